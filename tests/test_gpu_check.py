"""bench/gpu_check.py, the script a person with a GPU runs, in its tiny CPU mode: its cases run here on the same
code paths, so they cannot rot between GPU runs; and the driver keeps every finished row when a case hangs."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def gpu_check(out, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(out), *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rows(out) -> list[dict]:
    """The table's rows from the JSON-lines twin, in the order they were appended (not the per-case timings)."""
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    return [r for r in records if "what" in r]


def test_a_case_past_its_limit_is_a_timeout_row_and_the_check_goes_on(tmp_path):
    """gram gets 1 s, less than its process needs to start: its row is a TIMEOUT with the reason, the case after it
    still runs, and the row of the case before it is in the file while the check is still running."""
    out = tmp_path / "check.md"
    proc = gpu_check(out, "--only", "ema,gram,sampling", "--limit", "gram=1")
    while proc.poll() is None and not (out.exists() and "| ema |" in out.read_text()):
        time.sleep(0.05)
    running_with_the_ema_row = proc.poll() is None
    output, _ = proc.communicate(timeout=600)
    assert running_with_the_ema_row, output
    assert proc.returncode == 1, output  # a case timed out

    table = rows(out)
    assert [r["case"] for r in table][:1] == ["ema"] and table[0]["status"] == "ok"
    gram = [r for r in table if r["case"] == "gram"]
    assert len(gram) == 1 and gram[0]["status"] == "TIMEOUT", gram
    assert gram[0]["result"].startswith("TIMEOUT after 1 s; last line:"), gram
    after = [r for r in table[table.index(gram[0]) + 1:]]
    assert {r["case"] for r in after} == {"sampling"} and all(r["status"] == "ok" for r in after), after
    markdown = out.read_text()
    assert "| gram | gram | TIMEOUT after 1 s" in markdown and "| sampling | TIMEOUT |" not in markdown
    assert "| gram | TIMEOUT |" in markdown  # the timings at the end


@pytest.mark.slow
def test_cpu_cases_run_and_write_their_rows(tmp_path):
    """A subset of the cases at tiny CPU sizes (the digits pipeline and torch.compile take minutes here; run them
    with `--cpu --only digits,train-128-compile`): training through the engine alone, with deterministic kernels,
    under DDP and ZeRO-2 with 2 processes; the NLL, distillation and the shard loader."""
    out = tmp_path / "check.md"
    cases = ["train-32", "train-128-deterministic", "nll", "distill", "loader", "train-128-ddp-2gpu",
             "train-128-zero2-2gpu"]
    proc = gpu_check(out, "--only", ",".join(cases))
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    table = rows(out)
    assert [c for c in cases if any(r["case"] == c for r in table)] == cases, table
    assert all(r["status"] == "ok" and "images_per_s" in r for r in table), table
    assert all(any(f"2 x CPU process, {how}" in r["what"] for r in table) for how in ("DDP", "ZeRO-2")), table
    assert len([r for r in table if r["case"] == "loader"]) == 2  # pinned and not
    assert "| train-32 | ok |" in out.read_text()
