"""Every benchmark script runs against the current code: each in its --tiny smoke mode, as a subprocess.

No timing is asserted (the tiny modes measure nothing worth judging); only that each script runs to its
table.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DIGITS, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bench(script: str, *args, tiny: bool = True) -> str:
    """stdout of `python bench/<script> --tiny args...`; stderr goes to pytest's capture."""
    try:
        proc = subprocess.run([sys.executable, f"bench/{script}", *(["--tiny"] if tiny else []), *map(str, args)],
                              cwd=ROOT, check=True,
                              env=ENV, stdout=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as error:
        print(error.stdout)
        raise
    print(proc.stdout)
    return proc.stdout


@pytest.fixture
def finished_run(finished_digits) -> list[str]:
    """The overrides that point at a finished digits run (conftest's, shared with other tests)."""
    return finished_digits[1]


def test_data_bench():
    assert "loader / training:" in bench("data.py")


def test_train_step_bench():
    assert "engine overhead:" in bench("train_step.py")


def test_gram_pass_bench():
    out = bench("gram_pass.py")
    assert "| streamed from the shards (the fuse stage) | 64 |" in out and "| read whole first | 64 |" in out


def test_likelihood_bench():
    out = bench("likelihood.py")
    assert "| FusedDenoiser, K = 3 | 4 | 3 |" in out and "| 16 |" in out  # both tables, to the last row


@pytest.mark.multiprocess  # its own prepare, then training under `accelerate launch`
def test_scaling_bench():
    # its own prepare, of smaller populations (the 10 training steps draw from a resampled stream)
    out = bench("scaling.py", "data.aux.0.count=64", "data.aux.1.count=64", "data.aux.2.count=64",
                "data.reference.count=40")
    assert "| DDP | 1 |" in out and "ZeRO-2" not in out


@pytest.mark.slow
def test_fusion_bench(finished_run):
    out = bench("fusion.py", "--config", DIGITS, *finished_run)
    assert "| exact (Gram pass + QP)" in out and "fused / auxiliary:" in out


@pytest.mark.slow
def test_sampling_bench(finished_run):
    result = json.loads(bench("sampling.py", "--config", DIGITS, *finished_run).splitlines()[-1])
    assert result["teacher"] in ("fused-exact", "fused-sgd") and len(result["samples_per_s"]) == 3
    assert result["metric"].endswith("16") and result["fd_ratio"] > 0


@pytest.mark.slow
def test_mixture_bench(finished_run):
    out = bench("mixture.py", "--config", DIGITS, *finished_run)
    assert "mixture / auxiliary:" in out and "the router step costs" in out


@pytest.mark.slow
def test_evaluate_bench(finished_run):
    """The bench has no smaller mode: the fast run's evaluation with half its samples and 2 NLL images."""
    out = bench("evaluate.py", "--config", DIGITS, *finished_run, "eval.num_samples=32", "eval.nll_images=2",
                tiny=False)
    assert "| again (cached) |" in out and "cached / first:" in out
