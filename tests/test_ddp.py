"""Two CPU processes under `accelerate launch` (DDP over gloo) train an auxiliary model."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DIGITS, ROOT, SHORT_TRAIN

pytestmark = pytest.mark.multiprocess


def test_two_process_ddp_training(digits_run):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29533", "-m", "launch.cli", "train-aux", "--config", str(DIGITS),
           "aux=aux-high", f"root={digits_run.parent}", *SHORT_TRAIN, "train.total_kimg=1.28",
           "data.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stage = digits_run / "aux" / "aux-high"
    assert json.loads((stage / "done.json").read_text())["steps"] == 40
    ckpt = sorted((stage / "checkpoints").glob("ckpt-*"))[-1]
    # Each rank's RNG state is in the checkpoint.
    assert {p.name for p in ckpt.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(l == l for l in losses)
    assert losses[-1] < losses[0]
