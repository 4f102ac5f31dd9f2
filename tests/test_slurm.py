"""The pipeline on a real SLURM cluster (one node, real daemons, tests/slurm_cluster.py): `scorefuse
submit` end to end, requeue in the middle of training, and USR1 ahead of a time limit."""
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime

import pytest
import torch
from safetensors.torch import load_file

from launch.submit import SCRIPT
from tests.conftest import DIGITS, FAST as PIPELINE_FAST, ROOT, SHORT_TRAIN, scorefuse, scorefuse_here
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from trainer.preemption import EXIT_PREEMPTED

# Meant to share one pytest-xdist worker (one cluster per run); with pytest 9 the group does not form (tests/conftest.py),
# and two workers each start a cluster of their own, on ports of their own: that works too.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

# conftest.FAST without the sample grids during training, and without the digits config's sweep
FAST = [f for f in PIPELINE_FAST if f != "train.snapshot_every_kimg=0.32"] + ["sweep.sizes=[]"]
# One CPU per job: the node has 2, so two array tasks run at once. No GPUs: the test cluster has none (sbatch
# refuses the script's --gpus-per-node=8), and 0 tells the script to run each stage as one CPU process.
SBATCH = ["--cpus-per-task=1", "--time=00:30:00", "--gpus-per-node=0"]
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def job_env(cluster) -> dict:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sbatch(cluster, log, *args) -> str:
    """The batch script for one stage, as `scorefuse submit` would start it."""
    proc = cluster.run("sbatch", "--parsable", f"--output={log}", "--job-name=scorefuse-test",
                       f"--export=ALL,SCOREFUSE_PYTHON={sys.executable},OMP_NUM_THREADS=1", *SBATCH, SCRIPT,
                       *map(str, args))
    return proc.stdout.strip().split(";")[0]


def state(cluster, job_id) -> str:
    return cluster.job(job_id).get("JobState", "?")


def wait_state(cluster, job_id, wanted, logs, timeout=300):
    """Until the job (every task of an array) is in `wanted`; fails at once on a failed job."""
    def check():
        records = cluster.jobs(job_id)
        states = {r.get("JobState") for r in records}
        bad = states & FAILED or {r.get("Reason") for r in records} & {"DependencyNeverSatisfied"}
        if bad and wanted not in bad:
            raise AssertionError(f"job {job_id}: {bad}\n{describe(cluster, logs)}")
        return records if states == {wanted} else None
    return cluster.wait(f"job {job_id} {wanted}", check, timeout=timeout, on_timeout=lambda: describe(cluster, logs))


def describe(cluster, logs) -> str:
    """What a failure message needs: the queue and the job logs."""
    text = [cluster.run("squeue", "-a", "-o", "%i %j %T %r", check=False).stdout]
    for path in sorted(logs.glob("*.out")) if logs.is_dir() else [logs]:
        if path.exists():
            text.append(f"==== {path.name}\n{path.read_text(errors='replace')[-6000:]}")
    return "\n".join(text)


def newest_step(stage_dir) -> int:
    ckpts = sorted((stage_dir / "checkpoints").glob("ckpt-*"))
    return int(ckpts[-1].name.split("-")[1]) if ckpts else -1


def test_submit_runs_the_whole_pipeline_with_an_array_job(slurm_cluster, prepared_digits, tmp_path, capfd):
    """Every stage a job, chained, on a prepared run (the prepare job finds its shards); the models that need no
    baseline or router, no NLL (the chain is what is checked here)."""
    cluster = slurm_cluster
    shutil.copytree(prepared_digits, tmp_path / "digits")
    before = sorted(p for p in (tmp_path / "digits").rglob("*"))
    args = ["submit", "--config", DIGITS, *[f"--sbatch={a}" for a in SBATCH], f"root={tmp_path}", *FAST,
            "fuse.baselines=[]", "fuse.mixture=false", "eval.nll_images=0"]
    code, dry, err = scorefuse_here(capfd, *args, "--dry-run")
    assert code == 0, err
    assert dry.count("$(sbatch ") == 5 and "--array=0-2" in dry and "aux=aux-low,aux-high,aux-even" in dry
    assert sorted(p for p in (tmp_path / "digits").rglob("*")) == before  # a dry run submits and writes nothing

    out = scorefuse(*args).stdout
    ids = dict(re.findall(r"^(\w+): job (\d+)", out, re.M))
    assert list(ids) == ["prepare", "train_aux", "fuse", "distill", "evaluate"], out
    logs = tmp_path / "digits" / "slurm"
    assert cluster.job(ids["fuse"])["Dependency"].startswith(f"afterok:{ids['train_aux']}")
    assert cluster.job(ids["evaluate"])["Dependency"].startswith(f"afterok:{ids['distill']}")
    wait_state(cluster, ids["evaluate"], "COMPLETED", logs, timeout=600)

    tasks = cluster.jobs(ids["train_aux"])
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2]
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}
    task_logs = sorted(logs.glob("digits-train-aux-*.out"))
    assert len(task_logs) == 3
    trained = {re.search(r"aux=(\S+)", p.read_text()).group(1) for p in task_logs}
    assert trained == {"aux-low", "aux-high", "aux-even"}
    run = tmp_path / "digits"
    report = json.loads((run / "report.json").read_text())
    models = {row["model"] for section in report["sections"] for row in section.get("rows", []) if "model" in row}
    assert {"aux/aux-low", "aux/aux-high", "aux/aux-even", "fused-exact", "distill"} <= models
    assert (run / "report.md").is_file()


def test_a_refused_job_is_one_line_naming_it(slurm_cluster, tmp_path):
    proc = scorefuse("submit", "--config", DIGITS, *[f"--sbatch={a}" for a in SBATCH],
                     "--sbatch=--partition=nosuchpartition", f"root={tmp_path}", "sweep.sizes=[]", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scorefuse: error: sbatch refused the prepare job:"), lines
    assert "partition" in lines[0].lower()


def train_args(root, total_steps, workers=0):
    return ["train-aux", "--config", DIGITS, "aux=aux-low", f"root={root}", *SHORT_TRAIN,
            f"train.total_kimg={total_steps * 32 / 1000}", f"data.workers={workers}"]


def stamp(text, pattern) -> datetime:
    return datetime.fromisoformat(re.search(pattern + r".*? at ([0-9T:+-]+)", text).group(1))


def test_requeue_and_usr1_stop_a_job_that_resumes(slurm_cluster, prepared_digits, tmp_path):
    """Two jobs side by side (each waits out its requeue delay, so they share it): job A is requeued with
    `scontrol requeue` after the checkpoint of step 20 of 100 and must end with the weights of an uninterrupted
    run (outside SLURM, meanwhile); job B gets USR1 at its batch shell after step 20, checkpoints within seconds,
    exits 75 and is requeued, and a job that depends on it waits for its final run."""
    cluster, steps = slurm_cluster, 100
    straight, requeued, usr1 = tmp_path / "straight", tmp_path / "requeued", tmp_path / "usr1"
    for d in (straight, requeued, usr1):
        shutil.copytree(prepared_digits, d / "digits")
    log_a, log_b = tmp_path / "requeued.out", tmp_path / "usr1.out"
    job_a = sbatch(cluster, log_a, *train_args(requeued, steps))
    job_b = sbatch(cluster, log_b, *train_args(usr1, steps))
    # a job waiting for B: a requeued job is not finished, so this must wait for its final run
    after = cluster.run("sbatch", "--parsable", f"--output={tmp_path}/after.out", "--cpus-per-task=1",
                        f"--dependency=afterok:{job_b}", "--wrap", "echo dependent ran").stdout.strip()
    # the uninterrupted run, outside SLURM, meanwhile
    ref_log = open(tmp_path / "straight.out", "w")
    ref = subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, train_args(straight, steps))], cwd=ROOT,
                           env=job_env(cluster), stdout=ref_log, stderr=subprocess.STDOUT)
    stage_a, stage_b = (d / "digits" / "aux" / "aux-low" for d in (requeued, usr1))
    cluster.wait("a checkpoint at step 20 in both jobs",
                 lambda: min(newest_step(stage_a), newest_step(stage_b)) >= 20
                 or {state(cluster, job_a), state(cluster, job_b)} & FAILED,
                 timeout=300, poll=0.2, on_timeout=lambda: describe(cluster, tmp_path))
    assert not (stage_a / "done.json").exists() and not (stage_b / "done.json").exists(), "finished before the stop"
    cluster.run("scancel", "--batch", "--signal=USR1", job_b)
    cluster.run("scontrol", "requeue", job_a)
    cluster.wait("B's requeue", lambda: "requeued job" in log_b.read_text(), timeout=120,
                 on_timeout=lambda: describe(cluster, log_b))
    assert state(cluster, after) == "PENDING"

    # A: requeued, resumed, the uninterrupted run's weights
    records = wait_state(cluster, job_a, "COMPLETED", log_a, timeout=300)
    if ref.wait(timeout=300) == EXIT_PREEMPTED:
        # Stopped by a signal from outside this test (seen once on a shared machine, not reproduced):
        # finish it; resuming is bit-identical (tests/test_resume.py), so the reference stays exact.
        print(f"reference run stopped from outside:\n{(tmp_path / 'straight.out').read_text()[-500:]}")
        scorefuse(*train_args(straight, steps))
    else:
        assert ref.returncode == 0, (tmp_path / "straight.out").read_text()[-3000:]
    text = log_a.read_text()
    assert records[0]["Restarts"] == "1", describe(cluster, log_a)
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from" in text, describe(cluster, log_a)
    print("\n".join(line.split("\r")[-1] for line in text.splitlines() if not line.startswith("args:")))
    a, b = straight / "digits" / "aux" / "aux-low", stage_a
    for rel in ("ema.safetensors", f"checkpoints/ckpt-{steps:09d}/model.safetensors"):
        x, y = load_file(a / rel), load_file(b / rel)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{rel}: {k} differs after the requeue"

    # B: stopped by USR1, requeued, finished; then its dependent job ran
    wait_state(cluster, job_b, "COMPLETED", log_b, timeout=300)
    wait_state(cluster, after, "COMPLETED", tmp_path / "after.out", timeout=120)
    text = log_b.read_text()
    assert "stop requested (signal 10)" in text and "exited with 75" in text, describe(cluster, log_b)
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from" in text
    assert cluster.job(job_b)["Restarts"] == "1"
    # the stage stopped within a step or so of the signal: seconds, not a checkpoint interval
    assert (stamp(text, "exited with 75") - stamp(text, "SIGUSR1")).total_seconds() < 20
    assert (stage_b / "done.json").exists()
