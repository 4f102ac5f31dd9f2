"""Training several auxiliary models on one machine: on disjoint GPU subsets of equal size, as many at a time
as finishes them soonest, or on CPU one after another (or a configured number at a time).

Each model is its own process (`accelerate launch` when it has GPUs), so one model's failure or
preemption does not take the others down, and each resumes on its own.
"""
import math
import os
import subprocess
import sys
from fractions import Fraction

import torch

from shards.errors import ConfigError
from stages.config import RunConfig
from stages.rundir import RunDir

# How a launcher tells its processes how many they are (the variables Accelerate reads: torchrun's, MPI's).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def refuse_under_launcher(command: str) -> None:
    """`train-aux aux=all` starts a launcher per auxiliary itself: in a process started by a launcher with
    several processes, each of them would start the whole set again, on the same GPUs and ports."""
    for name in WORLD_SIZE_VARIABLES:
        n = int(os.environ.get(name) or 1)
        if n > 1:
            raise ConfigError(
                f"{command} starts its own launchers (one per auxiliary model), but this process is one of {n} "
                f"started by a launcher ({name}={n}): run it as a plain process (scorefuse train-aux aux=all ...), "
                f"or train one auxiliary per `accelerate launch` with aux=NAME")


def aux_schedule(num_gpus: int, num_models: int, step_batch: int, max_parallel: int = 0) -> tuple[int, int]:
    """(p, s): train p models at a time on s GPUs each. s divides the per-step global batch (every rank
    takes an equal share), p * s <= num_gpus, p <= num_models and p <= max_parallel when set (0: no limit).
    Minimises the wall time ceil(num_models / p) / s (rounds of training, each s GPUs wide); ties go to
    more GPUs used, then to fewer models at a time (less contention for memory, disks and cores)."""
    options = []
    for p in range(1, min(num_models, num_gpus, max_parallel or num_models) + 1):
        s = max(d for d in range(1, num_gpus // p + 1) if step_batch % d == 0)
        options.append((Fraction(math.ceil(num_models / p), s), -p * s, p, s))
    _, _, p, s = min(options)
    return p, s


def physical_gpu_ids(group: list[int], visible: str | None) -> list[str]:
    """The ids to hand `accelerate launch --gpu_ids` for a group of indices into this process's visible GPUs.
    Accelerate writes --gpu_ids straight into the child's CUDA_VISIBLE_DEVICES, so under a parent restricted
    to CUDA_VISIBLE_DEVICES=4,5,6,7 (a SLURM allocation) index 0 must become "4", not "0" (another job's GPU).
    Entries may be GPU UUIDs; they are passed through."""
    if not visible:
        return [str(i) for i in group]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [ids[i] for i in group]


def thread_share(processes: int) -> dict:
    """OMP_NUM_THREADS for each of `processes` processes running at once: an equal share of the cores this
    process may use (a SLURM allocation or taskset gives fewer than os.cpu_count()), at least 1, and no more
    than an OMP_NUM_THREADS set for this process (by a user or a test runner sharing the cores with others:
    OpenMP threads that outnumber the free cores spin on barriers, 4-10x slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // processes)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return {"OMP_NUM_THREADS": str(min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share)}


def aux_commands(cfg: RunConfig, config_path: str, overrides: list[str],
                 log=print) -> tuple[list[tuple[str, list[str], dict]], int]:
    """(aux name, command, extra environment) per auxiliary model, and how many may run at once."""
    num_gpus = torch.cuda.device_count()
    names = [p.name for p in cfg.data.aux]
    base = ["-m", "launch.cli", "train-aux", "--config", config_path, *overrides]
    jobs = []
    if num_gpus:
        step_batch = cfg.train.batch // cfg.train.accum
        parallel, size = aux_schedule(num_gpus, len(names), step_batch, cfg.launch.aux_parallel)
        if idle := num_gpus - parallel * size:
            cap = f", at most launch.aux_parallel={cfg.launch.aux_parallel} at a time" if cfg.launch.aux_parallel else ""
            log(f"aux=all: {idle} of {num_gpus} GPUs stay idle: {parallel} model(s) at a time on {size} GPU(s) each "
                f"is the fastest split for {len(names)} models (a model's GPU count must divide "
                f"train.batch / train.accum = {step_batch}{cap})")
        env = thread_share(parallel * size)  # accelerate launch gives its OMP_NUM_THREADS to each of its ranks
        for i, name in enumerate(names):
            slot = i % parallel  # model i starts when model i - parallel, on the same GPUs, has finished
            group = list(range(slot * size, (slot + 1) * size))
            ids = physical_gpu_ids(group, os.environ.get("CUDA_VISIBLE_DEVICES"))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(size),
                   "--gpu_ids", ",".join(ids), "--main_process_port", str(29500 + slot),
                   "--mixed_precision", cfg.train.precision, "--dynamo_backend", "no"]
            if size > 1:
                cmd.append("--multi_gpu")
            jobs.append((name, cmd + base + [f"aux={name}"], env))
        return jobs, parallel
    parallel = min(len(names), max(1, cfg.launch.aux_parallel))
    env = thread_share(parallel)
    for name in names:
        jobs.append((name, [sys.executable, *base, f"aux={name}"], env))
    return jobs, parallel


def train_aux(cfg: RunConfig, args: dict, invocation) -> int:
    """`scorefuse train-aux`: aux=all on this machine (train_all), else the named auxiliaries in this process."""
    if args["aux"] == "all":
        return train_all(cfg, invocation.config_path, invocation.overrides)
    from stages import train_aux as stage
    for name in args["aux"].split(","):
        stage.run(cfg, name)
    return 0


def train_all(cfg: RunConfig, config_path: str, overrides: list[str], log=print) -> int:
    """Run every auxiliary's training; returns the first non-zero exit code (or 0)."""
    jobs, parallel = aux_commands(cfg, config_path, overrides, log)
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
