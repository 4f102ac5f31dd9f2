"""Sampling cost and quality of the one-step generator against its teacher, on a finished run (after
`scorefuse distill`), side by side in one process on the same batch of latents (the catalogue's per-image
latents). The models come from the run's catalogue (stages/catalogue.py): `distill` and the fused model that
taught it (`fused-exact` or `fused-sgd`: distill.teacher_fit, else the fit's fuse.method), on the GPU when
there is one.

1. samples/s of
   - the one-step generator G (one network call per sample),
   - the fused teacher with the run's deterministic Heun sampler (edm.sampler_steps steps:
     2 x steps - 1 evaluations, each running the teacher's networks per evaluation: K, or 1 where lambda is
     one-hot),
   - the fused teacher with an --em-steps (1000) step Euler-Maruyama sampler like the ScoreFusion paper's.
     Written in the VE / EDM form of the reverse SDE, dx = -2 sigma sigma' score dt + sqrt(2 sigma sigma') dW
     with score(x; sigma) = (D(x; sigma) - x) / sigma^2, on EDM's rho = 7 sigma schedule (sigma_max ...
     sigma_min):
         x <- x + (s_i^2 - s_{i+1}^2) score(x; s_i) + sqrt(s_i^2 - s_{i+1}^2) xi,   xi ~ N(0, I)
     and a final denoising step x0 = D(x; sigma_min) (Tweedie) instead of noise at sigma_min. em_steps
     evaluations of the teacher.
   Target: G at least 30x the Heun sampler's samples/s.
2. The Fréchet distance of G's and of the Heun teacher's samples to the target's held-out reference
   population (eval.num_samples each, --fd-samples; the run's feature space, as `scorefuse evaluate`).
   Target: G's within 1.5x of the teacher's.

    python bench/sampling.py [--config configs/digits.yaml] [--root runs] [--batch 64] [--em-steps 1000]
                             [--fd-samples N] [--skip-fd] [key=value ...]
    python bench/sampling.py --tiny [--root DIR] [key=value ...]   # smoke test: batch 4, 4 EM steps, FD of 16
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from evaluation.features import frechet  # noqa: E402
from evaluation.labels import DISTILL, fused as fused_label  # noqa: E402
from stages.catalogue import find, latents  # noqa: E402
from stages.config import load_config  # noqa: E402
from trainer.edm import sigma_steps  # noqa: E402
from stages.context import StageContext  # noqa: E402
from stages.catalogue import load_fit  # noqa: E402


@torch.no_grad()
def euler_maruyama(denoiser, z, steps, sigma_min, sigma_max, rho, generator):
    sig = sigma_steps(steps, sigma_min, sigma_max, rho)[:-1].tolist()  # sigma_max ... sigma_min
    x = z.double() * sig[0]
    for s, s_next in zip(sig, sig[1:]):
        sigma = torch.full((len(x), 1, 1, 1), s, dtype=torch.float64, device=x.device)
        score = (denoiser(x, sigma).double() - x) / s ** 2
        var = s ** 2 - s_next ** 2
        x = x + var * score + var ** 0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return denoiser(x, torch.full((len(x), 1, 1, 1), sig[-1], dtype=torch.float64, device=x.device)).float()


def timed(fn, z, repeats=1):
    fn(z[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(z)
    return repeats * len(z) / (time.perf_counter() - t0)


def teacher_label(cfg) -> str:
    """The catalogue label of the fused model distill was taught by (stages/distill.py's choice)."""
    return fused_label(cfg.distill.teacher_fit or load_fit(cfg)['method'])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--root", help="the runs directory (the same as the override root=...)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--em-steps", type=int, default=1000)
    p.add_argument("--fd-samples", type=int, help="samples per Fréchet distance (default: eval.num_samples)")
    p.add_argument("--skip-fd", action="store_true")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: batch 4, G timed twice, 4 EM steps, FD over 16 samples (no target judged)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. root=/elsewhere/runs")
    a = p.parse_intermixed_args()
    repeats = 20
    if a.tiny:
        a.batch, a.em_steps, a.fd_samples, repeats = 4, 4, 16, 2
    cfg = load_config(a.config, [*a.overrides, *([f"root={a.root}"] if a.root else [])])
    n = a.fd_samples or cfg.eval.num_samples
    cfg.eval.sample_batch = min(cfg.eval.sample_batch, n)  # FeatureSpace.sample draws whole groups: no more than n samples
    ctx = StageContext.open(cfg)  # the device, the image shape and the run's feature space, as evaluate's
    device, shape = ctx.device, ctx.shape
    student, teacher = find(cfg, DISTILL), find(cfg, teacher_label(cfg))
    G = student.load().to(device)
    fused = teacher.load().to(device)
    heun = teacher.sampler(fused, cfg)
    e = cfg.edm
    z = latents(cfg, range(a.batch), shape).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def go(x):
            out = fn(x)
            sync()
            return out
        return go
    active = fused.networks_per_call
    labels = {"G": f"one-step generator ({student.nfe(G, cfg)} NFE)",
              "heun": f"{teacher.label} teacher, Heun {e.sampler_steps} steps ({teacher.nfe(fused, cfg)} NFE)",
              "em": f"{teacher.label} teacher, Euler-Maruyama {a.em_steps} steps ({a.em_steps * active} NFE)"}
    with torch.no_grad():
        rates = {labels["G"]: timed(run(G), z, repeats=repeats), labels["heun"]: timed(run(heun), z)}
        g = torch.Generator().manual_seed(0)
        rates[labels["em"]] = timed(run(lambda x: euler_maruyama(fused, x, a.em_steps, e.sigma_min, e.sigma_max,
                                                                  e.rho, g)), z)
    gen = rates[labels["G"]]
    print(f"{teacher.label} teacher: K = {fused.num_models}, {active} network(s) run per evaluation; device {device}, "
          f"batch {a.batch}, torch threads {torch.get_num_threads()}"
          + (" (--tiny: a smoke test, not a measurement)" if a.tiny else ""))
    result = {"device": str(device), "batch": a.batch, "teacher": teacher.label, "K": fused.num_models,
              "networks_per_evaluation": active, "samples_per_s": rates,
              "speedup_vs_heun": gen / rates[labels["heun"]], "speedup_vs_em": gen / rates[labels["em"]]}
    for k, v in rates.items():
        print(f"{k:>60}: {v:10.1f} samples/s  ({gen / v:7.1f}x slower than G)")
    if not a.skip_fd:
        space = ctx.features()
        reference = ctx.reference(cfg.data.reference.name)
        name = space.metric(n)
        fd_g = frechet(space.sample(student.sampler(G, cfg), shape, n, seed=cfg.train.seed)[0], reference)
        fd_t = frechet(space.sample(heun, shape, n, seed=cfg.train.seed)[0], reference)
        result.update({"metric": name, "fd_generator": fd_g, "fd_teacher_heun": fd_t, "fd_ratio": fd_g / fd_t})
        print(f"{name} to the target reference: generator {fd_g:.3f}, {teacher.label} teacher (Heun) {fd_t:.3f}, "
              f"ratio {fd_g / fd_t:.2f} (target <= 1.5)")
    print(f"speedup vs Heun {result['speedup_vs_heun']:.1f}x (target >= 30x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
