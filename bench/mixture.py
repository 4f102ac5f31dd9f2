"""Mixture fusion's costs on a finished run (after `make demo`), side by side in one process:

1. Sampling: the mixture-fused model (the router and the K auxiliaries per evaluation) against one auxiliary
   and the barycenter, same latents, batch and Heun sampler; with skipping (fuse.mixture_skip) the networks
   the router's posterior excludes for a whole batch are not run. Target: at most K x + 15% with the router.
2. Training: images/s of the router's training step against one auxiliary's (the same batch, in memory, the
   same engine-free loop of forward, backward and Adam), so its share of the fuse stage is known.

    python bench/mixture.py [--config configs/digits.yaml] [--batch 64] [--skip 1e-3] [key=value ...]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from evaluation.labels import FUSED_EXACT, FUSED_MIXTURE, auxiliary  # noqa: E402
from shards.manifest import image_shape, load_manifest  # noqa: E402
from stages.catalogue import find, latents  # noqa: E402
from stages.config import load_config  # noqa: E402
from trainer.edm import Denoiser, denoising_loss, heun_sample  # noqa: E402
from trainer.engine import adam  # noqa: E402
from trainer.router import Router, router_loss  # noqa: E402
from stages.rundir import RunDir  # noqa: E402
from trainer.unet import build_unet  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, rounds) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_rate(loss, optimizer, device, steps) -> float:
    def run():
        for _ in range(steps):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return steps / seconds(run, device, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--skip", type=float, default=1e-3, help="the skipping threshold measured")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a smoke test: batch 4, 3 Heun steps, 1 round")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    overrides = list(a.overrides)
    if a.tiny:
        a.batch, a.rounds, a.train_steps = 4, 1, 2
        overrides.append("edm.sampler_steps=3")
    cfg = load_config(a.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = image_shape(load_manifest(RunDir.of(cfg).data))
    z = latents(cfg, range(a.batch), shape).to(device)
    mixture_entry, barycenter_entry = find(cfg, FUSED_MIXTURE), find(cfg, FUSED_EXACT)
    aux_entry = find(cfg, auxiliary(cfg.data.aux[0].name))
    mixture = mixture_entry.load().to(device)
    k = mixture.num_models
    rows = {}
    with torch.no_grad():
        for label, entry, network in (("one auxiliary", aux_entry, aux_entry.load().to(device)),
                                      (f"barycenter, K = {k}", barycenter_entry, barycenter_entry.load().to(device)),
                                      (f"mixture, K = {k}, router, all networks", mixture_entry, mixture)):
            rows[label] = seconds(lambda: entry.sampler(network, cfg)(z), device, a.rounds)
        mixture.skip = a.skip
        rows[f"mixture, skip below {a.skip:g}"] = seconds(lambda: heun_sample(
            mixture, z, cfg.edm.sampler_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho), device, a.rounds)
    single = rows["one auxiliary"]
    print(f"\nsampling {a.batch} images, {cfg.edm.sampler_steps}-step Heun, {device}, median of {a.rounds}")
    print("| model | seconds | x one auxiliary |\n|---|---|---|")
    for label, s in rows.items():
        print(f"| {label} | {s:.3f} | {s / single:.2f} |")
    ratio = rows[f"mixture, K = {k}, router, all networks"] / single
    print(f"mixture / auxiliary: {ratio:.2f}x (target <= {k * 1.15:.2f}x)")

    torch.manual_seed(0)
    x0 = torch.rand(a.batch, *shape, device=device) * 2 - 1
    labels = torch.arange(a.batch, device=device) % k
    denoiser = Denoiser(build_unet(cfg.network.preset, shape[-1], shape[0])).to(device)
    router = Router(shape[-1], shape[0], k, cfg.fuse.router_preset).to(device)
    e = cfg.edm
    aux_rate = training_rate(lambda: denoising_loss(denoiser, x0, None, e.p_mean, e.p_std, e.sigma_data).mean(),
                             adam(denoiser.parameters(), 1e-4, (0.9, 0.999), 1e-8), device, a.train_steps)
    router_rate = training_rate(lambda: router_loss(router, x0, labels, e.sigma_min, e.sigma_max),
                                adam(router.parameters(), 1e-3, (0.9, 0.999), 1e-8), device, a.train_steps)
    print(f"\ntraining step, batch {a.batch}: auxiliary ({cfg.network.preset}) {aux_rate:.1f} steps/s, "
          f"router ({cfg.fuse.router_preset}) {router_rate:.1f} steps/s: the router step costs "
          f"{aux_rate / router_rate:.2f}x an auxiliary's")


if __name__ == "__main__":
    main()
