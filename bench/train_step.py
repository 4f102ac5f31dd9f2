"""Engine overhead: images/s of trainer.engine.Engine against a plain PyTorch loop doing the same
work (same Denoiser, batch, precision, Adam, EMA update), measured side by side, interleaved.

Both read the same in-memory batch, so this isolates the engine's own cost (bookkeeping, Accelerate
wrappers, finite-gradient check, logging). bench/data.py measures the shard reader separately.

    python bench/train_step.py                                   # tiny preset, CPU
    python bench/train_step.py --preset ddpmpp-cifar10 --batch 128 --precision bf16   # on a GPU
    python bench/train_step.py --tiny                            # smoke test: batch 16, 3 steps, 1 round
Target: overhead <= 5%. Both loops use trainer.engine.adam, the fused Adam every stage builds.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from trainer.edm import Denoiser, denoising_loss  # noqa: E402
from trainer.ema import ema_beta, make_ema, update_ema  # noqa: E402
from trainer.accelerator import make_accelerator  # noqa: E402
from stages.rundir import engine_paths  # noqa: E402
from trainer.engine import Engine, Update, adam  # noqa: E402
from trainer.spec import TrainSpec  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

# The engine's progress (trainer/progress.py) goes to stderr, a bar on a terminal and one plain line per run
# otherwise, and is part of what the engine costs; the table goes to stdout after it.


def model(args):
    torch.manual_seed(0)
    return Denoiser(build_unet(args.preset, args.resolution, args.channels))


def engine_rate(args, x0) -> float:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    spec = TrainSpec(batch=args.batch, precision=args.precision, lr=1e-4, lr_rampup_kimg=0,
                     total_kimg=args.batch * args.steps / 1000, log_every_kimg=args.batch * args.steps / 1000,
                     checkpoint_every_kimg=0, ema_halflife_kimg=50)
    acc = make_accelerator(spec)
    den = model(args)
    opt = adam(den.parameters(), spec.lr, spec.adam_betas, spec.adam_eps)

    def batches(start):
        while True:
            yield x0

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "engine"  # the name its progress line shows
        eng = Engine(acc, spec, engine_paths(stage), modules={"net": den}, optimizers={"adam": opt},
                     updates=[Update("adam", "net", lambda m, x, step: denoising_loss(m["net"], x, None, sigma_data=0.5).mean())],
                     batches=batches, ema=("net",), log=lambda m: None)
        eng.run()
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def plain_rate(args, x0) -> float:
    device = x0.device
    den = model(args).to(device)
    ema = make_ema(den)
    spec = TrainSpec()  # the engine's Adam betas and eps
    opt = adam(den.parameters(), 1e-4, spec.adam_betas, spec.adam_eps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
    t0 = time.perf_counter()
    for step in range(args.steps):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = denoising_loss(den, x0, None).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, den, ema_beta(args.batch, (step + 1) * args.batch, 50, 0.05))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="smoke test: batch 16, 3 steps, 1 round (no target judged)")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps, args.rounds = 16, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x0 = torch.rand(args.batch, args.channels, args.resolution, args.resolution, device=device) * 2 - 1
    engine_rate(args, x0), plain_rate(args, x0)  # warm-up (allocator, kernels, threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eng, plain = [], []
    for _ in range(args.rounds):  # interleaved, so drift in machine speed hits both alike
        eng.append(engine_rate(args, x0))
        plain.append(plain_rate(args, x0))
    e, q = statistics.median(eng), statistics.median(plain)
    print(f"\npreset={args.preset} batch={args.batch} precision={args.precision} device={device} "
          f"steps/round={args.steps} rounds={args.rounds}")
    print("| loop | images/s (median) | min | max |\n|---|---|---|---|")
    print(f"| plain PyTorch | {q:.1f} | {min(plain):.1f} | {max(plain):.1f} |")
    print(f"| scorefuse Engine | {e:.1f} | {min(eng):.1f} | {max(eng):.1f} |")
    print(f"engine overhead: {100 * (q / e - 1):+.1f}% (target <= 5%)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
