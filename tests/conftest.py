import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

# A short aux run: 32 images per step, checkpoints every 20 steps, no periodic evaluation.
SHORT_TRAIN = ["train.batch=32", "train.lr_rampup_kimg=0.5", "train.log_every_kimg=0.32",
               "train.checkpoint_every_kimg=0.64", "train.eval_every_kimg=0", "train.snapshot_every_kimg=0"]


def scorefuse(*args, check=True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"scorefuse {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


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
