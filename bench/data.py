"""Shard reader throughput against what training consumes, side by side in one run.

Prepares the embedded digits in a temporary directory, then measures
  - images/s of the training stream (shards.stream.train_loader) with 0, 1 and 2 DataLoader workers;
  - images/s of one `tiny` training step (forward, backward, the stages' fused Adam) at the same batch;
and prints the ratio. Target: the loader is at least 10x faster than the tiny training step.

    python bench/data.py [--batch 128] [--batches 200] [--train-steps 20] [--rounds 3]
    python bench/data.py --tiny      # smoke test: a few batches and steps, 1 round, no target judged
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from shards.prepare import prepare  # noqa: E402
from shards.stream import train_loader  # noqa: E402
from stages.config import load_config  # noqa: E402
from trainer.edm import Denoiser, denoising_loss  # noqa: E402
from trainer.engine import adam  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"


def loader_rate(data_dir, population, batch, batches, workers) -> float:
    loader = iter(train_loader(data_dir, population, batch_size=batch, seed=0, rank=0, world_size=1,
                               num_workers=workers))
    for _ in range(max(4, workers * 4)):  # start the workers, fill their prefetch queues
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - t0)


def train_rate(cfg, batch, steps, image_size, channels) -> float:
    torch.manual_seed(0)
    den = Denoiser(build_unet("tiny", image_size, channels), sigma_data=cfg.edm.sigma_data)
    opt = adam(den.parameters(), 1e-4, cfg.train.adam_betas, cfg.train.adam_eps)
    x0 = torch.rand(batch, channels, image_size, image_size) * 2 - 1

    def step():
        denoising_loss(den, x0, None).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="smoke test: batch 32, 4 batches, 2 steps, 1 round")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.batches, args.train_steps, args.rounds = 32, 4, 2, 1
    cfg = load_config(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare(cfg.data, Path(tmp), log=lambda m: None)
        pop = cfg.data.aux[0].name
        rates = {w: [] for w in (0, 1, 2)}
        train = []
        for _ in range(args.rounds):  # interleaved, so drift in machine speed hits all alike
            for w in rates:
                rates[w].append(loader_rate(Path(tmp), pop, args.batch, args.batches, w))
            train.append(train_rate(cfg, args.batch, args.train_steps, manifest["image_size"], manifest["channels"]))
    t = statistics.median(train)
    print(f"\ndigits {manifest['image_size']}x{manifest['image_size']}x{manifest['channels']} PNG shards, "
          f"batch {args.batch}, median of {args.rounds} rounds, torch threads {torch.get_num_threads()}"
          + (" (--tiny: a smoke test, not a measurement)" if args.tiny else ""))
    print("| what | images/s | x tiny training step |\n|---|---|---|")
    for w, r in rates.items():
        print(f"| train_loader, {w} workers | {statistics.median(r):,.0f} | {statistics.median(r) / t:.1f}x |")
    print(f"| tiny training step (fwd+bwd+Adam) | {t:,.0f} | 1.0x |")
    best = max(statistics.median(r) for r in rates.values())
    print(f"loader / training: {best / t:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
