"""ScoreFusion costs on a finished run (after `make demo`, or at least `scorefuse fuse`), side by side in one
process; the models come from the run's catalogue (stages/catalogue.py) and run on the GPU when there is one:

1. Fitting lambda: the exact fit (one Gram pass + the simplex QP) against the paper's fit (softmax
   logits, SGD with fuse.sgd_lr and fuse.sgd_momentum, minibatches of fuse.batch target images with fresh
   sigma/noise draws, the K networks evaluated at every step), on the K auxiliaries of the run's fused model
   (its own lambda plays no part in either fit) and with the run's fuse.sigma_bins. Both are judged on one
   yardstick: the loss on reference Gram statistics from fuse.draws_per_image draws per image (--draws); its
   optimum is "the optimal loss". The exact fit is timed at 1, 2, 4, ... draws per image on other draws
   (another seed), and the first one within 0.1% of the optimum counts; SGD's clock stops when it first
   comes within 0.1%. Target: the exact fit is at least 20x faster and at least as good.
2. Sampling: one sample of the fused model `fused-exact` (its networks per evaluation: K, or 1 where lambda
   is one-hot) against one of an auxiliary (--aux), same latents and the run's Heun sampler.
   Target: at most (networks per evaluation) x + 10%.

    python bench/fusion.py [--config configs/digits.yaml] [--root runs] [--aux aux-low] [key=value ...]
    python bench/fusion.py --tiny [--root DIR] [key=value ...]   # smoke test: 2 draws, 2 SGD epochs, 4 samples
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from evaluation.labels import FUSED_EXACT, auxiliary  # noqa: E402
from shards.manifest import image_shape, load_manifest  # noqa: E402
from shards.stream import read_population  # noqa: E402
from stages.catalogue import find, latents  # noqa: E402
from stages.config import load_config  # noqa: E402
from stages.fuse import sgd_fit_parts  # noqa: E402
from trainer.lambda_fit import accumulate_gram, fit_barycenter_weights, objective_of  # noqa: E402
from shards.seeds import Stream, generator, seed_of  # noqa: E402
from shards.pixels import to_unit  # noqa: E402
from stages.rundir import RunDir  # noqa: E402
from trainer.precision import autocast_dtype  # noqa: E402
from stages.fuse import target_batches  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def objective(cfg):
    return objective_of(cfg.fuse.objective, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data)


def exact_fit(fused, images, cfg, draws, seed):
    t0 = time.perf_counter()
    batches = target_batches(enumerate(images.split(cfg.fuse.batch)), seed)
    stats = accumulate_gram(fused, batches, draws, objective(cfg),
                            sigma_edges=list(cfg.fuse.sigma_bins) or None,
                            autocast_dtype=autocast_dtype(cfg.fuse.precision))  # returns on the CPU: synchronised
    fit = fit_barycenter_weights(stats, fused.names)
    return stats, fit, time.perf_counter() - t0


def fastest_exact(fused, images, cfg, reference, optimum, max_draws):
    """(seconds, draws per image, loss on the reference) of the cheapest exact fit within 0.1%."""
    draws = 1
    while True:
        _, fit, seconds = exact_fit(fused, images, cfg, draws, seed_of(cfg.train.seed, Stream.GRAM))
        loss = float(reference.loss(fit["lambda"]))
        if loss <= optimum * 1.001 or draws >= max_draws:
            return seconds, draws, loss
        draws *= 2


def sgd_fit(fused, images, cfg, stats, optimum, max_epochs, device):
    """The paper's SGD; returns (seconds to within 0.1% of the optimum or None, epochs, final loss)."""
    torch.manual_seed(seed_of(cfg.train.seed, Stream.LAMBDA_SGD, 0))  # as the fuse stage's rank 0
    modules, optimizers, updates = sgd_fit_parts(fused, objective(cfg), sigma_edges=list(cfg.fuse.sigma_bins) or None,
                                                 lr=cfg.fuse.sgd_lr, momentum=cfg.fuse.sgd_momentum,
                                                 autocast_dtype=autocast_dtype(cfg.fuse.precision),
                                                 init=generator(cfg.train.seed, Stream.LAMBDA_INIT))
    opt, loss_fn, weights = optimizers["sgd"], updates[0].loss, modules["weights"].to(device)

    def yardstick():
        return float(stats.loss(weights.weights().detach().double().cpu()))
    x0 = to_unit(images).to(device)
    clock, reached, step = 0.0, None, 0
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(x0))
        for chunk in order.split(cfg.fuse.batch):
            t0 = time.perf_counter()
            loss = loss_fn(modules, x0[chunk.to(device)], step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            clock += time.perf_counter() - t0
            step += 1
            if reached is None and yardstick() <= optimum * 1.001:
                reached = clock
        if reached is not None:
            return reached, epoch, yardstick()
    return None, max_epochs, yardstick()


def sample_seconds(sample_fn, z, rounds, device):
    sample_fn(z[:2])  # warm-up
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        sample_fn(z)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--root", help="the runs directory (the same as the override root=...)")
    p.add_argument("--aux", help="the auxiliary the fused model's sampling is compared with (default: the first)")
    p.add_argument("--draws", type=int, help="draws per image of the yardstick (default: fuse.draws_per_image)")
    p.add_argument("--max-epochs", type=int, default=1000, help="SGD gives up after this many epochs")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: yardstick of 2 draws, 2 SGD epochs, 4 samples, 1 round (no target judged)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. root=/elsewhere/runs")
    args = p.parse_intermixed_args()
    if args.tiny:
        args.draws, args.max_epochs, args.sample_batch, args.rounds = 2, 2, 4, 1
    cfg = load_config(args.config, [*args.overrides, *([f"root={args.root}"] if args.root else [])])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rd = RunDir.of(cfg)
    fused_model = find(cfg, FUSED_EXACT)
    aux_model = find(cfg, auxiliary(args.aux or cfg.data.aux[0].name))
    fused = fused_model.load().to(device)
    single = aux_model.load().to(device)
    k, draws = fused.num_models, args.draws or cfg.fuse.draws_per_image
    images = read_population(rd.data, cfg.data.target.name, cfg.data.max_bad_samples)[0]

    stats, fit, reference_s = exact_fit(fused, images, cfg, draws, cfg.train.seed)
    optimum = fit["report"]["loss"]
    exact_s, exact_draws, exact_loss = fastest_exact(fused, images, cfg, stats, optimum, draws)
    sgd_s, epochs, sgd_loss = sgd_fit(fused, images, cfg, stats, optimum, args.max_epochs, device)
    print(f"\nfitting lambda on n = {len(images)} target images, K = {k} ({', '.join(fused.names)}); yardstick: "
          f"{draws} draws/image ({reference_s:.1f} s), optimal loss {optimum:.5f}; device {device}, "
          f"torch threads {torch.get_num_threads()}" + (" (--tiny: a smoke test, not a measurement)" if args.tiny else ""))
    print("| fit | seconds to within 0.1% of the optimum | loss on the yardstick |\n|---|---|---|")
    print(f"| exact (Gram pass + QP), {exact_draws} draws/image | {exact_s:.2f} | {exact_loss:.5f} |")
    sgd_cell = f"{sgd_s:.2f} ({epochs} epochs)" if sgd_s is not None else f"not reached in {epochs} epochs"
    print(f"| paper's SGD (lr {cfg.fuse.sgd_lr}, momentum {cfg.fuse.sgd_momentum}) | {sgd_cell} | {sgd_loss:.5f} |")
    if sgd_s is not None:
        print(f"exact fit speed-up: {sgd_s / exact_s:.1f}x (target >= 20x)")
    else:
        print(f"exact fit speed-up: > {args.max_epochs} epochs of SGD; SGD ended {100 * (sgd_loss / optimum - 1):.3f}% above the optimum")

    shape = image_shape(load_manifest(rd.data))
    z = latents(cfg, range(args.sample_batch), shape).to(device)
    with torch.no_grad():
        one = sample_seconds(aux_model.sampler(single, cfg), z, args.rounds, device)
        many = sample_seconds(fused_model.sampler(fused, cfg), z, args.rounds, device)
    active = fused.networks_per_call
    print(f"\nsampling {args.sample_batch} images, {cfg.edm.sampler_steps}-step Heun, median of {args.rounds}; "
          f"{fused_model.label} runs {active} of its K = {k} networks per evaluation")
    print("| model | seconds | per sample (ms) | x one auxiliary |\n|---|---|---|---|")
    print(f"| {aux_model.label} | {one:.2f} | {1000 * one / args.sample_batch:.1f} | 1.00 |")
    print(f"| {fused_model.label}, K = {k} | {many:.2f} | {1000 * many / args.sample_batch:.1f} | {many / one:.2f} |")
    print(f"fused / auxiliary: {many / one:.2f}x (target <= {active * 1.1:.1f}x)")


if __name__ == "__main__":
    main()
