import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread for the whole in-process suite, as every subprocess gets (OMP_NUM_THREADS=1 in
# scorefuse()): on 2 shared cores two OpenMP threads spin on barriers whenever another process holds a core
# (the distill toys: 9 s on one thread, 110 s on two under load), and a test that compares its numbers with
# another process's needs the same float reductions.
torch.set_num_threads(1)

ROOT = Path(__file__).parents[1]
SHARED_RUN = ("finished_digits", "fuse_pending")  # the fixtures of the one finished pipeline run


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on two pytest-xdist workers (--dist loadgroup), longest work first, so that
    neither waits at the end: the tests of the shared finished run are marked as one group (one worker builds the
    run and runs them all), then the slow tests, then the rest. The groups need pytest 8: under pytest 9 with
    pytest-xdist 3.8 they do not form (xdist renames item._nodeid, pytest 9 reads item._id), hence the pin in
    pyproject.toml."""
    for item in items:
        if any(name in item.fixturenames for name in SHARED_RUN):
            item.add_marker(pytest.mark.xdist_group("finished_digits"))

    def order(item):
        return (0 if any(name in item.fixturenames for name in SHARED_RUN) else
                1 if item.get_closest_marker("slow") else 2)
    items.sort(key=order)  # stable: file order within each class

DIGITS = ROOT / "configs" / "digits.yaml"

# A short aux run: 32 images per step, checkpoints every 20 steps, no periodic evaluation.
SHORT_TRAIN = ["train.batch=32", "train.lr_rampup_kimg=0.5", "train.log_every_kimg=0.32",
               "train.checkpoint_every_kimg=0.64", "train.eval_every_kimg=0", "train.snapshot_every_kimg=0"]
# The whole pipeline in about a minute: 20 steps per model, 64 evaluation samples, a 4-step sampler.
FAST = [*SHORT_TRAIN, "train.total_kimg=0.64", "train.snapshot_every_kimg=0.32", "eval.num_samples=64",
        "eval.grid_images=16", "edm.sampler_steps=4", "fuse.scratch_kimg=0.32", "fuse.finetune_kimg=0.32",
        "fuse.draws_per_image=4", "fuse.sgd_epochs=4", "eval.test_draws_per_image=2",
        "distill.teacher_samples=32", "distill.teacher_steps=2", "distill.batch=32", "distill.total_kimg=0.128",
        "distill.eval_every_kimg=0", "distill.snapshot_every_kimg=0", "distill.checkpoint_every_kimg=0.064",
        "eval.nll_images=8", "eval.nll_steps=4", "eval.bootstrap=20", "eval.kid_subsets=5", "eval.batch=32", "eval.sample_batch=32",
        "fuse.router_kimg=0.192", "fuse.router_draws=2", "fuse.hybrid_sigma=0.5"]


def scorefuse(*args, check=True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"scorefuse {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def scorefuse_here(capfd, *args) -> tuple[int, str, str]:
    """`scorefuse ARGS` in this process: (exit code, stdout, stderr). No interpreter start-up (a subprocess
    costs ~3 s of it), for commands that stop before any training (a user error, a dry run, a prepare); the
    environment is left as it was."""
    from launch import cli
    environment = dict(os.environ)
    capfd.readouterr()
    code = 0
    try:
        cli.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    finally:
        os.environ.clear()
        os.environ.update(environment)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """A digits run directory after `scorefuse prepare` (shards, manifest, digit classifier)."""
    root = tmp_path_factory.mktemp("prepared")
    scorefuse("prepare", "--config", DIGITS, f"root={root}")
    return root / "digits"


@pytest.fixture
def digits_run(prepared_digits, tmp_path) -> Path:
    """A private copy of the prepared run, so a test can train in it."""
    dst = tmp_path / "digits"
    shutil.copytree(prepared_digits, dst)
    return dst


def shared_directory(tmp_path_factory, name: str) -> Path:
    """A directory every pytest-xdist worker of this run sees under one name (the run's base temporary
    directory is per worker, its parent is the run's); without workers, the session's own."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def finished_digits(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A finished digits run of the fast pipeline (every stage and the report), built once per test run
    (the first worker to ask builds it, the others wait for it): (its run directory, the overrides that
    point at it, what the run printed on stderr). Tests must not change it."""
    from filelock import FileLock
    root = shared_directory(tmp_path_factory, "finished")
    overrides = [f"root={root}", *FAST]
    stderr = root / "run.stderr"
    with FileLock(f"{root}.lock"):
        if not stderr.exists():
            proc = scorefuse("run", "--config", DIGITS, *overrides)
            stderr.write_text(proc.stderr)
    return root / "digits", overrides, stderr.read_text()


@pytest.fixture
def fuse_pending(finished_digits, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the finished fast run with its auxiliaries only: fuse, the router and the baselines not yet
    run. (its run directory, the overrides that point at it)."""
    run, overrides, _ = finished_digits
    dst = tmp_path / "digits"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("fuse", "router", "baselines", "distill", "eval_cache"))
    return dst, [f"root={tmp_path}", *overrides[1:]]
