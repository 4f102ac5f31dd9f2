"""Resume and preemption, through the real CLI in real processes."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DIGITS, ROOT, SHORT_TRAIN, scorefuse
from trainer.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED

pytestmark = pytest.mark.resume


def train_args(run_dir, total_kimg, workers=2):
    return ["train-aux", "--config", DIGITS, "aux=aux-low", f"root={run_dir.parent}", *SHORT_TRAIN,
            f"train.total_kimg={total_kimg}", f"data.workers={workers}"]


def popen(args, new_session=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


def newest_step(stage_dir):
    ckpts = sorted((stage_dir / "checkpoints").glob("ckpt-*"))
    return int(ckpts[-1].name.split("-")[1]) if ckpts else -1


def wait_for_step(proc, stage_dir, step, timeout=240):
    t0 = time.time()
    while newest_step(stage_dir) < step:
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout, "no checkpoint in time"
        time.sleep(0.05)


def final_state(stage_dir):
    ckpt = sorted((stage_dir / "checkpoints").glob("ckpt-*"))[-1]
    model = load_file(ckpt / "model.safetensors")
    ema = load_file(ckpt / "ema-net.safetensors")
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return ckpt.name, model, ema, opt


def kill_after(proc, stage_dir, step):
    """SIGKILL once the checkpoint of `step` is there, before the stage finished."""
    wait_for_step(proc, stage_dir, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage_dir / "done.json").exists(), "the run finished before it was killed"


def assert_same_final_state(stage_a, stage_b, step):
    """The newest checkpoints of two runs are both of `step`, with bit-identical weights, EMA and optimizer."""
    a, b = final_state(stage_a), final_state(stage_b)
    assert a[0] == b[0] == f"ckpt-{step:09d}"
    for x, y in zip(a[1:], b[1:]):
        tx, ty = dict(flat_tensors(x)), dict(flat_tensors(y))
        assert tx.keys() == ty.keys()
        for k in tx:
            assert torch.equal(tx[k], ty[k]), f"{k} differs after resume"


def flat_tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat_tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat_tensors(v, f"{prefix}/{i}")


def test_sigkill_and_restart_is_bit_identical(digits_run, tmp_path):
    """120 steps straight through vs. killed with SIGKILL after step 60 and restarted (the two runs side by side,
    one core each)."""
    total = 120 * 32 / 1000
    straight = tmp_path / "straight" / "digits"
    straight.parent.mkdir()
    os.rename(digits_run, straight)
    killed = tmp_path / "killed" / "digits"
    shutil.copytree(straight, killed)

    reference = popen(train_args(straight, total))
    proc = popen(train_args(killed, total))
    stage = killed / "aux" / "aux-low"
    kill_after(proc, stage, 60)
    out = scorefuse(*train_args(killed, total)).stderr
    reference_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_out
    assert "resumed from" in out

    assert_same_final_state(straight / "aux" / "aux-low", stage, 120)
    assert load_file(straight / "aux/aux-low/ema.safetensors").keys() == load_file(stage / "ema.safetensors").keys()
    for k, v in load_file(straight / "aux/aux-low/ema.safetensors").items():
        assert torch.equal(v, load_file(stage / "ema.safetensors")[k])


# (signal, exit code, DataLoader workers)
STOPS = [(signal.SIGTERM, EXIT_PREEMPTED, 0), (signal.SIGUSR1, EXIT_PREEMPTED, 0), (signal.SIGINT, EXIT_INTERRUPTED, 2)]


def test_stop_signals_checkpoint_and_exit_with_the_documented_codes(prepared_digits, tmp_path):
    """SIGTERM, SIGUSR1 and SIGINT, each to its own training (the three side by side): a checkpoint at the next
    step boundary, the documented exit code, and the next start resumes from exactly there. SIGINT goes to the
    whole process group, as Ctrl-C in a terminal does: the DataLoader workers leave it to the trainer, which
    checkpoints like for SIGTERM."""
    runs = []
    for sig, code, workers in STOPS:
        run = tmp_path / sig.name / "digits"
        shutil.copytree(prepared_digits, run)
        runs.append((sig, code, run, popen(train_args(run, total_kimg=1000, workers=workers), new_session=True)))
    restarts = []
    for sig, code, run, proc in runs:
        stage = run / "aux" / "aux-low"
        wait_for_step(proc, stage, 20)
        before = newest_step(stage)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code, (sig.name, out)
        assert "Traceback" not in out, (sig.name, out)
        assert "stop requested" in out, (sig.name, out)
        stopped_at = newest_step(stage)
        # the checkpoint of the step boundary where the signal arrived (the periodic one if it was just written)
        assert stopped_at >= before and f"checkpointing at step {stopped_at}" in out, (sig.name, out)
        restarts.append((sig, stopped_at, popen(train_args(run, total_kimg=(stopped_at + 5) * 32 / 1000, workers=0))))
    for sig, stopped_at, proc in restarts:  # the next start resumes from exactly there
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (sig.name, out)
        assert f"step {stopped_at}" in out and "resumed from" in out, (sig.name, out)


def fuse_args(run_dir, overrides):
    # target-scratch only, 30 steps with a checkpoint every 2: time to kill it in the middle
    return ["fuse", "--config", DIGITS, *overrides, "fuse.mixture=false", "fuse.baselines=[target-scratch]",
            "fuse.scratch_kimg=0.96", "train.checkpoint_every_kimg=0.064"]


@pytest.mark.slow
def test_fuse_killed_during_a_baseline_resumes_it_bit_identically(fuse_pending, tmp_path):
    """The fuse stage trains the paper's SGD fit, then the baselines, on one Accelerator. Killed during a
    baseline, a fresh process (which trains only the baseline: the fit is finished) must resume the
    baseline's checkpoints, and end where an uninterrupted fuse ends."""
    killed, overrides = fuse_pending
    straight = tmp_path / "straight" / "digits"
    shutil.copytree(killed, straight)
    # the uninterrupted run alongside, on the other core
    reference = popen(fuse_args(straight, [f"root={straight.parent}", *overrides[1:]]))

    proc = popen(fuse_args(killed, overrides))
    stage = killed / "baselines" / "target-scratch"
    kill_after(proc, stage, 4)
    # the baseline's own weights alone, not the SGD fit's that was trained before it in the same process
    assert {p.name for p in (stage / "checkpoints").glob("*/model*.safetensors")} == {"model.safetensors"}
    out = scorefuse(*fuse_args(killed, overrides)).stderr
    reference_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_out
    assert "resumed from" in out and "skipping checkpoint" not in out

    assert_same_final_state(straight / "baselines" / "target-scratch", stage, 30)
