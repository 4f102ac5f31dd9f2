"""The stages of a run, as functions of the run config. The CLI, the local pipeline and the SLURM
scripts all call these, so a stage behaves the same however it is started."""
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evaluation.digit_classifier import class_proportions, train_digit_classifier
from evaluation.frechet import FrechetEvaluator, metric_name
from evaluation.grid import save_grid
from evaluation.report import write_report
from launch.config import ConfigError, RunConfig, extractor_for
from launch.rundir import RunDir
from shards.manifest import load_manifest, population_entry
from shards.prepare import prepare
from shards.stream import read_population
from trainer.diffusion import is_finished, train_diffusion
from trainer.edm import heun_sample
from trainer.engine import Hook, make_accelerator
from trainer.export import load_denoiser

GRID_SEED = 2024
ROLES = ["aux", "target", "reference"]  # the same latents for every grid, so grids of one model over time are comparable


def prepare_stage(cfg: RunConfig, log=print) -> dict:
    rd = RunDir.of(cfg)
    rd.record_config(cfg)
    manifest = prepare(cfg.data, rd.data, log=log)
    if extractor_for(cfg) == "digit-classifier" and not rd.digit_classifier.is_file():
        # Trained on the auxiliary populations only: the target and the held-out reference stay unseen.
        parts = [read_population(rd.data, p.name) for p in cfg.data.aux]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        info = train_digit_classifier(images, labels, rd.digit_classifier, seed=cfg.train.seed)
        log(f"digit classifier: held-out accuracy {info['accuracy']:.3f} -> {rd.digit_classifier}")
    return manifest


def _sampler(denoiser, cfg: RunConfig):
    e = cfg.edm
    return partial(heun_sample, denoiser, num_steps=e.sampler_steps, sigma_min=e.sigma_min,
                   sigma_max=e.sigma_max, rho=e.rho)


def _evaluator(cfg: RunConfig, device) -> FrechetEvaluator:
    rd = RunDir.of(cfg)
    extractor = extractor_for(cfg)
    weights = str(rd.digit_classifier) if extractor == "digit-classifier" else cfg.eval.inception_weights
    return FrechetEvaluator(extractor, weights, rd.eval_cache, batch_size=cfg.eval.batch, device=device)


def _reference(evaluator: FrechetEvaluator, cfg: RunConfig, population: str):
    rd = RunDir.of(cfg)
    entry = population_entry(load_manifest(rd.data), population)
    return evaluator.reference_statistics(entry["hash"], lambda: read_population(rd.data, population)[0])


def _grid_latents(cfg: RunConfig, manifest: dict, device) -> torch.Tensor:
    shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
    return _latents(cfg.eval.grid_images, shape, GRID_SEED, device)


def training_hooks(cfg: RunConfig, stage_dir: Path, population: str, acc) -> tuple[Hook, ...]:
    """Periodic Frechet distance to the model's own population, and a sample grid, from the EMA."""
    manifest = load_manifest(RunDir.of(cfg).data)
    hooks = []
    if cfg.train.eval_every_kimg > 0:
        evaluator = _evaluator(cfg, acc.device)
        reference = _reference(evaluator, cfg, population)
        name = metric_name(evaluator.extractor, cfg.train.eval_samples)
        shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])

        def frechet(engine):
            value = evaluator.distance(_sampler(engine.ema["net"], cfg), shape, cfg.train.eval_samples, reference,
                                       seed=cfg.train.seed, rank=acc.process_index,
                                       world_size=acc.num_processes, gather=acc.gather)
            engine.log(f"{stage_dir.name}: {name} = {value:.3f} at {engine.kimg:.1f} kimg")
            return {name: value}
        hooks.append(Hook(cfg.train.eval_every_kimg, frechet))
    if cfg.train.snapshot_every_kimg > 0:
        def snapshot(engine):
            if acc.is_main_process:
                images = _sampler(engine.ema["net"], cfg)(_grid_latents(cfg, manifest, acc.device))
                save_grid(images, stage_dir / "samples.png", scale=_grid_scale(manifest))
        hooks.append(Hook(cfg.train.snapshot_every_kimg, snapshot))
    return tuple(hooks)


def _grid_scale(manifest: dict) -> int:
    return max(1, 64 // manifest["image_size"])  # small images are upscaled so a person can see them


def train_aux_stage(cfg: RunConfig, name: str) -> None:
    """Train one auxiliary model (any number of processes, under `accelerate launch` or not)."""
    rd = RunDir.of(cfg)
    names = [p.name for p in cfg.data.aux]
    if name not in names:
        raise ConfigError(f"aux={name}: no such auxiliary population (have: {', '.join(names)})")
    stage_dir = rd.aux(name)
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes)
    if is_finished(stage_dir):
        acc.print(f"{stage_dir}: already finished, skipping")
        return
    if acc.is_main_process:
        rd.record_config(cfg)
    load_manifest(rd.data)  # a clear "run prepare first" before any work
    restart = os.environ.get("SLURM_RESTART_COUNT")
    if restart:
        acc.print(f"SLURM_RESTART_COUNT={restart}")
    train_diffusion(acc, stage_dir, rd.data, name, cfg.data, cfg.network, cfg.edm, cfg.train,
                    hooks=training_hooks(cfg, stage_dir, name, acc))


def evaluate_stage(cfg: RunConfig, log=print) -> dict:
    """Evaluate every finished model of the run; write report.md and report.json.

    Each model is sampled once (eval.num_samples, spread over the ranks) and those samples are compared
    with its own population and with the held-out reference population of the target mixture."""
    rd = RunDir.of(cfg)
    manifest = load_manifest(rd.data)
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes)
    evaluator = _evaluator(cfg, acc.device)
    n = cfg.eval.num_samples
    name = metric_name(evaluator.extractor, n)
    shape = (manifest["channels"], manifest["image_size"], manifest["image_size"])
    target_ref = _reference(evaluator, cfg, cfg.data.reference.name)
    classes = manifest["class_names"]
    target_mix = _mixture_vector(cfg.data.target.mixture, classes)
    rows = []
    for pop in cfg.data.aux:
        stage_dir = rd.aux(pop.name)
        if not is_finished(stage_dir):
            log(f"{stage_dir}: not finished, left out of the report")
            continue
        denoiser, _ = load_denoiser(stage_dir)
        sample = _sampler(denoiser.to(acc.device), cfg)
        done = _done(stage_dir)
        features = evaluator.sample_features(sample, shape, n, seed=cfg.train.seed, rank=acc.process_index,
                                             world_size=acc.num_processes, gather=acc.gather)
        row = {"model": f"aux/{pop.name}", "kimg": done["kimg"], "train minutes": done["seconds"] / 60,
               f"{name} own population": evaluator.frechet(features, _reference(evaluator, cfg, pop.name)),
               f"{name} target": evaluator.frechet(features, target_ref)}
        if evaluator.extractor == "digit-classifier" and acc.is_main_process:
            images = sample(_latents(n, shape, cfg.train.seed, acc.device))
            props = class_proportions(rd.digit_classifier, images)
            row["class TV own"] = _total_variation(props, _mixture_vector(pop.mixture, classes))
            row["class TV target"] = _total_variation(props, target_mix)
            row["sample class proportions"] = _format_mixture(props)
        rows.append(row)
        log(f"{pop.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    if acc.is_main_process:
        data_rows = [{"population": p, "role": e["role"], "images": e["count"], "shards": len(e["shards"]),
                      "class mixture": _format_mixture(_mixture_vector(e["mixture"], classes))}
                     for p, e in sorted(manifest["populations"].items(), key=lambda pe: ROLES.index(pe[1]["role"]))]
        notes = [f"{name}: Fréchet distance over {n} samples ({cfg.edm.sampler_steps}-step Heun) in "
                 f"{evaluator.extractor} feature space" + ("" if evaluator.extractor == "inception" else " (not FID)")
                 + f"; 'target' is the held-out population `{cfg.data.reference.name}` of the target mixture.",
                 "class TV: total variation distance between the digit classifier's class proportions of the "
                 "samples and a population's mixture (0 = same, 1 = disjoint).",
                 f"class order: {' '.join(classes)}; populations disjoint: {manifest['disjoint']}."]
        write_report(rd.root, f"scorefuse report: {cfg.name}",
                     [("Auxiliary models", rows), ("Populations", data_rows)], notes)
        log(f"wrote {rd.root / 'report.md'}")
    return {"rows": rows}


def _latents(n: int, shape, seed: int, device) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)


def _total_variation(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _format_mixture(p) -> str:
    return " ".join(f"{x:.2f}" for x in p)


def _mixture_vector(mixture: dict, class_names: list[str]):
    return np.array([float(mixture.get(c, 0.0)) for c in class_names])


def _done(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "done.json").read_text())
