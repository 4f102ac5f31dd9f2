"""The whole local pipeline through the CLI: prepare -> every auxiliary -> evaluate -> report."""
import json
import os

import numpy as np

from tests.conftest import DIGITS, FAST, SHORT_TRAIN, scorefuse


def test_run_writes_report_and_skips_finished_stages(tmp_path):
    out = scorefuse("run", "--config", DIGITS, f"root={tmp_path}", *FAST).stderr
    run = tmp_path / "digits"
    report = json.loads((run / "report.json").read_text())
    rows = {row["model"]: row for section in report["sections"] for row in section.get("rows", []) if "model" in row}
    assert set(rows) == {"aux/aux-low", "aux/aux-high", "aux/aux-even", "fused-exact", "fused-sgd", "fused-mixture",
                         "target-scratch",
                         "target-finetune", "checkpoint-merge", "distill", "real: held-out half vs half",
                         "real: target images as samples"}
    assert all(rows[m]["NLL bits/dim"] for m in rows if m != "distill" and not m.startswith("real"))
    assert rows["distill"]["NLL bits/dim"] is None and rows["real: target images as samples"]["copies %"] == 100
    assert all(rows[m]["fd_clf64 vs reference"]["low"] <= rows[m]["fd_clf64 vs reference"]["value"] <= rows[m]["fd_clf64 vs reference"]["high"] for m in rows)
    assert all(rows[m]["KID"]["std"] >= 0 for m in rows)
    md = (run / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Models and floors")
    assert "Held-out NLL:" in md and "Fusion (fused-exact) against target-scratch" in md
    mixture = json.loads((run / "fuse" / "mixture.json").read_text())
    assert abs(sum(mixture["router"]["pi"]) - 1) < 1e-9 and abs(sum(mixture["nll"]["pi"]) - 1) < 1e-9
    # EM on the likelihoods maximises that likelihood: the router's pi cannot reach a lower NLL with it
    assert mixture["nll"]["nll_bits_per_dim"] <= mixture["router"]["nll_bits_per_dim"] + 1e-9
    assert (run / "figures" / "copies-fused-exact.png").is_file()
    fit = json.loads((run / "fuse" / "lambda.json").read_text())
    assert fit["method"] == "exact" and abs(sum(fit["exact"]["lambda"][0]) - 1) < 1e-9
    assert fit["exact"]["loss"] <= min(fit["exact"]["vertex_losses"].values()) + 1e-12
    assert fit["exact"]["loss"] <= fit["sgd"]["loss"] + 1e-12
    assert (run / "fuse" / "lambda.png").is_file() and (run / "fuse" / "samples.png").is_file()
    for name in ("aux-low", "aux-high", "aux-even"):
        assert (run / "aux" / name / "samples.png").is_file()
        assert (run / "aux" / name / "ema.safetensors").is_file()
    assert "report in" in out

    again = scorefuse("run", "--config", DIGITS, f"root={tmp_path}", *FAST)
    assert "shards up to date" in again.stderr
    assert json.loads((run / "report.json").read_text()) == report  # the cached samples give the same numbers
    assert (run / "distill" / "generator.safetensors").is_file() and (run / "distill" / "samples.png").is_file()
    # 3 auxiliaries, the fuse stage, the 3 baselines and distill
    assert again.stderr.count("already finished") == 8


def test_changed_populations_are_refused_not_overwritten(tmp_path):
    scorefuse("prepare", "--config", DIGITS, f"root={tmp_path}")
    manifest = (tmp_path / "digits" / "data" / "manifest.json").read_text()
    proc = scorefuse("prepare", "--config", DIGITS, f"root={tmp_path}", "data.target.count=32", check=False)
    assert proc.returncode == 2 and "different" in proc.stderr
    assert (tmp_path / "digits" / "data" / "manifest.json").read_text() == manifest


def test_train_aux_before_prepare_says_so(tmp_path):
    proc = scorefuse("train-aux", "--config", DIGITS, f"root={tmp_path}", "aux=aux-low", check=False)
    assert proc.returncode == 2 and "scorefuse prepare" in proc.stderr


def test_unknown_aux_is_named(tmp_path):
    proc = scorefuse("train-aux", "--config", DIGITS, f"root={tmp_path}", "aux=nope", check=False)
    assert proc.returncode == 2 and "aux=nope" in proc.stderr and "aux-low" in proc.stderr


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


def test_fuse_without_auxiliaries_names_the_missing_one(digits_run):
    proc = scorefuse("fuse", "--config", DIGITS, f"root={digits_run.parent}", check=False)
    assert proc.returncode == 2
    assert "auxiliary aux-low" in proc.stderr and "train-aux aux=aux-low" in proc.stderr
    assert not (digits_run / "fuse" / "lambda.json").exists()


def test_sample_reproduces_the_report_images_with_any_batch_size(finished_digits, tmp_path):
    """Every label of report.json: the same n images for eval.batch 5 and 16 (per-image seeds); out= says
    what to write by its suffix."""
    run, overrides, _ = finished_digits
    report = json.loads((run / "report.json").read_text())
    labels = [row["model"] for section in report["sections"] for row in section.get("rows", [])
              if "model" in row and not row["model"].startswith("real:")]
    assert len(labels) == 10
    for label in labels:
        arrays = []
        for batch in (5, 16):
            out = tmp_path / f"{label.replace('/', '_')}-{batch}.npz"
            scorefuse("sample", "--config", DIGITS, *overrides, f"model={label}", "n=16", f"out={out}", f"eval.batch={batch}")
            arrays.append(np.load(out)["images"])
        assert arrays[0].shape == (16, 16, 16, 1) and np.array_equal(arrays[0], arrays[1]), label
    scorefuse("sample", "--config", DIGITS, *overrides, "model=distill", "n=4", f"out={tmp_path / 'grid.png'}")
    assert (tmp_path / "grid.png").is_file()
    proc = scorefuse("sample", "--config", DIGITS, *overrides, "model=fused", "n=4", check=False)
    assert proc.returncode == 2 and "fused-exact" in proc.stderr  # the error lists the labels


def test_evaluate_again_reuses_every_sample(finished_digits):
    run, overrides, _ = finished_digits
    cached = {p: p.stat().st_mtime_ns for p in (run / "eval_cache").glob("*.npz")}
    report = (run / "report.json").read_text()
    scorefuse("evaluate", "--config", DIGITS, *overrides)
    assert {p: p.stat().st_mtime_ns for p in (run / "eval_cache").glob("*.npz")} == cached
    assert (run / "report.json").read_text() == report


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
    assert "kimg, loss" in stderr and "evaluate: report in" in stderr
    stages = [run / "aux" / "aux-low", run / "fuse" / "sgd", run / "router", run / "baselines" / "target-scratch",
              run / "baselines" / "target-finetune", run / "distill"]
    assert all(list((stage / "tensorboard").glob("events.out.tfevents.*")) for stage in stages)
