"""DeepSpeed ZeRO-2 through Accelerate, two CPU processes (gloo): an auxiliary model trains, checkpoints
(every rank its optimizer shard), resumes in a second launch and exports, and its losses are those of
the same run under DDP.

Why the losses can be compared step by step: the initial weights come from the seed, the noise from each
rank's seeded global RNG, the data from (seed, rank, position), and the learning rate from kimg; ZeRO-2
with a torch Adam and no clipping does the same arithmetic as DDP. Measured on 2 processes in fp32: the
logged losses and the exported EMA weights are bit-identical, before and after the resume. The
tolerance (1e-5 relative) leaves room only for a different order of the gradient reduction (other
world sizes or library versions); with train.precision=bf16 the two differ by up to ~1e-5 after 20 steps
(DeepSpeed's autocast casts fewer ops than torch's), so this test stays in fp32.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DIGITS, ROOT, SHORT_TRAIN

pytestmark = pytest.mark.multiprocess

ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
# Per-step losses in metrics.jsonl, a checkpoint every 10 steps; aux-low, not the aux-high of test_ddp.py.
TRAIN = ["aux=aux-low", *SHORT_TRAIN, "train.log_every_kimg=0.032", "train.checkpoint_every_kimg=0.32",
         "data.workers=0"]
DDP = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(launcher: list[str], port: int, root: Path, *overrides: str, stage: tuple = ("train-aux", *TRAIN),
            processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
           "--main_process_port", str(port), "-m", "launch.cli", stage[0], "--config", str(DIGITS),
           *stage[1:], f"root={root}", *overrides]
    # DS_ACCELERATOR=cpu: no GPU probing. DeepSpeed builds its shared-memory comm op on the first start
    # (~1 minute); the default cache keeps it for later runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    return proc


def _losses(stage: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_zero2_trains_resumes_and_matches_ddp(digits_run, tmp_path):
    stage = digits_run / "aux" / "aux-low"
    _launch(["--config_file", str(ZERO2)], 29535, digits_run.parent, "train.total_kimg=0.32")
    assert json.loads((stage / "done.json").read_text())["steps"] == 10
    ckpt = stage / "checkpoints" / "ckpt-000000010"
    # DeepSpeed really ran (not a silent fallback to DDP): one ZeRO optimizer shard per rank.
    assert {p.name for p in (ckpt / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}

    # A finished stage is skipped; to train on, drop its marker and ask for more images.
    (stage / "done.json").unlink()
    proc = _launch(["--config_file", str(ZERO2)], 29535, digits_run.parent, "train.total_kimg=0.64")
    assert "resumed from" in proc.stderr and "ckpt-000000010" in proc.stderr
    assert json.loads((stage / "done.json").read_text())["steps"] == 20
    assert (stage / "model.json").is_file()

    ddp_run = tmp_path / "ddp" / "digits"
    shutil.copytree(digits_run / "data", ddp_run / "data")
    _launch(DDP, 29536, ddp_run.parent, "train.total_kimg=0.64")
    ddp_stage = ddp_run / "aux" / "aux-low"

    zero2, ddp = _losses(stage), _losses(ddp_stage)
    assert sorted(zero2) == sorted(ddp) == list(range(1, 21))
    for step in ddp:
        assert zero2[step] == pytest.approx(ddp[step], rel=1e-5), f"step {step}"
    ema_zero2, ema_ddp = load_file(stage / "ema.safetensors"), load_file(ddp_stage / "ema.safetensors")
    assert ema_zero2.keys() == ema_ddp.keys()
    for name in ema_ddp:
        assert (ema_zero2[name] - ema_ddp[name]).abs().max().item() <= 1e-5, name


def test_distill_under_zero2_falls_back_to_ddp_with_a_message(tmp_path):
    """Two models and two optimizers: the launcher's DeepSpeed config is set aside for DDP, said once,
    and the stage trains to the end on both processes (no hang, no ZeRO shards)."""
    from tests.test_distill import STAGE, fake_run
    run = fake_run(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2), "--num_processes", "2",
           "--main_process_port", "29537", "-m", "launch.cli", "distill", "--config", str(DIGITS),
           f"root={tmp_path}", *STAGE, "distill.total_kimg=0.032"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    assert proc.stderr.count("DeepSpeed is not used here (distillation trains two models") == 1, proc.stderr
    stage = run / "distill"
    assert json.loads((stage / "done.json").read_text())["steps"] == 4  # 32 images, batch 8
    ckpt = sorted((stage / "checkpoints").glob("ckpt-*"))[-1]
    assert {p.name for p in ckpt.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list(ckpt.rglob("zero_pp_rank_*"))
    assert (stage / "generator.safetensors").is_file()


def test_fuse_trains_its_fit_router_and_baseline_under_zero2(fuse_pending):
    """The fuse stage trains three models one after another (the SGD fit, the router, a baseline), each with
    its own batch size, under one DeepSpeed launch: each fills the config's "auto" values afresh."""
    run, overrides = fuse_pending
    _launch(["--config_file", str(ZERO2)], 29538, run.parent, *overrides[1:], "fuse.baselines=[target-scratch]",
            "fuse.nll_check=false", stage=("fuse",), processes=1)
    for stage in ("fuse", "router", "baselines/target-scratch"):
        assert (run / stage / "done.json").is_file(), stage
    ckpt = sorted((run / "baselines" / "target-scratch" / "checkpoints").glob("ckpt-*"))[-1]
    assert list(ckpt.rglob("zero_pp_rank_0_*optim_states.pt"))  # DeepSpeed trained it, not a fallback
