"""Sample grids and the run report: sizes, contents, atomic writes."""
import json

import pytest
import torch
from PIL import Image

from evaluation.grid import PADDING, save_grid
from evaluation.report import write_report
from shards.pixels import to_uint8


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
