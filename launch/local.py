"""Training several auxiliary models on one machine: concurrently on disjoint GPU subsets, or on CPU
one after another (or a configured number at a time).

Each model is its own process (`accelerate launch` when it has GPUs), so one model's failure or
preemption does not take the others down, and each resumes on its own.
"""
import os
import subprocess
import sys

import torch

from trainer.config import RunConfig
from trainer.rundir import RunDir


def gpu_groups(num_gpus: int, num_models: int, parallel: int) -> list[list[int]]:
    """Split GPUs 0..num_gpus-1 into `slots` disjoint groups of equal size, slots = how many models
    train at once (parallel, or as many as there are GPUs, capped by the number of models)."""
    slots = min(parallel or num_gpus, num_gpus, num_models)
    size = num_gpus // slots
    return [list(range(i * size, (i + 1) * size)) for i in range(slots)]


def physical_gpu_ids(group: list[int], visible: str | None) -> list[str]:
    """The ids to hand `accelerate launch --gpu_ids` for a group of indices into this process's visible GPUs.
    Accelerate writes --gpu_ids straight into the child's CUDA_VISIBLE_DEVICES, so under a parent restricted
    to CUDA_VISIBLE_DEVICES=4,5,6,7 (a SLURM allocation) index 0 must become "4", not "0" (another job's GPU).
    Entries may be GPU UUIDs; they are passed through."""
    if not visible:
        return [str(i) for i in group]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [ids[i] for i in group]


def aux_commands(cfg: RunConfig, config_path: str, overrides: list[str]) -> tuple[list[tuple[str, list[str], dict]], int]:
    """(aux name, command, extra environment) per auxiliary model, and how many may run at once."""
    num_gpus = torch.cuda.device_count()
    names = [p.name for p in cfg.data.aux]
    base = ["-m", "launch.cli", "train-aux", "--config", config_path, *overrides]
    jobs = []
    if num_gpus:
        groups = gpu_groups(num_gpus, len(names), cfg.launch.aux_parallel)
        for i, name in enumerate(names):
            gpus = groups[i % len(groups)]
            ids = physical_gpu_ids(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(len(gpus)),
                   "--gpu_ids", ",".join(ids), "--main_process_port", str(29500 + i % len(groups)),
                   "--mixed_precision", cfg.train.precision, "--dynamo_backend", "no"]
            if len(gpus) > 1:
                cmd.append("--multi_gpu")
            jobs.append((name, cmd + base + [f"aux={name}"], {}))
        return jobs, len(groups)
    parallel = max(1, cfg.launch.aux_parallel)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    for name in names:
        jobs.append((name, [sys.executable, *base, f"aux={name}"], {"OMP_NUM_THREADS": str(threads)}))
    return jobs, parallel


def train_all(cfg: RunConfig, config_path: str, overrides: list[str], log=print) -> int:
    """Run every auxiliary's training; returns the first non-zero exit code (or 0)."""
    jobs, parallel = aux_commands(cfg, config_path, overrides)
    running: list[tuple[str, subprocess.Popen, object]] = []
    failures = []

    def wait_one():
        name, proc, logf = running.pop(0)
        code = proc.wait()
        if logf:
            logf.close()
        if code:
            failures.append((name, code))
            log(f"aux {name}: exited with code {code}")

    for name, cmd, env in jobs:
        while len(running) >= parallel:
            wait_one()
        logf = None
        stdout = None
        if parallel > 1:  # interleaved progress bars are unreadable: one log file per model
            path = RunDir.of(cfg).train_log(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            logf = stdout = open(path, "a")
            log(f"aux {name}: training, log in {path}")
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
        running.append((name, proc, logf))
    while running:
        wait_one()
    return failures[0][1] if failures else 0
