"""Sample grids and the reports: sizes, contents, atomic writes; the run report as a view of the measurements."""
import json

import pytest
import torch
from PIL import Image

from evaluation import plots
from evaluation.grid import PADDING, save_grid
from evaluation.report import write_report
from evaluation.run_report import write_run_report
from evaluation.verdict import verdict
from shards.pixels import to_uint8
from tests.constructed_measurements import measurements, model


@pytest.mark.parametrize("b, c, nrow, scale, cells", [
    (10, 1, 4, 3, (4, 3)),      # 4 per row -> 3 rows, the last one partial
    (4, 3, None, 1, (2, 2)),    # default: near-square
    (3, 1, 8, 2, (3, 1)),       # fewer images than nrow: no empty columns
])
def test_grid_size(tmp_path, b, c, nrow, scale, cells):
    path = tmp_path / "samples.png"
    save_grid(torch.rand(b, c, 16, 16) * 2 - 1, path, nrow=nrow, scale=scale)
    picture = Image.open(path)
    columns, rows = cells
    assert picture.size == ((columns * (16 + PADDING) + PADDING) * scale, (rows * (16 + PADDING) + PADDING) * scale)
    assert picture.mode == ("L" if c == 1 else "RGB")
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"], "no temporary file may be left behind"


def test_grid_pixels_are_the_quantised_images(tmp_path):
    images = torch.stack([torch.full((1, 16, 16), -1.0), torch.full((1, 16, 16), 1.0)])
    save_grid(images, tmp_path / "g.png", nrow=2, scale=4)
    picture = Image.open(tmp_path / "g.png")
    second_cell_centre = ((PADDING + 16 + PADDING + 8) * 4, (PADDING + 8) * 4)
    assert picture.getpixel(second_cell_centre) == 255
    assert picture.getpixel(((PADDING + 8) * 4, (PADDING + 8) * 4)) == 0
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


def test_report_markdown_and_json(tmp_path):
    models = [
        {"model": "aux0", "fd_digits2k": 3.14159265, "lambda": 0.25, "seconds": 12},
        {"model": "fused", "fd_digits2k": 1.23456e-5, "lambda": None},
        {"model": "distilled", "fd_digits2k": 1234.5678, "note": "a|b"},
    ]
    sections = [("Models", models), ("Empty", [])]
    write_report(tmp_path / "report.md", "Digits run", sections, notes=["FID on 2k samples is not fid50k"])

    markdown = (tmp_path / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "# Digits run"
    header = lines.index("| model | fd_digits2k | lambda | seconds | note |")
    assert lines[header + 2] == "| aux0 | 3.142 | 0.25 | 12 | — |"
    assert lines[header + 3] == "| fused | 1.235e-05 | — | — | — |"
    assert lines[header + 4] == "| distilled | 1235 | — | — | a\\|b |"
    assert "(no rows)" in markdown and "- FID on 2k samples is not fid50k" in markdown

    document = json.loads((tmp_path / "report.json").read_text())
    assert document == {
        "title": "Digits run",
        "sections": [{"name": "Models", "rows": models}, {"name": "Empty", "rows": []}],
        "notes": ["FID on 2k samples is not fid50k"],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_the_run_report_is_a_view_of_the_measurements(tmp_path):
    """report.md and report.json from made-up measurements alone: the verdict, each entry's row in the report's
    units and roundings (the Fréchet cell without its rounds), and the comparisons with their Holm-adjusted p."""
    made = measurements({
        "fused-exact": model([1.0, 1.5], loss=[0.25, 0.75], weights=[[0.25, 0.75], [0.5, 0.5]], fit_gap_percent=0.0,
                             classes=[0.3, 0.7], reference_classes=[0.5, 0.5], nfe=21, samples_per_second=12.345,
                             fit_minutes=0.126),
        "fused-mixture": model([1.25, 1.5]),
        "target-scratch": model([2.0, 2.5], fd=(20.0, 18.0, 22.0), fd_own_population=3.14159,
                                fd_at_floor_size=2.71828)},
        floors={"real: target images as samples": model(fd=(1.0, None, None), copy_share=1.0, nn=(0.0, 33.333))},
        sweep_n=16)
    write_run_report(tmp_path / "report.md", made)
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["title"] == "scorefuse report: digits, sweep run at target size n = 16"
    sections = {s["name"]: s.get("rows", s.get("text")) for s in document["sections"]}
    assert list(sections) == ["Verdict", "Models and floors", "Fusion against the baselines and the controls",
                              "Populations"]
    assert sections["Verdict"] == verdict(made)
    rows = {row["model"]: row for row in sections["Models and floors"]}
    assert rows["fused-exact"] == {
        "model": "fused-exact", "NLL bits/dim": {"mean": 1.25, "se": 0.25}, "held-out loss": {"mean": 0.5, "se": 0.25},
        "fd_clf64 vs reference": {"value": 10.0, "low": 8.0, "high": 12.0}, "KID": {"mean": 0.5, "std": 0.25},
        "copies %": 0.0, "NN train": 40.0, "NN held-out": 40.0, "class TV": 0.2, "class proportions": "0.30 0.70",
        "NFE": 21, "samples/s": 12.3, "fit minutes": 0.13, "weights": "0.25 0.75 | 0.50 0.50", "fit gap %": 0.0,
        "what": "made up"}
    assert rows["target-scratch"]["fd_clf64 vs reference own population"] == 3.142
    assert rows["target-scratch"]["FD at floor size"] == 2.718 and "FD at floor size" not in rows["fused-exact"]
    floor = rows["real: target images as samples"]
    assert floor["fd_clf64 vs reference"] == 1.0 and floor["copies %"] == 100.0 and floor["NLL bits/dim"] is None
    table = sections["Fusion against the baselines and the controls"]
    assert [(c["fused"], c["against"], c["NLL"], c["FD"]) for c in table] == [
        ("fused-exact", "target-scratch", "better", "better"), ("fused-mixture", "target-scratch", "better", "better"),
        ("fused-mixture", "fused-exact", "indistinguishable", "indistinguishable")]
    # 6 tests; the FD differences have no noise (the rounds share everything): p = 0, or 1 for equal distances
    assert table[0]["FD difference"] == {"value": -10.0, "low": -10.0, "high": -10.0}
    assert table[0]["FD p (Holm)"] == 0.0
    # fused-mixture - fused-exact = (0.25, 0) per image: +0.125 ± 0.125, p = erfc(1 / sqrt 2) = 0.317, the 5th
    # smallest of 6 p-values: Holm doubles it
    mixture = made["comparisons"][2]["nll_difference"]
    assert table[2]["NLL difference"] == pytest.approx({"mean": 0.125, "se": 0.125}, abs=1e-15)
    assert table[2]["NLL p (Holm)"] == mixture["p_holm"] == pytest.approx(2 * 0.31731050786291415, abs=1e-12)
    markdown = (tmp_path / "report.md").read_text()
    assert "| real: target images as samples | — | — | 1 | 0.5 ± 0.25 | 100 | 0 | 33.33 |" in markdown
    assert "Held-out NLL by class" not in markdown  # no labels, no table
    assert "the classifier itself is 0.010 from the true target mixture" in markdown


def test_the_report_has_the_nll_by_class_where_the_images_have_labels(tmp_path):
    """Classes "0" and "1" of four held-out images labelled 0, 1, 0, 1: a row per model with its NLL, a column
    per class."""
    made = measurements({"fused-exact": model([1.0, 2.0, 1.5, 3.0], nll_labels=[0, 1, 0, 1], class_count=2),
                         "distill": model(None)})
    write_run_report(tmp_path / "report.md", made)
    sections = {s["name"]: s.get("rows", s.get("text")) for s in json.loads((tmp_path / "report.json").read_text())
                ["sections"]}
    assert list(sections)[:3] == ["Verdict", "Models and floors", "Held-out NLL by class"]
    assert sections["Held-out NLL by class"] == [{"NLL of": "fused-exact", "0": {"mean": 1.25, "se": 0.25},
                                                  "1": {"mean": 2.5, "se": 0.5}}]
    assert "| fused-exact | 1.25 ± 0.25 | 2.5 ± 0.5 |" in (tmp_path / "report.md").read_text()


def test_the_nll_note_says_when_the_images_are_upsampled(tmp_path):
    """The 8x8 digits at 16x16: 192 of 256 dimensions interpolate the other 64, and the NLL's note says so; at the
    native size, or for a source whose images vary in size, it says nothing of it."""
    made = measurements({"fused-exact": model([1.0, 2.0, 1.5, 3.0])})
    for size, native, said in ((16, 8, True), (8, 8, False), (16, None, False)):
        made["settings"].update(image_size=size, native_size=native)
        write_run_report(tmp_path / "report.md", made)
        text = (tmp_path / "report.md").read_text()
        assert ("the source's 8x8 upsampled to 16x16: 192 of every 256 dimensions" in text) == said, (size, native)
        assert ("data.source.image_size=8 measures the images themselves" in text) == said


def test_the_report_shows_the_mixture_router_by_noise_level(tmp_path):
    """A row per sigma band, rounded; the note names chance, ln K for the mixture's K weights."""
    bands = [{"sigma_low": 0.002, "sigma_high": 0.0117851, "images": 340, "cross_entropy": 0.12345,
              "accuracy": 0.95678, "ece": 0.01234},
             {"sigma_low": 13.5747, "sigma_high": 80.0, "images": 0, "cross_entropy": None, "accuracy": None, "ece": None}]
    made = measurements({"fused-exact": model([1.0, 2.0]), "fused-mixture": model([1.5, 2.0], weights=[0.5, 0.5])},
                        router_calibration=bands)
    write_run_report(tmp_path / "report.md", made)
    sections = {s["name"]: s.get("rows", s.get("text")) for s in json.loads((tmp_path / "report.json").read_text())
                ["sections"]}
    assert sections["The mixture's router by noise level"] == [
        {"sigma": "0.002 to 0.0118", "images": 340, "cross-entropy, nats": 0.123, "accuracy": 0.957,
         "calibration error": 0.012},
        {"sigma": "13.6 to 80", "images": 0, "cross-entropy, nats": None, "accuracy": None, "calibration error": None}]
    assert "(chance: ln 2 = 0.693)" in (tmp_path / "report.md").read_text()
    write_run_report(tmp_path / "plain.md", measurements({"fused-exact": model([1.0, 2.0])}))
    assert "router by noise level" not in (tmp_path / "plain.md").read_text()


def test_the_sweep_plot_draws_bands_and_reads_n_over_the_auxiliary_size(tmp_path, monkeypatch):
    """Each method a line with its interval as a band; with N_aux, a top axis whose ticks are n / N_aux."""
    kept = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: kept.append(figure))
    series = {"fused-exact": [(64, 2.0, 1.9, 2.1), (256, 1.8, 1.75, 1.85)], "target-scratch": [(64, 3.0, 2.8, 3.2)]}
    plots.metric_vs_n(series, tmp_path / "nll.png", "NLL bits/dim", "NLL vs n", aux_images=1000)
    (axes,) = kept[0].axes[:1]
    assert [line.get_label() for line in axes.get_lines()] == ["fused-exact", "target-scratch"]
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(1.75) and band[:, 1].max() == pytest.approx(2.1)
    (top,) = axes.child_axes
    assert list(top.get_xticks()) == pytest.approx([0.064, 0.256])
    assert top.get_xlabel() == "n / N_aux (N_aux = 1000 images per auxiliary)"
    plots.metric_vs_n(series, tmp_path / "nll.png", "NLL bits/dim", "NLL vs n")
    assert kept[1].axes[0].child_axes == []
