"""ScoreFusion costs on a trained run (after `make demo`), side by side in one process:

1. Fitting lambda: the exact fit (one Gram pass + the simplex QP) against the paper's fit (softmax
   logits, SGD lr 0.1 momentum 0.9, minibatches of the target images with fresh sigma/noise draws,
   the K networks evaluated at every step). Both are judged on one yardstick: the loss on reference
   Gram statistics from fuse.draws_per_image draws per image (its optimum is "the optimal loss").
   The exact fit is timed at 1, 2, 4, ... draws per image on other draws (another seed), and the
   first one within 0.1% of the optimum counts; SGD's clock stops when it first comes within 0.1%.
   Target: the exact fit is at least 20x faster and at least as good.
2. Sampling: one fused-model sample (K networks per evaluation) against one auxiliary sample, same
   batch and sampler. Target: at most K x + 10%.

    python bench/fusion.py [--config configs/digits.yaml] [key=value ...]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from launch.config import load_config  # noqa: E402
from launch.rundir import RunDir  # noqa: E402
from shards.stream import read_population  # noqa: E402
from trainer.barycenter import accumulate_gram, fit_barycenter_weights, sgd_fit_parts  # noqa: E402
from trainer.edm import heun_sample  # noqa: E402
from trainer.fusion import FusedDenoiser  # noqa: E402
from trainer.scorefusion import target_batches, load_auxiliaries  # noqa: E402


def exact_fit(fused, images, cfg, draws, seed):
    t0 = time.perf_counter()
    stats = accumulate_gram(fused, target_batches(images, cfg.fuse.batch, seed, 0, 1), draws,
                            cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data)
    fit = fit_barycenter_weights(stats, fused.names)
    return stats, fit, time.perf_counter() - t0


def fastest_exact(fused, images, cfg, reference, optimum):
    """(seconds, draws per image, loss on the reference) of the cheapest exact fit within 0.1%."""
    draws = 1
    while True:
        _, fit, seconds = exact_fit(fused, images, cfg, draws, cfg.train.seed + 1)
        loss = float(reference.loss(fit["lambda"]))
        if loss <= optimum * 1.001 or draws >= cfg.fuse.draws_per_image:
            return seconds, draws, loss
        draws *= 2


def sgd_fit(fused, images, cfg, stats, optimum, max_epochs):
    """The paper's SGD; returns (seconds to within 0.1% of the optimum or None, epochs, final loss)."""
    torch.manual_seed(cfg.train.seed)
    modules, optimizers, updates = sgd_fit_parts(fused, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data,
                                                 lr=cfg.fuse.sgd_lr, momentum=cfg.fuse.sgd_momentum)
    opt, loss_fn, weights = optimizers["sgd"], updates[0].loss, modules["weights"]
    x0 = images.float().div(127.5).sub(1)
    clock, reached = 0.0, None
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(x0))
        for chunk in order.split(cfg.fuse.batch):
            t0 = time.perf_counter()
            loss = loss_fn(modules, x0[chunk])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock += time.perf_counter() - t0
            if reached is None and float(stats.loss(weights.weights().detach().double())) <= optimum * 1.001:
                reached = clock
        if reached is not None:
            return reached, epoch, float(stats.loss(weights.weights().detach().double()))
    return None, max_epochs, float(stats.loss(weights.weights().detach().double()))


def sample_seconds(denoiser, shape, batch, steps, rounds):
    latents = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        heun_sample(denoiser, latents, num_steps=steps)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--max-epochs", type=int, default=1000, help="SGD gives up after this many epochs")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. root=/elsewhere/runs")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    rd = RunDir.of(cfg)
    auxiliaries = load_auxiliaries(rd.aux_dirs(cfg))
    k = len(auxiliaries)
    fused = FusedDenoiser(auxiliaries, torch.full((k,), 1 / k), names=list(rd.aux_dirs(cfg)))
    images = read_population(rd.data, cfg.data.target.name)[0]

    stats, fit, reference_s = exact_fit(fused, images, cfg, cfg.fuse.draws_per_image, cfg.train.seed)
    optimum = fit["report"]["loss"]
    exact_s, exact_draws, exact_loss = fastest_exact(fused, images, cfg, stats, optimum)
    sgd_s, epochs, sgd_loss = sgd_fit(fused, images, cfg, stats, optimum, args.max_epochs)
    print(f"\nfitting lambda on n = {len(images)} target images, K = {k}; yardstick: {cfg.fuse.draws_per_image} "
          f"draws/image ({reference_s:.1f} s), optimal loss {optimum:.5f}; torch threads {torch.get_num_threads()}")
    print("| fit | seconds to within 0.1% of the optimum | loss on the yardstick |\n|---|---|---|")
    print(f"| exact (Gram pass + QP), {exact_draws} draws/image | {exact_s:.2f} | {exact_loss:.5f} |")
    sgd_cell = f"{sgd_s:.2f} ({epochs} epochs)" if sgd_s is not None else f"not reached in {epochs} epochs"
    print(f"| paper's SGD (lr {cfg.fuse.sgd_lr}, momentum {cfg.fuse.sgd_momentum}) | {sgd_cell} | {sgd_loss:.5f} |")
    if sgd_s is not None:
        print(f"exact fit speed-up: {sgd_s / exact_s:.1f}x (target >= 20x)")
    else:
        print(f"exact fit speed-up: > {args.max_epochs} epochs of SGD; SGD ended {100 * (sgd_loss / optimum - 1):.3f}% above the optimum")

    shape = tuple(auxiliaries[0].image_shape)  # fused holds uniform weights: all K networks run
    single = sample_seconds(auxiliaries[0], shape, args.sample_batch, cfg.edm.sampler_steps, args.rounds)
    many = sample_seconds(fused, shape, args.sample_batch, cfg.edm.sampler_steps, args.rounds)
    print(f"\nsampling {args.sample_batch} images, {cfg.edm.sampler_steps}-step Heun, median of {args.rounds}")
    print("| model | seconds | per sample (ms) | x one auxiliary |\n|---|---|---|---|")
    print(f"| one auxiliary | {single:.2f} | {1000 * single / args.sample_batch:.1f} | 1.00 |")
    print(f"| fused, K = {k} | {many:.2f} | {1000 * many / args.sample_batch:.1f} | {many / single:.2f} |")
    print(f"fused / auxiliary: {many / single:.2f}x (target <= {k * 1.1:.1f}x)")


if __name__ == "__main__":
    main()
