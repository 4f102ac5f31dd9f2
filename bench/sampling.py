"""Sampling cost and quality of the one-step generator against its teacher, on a finished run (after
`scorefuse distill`), side by side in one process on the same batch of latents:

1. samples/s of
   - the one-step generator G (one network call per sample),
   - the fused teacher with the default deterministic Heun sampler (edm.sampler_steps steps:
     2 x steps - 1 evaluations, each running the K auxiliaries),
   - the fused teacher with a 1000-step Euler-Maruyama sampler like the ScoreFusion paper's. Written in the
     VE / EDM form of the reverse SDE, dx = -2 sigma sigma' score dt + sqrt(2 sigma sigma') dW with
     score(x; sigma) = (D(x; sigma) - x) / sigma^2, on EDM's rho = 7 sigma schedule (sigma_max ... sigma_min):
         x <- x + (s_i^2 - s_{i+1}^2) score(x; s_i) + sqrt(s_i^2 - s_{i+1}^2) xi,   xi ~ N(0, I)
     and a final denoising step x0 = D(x; sigma_min) (Tweedie) instead of noise at sigma_min. 1000 evaluations
     of the K networks.
   Target: G at least 30x the Heun sampler's samples/s.
2. The Fréchet distance of G's and of the Heun teacher's samples to the target's held-out reference
   population (eval.num_samples each, the run's extractor). Target: G's within 1.5x of the teacher's.

    python bench/sampling.py [--config configs/digits.yaml] [--batch 64] [--em-steps 1000] [key=value ...]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from evaluation.frechet import metric_name  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.distill import distill_dir  # noqa: E402
from launch.stages import frechet_evaluator, latents, reference_statistics, sampler  # noqa: E402
from launch.rundir import RunDir  # noqa: E402
from shards.manifest import image_shape, load_manifest  # noqa: E402
from trainer.distill import load_generator  # noqa: E402
from trainer.edm import sigma_steps  # noqa: E402
from trainer.scorefusion import load_fused  # noqa: E402


@torch.no_grad()
def euler_maruyama(denoiser, z, steps, sigma_min, sigma_max, rho, generator):
    sig = sigma_steps(steps, sigma_min, sigma_max, rho)[:-1].tolist()  # sigma_max ... sigma_min
    x = z.double() * sig[0]
    for s, s_next in zip(sig, sig[1:]):
        score = (denoiser(x, torch.full((len(x), 1, 1, 1), s, dtype=torch.float64)).double() - x) / s ** 2
        var = s ** 2 - s_next ** 2
        x = x + var * score + var ** 0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return denoiser(x, torch.full((len(x), 1, 1, 1), sig[-1], dtype=torch.float64)).float()


def timed(fn, z, repeats=1):
    fn(z[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(z)
    return repeats * len(z) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--em-steps", type=int, default=1000)
    p.add_argument("--skip-fd", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    rd = RunDir.of(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = image_shape(load_manifest(rd.data))
    G = load_generator(distill_dir(cfg))[0].to(device)
    fused = load_fused(rd.fuse, rd.aux_dirs(cfg)).to(device)
    heun = sampler(fused, cfg)
    e = cfg.edm
    z = latents(a.batch, shape, 0, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def go(x):
            out = fn(x)
            sync()
            return out
        return go
    with torch.no_grad():
        rates = {"one-step generator (1 NFE)": timed(run(G), z, repeats=20),
                 f"fused teacher, Heun {e.sampler_steps} steps ({(2 * e.sampler_steps - 1)} x K NFE)": timed(run(heun), z)}
        g = torch.Generator().manual_seed(0)
        rates[f"fused teacher, Euler-Maruyama {a.em_steps} steps ({a.em_steps} x K NFE)"] = timed(
            run(lambda x: euler_maruyama(fused, x, a.em_steps, e.sigma_min, e.sigma_max, e.rho, g)), z)
    gen = rates["one-step generator (1 NFE)"]
    active = fused.networks_per_call
    print(f"fused teacher: K = {fused.num_models}, {active} network(s) run per evaluation")
    result = {"device": str(device), "batch": a.batch, "K": fused.num_models, "networks_per_evaluation": active,
              "samples_per_s": rates,
              "speedup_vs_heun": gen / list(rates.values())[1], "speedup_vs_em": gen / list(rates.values())[2]}
    for k, v in rates.items():
        print(f"{k:>60}: {v:10.1f} samples/s  ({gen / v:7.1f}x slower than G)")
    if not a.skip_fd:
        evaluator = frechet_evaluator(cfg, device)
        reference = reference_statistics(evaluator, cfg, cfg.data.reference.name)
        n = cfg.eval.num_samples
        name = metric_name(evaluator.extractor, n)
        fd_g = evaluator.distance(G, shape, n, reference, seed=cfg.train.seed)
        fd_t = evaluator.distance(heun, shape, n, reference, seed=cfg.train.seed)
        result.update({"metric": name, "fd_generator": fd_g, "fd_teacher_heun": fd_t, "fd_ratio": fd_g / fd_t})
        print(f"{name} to the target reference: generator {fd_g:.3f}, fused teacher (Heun) {fd_t:.3f}, "
              f"ratio {fd_g / fd_t:.2f} (target <= 1.5)")
    print(f"speedup vs Heun {result['speedup_vs_heun']:.1f}x (target >= 30x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
