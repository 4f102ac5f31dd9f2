"""The sweep over the target size n (stages/sweep.py) on a copy of the fast pipeline's run: each n is a
run of its own sharing the main run's auxiliaries and shards, the targets are nested, and the summary has a
table and a plot per metric; under `submit` the sizes are an array job after the auxiliaries. The summary is
a view of each size's measurements file: made-up ones give known findings and tables."""
import json
import shutil

import pytest

from evaluation.measurements import read_measurements, write_measurements
from shards.manifest import load_manifest, shard_paths
from shards.stream import read_population
from tests.conftest import DIGITS, scorefuse
from tests.constructed_measurements import measurements, model, plus
from stages.config import load_config, sweep_member
from stages.rundir import RunDir
from stages import sweep as sweep_stage


@pytest.mark.slow
def test_sweep_runs_every_size_and_summarises(finished_digits, tmp_path):
    run, overrides, _ = finished_digits
    root = tmp_path / "copy"
    shutil.copytree(run, root / "digits", ignore=shutil.ignore_patterns("sweep"))
    args = ["--config", DIGITS, *overrides, f"root={root}", "sweep.sizes=[8,16]", "sweep.replicates=2",
            "sweep.aux_seeds=true", "fuse.hybrid_sigma=null"]  # the ablation row, which the finished run's report covers
    out = scorefuse("sweep", *args).stderr
    sweep = root / "digits" / "sweep"
    assert (sweep / "sweep.md").is_file() and "summary in" in out
    summary = json.loads((sweep / "sweep.json").read_text())["data"]
    assert summary["sizes"] == [8, 16]
    nll = summary["metrics"]["NLL bits/dim"]
    assert set(nll) >= {"fused-exact", "fused-mixture", "target-scratch", "target-finetune"}
    # two replicates: a cell is their mean ± std, which the fine-tune's target draws move
    assert all(nll["target-finetune"][str(n)]["std"] > 0 for n in (8, 16))
    for name in ("nll", "fd", "loss", "kid", "copies"):
        assert (sweep / f"{name}.png").is_file()
    md = (sweep / "sweep.md").read_text()
    assert "fused-exact against target-scratch on held-out NLL (paired):" in md
    assert sweep_stage.NESTED in md

    small, large = (sweep / "n8" / "data"), (sweep / "n16" / "data")
    targets = [set(map(tuple, read_population(d, "target")[0].flatten(1).tolist())) for d in (small, large)]
    assert len(targets[0]) == 8 and len(targets[1]) == 16 and targets[0] < targets[1]  # nested
    manifest = load_manifest(small)
    assert all("../" in path for path in shard_paths(small, manifest, "aux-low"))  # the main run's shards
    assert read_population(small, "reference")[0].equal(read_population(root / "digits" / "data", "reference")[0])
    assert not (sweep / "n8" / "aux").exists()  # the main run's auxiliaries, not copies

    other = read_population(sweep / "n8-r1" / "data", "target")[0]  # replicate 1: another draw of 8 images
    assert len(other) == 8 and set(map(tuple, other.flatten(1).tolist())) != targets[0]
    assert json.loads((sweep / "sweep.json").read_text())["data"]["replicates"] == 2
    # sweep.aux_seeds: replicate 1 trained auxiliaries of its own, with other seeds, and its runs use them (same
    # held-out images and draws: the main auxiliary's NLL is the same at every n, replicate 1's differs)
    aux = root / "digits" / "aux"
    for name in ("aux-low", "aux-high", "aux-even"):
        assert (aux / f"{name}-r1" / "done.json").is_file()
        assert (aux / f"{name}-r1" / "ema.safetensors").read_bytes() != (aux / name / "ema.safetensors").read_bytes()
    nll = {member: read_measurements(sweep / member / "measurements.json")["models"]["aux/aux-low"]["nll"]["mean"]
           for member in ("n8", "n16", "n8-r1", "n16-r1")}
    assert nll["n8"] == nll["n16"] and nll["n8-r1"] == nll["n16-r1"] and nll["n8"] != nll["n8-r1"]
    assert "its own training of the auxiliaries" in md

    again = scorefuse("sweep", *args).stderr  # resumes: every stage of every size and replicate skips itself
    assert again.count("already finished") >= 2 * 2 * 4


@pytest.mark.slow
def test_submit_queues_the_sizes_as_an_array_after_the_auxiliaries(tmp_path):
    out = scorefuse("submit", "--config", DIGITS, "--dry-run", f"root={tmp_path}", "sweep.sizes=[16,32]",
                    "sweep.aux_seeds=false").stdout
    lines = {line.split("=", 1)[0]: line for line in out.splitlines()}
    assert '"--dependency=afterok:$train_aux" --array=0-1' in lines["sweep_runs"] and "n=16,32" in lines["sweep_runs"]
    assert '"--dependency=afterok:$sweep_runs"' in lines["sweep"]
    # with sweep.aux_seeds, each replicate's own auxiliaries train (an array over them) before any size's run
    out = scorefuse("submit", "--config", DIGITS, "--dry-run", f"root={tmp_path}", "sweep.sizes=[16,32]",
                    "sweep.replicates=3", "sweep.aux_seeds=true").stdout
    lines = {line.split("=", 1)[0]: line for line in out.splitlines()}
    for r, after in ((1, "train_aux"), (2, "train_aux_r1")):
        assert f'"--dependency=afterok:${after}" --array=0-2' in lines[f"train_aux_r{r}"]
        assert "aux=aux-low,aux-high,aux-even" in lines[f"train_aux_r{r}"] and f"sweep.replicate={r}" in lines[f"train_aux_r{r}"]
    assert '"--dependency=afterok:$train_aux_r2" --array=0-1' in lines["sweep_runs"]


def test_the_summary_is_a_view_of_each_sizes_measurements(tmp_path):
    """Measurements files written here for n = 8 and 16: fused-exact beats target-scratch on NLL at n = 8 (paired
    difference -1.0 ± 0.04) and ties it at n = 16 (-0.005 ± 0.012), and on the Fréchet distance it is lower at
    both by a difference without noise (the rounds share everything but the value); sweep.md says so, after Holm
    over the sweep's 4 tests, and sweep.json holds the members' numbers as they are."""
    cfg = load_config(DIGITS, [f"root={tmp_path}", "sweep.sizes=[16,8]", "sweep.replicates=1"])
    fused, loss = [2.0, 2.2, 2.4, 2.6], [0.5, 0.7]
    made = {8: measurements({"fused-exact": model(fused, loss=loss),
                             "target-scratch": model(plus(fused, [1.0, 1.1, 0.9, 1.0]), fd=(20.0, 18.0, 22.0), loss=loss)},
                            floors={"real: held-out half vs half": model(fd=(1.0, 0.5, 1.5))}, sweep_n=8),
            16: measurements({"fused-exact": model(fused, fd=(9.0, 8.0, 10.0), loss=loss),
                              "target-scratch": model(plus(fused, [0.02, -0.02, 0.03, -0.01]), fd=(15.0, 14.0, 16.0),
                                                      loss=loss)},
                             floors={"real: held-out half vs half": model(fd=(1.0, 0.5, 1.5))}, sweep_n=16)}
    for n, m in made.items():
        write_measurements(RunDir.of(sweep_member(cfg, n)).measurements, m)

    sweep_stage.summarise(cfg)
    sweep = RunDir.of(cfg).sweep
    md = (sweep / "sweep.md").read_text()
    assert "- fused-exact against target-scratch on held-out NLL (paired): better at n = 8; indistinguishable at " \
           "n = 16.\n" in md
    assert "- fused-exact against target-scratch on Fréchet distance (paired rounds): better at n = 8, 16.\n" in md
    assert "one family of 4 paired tests (2 on NLL, 2 on the Fréchet distance), Holm-adjusted together" in md
    assert "| fused-exact | 2.3 ± 0.13 | 2.3 ± 0.13 |" in md and f"- {sweep_stage.NESTED}" in md
    data = json.loads((sweep / "sweep.json").read_text())["data"]
    assert data["sizes"] == [8, 16]
    assert set(data["metrics"]) == {"NLL bits/dim", "held-out loss", "KID", "copies %", "fd_clf64 vs reference"}
    nll = data["metrics"]["NLL bits/dim"]
    assert list(nll) == ["fused-exact", "target-scratch", "real: held-out half vs half"]
    scratch = made[16]["models"]["target-scratch"]["nll"]
    assert nll["target-scratch"]["16"] == {"mean": scratch["mean"], "se": scratch["se"]}
    assert data["metrics"]["fd_clf64 vs reference"]["fused-exact"] == {
        "8": {"value": 10.0, "low": 8.0, "high": 12.0}, "16": {"value": 9.0, "low": 8.0, "high": 10.0}}
    assert [c["NLL"] for n in ("8", "16") for c in data["comparisons"][n]] == ["better", "indistinguishable"]
    for name in ("nll", "fd", "loss", "kid", "copies"):
        assert (sweep / f"{name}.png").is_file()
