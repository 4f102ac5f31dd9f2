"""Data-parallel scaling: images/s of the real aux training stage (`accelerate launch -m launch.cli
train-aux`: shards, engine, checkpoints) with 1 and 2 processes, under DDP and DeepSpeed ZeRO-2, at the
same global batch, in interleaved rounds so that drift in machine speed hits every case alike.

The rate is taken from the stage's metrics.jsonl between its first and last logged rows, so start-up
(imports, rendezvous, DeepSpeed's engine build, the first window's warm-up) is left out.

    python bench/scaling.py                        # tiny preset on the digits shards; CPU: DS_ACCELERATOR=cpu is set
    python bench/scaling.py --processes 1 --precision bf16 network.preset=ddpmpp-cifar10   # one GPU: DDP vs ZeRO-2
    python bench/scaling.py --launchers DDP        # DDP only (no DeepSpeed warm-up)
    python bench/scaling.py --tiny                 # smoke test: DDP, 1 process, 10 steps, 1 round

On CPU each process gets cores / processes threads (--threads sets it), so 2 processes use the same
cores as 1. Extra arguments are run-config overrides.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
LAUNCHERS = ("DDP", "ZeRO-2")


def launcher(kind: str, processes: int, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--num_processes", str(processes), "--main_process_port", str(port), "--dynamo_backend", "no"]
    if kind == "ZeRO-2":
        return [*cmd, "--config_file", str(ZERO2)]
    return [*cmd, "--mixed_precision", "no", *(["--multi_gpu"] if processes > 1 else [])]


def rate(stage: Path) -> float:
    """images/s between the first and the last logged row."""
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    if len(rows) < 3:
        raise SystemExit(f"{stage}: {len(rows)} logged rows; raise --steps")
    return 1000 * (rows[-1]["kimg"] - rows[0]["kimg"]) / (rows[-1]["time"] - rows[0]["time"])


def run_case(args, run_root: Path, kind: str, processes: int) -> float:
    stage = run_root / "digits" / "aux" / args.aux
    shutil.rmtree(stage, ignore_errors=True)  # a finished stage would be skipped
    kimg = args.batch / 1000
    overrides = [f"root={run_root}", f"aux={args.aux}", f"train.batch={args.batch}",
                 f"train.precision={args.precision}", f"train.total_kimg={kimg * args.steps}",
                 f"train.log_every_kimg={kimg * args.log_every}", "train.eval_every_kimg=0",
                 "train.snapshot_every_kimg=0", "train.checkpoint_every_kimg=0", "train.lr_rampup_kimg=0",
                 "data.workers=0", *args.overrides]
    threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    cmd = [*launcher(kind, processes, args.port), "--num_cpu_threads_per_process", str(threads),
           "-m", "launch.cli", "train-aux", "--config", args.config, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stderr is a pipe: progress comes as plain lines
    if not _has_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} x{processes} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return rate(stage)


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--aux", default="aux-low", help="the auxiliary population to train")
    p.add_argument("--batch", type=int, default=64, help="global batch (all processes together)")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20, help="steps per logged row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--threads", type=int, default=0, help="threads per process (default: cores / processes)")
    p.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: DDP only, 1 process of 1 thread, batch 16, 10 steps logged every 3, 1 round, "
                        "no warm-up")
    p.add_argument("overrides", nargs="*", help="run-config overrides, key=value")
    args = p.parse_args()
    if args.tiny:
        args.launchers, args.processes, args.threads = ["DDP"], [1], 1
        args.batch, args.steps, args.log_every, args.rounds = 16, 10, 3, 1

    kinds = [kind for kind in LAUNCHERS if kind in args.launchers]
    cases = [(kind, n) for kind in kinds for n in args.processes]
    rates = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", "--config", args.config,
                                   f"root={tmp}", *[o for o in args.overrides if o.startswith("data.")]],
                                  cwd=ROOT, capture_output=True, text=True)
        if prepared.returncode != 0:
            raise SystemExit(f"prepare failed:\n{prepared.stdout[-3000:]}\n{prepared.stderr[-5000:]}")
        if "ZeRO-2" in kinds:
            run_case(args, Path(tmp), "ZeRO-2", args.processes[0])  # warm-up: DeepSpeed's op build, page cache
        for r in range(args.rounds):
            for case in cases:
                rates[case].append(run_case(args, Path(tmp), *case))
                print(f"round {r + 1}: {case[0]} x{case[1]}: {rates[case][-1]:.1f} images/s", file=sys.stderr)

    base = statistics.median(rates[cases[0]])
    device = "cuda" if _has_gpu() else f"cpu ({os.cpu_count()} cores)"
    print(f"\ntrain-aux, {args.batch} images per step in all, precision={args.precision}, device={device}, "
          f"{args.steps} steps, median of {args.rounds} rounds; overrides: {' '.join(args.overrides) or '-'}")
    print(f"| launcher | processes | images/s (median) | min | max | vs {cases[0][0]} x{cases[0][1]} |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        m = statistics.median(rates[case])
        print(f"| {case[0]} | {case[1]} | {m:.1f} | {min(rates[case]):.1f} | {max(rates[case]):.1f} | {m / base:.2f}x |")
    for kind in kinds:
        if len(args.processes) > 1:
            a, b = (statistics.median(rates[(kind, n)]) for n in args.processes[:2])
            print(f"{kind}: {args.processes[1]} processes / {args.processes[0]}: {b / a:.2f}x")
    for n in args.processes if len(kinds) == 2 else ():
        z, d = statistics.median(rates[("ZeRO-2", n)]), statistics.median(rates[("DDP", n)])
        print(f"{n} process{'es' if n > 1 else ''}: ZeRO-2 / DDP: {z / d:.2f}x")


if __name__ == "__main__":
    main()
