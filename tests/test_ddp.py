"""Two CPU processes under `accelerate launch` (DDP over gloo) train an auxiliary model: on one "node"
(one launcher starting both), and on two "nodes" (two launchers on this machine, machine ranks 0 and 1,
a c10d rendezvous on loopback, as launch/slurm/stage.sbatch starts them). The two runs have the same
global batch and world size, and the data, noise and initial weights depend only on (seed, rank,
position), so the second must reproduce the first bit for bit."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DIGITS, ROOT, SHORT_TRAIN

pytestmark = pytest.mark.multiprocess

# 20 steps, a logged loss every 5
TRAIN = ["-m", "launch.cli", "train-aux", "--config", str(DIGITS), "aux=aux-high", *SHORT_TRAIN,
         "train.total_kimg=0.64", "train.log_every_kimg=0.16", "data.workers=1"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _losses(stage) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_node(prepared_digits, tmp_path_factory):
    """aux-high trained by one launcher with 2 processes; the stage directory."""
    root = tmp_path_factory.mktemp("one-node")
    shutil.copytree(prepared_digits, root / "digits")
    cmd = [*LAUNCH, "--num_machines", "1", "--main_process_port", "29533", *TRAIN, f"root={root}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "digits" / "aux" / "aux-high"


def test_two_process_ddp_training(one_node):
    stage = one_node
    assert json.loads((stage / "done.json").read_text())["steps"] == 20
    ckpt = sorted((stage / "checkpoints").glob("ckpt-*"))[-1]
    # Each rank's RNG state is in the checkpoint.
    assert {p.name for p in ckpt.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    losses = [loss for _, loss in _losses(stage)]
    assert len(losses) == 4 and all(l == l for l in losses)
    assert losses[-1] < losses[0]


def test_two_launchers_as_two_nodes_match_one_node(one_node, prepared_digits, tmp_path):
    root = tmp_path
    shutil.copytree(prepared_digits, root / "digits")
    port = 29543
    node = [*LAUNCH, "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--rdzv_backend", "c10d"]
    logs = [open(root / f"node{rank}.log", "w") for rank in (0, 1)]
    # Machine rank 0 first: its launcher refuses a port that is already taken, and on one machine the
    # launcher that comes first hosts the rendezvous store on it. (On a cluster the nodes differ.)
    procs = [subprocess.Popen([*node, "--machine_rank", "0", *TRAIN, f"root={root}"], cwd=ROOT, env=ENV,
                              stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 120
        while not _listening(port) and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        procs.append(subprocess.Popen([*node, "--machine_rank", "1", *TRAIN, f"root={root}"], cwd=ROOT, env=ENV,
                                      stdout=logs[1], stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:  # a failed rendezvous would otherwise wait for its full timeout
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    output = "\n".join(f"==== node {r}\n" + (root / f"node{r}.log").read_text()[-5000:] for r in (0, 1))
    assert codes == [0, 0], output

    stage = root / "digits" / "aux" / "aux-high"
    assert _losses(stage) == _losses(one_node)
    ema_two, ema_one = load_file(stage / "ema.safetensors"), load_file(one_node / "ema.safetensors")
    assert ema_two.keys() == ema_one.keys()
    for name in ema_one:
        assert torch.equal(ema_two[name], ema_one[name]), name
    ckpt = sorted((stage / "checkpoints").glob("ckpt-*"))[-1]
    assert {p.name for p in ckpt.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
