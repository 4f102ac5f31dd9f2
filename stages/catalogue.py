"""The model catalogue: every finished model of a run, by the label the report shows.

One entry per model: how to load it, how to sample it, how many network evaluations a sample costs, and
the facts the report prints (training length, fit time, lambda). `evaluate`, `sample`, the sweep and the
benches all go through it, so `scorefuse sample model=<label>` accepts exactly the labels of report.json.

Labels: evaluation/labels.py (auxiliaries, the fused models, the baselines, the one-step generator).

Every sampler draws image i from its own latents (shards.seeds, Stream.SAMPLES and the run's train.seed),
so image i of a model is the same whatever the batch size, the number of processes or the chunking:
`scorefuse sample` reproduces the images the report scored.
"""
import functools
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from evaluation import labels
from shards.atomic import sha256_file, sha256_text
from shards.errors import CheckpointError, ConfigError, ModelError
from stages.config import RunConfig
from trainer.edm import heun_sample, sigma_bounds
from trainer.export import DENOISER_FILES, GENERATOR_FILES, ROUTER_FILES, has_denoiser, load_denoiser
from trainer.fused_denoiser import FusedDenoiser
from trainer.mixture import HybridDenoiser, MixtureDenoiser
from trainer.precision import with_autocast
from shards.pixels import to_uint8
from trainer.router import Router, load_router
from stages.pretrained import load_recorded
from stages.rundir import RunDir, finished_info, is_finished
from trainer.score_mismatch import load_generator
from shards.seeds import Stream, per_image_normal


@dataclass
class Model:
    label: str
    description: str
    load: Callable[[], nn.Module]   # the network on the CPU, in eval mode
    files: tuple[Path, ...]         # the weights it is made of: what identifies it
    one_step: bool = False          # a generator z -> x (one call), not a denoiser
    facts: dict = field(default_factory=dict)

    def sampler(self, network: nn.Module, cfg: RunConfig) -> Callable[[torch.Tensor], torch.Tensor]:
        """latents [B, C, H, W] -> images in [-1, 1]: the generator itself, or the run's Heun sampler, under
        autocast of eval.sample_precision."""
        e = cfg.edm
        low, high = sigma_bounds(network, e.sigma_min, e.sigma_max)
        sample = network if self.one_step else partial(heun_sample, network, num_steps=e.sampler_steps,
                                                       sigma_min=low, sigma_max=high, rho=e.rho)
        return with_autocast(sample, cfg.eval.sample_precision)

    def nfe(self, network: nn.Module, cfg: RunConfig) -> int:
        """Network evaluations per sample: 1 for a generator; 2 x steps - 1 Heun evaluations, times the
        networks a fused model runs per evaluation."""
        if self.one_step:
            return 1
        return (2 * cfg.edm.sampler_steps - 1) * getattr(network, "networks_per_call", 1)

    def fingerprint(self) -> str:
        """A hash of the weights and of what combines them (lambda, pi, the hybrid's sigma*): the evaluation
        cache's key."""
        return sha256_text(repr([self.label, [sha256_file(f) for f in self.files], self.facts.get("weights"),
                                 *([self.facts["sigma_star"]] if "sigma_star" in self.facts else [])]))


# ---- what a finished fuse stage holds ------------------------------------------------------------------------

def load_auxiliaries(cfg: RunConfig) -> dict[str, torch.nn.Module]:
    """The denoisers of the finished auxiliaries, by name (the EMA weights of a trained one, the recorded model
    of a pretrained one); a clear error naming any that is missing."""
    run = RunDir.of(cfg)
    denoisers = {}
    for spec in cfg.data.aux:
        name, directory = spec.name, run.aux(spec.name)
        try:
            denoisers[name] = _auxiliary(run, spec)
        except CheckpointError as error:
            if spec.pretrained is not None and run.pretrained_record(name).is_file():
                raise  # recorded, but its weights changed: the error says so
            raise ModelError(f"auxiliary {name}: no finished model in {directory}; "
                             f"run `scorefuse train-aux aux={name}` first") from error
    return denoisers


def trained_auxiliaries(cfg: RunConfig) -> list[str]:
    """The auxiliaries trained here (network.preset), not pretrained: what fine-tuning and warm starts start from."""
    return [a.name for a in cfg.data.aux if a.pretrained is None]


def sigma_limits(cfg: RunConfig) -> tuple[float, float]:
    """The run's sigma_min and sigma_max (edm.*) within the ranges recorded for its pretrained auxiliaries: where
    the likelihood's ODE runs for every model, so that the rows of the report compare on the same ODE."""
    low, high = cfg.edm.sigma_min, cfg.edm.sigma_max
    for spec in cfg.data.aux:
        if spec.pretrained is None:
            continue
        record = RunDir.of(cfg).pretrained_record(spec.name)
        if record.is_file():
            valid = json.loads(record.read_text())["sigma_range"]
            if valid is not None:
                low, high = max(low, valid[0]), min(high, valid[1])
    return low, high


def _valid_for(sigma_range, why: str = "") -> str:
    """What a description says of a model valid at part of the sigmas only (a pretrained auxiliary, what fuses
    one): ", valid for sigma lo to hi"; nothing for one valid at every sigma (sigma_range None)."""
    return "" if sigma_range is None else ", valid for sigma {:.4g} to {:.4g}{}".format(*sigma_range, why)


def load_fit(cfg: RunConfig) -> dict:
    """lambda.json of a finished fuse stage."""
    path = RunDir.of(cfg).lambda_file
    if not path.is_file():
        raise ModelError(f"no {path}: run `scorefuse fuse` first")
    return json.loads(path.read_text())


def barycenter_model(fit: dict, auxiliaries: dict, which: str | None = None, batched: bool | None = None) -> FusedDenoiser:
    """The fused model of a fit: `which` = exact | sgd | uniform, or None for fuse.method's."""
    lam = torch.tensor(fit[which or fit["method"]]["lambda"], dtype=torch.float64)
    return FusedDenoiser([auxiliaries[n] for n in fit["names"]], lam, sigma_edges=fit["sigma_edges"],
                         names=fit["names"], batched=batched)


def best_auxiliary(fit: dict, among: Sequence[str] | None = None) -> str:
    """The auxiliary with the lowest target loss on its own (the best vertex of the exact fit), of `among`
    (default: all)."""
    losses = {k: v for k, v in fit["exact"]["vertex_losses"].items() if among is None or k in among}
    return min(losses, key=losses.get)


def single_lambda(fit: dict) -> list[float]:
    """One lambda for every sigma: the exact fit's, or with sigma bins the single-lambda fit on the same draws."""
    exact = fit["exact"]
    return exact.get("single_lambda", {}).get("lambda") or exact["lambda"][0]


def mixture_model(cfg: RunConfig, mixture: dict, auxiliaries: dict, router: Router) -> MixtureDenoiser:
    """The mixture-fused model of a fit (fuse.mixture_weights' pi)."""
    return MixtureDenoiser([auxiliaries[n] for n in mixture["names"]], router, mixture[mixture["weights"]]["pi"],
                           mixture["priors"], names=mixture["names"], batched=cfg.fuse.batched,
                           skip=cfg.fuse.mixture_skip)


def hybrid_model(cfg: RunConfig, fit: dict, mixture: dict, auxiliaries: dict, router: Router) -> HybridDenoiser:
    """The hybrid of the two fused models: the mixture's weights above fuse.hybrid_sigma, fuse.method's lambda
    below."""
    return HybridDenoiser([auxiliaries[n] for n in mixture["names"]], router, mixture[mixture["weights"]]["pi"],
                          fit[fit["method"]]["lambda"], cfg.fuse.hybrid_sigma, mixture["priors"],
                          sigma_edges=fit["sigma_edges"], names=mixture["names"], batched=cfg.fuse.batched,
                          skip=cfg.fuse.mixture_skip)


def load_mixture(cfg: RunConfig) -> dict:
    path = RunDir.of(cfg).mixture_file
    if not path.is_file():
        raise ModelError(f"no {path}: run `scorefuse fuse` with fuse.mixture=true first")
    return json.loads(path.read_text())


# ---- the catalogue ---------------------------------------------------------------------------------------------

def finished_models(cfg: RunConfig) -> list[Model]:
    """Every finished model of the run, in report order."""
    run = RunDir.of(cfg)
    models = []
    for pop in cfg.data.aux:
        stage = run.aux(pop.name)
        if is_finished(stage) and pop.pretrained is not None:
            record = json.loads(run.pretrained_record(pop.name).read_text())
            kind = f"{record['class']} {record['prediction_type']}" if record["kind"] == "diffusers" else \
                "scorefuse export"
            described = f"pretrained {pop.pretrained} ({kind}{_valid_for(record['sigma_range'])})"
            models.append(Model(labels.auxiliary(pop.name), described,
                                partial(_auxiliary, run, pop), _aux_files(run, pop), facts={"minutes": 0.0}))
        elif is_finished(stage):
            done = finished_info(stage)
            models.append(Model(labels.auxiliary(pop.name), f"auxiliary trained on {pop.name}",
                                partial(_denoiser, stage), _files(stage, DENOISER_FILES),
                                facts={"population": pop.name, "kimg": done["kimg"], "minutes": done["seconds"] / 60}))
    if is_finished(run.fuse):
        fit = load_fit(cfg)
        auxiliaries = functools.cache(lambda: load_auxiliaries(cfg))  # loaded once, for both fused models

        def fused(which):
            return barycenter_model(fit, auxiliaries(), which, batched=cfg.fuse.batched).eval()
        specs = {a.name: a for a in cfg.data.aux}
        aux_files = tuple(f for name in fit["names"] for f in _aux_files(run, specs[name]))
        valid = _valid_for(fit.get("sigma_range"), " (the auxiliaries' common range)")
        objective = fit.get("objective", "edm")
        for which, description in (
                ("exact", f"ScoreFusion barycenter, lambda by exact fit ({objective} objective{valid})"),
                ("sgd", f"ScoreFusion barycenter, lambda by the paper's SGD fit ({objective} objective{valid})"),
                ("uniform", f"control: the barycenter with lambda = 1/K, an ensemble fitted to nothing{valid}")):
            if which not in fit:  # a fit written before the uniform control existed
                continue
            facts = {"minutes": fit[which]["seconds"] / 60, "weights": fit[which]["lambda"],
                     "fit gap %": fit[which].get("gap_percent", 0.0),
                     **({"early_stopping": fit[which]["early_stopping"]} if "early_stopping" in fit[which] else {})}
            models.append(Model(labels.fused(which), description, partial(fused, which), aux_files, facts=facts))
        if run.mixture_file.is_file():
            mixture = load_mixture(cfg)

            def mixed():
                return mixture_model(cfg, mixture, auxiliaries(), load_router(run.router)).eval()
            drawn = mixture.get("router_samples", {})  # the pretrained auxiliaries' samples the router trained on
            facts = {"minutes": (mixture["seconds"] + sum(d["seconds"] for d in drawn.values())) / 60,
                     "weights": mixture[mixture["weights"]]["pi"]}
            on_samples = "; the router trained on " + ", ".join(f"{d['images']} samples of {n}" for n, d in
                                                                 drawn.items()) if drawn else ""
            models.append(Model(labels.FUSED_MIXTURE, f"mixture fusion, pi by EM on the {mixture['weights']} "
                                f"(router posteriors or the auxiliaries' likelihoods){on_samples}", mixed,
                                aux_files + _files(run.router, ROUTER_FILES), facts=facts))
            if cfg.fuse.hybrid_sigma is not None and mixture["names"] == fit["names"]:
                lam = fit[fit["method"]]["lambda"]  # weights: pi above sigma*, then lambda's rows

                def hybrid():
                    return hybrid_model(cfg, fit, mixture, auxiliaries(), load_router(run.router)).eval()
                models.append(Model(labels.FUSED_HYBRID, f"ablation: {labels.FUSED_MIXTURE}'s weights at sigma >= "
                                    f"{cfg.fuse.hybrid_sigma:g}, {labels.fused(fit['method'])}'s lambda below",
                                    hybrid, aux_files + _files(run.router, ROUTER_FILES),
                                    facts={"minutes": facts["minutes"] + fit[fit["method"]]["seconds"] / 60,
                                           "weights": [facts["weights"], *np.atleast_2d(lam).tolist()],
                                           "sigma_star": cfg.fuse.hybrid_sigma}))
    for name, description in ((labels.TARGET_SCRATCH, "trained on the n target images alone"),
                              (labels.TARGET_FINETUNE, "the best auxiliary fine-tuned on the n target images"),
                              (labels.CHECKPOINT_MERGE, "auxiliary weights averaged with lambda")):
        stage = run.baseline(name)
        if is_finished(stage) and has_denoiser(stage):
            done = finished_info(stage)
            facts = {"kimg": done["kimg"], "minutes": done["seconds"] / 60,
                     **({"early_stopping": done["early_stopping"]} if "early_stopping" in done else {})} \
                if "kimg" in done else {"minutes": 0.0, "weights": done["lambda"]}
            models.append(Model(name, description, partial(_denoiser, stage), _files(stage, DENOISER_FILES), facts=facts))
    if is_finished(run.baseline(labels.SEED_ENSEMBLE)):
        models.append(_seed_ensemble(cfg, run))
    if is_finished(run.distill):
        done = finished_info(run.distill)
        models.append(Model(labels.DISTILL, "one-step generator (Score Mismatching, fused teacher)",
                            lambda: load_generator(run.distill)[0], _files(run.distill, GENERATOR_FILES), one_step=True,
                            facts={"kimg": done["kimg"], "minutes": done["seconds"] / 60}))
    return models


def find(cfg: RunConfig, label: str) -> Model:
    models = finished_models(cfg)
    for model in models:
        if model.label == label:
            return model
    raise ConfigError(f"model={label}: no finished model of that name in {RunDir.of(cfg).root} "
                      f"(have: {', '.join(m.label for m in models) or 'none'})")


def latents(cfg: RunConfig, indices: Sequence[int], shape) -> torch.Tensor:
    """The latents of images `indices` of any model of the run (evaluate's and `sample`'s)."""
    return per_image_normal(cfg.train.seed, Stream.SAMPLES, indices, shape)


@torch.no_grad()
def draw(sample_fn, cfg: RunConfig, indices: Sequence[int], shape, device) -> torch.Tensor:
    """uint8 images [len(indices), C, H, W] of a sampler: each computed in its aligned group of
    eval.sample_batch images (evaluation/features.py says why), each group once."""
    group = cfg.eval.sample_batch
    images = {}
    for g in sorted({int(i) // group for i in indices}):
        members = range(g * group, (g + 1) * group)
        batch = to_uint8(sample_fn(latents(cfg, members, shape).to(device))).cpu()
        images.update(zip(members, batch))
    return torch.stack([images[int(i)] for i in indices]) if len(indices) else torch.zeros((0, *shape), dtype=torch.uint8)


def _seed_ensemble(cfg: RunConfig, run: RunDir) -> Model:
    """The control seed-ensemble: an auxiliary and its copies trained with other seeds (stages/fuse.py), their
    denoisers averaged with equal weights, the same FusedDenoiser as the barycenter's."""
    done = finished_info(run.baseline(labels.SEED_ENSEMBLE))
    best, copies = done["population"], range(1, done["copies"] + 1)
    stages = [run.aux(best), *map(run.ensemble_copy, copies)]
    weights = [1 / len(stages)] * len(stages)

    def ensemble():
        return FusedDenoiser([_denoiser(s) for s in stages], torch.tensor(weights, dtype=torch.float64),
                             names=[best, *(f"{best} copy {c}" for c in copies)], batched=cfg.fuse.batched).eval()
    return Model(labels.SEED_ENSEMBLE, f"control: {labels.auxiliary(best)} and {len(copies)} copies of it trained with "
                 "other seeds, averaged uniformly", ensemble, tuple(f for s in stages for f in _files(s, DENOISER_FILES)),
                 facts={"population": best, "weights": weights,
                        "minutes": sum(finished_info(s)["seconds"] for s in stages) / 60})


def _denoiser(stage: Path) -> nn.Module:
    return load_denoiser(stage)[0]


def _auxiliary(run: RunDir, spec) -> nn.Module:
    """An auxiliary's denoiser: trained here, or pretrained (loaded again from its recorded source)."""
    return load_recorded(spec, run.pretrained_record(spec.name)) if spec.pretrained is not None \
        else load_denoiser(run.aux(spec.name))[0]


def _aux_files(run: RunDir, spec) -> tuple[Path, ...]:
    """What identifies an auxiliary: its weights, or the record of a pretrained one (which holds their sha256)."""
    return (run.pretrained_record(spec.name),) if spec.pretrained is not None \
        else _files(run.aux(spec.name), DENOISER_FILES)


def _files(stage: Path, names: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(Path(stage) / name for name in names)
