"""The whole local pipeline through the CLI: prepare -> every auxiliary -> evaluate -> report."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from evaluation.cache import ResultCache
from evaluation.features import weights_fingerprint
from shards.errors import ConfigError
from shards.manifest import image_shape, load_manifest
from stages.catalogue import draw, find, finished_models
from stages.config import extractor_for, load_config
from stages.rundir import RunDir
from stages.sample import command, run as sample
from trainer.export import load_denoiser
from tests.conftest import DIGITS, SHORT_TRAIN, scorefuse, scorefuse_here


@pytest.mark.slow  # the shared finished run: the whole pipeline, about a minute
def test_run_writes_report_and_skips_finished_stages(finished_digits, tmp_path):
    """The shared fast run (conftest's finished_digits) has every model in its report; `run` again on a copy of
    it skips every finished stage and re-evaluates from the cache alone: not one cached sample, NLL or loss is
    computed again, and the report is the same."""
    finished, overrides, out = finished_digits
    report = json.loads((finished / "report.json").read_text())
    rows = {row["model"]: row for section in report["sections"] for row in section.get("rows", []) if "model" in row}
    assert set(rows) == {"aux/aux-low", "aux/aux-high", "aux/aux-even", "fused-exact", "fused-sgd", "fused-mixture",
                         "fused-hybrid", "fused-uniform", "target-scratch",
                         "target-finetune", "checkpoint-merge", "seed-ensemble", "distill", "real: held-out half vs half",
                         "real: target images as samples"}
    assert all(rows[m]["NLL bits/dim"] for m in rows if m != "distill" and not m.startswith("real"))
    assert all(rows[m]["NLL step error"]["se"] > 0 for m in rows if m != "distill" and not m.startswith("real"))
    assert rows["distill"]["NLL bits/dim"] is None and rows["real: target images as samples"]["copies %"] == 100
    # copies of the auxiliaries' images for every model, of the teacher's samples for the one-step generator
    assert all(0 <= rows[m]["copies aux %"] <= 100 for m in rows if not m.startswith("real"))
    assert 0 <= rows["distill"]["copies teacher %"] <= 100 and "copies teacher %" not in rows["fused-exact"]
    assert all(rows[m]["fd_clf64 vs reference"]["low"] <= rows[m]["fd_clf64 vs reference"]["value"] <= rows[m]["fd_clf64 vs reference"]["high"] for m in rows)
    assert all(rows[m]["KID"]["std"] >= 0 for m in rows)
    md = (finished / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Models and floors")
    assert "Held-out NLL:" in md and "Fusion (fused-exact) against target-scratch" in md
    mixture = json.loads((finished / "fuse" / "mixture.json").read_text())
    assert abs(sum(mixture["router"]["pi"]) - 1) < 1e-9 and abs(sum(mixture["nll"]["pi"]) - 1) < 1e-9
    # EM on the likelihoods maximises that likelihood: the router's pi cannot reach a lower NLL with it
    assert mixture["nll"]["nll_bits_per_dim"] <= mixture["router"]["nll_bits_per_dim"] + 1e-9
    bands = mixture["router_calibration"]  # six bands of ln sigma over [0.002, 80], every image in one
    assert bands[0]["sigma_low"] == pytest.approx(0.002) and bands[-1]["sigma_high"] == pytest.approx(80)
    assert len(bands) == 6 and sum(b["images"] for b in bands) >= 2048
    router_table = next(s["rows"] for s in report["sections"] if s["name"] == "The mixture's router by noise level")
    assert [row["images"] for row in router_table] == [b["images"] for b in bands]
    assert (finished / "figures" / "copies-fused-exact.png").is_file()
    fit = json.loads((finished / "fuse" / "lambda.json").read_text())
    assert fit["method"] == "exact" and abs(sum(fit["exact"]["lambda"][0]) - 1) < 1e-9
    assert fit["exact"]["loss"] <= min(fit["exact"]["vertex_losses"].values()) + 1e-12
    assert fit["exact"]["loss"] <= fit["sgd"]["loss"] + 1e-12
    assert fit["exact"]["loss"] <= fit["uniform"]["loss"] + 1e-12 and fit["uniform"]["lambda"] == [[1 / 3] * 3]
    assert (finished / "fuse" / "lambda.png").is_file() and (finished / "fuse" / "samples.png").is_file()
    for name in ("aux-low", "aux-high", "aux-even"):
        assert (finished / "aux" / name / "samples.png").is_file()
        assert (finished / "aux" / name / "ema.safetensors").is_file()
    assert (finished / "distill" / "generator.safetensors").is_file() and (finished / "distill" / "samples.png").is_file()
    assert "report in" in out

    run = tmp_path / "digits"
    shutil.copytree(finished, run)
    cached = {p: p.stat().st_mtime_ns for p in (run / "eval_cache").glob("*.npz")}
    assert len([p for p in cached if p.name.startswith("samples-")]) == 13  # one per model
    again = scorefuse("run", "--config", DIGITS, f"root={tmp_path}", *overrides[1:])
    assert "shards up to date" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (run / "eval_cache").glob("*.npz")} == cached
    assert json.loads((run / "report.json").read_text()) == report  # the cached samples give the same numbers
    assert (run / "report.md").read_text() == md
    # 3 auxiliaries, the fuse stage, the 3 baselines, the seed ensemble and distill
    assert again.stderr.count("already finished") == 9


@pytest.mark.slow  # the shared finished run
def test_the_seed_ensemble_averages_the_best_auxiliary_and_its_copies(finished_digits):
    """seed-ensemble, the control for plain ensembling: the auxiliary with the lowest target loss and
    fuse.ensemble_copies copies of it, trained on its population with seeds of their own (so their weights
    differ), their denoisers averaged with equal weights."""
    finished, overrides, _ = finished_digits
    cfg = load_config(DIGITS, overrides)
    losses = json.loads((finished / "fuse" / "lambda.json").read_text())["exact"]["vertex_losses"]
    best = min(losses, key=losses.get)
    done = json.loads((finished / "baselines" / "seed-ensemble" / "done.json").read_text())
    assert (done["population"], done["copies"]) == (best, 2)
    run = RunDir.of(cfg)
    members = [load_denoiser(run.aux(best)), *(load_denoiser(run.ensemble_copy(c)) for c in (1, 2))]
    assert all(meta["population"] == best for _, meta in members)
    weights = [dict(m.named_parameters()) for m, _ in members]
    name = next(iter(weights[0]))
    assert not torch.equal(weights[0][name], weights[1][name]) and not torch.equal(weights[1][name], weights[2][name])
    model = find(cfg, "seed-ensemble")
    assert model.facts["weights"] == [1 / 3] * 3 and model.facts["population"] == best
    x, sigma = torch.randn([4, *image_shape(load_manifest(run.data))], generator=torch.Generator().manual_seed(0)), 0.7
    with torch.no_grad():
        expected = sum(m(x, sigma) for m, _ in members) / 3
        torch.testing.assert_close(model.load()(x, sigma), expected, rtol=1e-5, atol=1e-5)


def test_changed_populations_are_refused_not_overwritten(digits_run, capfd):
    manifest = (digits_run / "data" / "manifest.json").read_text()
    code, _, err = scorefuse_here(capfd, "prepare", "--config", DIGITS, f"root={digits_run.parent}",
                               "data.target.count=32")
    assert code == 2 and "different" in err
    assert (digits_run / "data" / "manifest.json").read_text() == manifest


def test_train_aux_before_prepare_says_so(tmp_path, capfd):
    code, _, err = scorefuse_here(capfd, "train-aux", "--config", DIGITS, f"root={tmp_path}", "aux=aux-low")
    assert code == 2 and "scorefuse prepare" in err


def test_unknown_aux_is_named(tmp_path, capfd):
    code, _, err = scorefuse_here(capfd, "train-aux", "--config", DIGITS, f"root={tmp_path}", "aux=nope")
    assert code == 2 and "aux=nope" in err and "aux-low" in err


def test_corrupt_shards_stop_training_with_one_line_naming_the_file(digits_run):
    for shard in (digits_run / "data" / "aux-low").glob("*.tar"):
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 3])
    proc = scorefuse("train-aux", "--config", DIGITS, f"root={digits_run.parent}", "aux=aux-low",
                     *SHORT_TRAIN, "train.total_kimg=0.64", "data.workers=1", "data.max_bad_samples=2", check=False)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if "scorefuse: error:" in line]
    assert len(error) == 1 and "aux-low" in error[0] and ".tar" in error[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_fuse_without_auxiliaries_names_the_missing_one(digits_run, capfd):
    code, _, err = scorefuse_here(capfd, "fuse", "--config", DIGITS, f"root={digits_run.parent}")
    assert code == 2
    assert "auxiliary aux-low" in err and "train-aux aux=aux-low" in err
    assert not (digits_run / "fuse" / "lambda.json").exists()


def cached_samples(cfg, model) -> torch.Tensor:
    """The uint8 images [N, C, H, W] that `evaluate` scored for `model`: the "samples" entry of the evaluation
    cache (evaluation/cache.py), under the key stages/evaluate.py's measure() gives it."""
    run, e, ev = RunDir.of(cfg), cfg.edm, cfg.eval
    weights = str(run.classifier) if extractor_for(cfg) == "classifier" else ev.inception_weights
    key = {"model": model.fingerprint(), "n": ev.num_samples, "seed": cfg.train.seed,
           "features": weights_fingerprint(weights),
           **({} if model.one_step else {"steps": e.sampler_steps, "sigma_min": e.sigma_min,
                                         "sigma_max": e.sigma_max, "rho": e.rho}),
           **({"precision": ev.sample_precision} if ev.sample_precision != "no" else {})}
    path = ResultCache(run.eval_cache).path("samples", key)
    assert path.is_file(), f"{model.label}: no cached samples at {path}"
    with np.load(path) as stored:
        return torch.from_numpy(stored["images"])


@pytest.mark.slow  # the shared finished run: the whole pipeline, about a minute
def test_sample_draws_the_images_the_report_scored(finished_digits, tmp_path):
    """For every model of the report, `sample` (stages/catalogue.py's draw) at the run's eval.sample_batch gives
    bit for bit the images `evaluate` scored and cached, in one call or in two chunks that split a group. At
    another eval.sample_batch image i is still the same in one call or in chunks, bit for bit; it is not compared
    with the report's: a network's rounding depends on its batch's shape (evaluation/spec.py; measured here:
    fused-sgd's images at sample_batch 5, 8 or 12 differ from the report's by one grey level in one pixel).
    `scorefuse sample` writes the images as its out= suffix says; a label that is not in the report is one line
    listing the labels, exit 2. Nothing here writes into the shared run."""
    run, overrides, _ = finished_digits
    runs_batch = load_config(DIGITS, overrides).eval.sample_batch
    assert runs_batch != 8
    configs = [load_config(DIGITS, [*overrides, f"eval.sample_batch={b}"]) for b in (runs_batch, 8)]
    models = finished_models(configs[0])
    report = json.loads((run / "report.json").read_text())
    assert [m.label for m in models] == [row["model"] for section in report["sections"]
                                         for row in section.get("rows", [])
                                         if "model" in row and not row["model"].startswith("real:")]
    shape = image_shape(load_manifest(run / "data"))
    n, cut = 20, 7  # part of one group of the run's size, three groups of 8; the cut inside a group of both
    for model in models:
        scored = cached_samples(configs[0], model)
        assert scored.shape == (64, *shape) and scored.dtype == torch.uint8
        network = model.load()
        for cfg in configs:
            sampler = model.sampler(network, cfg)
            whole = draw(sampler, cfg, range(n), shape, torch.device("cpu"))
            chunks = torch.cat([draw(sampler, cfg, range(0, cut), shape, torch.device("cpu")),
                                draw(sampler, cfg, range(cut, n), shape, torch.device("cpu"))])
            assert torch.equal(chunks, whole), (model.label, cfg.eval.sample_batch)
            if cfg is configs[0]:
                assert torch.equal(whole, scored[:n]), model.label

    exact = next(m for m in models if m.label == "fused-exact")
    written = sample(configs[0], "fused-exact", 5, str(tmp_path / "five.npz"))
    images = np.load(written)["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8  # the digits at their 8x8
    assert np.array_equal(images, cached_samples(configs[0], exact)[:5].permute(0, 2, 3, 1).numpy())
    assert sample(configs[0], "distill", 4, str(tmp_path / "grid.png")).is_file()
    folder = sample(configs[0], "aux/aux-low", 3, str(tmp_path / "pngs"))
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    command(configs[0], {"model": "target-scratch", "n": "2", "out": str(tmp_path / "two.npz")}, None)
    expected = cached_samples(configs[0], find(configs[0], "target-scratch"))[:2]
    assert np.array_equal(np.load(tmp_path / "two.npz")["images"], expected.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ConfigError, match="positive whole number"):
        command(configs[0], {"model": "distill", "n": "-3"}, None)
    proc = scorefuse("sample", "--config", DIGITS, *overrides, "model=fused", "n=4", f"out={tmp_path / 'no.npz'}",
                     check=False)
    assert proc.returncode == 2 and "fused-exact" in proc.stderr  # one line listing the labels
    assert not (tmp_path / "no.npz").exists()


@pytest.mark.slow  # the shared finished run: the whole pipeline, about a minute
def test_results_are_readable_logs_are_lines_and_every_stage_has_tensorboard(finished_digits):
    """Files get the user's umask (no 0600 files from the atomic writer), a log off a terminal holds plain
    lines (no progress-bar fragments, no DeepSpeed accelerator notice), and every training run of the
    pipeline wrote TensorBoard events (train.log_with=tensorboard in configs/digits.yaml)."""
    run, _, stderr = finished_digits
    umask = os.umask(0)
    os.umask(umask)
    modes = {p: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert modes and all(mode == 0o666 & ~umask for mode in modes.values()), \
        sorted((oct(m), str(p)) for p, m in modes.items() if m != 0o666 & ~umask)[:5]
    assert "\r" not in stderr and "Setting accelerator to CPU" not in stderr
    assert "kimg, loss" in stderr
    assert any(line.startswith("evaluate:") and "report in" in line for line in stderr.splitlines())
    stages = [run / "aux" / "aux-low", run / "fuse" / "sgd", run / "router", run / "baselines" / "target-scratch",
              run / "baselines" / "target-finetune", run / "distill"]
    assert all(list((stage / "tensorboard").glob("events.out.tfevents.*")) for stage in stages)
