"""bench/gpu_check.py, the script a person with a GPU runs, in its tiny CPU mode: every check it makes on a
GPU runs here on the same code paths, so it cannot rot between GPU runs."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHECKS = ["train DDP, compile off, channels_last off", "train DDP, compile on, channels_last on",
          "train ZeRO-2, compile off, channels_last off", "Gram pass float32", "Gram pass bf16 autocast",
          "fused sampling K = 3, vmapped", "fused sampling K = 3, loop", "fused sampling vmapped vs loop",
          "one-step generator", "train.deterministic: stop at half, resume", "train.deterministic cost (digits)",
          "tiny digits pipeline (5 stages)"]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")}
    assert set(CHECKS) <= rows, table
    assert "bit-identical to the uninterrupted run" in table and "FAILED" not in table
