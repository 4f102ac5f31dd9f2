"""The sweep over the target size n (stages/sweep.py) on a copy of the fast pipeline's run: each n is a
run of its own sharing the main run's auxiliaries and shards, the targets are nested, and the summary has a
table and a plot per metric; under `submit` the sizes are an array job after the auxiliaries."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.manifest import load_manifest, shard_paths
from shards.populations import allocate_counts
from shards.stream import read_population
from tests.conftest import DIGITS, scorefuse
from stages.config import load_config
from stages import sweep as sweep_stage

pytestmark = pytest.mark.slow


def test_sweep_runs_every_size_and_summarises(finished_digits, tmp_path):
    run, overrides, _ = finished_digits
    root = tmp_path / "copy"
    shutil.copytree(run, root / "digits", ignore=shutil.ignore_patterns("sweep"))
    args = ["--config", DIGITS, *overrides, f"root={root}", "sweep.sizes=[8,16]"]
    out = scorefuse("sweep", *args).stderr
    sweep = root / "digits" / "sweep"
    assert (sweep / "sweep.md").is_file() and "summary in" in out
    summary = json.loads((sweep / "sweep.json").read_text())["data"]
    assert summary["sizes"] == [8, 16]
    nll = summary["metrics"]["NLL bits/dim"]
    assert set(nll) >= {"fused-exact", "fused-mixture", "target-scratch", "target-finetune"}
    assert all(nll["fused-exact"][str(n)]["se"] > 0 for n in (8, 16))
    for name in ("nll", "fd", "loss", "kid", "copies"):
        assert (sweep / f"{name}.png").is_file()
    md = (sweep / "sweep.md").read_text()
    assert "fused-exact against target-scratch on held-out NLL (paired):" in md
    assert "The targets are nested" in md

    small, large = (sweep / "n8" / "data"), (sweep / "n16" / "data")
    targets = [set(map(tuple, read_population(d, "target")[0].flatten(1).tolist())) for d in (small, large)]
    assert len(targets[0]) == 8 and len(targets[1]) == 16 and targets[0] < targets[1]  # nested
    manifest = load_manifest(small)
    assert all("../" in path for path in shard_paths(small, manifest, "aux-low"))  # the main run's shards
    assert read_population(small, "reference")[0].equal(read_population(root / "digits" / "data", "reference")[0])
    assert not (sweep / "n8" / "aux").exists()  # the main run's auxiliaries, not copies

    again = scorefuse("sweep", *args).stderr  # resumes: every stage of every size skips itself
    assert again.count("already finished") >= 2 * 4


def test_submit_queues_the_sizes_as_an_array_after_the_auxiliaries(tmp_path):
    out = scorefuse("submit", "--config", DIGITS, "--dry-run", f"root={tmp_path}", "sweep.sizes=[16,32]").stdout
    lines = {line.split("=", 1)[0]: line for line in out.splitlines()}
    assert '"--dependency=afterok:$train_aux" --array=0-1' in lines["sweep_runs"] and "n=16,32" in lines["sweep_runs"]
    assert '"--dependency=afterok:$sweep_runs"' in lines["sweep"]


def test_sizes_whose_rounding_breaks_nesting_are_named(monkeypatch):
    """Largest-remainder rounding of the digits' target mixture gives class 5 two images at n = 16 and one at
    n = 17: the n = 16 target is then not inside the n = 17 one, and the summary says so."""
    cfg = load_config(DIGITS, [])
    mixture = np.array([cfg.data.target.mixture[str(k)] for k in range(10)])
    histograms = {n: {str(k): int(c) for k, c in enumerate(allocate_counts(n, mixture))} for n in (16, 17, 32)}
    monkeypatch.setattr(sweep_stage, "load_manifest", lambda data: {"populations": {cfg.data.target.name: {
        "class_histogram": histograms[int(Path(data).parent.name[1:])]}}})
    assert "NOT nested at n = 16 -> 17:" in sweep_stage._nesting(cfg, [16, 17, 32])
    assert sweep_stage._nesting(cfg, [16, 32]).startswith("The targets are nested")
