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

import torch
from torch import nn

from evaluation import labels
from shards.atomic import sha256_file, sha256_text
from shards.errors import CheckpointError, ConfigError, ModelError
from stages.config import RunConfig
from trainer.edm import heun_sample
from trainer.export import DENOISER_FILES, GENERATOR_FILES, ROUTER_FILES, has_denoiser, load_denoiser
from trainer.fused_denoiser import FusedDenoiser
from trainer.mixture import MixtureDenoiser
from trainer.precision import with_autocast
from shards.pixels import to_uint8
from trainer.router import Router, load_router
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
        sample = network if self.one_step else partial(heun_sample, network, num_steps=e.sampler_steps,
                                                       sigma_min=e.sigma_min, sigma_max=e.sigma_max, rho=e.rho)
        return with_autocast(sample, cfg.eval.sample_precision)

    def nfe(self, network: nn.Module, cfg: RunConfig) -> int:
        """Network evaluations per sample: 1 for a generator; 2 x steps - 1 Heun evaluations, times the
        networks a fused model runs per evaluation."""
        if self.one_step:
            return 1
        return (2 * cfg.edm.sampler_steps - 1) * getattr(network, "networks_per_call", 1)

    def fingerprint(self) -> str:
        """A hash of the weights and of what combines them (lambda): the evaluation cache's key."""
        return sha256_text(repr([self.label, [sha256_file(f) for f in self.files], self.facts.get("weights")]))


# ---- what a finished fuse stage holds ------------------------------------------------------------------------

def load_auxiliaries(cfg: RunConfig) -> dict[str, torch.nn.Module]:
    """The EMA denoisers of the finished auxiliaries, by name; a clear error naming any that is missing."""
    run = RunDir.of(cfg)
    denoisers = {}
    for name, directory in run.aux_dirs(cfg).items():
        try:
            denoisers[name] = load_denoiser(directory)[0]
        except CheckpointError:
            raise ModelError(f"auxiliary {name}: no finished model in {directory}; "
                             f"run `scorefuse train-aux aux={name}` first") from None
    return denoisers


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


def best_auxiliary(fit: dict) -> str:
    """The auxiliary with the lowest target loss on its own (the best vertex of the exact fit)."""
    losses = fit["exact"]["vertex_losses"]
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
        if is_finished(stage):
            done = finished_info(stage)
            models.append(Model(labels.auxiliary(pop.name), f"auxiliary trained on {pop.name}",
                                partial(_denoiser, stage), _files(stage, DENOISER_FILES),
                                facts={"population": pop.name, "kimg": done["kimg"], "minutes": done["seconds"] / 60}))
    if is_finished(run.fuse):
        fit = load_fit(cfg)
        auxiliaries = functools.cache(lambda: load_auxiliaries(cfg))  # loaded once, for both fused models

        def fused(which):
            return barycenter_model(fit, auxiliaries(), which, batched=cfg.fuse.batched).eval()
        aux_files = tuple(f for name in fit["names"] for f in _files(run.aux(name), DENOISER_FILES))
        for which, description in (
                ("exact", f"ScoreFusion barycenter, lambda by exact fit ({fit.get('objective', 'edm')} objective)"),
                ("sgd", f"ScoreFusion barycenter, lambda by the paper's SGD fit ({fit.get('objective', 'edm')} "
                        "objective)"),
                ("uniform", "control: the barycenter with lambda = 1/K, an ensemble fitted to nothing")):
            if which not in fit:  # a fit written before the uniform control existed
                continue
            facts = {"minutes": fit[which]["seconds"] / 60, "weights": fit[which]["lambda"],
                     "fit gap %": fit[which].get("gap_percent", 0.0)}
            models.append(Model(labels.fused(which), description, partial(fused, which), aux_files, facts=facts))
        if run.mixture_file.is_file():
            mixture = load_mixture(cfg)

            def mixed():
                return mixture_model(cfg, mixture, auxiliaries(), load_router(run.router)).eval()
            facts = {"minutes": mixture["seconds"] / 60, "weights": mixture[mixture["weights"]]["pi"]}
            models.append(Model(labels.FUSED_MIXTURE, f"mixture fusion, pi by EM on the {mixture['weights']} "
                                "(router posteriors or the auxiliaries' likelihoods)", mixed,
                                aux_files + _files(run.router, ROUTER_FILES), facts=facts))
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


def _denoiser(stage: Path) -> nn.Module:
    return load_denoiser(stage)[0]


def _files(stage: Path, names: tuple[str, ...]) -> tuple[Path, ...]:
    return tuple(Path(stage) / name for name in names)
