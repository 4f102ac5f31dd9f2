"""Cost and accuracy of the PF-ODE likelihood (evaluation/likelihood.py), side by side in one run:

1. seconds per image of nll_bits_per_dim at probes 1 and DEFAULT_STEPS for the `tiny` UNet on SxSx1 images (S:
   --size, the demo's 8 by default), a single network at --batch and at --small-batch images per ODE solve
   (eval.nll_batch), and a 3-network FusedDenoiser (lambda not one-hot, so all three run at every evaluation).
   Random weights: the cost does not depend on their values.
2. the discretisation error against the closed form (trainer/gaussian.py) for tests/test_likelihood.py's
   Gaussian (standard deviations 0.01 ... 0.5 along rotated axes, exact trace): the bias of the NLL in bits/dim,
   mean over images (what a reported mean is off by) and worst image. Heun is 2nd order: bias x steps^2 about
   constant.

    python bench/likelihood.py [--images 64] [--batch 64] [--small-batch 16] [--size 8] [--steps N] [--device cpu] [--tiny]
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from evaluation.likelihood import DEFAULT_STEPS, log_likelihood, nll_bits_per_dim  # noqa: E402
from trainer.edm import Denoiser  # noqa: E402
from trainer.fused_denoiser import FusedDenoiser  # noqa: E402
from trainer.gaussian import rotated_gaussian  # noqa: E402
from trainer.unet import build_unet  # noqa: E402

SHAPE, DIM = (1, 3, 3), 9
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def seconds_per_image(denoiser, images, steps: int, batch: int, device: str) -> float:
    nll_bits_per_dim(denoiser, images[:2], range(2), seed=0, steps=2, probes=1, device=device)  # warm-up
    t0 = time.perf_counter()
    nll_bits_per_dim(denoiser, images, range(len(images)), seed=0, steps=steps, probes=1, batch_size=batch,
                     device=device)  # returns on the CPU: the clock includes the device's work
    return (time.perf_counter() - t0) / len(images)


def gaussian_errors(step_counts, count: int) -> list[tuple[int, float, float]]:
    """(steps, mean, worst image's absolute value) of the NLL's error in bits/dim against the closed form."""
    denoiser = rotated_gaussian(SHAPE, 0.01, 0.5)  # tests/test_likelihood.py's
    y = denoiser.sample(count, torch.Generator().manual_seed(1))
    expected = denoiser.log_likelihood(y, SIGMA_MIN, SIGMA_MAX)
    rows = []
    for steps in step_counts:
        with torch.no_grad():
            log_p = log_likelihood(denoiser, y, None, SIGMA_MIN, SIGMA_MAX, steps)
        error = (expected - log_p) / (DIM * math.log(2))
        rows.append((steps, float(error.mean()), float(error.abs().max())))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--small-batch", type=int, default=16, help="the single network again at this eval.nll_batch")
    p.add_argument("--size", type=int, default=8, help="image side (the demo's digits: 8)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="a few seconds: 4 images, 4 steps (a smoke test)")
    args = p.parse_args()
    images, steps = (4, 4) if args.tiny else (args.images, args.steps)

    torch.manual_seed(0)
    size, batch = args.size, min(args.batch, images)
    single = Denoiser(build_unet("tiny", size, 1)).eval().to(args.device)
    auxiliaries = [Denoiser(build_unet("tiny", size, 1)) for _ in range(3)]
    fused = FusedDenoiser(auxiliaries, [0.2, 0.3, 0.5]).to(args.device)
    data = torch.randint(0, 256, (images, 1, size, size), dtype=torch.uint8)
    print(f"nll_bits_per_dim, tiny UNet, {size}x{size}x1, {images} images, {steps} Heun steps ({2 * steps} "
          f"evaluations), 1 probe, {args.device}, torch threads {torch.get_num_threads()}")
    print("| model | images per ODE solve | networks per evaluation | s/image | x single |\n|---|---|---|---|---|")
    base = seconds_per_image(single, data, steps, batch, args.device)
    print(f"| Denoiser | {batch} | 1 | {base:.3f} | 1.0x |")
    small = seconds_per_image(single, data, steps, args.small_batch, args.device)
    print(f"| Denoiser | {min(args.small_batch, images)} | 1 | {small:.3f} | {small / base:.1f}x |")
    seconds = seconds_per_image(fused, data, steps, batch, args.device)
    print(f"| FusedDenoiser, K = 3 | {batch} | {fused.networks_per_call} | {seconds:.3f} | {seconds / base:.1f}x |")

    step_counts, count = ((4, 8, 16), 16) if args.tiny else ((16, 32, 48, 64, 96, 128, 256), 256)
    print(f"\nGaussian closed form, {DIM} dimensions (std 0.01 ... 0.5, rotated), {count} images, exact trace; "
          f"default steps {DEFAULT_STEPS}")
    print("| steps | NLL bias, mean (bits/dim) | worst image | mean x steps^2 |\n|---|---|---|---|")
    for steps, mean, worst in gaussian_errors(step_counts, count):
        print(f"| {steps} | {mean:+.4f} | {worst:.4f} | {mean * steps ** 2:+.0f} |")


if __name__ == "__main__":
    main()
