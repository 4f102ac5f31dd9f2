"""The stages of a run, as functions of the run config. The CLI, the local pipeline and the SLURM
scripts all call these, so a stage behaves the same however it is started."""
import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from evaluation.digit_classifier import train_digit_classifier
from evaluation.frechet import FrechetEvaluator, metric_name
from evaluation.grid import save_grid
from evaluation.plots import lambda_chart
from launch.config import ConfigError, RunConfig, extractor_for
from launch.rundir import RunDir
from shards.manifest import image_shape, load_manifest, population_entry
from shards.prepare import prepare
from shards.stream import read_population
from trainer.diffusion import is_finished, train_diffusion
from trainer.edm import heun_sample
from trainer.engine import Hook, make_accelerator
from trainer.export import build_denoiser, export_denoiser, load_denoiser
from trainer.fusion import merge_weights
from trainer.scorefusion import best_auxiliary, fit_fusion, load_auxiliaries, load_fused, single_lambda

GRID_SEED = 2024  # the same latents for every grid, so grids of one model over time are comparable


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


def sampler(denoiser, cfg: RunConfig):
    e = cfg.edm
    return partial(heun_sample, denoiser, num_steps=e.sampler_steps, sigma_min=e.sigma_min,
                   sigma_max=e.sigma_max, rho=e.rho)


def frechet_evaluator(cfg: RunConfig, device) -> FrechetEvaluator:
    rd = RunDir.of(cfg)
    extractor = extractor_for(cfg)
    weights = str(rd.digit_classifier) if extractor == "digit-classifier" else cfg.eval.inception_weights
    return FrechetEvaluator(extractor, weights, rd.eval_cache, batch_size=cfg.eval.batch, device=device)


def reference_statistics(evaluator: FrechetEvaluator, cfg: RunConfig, population: str):
    rd = RunDir.of(cfg)
    entry = population_entry(load_manifest(rd.data), population)
    return evaluator.reference_statistics(entry["hash"], lambda: read_population(rd.data, population)[0])


def _grid_latents(cfg: RunConfig, manifest: dict, device) -> torch.Tensor:
    shape = (cfg.eval.grid_images, *image_shape(manifest))
    return torch.randn(shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(device)


def training_hooks(cfg: RunConfig, stage_dir: Path, population: str, acc) -> tuple[Hook, ...]:
    """Periodic Frechet distance to the model's own population, and a sample grid, from the EMA."""
    manifest = load_manifest(RunDir.of(cfg).data)
    hooks = []
    if cfg.train.eval_every_kimg > 0:
        evaluator = frechet_evaluator(cfg, acc.device)
        reference = reference_statistics(evaluator, cfg, population)
        name = metric_name(evaluator.extractor, cfg.train.eval_samples)
        shape = image_shape(manifest)

        def frechet(engine):
            value = evaluator.distance(sampler(engine.ema["net"], cfg), shape, cfg.train.eval_samples, reference,
                                       seed=cfg.train.seed, rank=acc.process_index,
                                       world_size=acc.num_processes, gather=acc.gather)
            engine.log(f"{stage_dir.name}: {name} = {value:.3f} at {engine.kimg:.1f} kimg")
            return {name: value}
        hooks.append(Hook(cfg.train.eval_every_kimg, frechet))
    if cfg.train.snapshot_every_kimg > 0:
        def snapshot(engine):
            if acc.is_main_process:
                images = sampler(engine.ema["net"], cfg)(_grid_latents(cfg, manifest, acc.device))
                save_grid(images, stage_dir / "samples.png", scale=grid_scale(manifest))
        hooks.append(Hook(cfg.train.snapshot_every_kimg, snapshot))
    return tuple(hooks)


def grid_scale(manifest: dict) -> int:
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


def fuse_stage(cfg: RunConfig, log=print) -> dict:
    """Fit lambda (exact and the paper's SGD), draw its chart and the fused model's samples, then
    build the baselines named in fuse.baselines."""
    rd = RunDir.of(cfg)
    manifest = load_manifest(rd.data)
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes)
    lambda_json = rd.fuse / "lambda.json"
    if lambda_json.is_file():
        acc.print(f"{rd.fuse}: already finished, skipping the fit")
        fit = json.loads(lambda_json.read_text())
    else:
        if acc.is_main_process:
            rd.record_config(cfg)
        fit = fit_fusion(acc, rd.fuse, rd.aux_dirs(cfg), rd.data, cfg.data.target.name, cfg.fuse, cfg.edm,
                         cfg.train, log=acc.print)
        if acc.is_main_process:
            edges = fit["sigma_edges"]
            labels = ["all sigma"] if not edges else _bin_labels(edges)
            lambda_chart(fit[fit["method"]]["lambda"], fit["names"], labels, rd.fuse / "lambda.png",
                         title=f"ScoreFusion lambda ({fit['method']} fit, n = {fit['target_images']})")
            fused = load_fused(rd.fuse, rd.aux_dirs(cfg)).to(acc.device)
            save_grid(sampler(fused, cfg)(_grid_latents(cfg, manifest, acc.device)), rd.fuse / "samples.png",
                      scale=grid_scale(manifest))
    for name in cfg.fuse.baselines:
        BASELINES[name](cfg, fit, acc, log=acc.print)
    return fit


def _bin_labels(edges) -> list[str]:
    bounds = [0.0, *edges, float("inf")]
    return [f"{lo:g}-{hi:g}" if hi != float("inf") else f">= {lo:g}" for lo, hi in zip(bounds, bounds[1:])]


def _target_scratch(cfg: RunConfig, fit: dict, acc, log=print) -> None:
    """The auxiliary recipe trained on the n target images alone."""
    stage = RunDir.of(cfg).baseline("target-scratch")
    if is_finished(stage):
        return log(f"{stage}: already finished, skipping")
    train = replace(cfg.train, total_kimg=cfg.fuse.scratch_kimg)
    train_diffusion(acc, stage, RunDir.of(cfg).data, cfg.data.target.name, cfg.data, cfg.network, cfg.edm,
                    train, hooks=training_hooks(cfg, stage, cfg.data.reference.name, acc))


def _target_finetune(cfg: RunConfig, fit: dict, acc, log=print) -> None:
    """The auxiliary with the lowest target loss (a vertex of the fit), fine-tuned on the n target images."""
    stage = RunDir.of(cfg).baseline("target-finetune")
    if is_finished(stage):
        return log(f"{stage}: already finished, skipping")
    best = best_auxiliary(fit)
    log(f"target-finetune: starting from aux/{best} (target loss {fit['exact']['vertex_losses'][best]:.5f})")
    init = load_denoiser(RunDir.of(cfg).aux(best))[0].state_dict()
    train = replace(cfg.train, total_kimg=cfg.fuse.finetune_kimg, lr=cfg.fuse.finetune_lr, lr_rampup_kimg=0)
    train_diffusion(acc, stage, RunDir.of(cfg).data, cfg.data.target.name, cfg.data, cfg.network, cfg.edm,
                    train, hooks=training_hooks(cfg, stage, cfg.data.reference.name, acc), init=init)


def _checkpoint_merge(cfg: RunConfig, fit: dict, acc, log=print) -> None:
    """Weights averaged with the fitted lambda: a different model from the fused one (METHODS.md §1).
    Needs one lambda: with sigma bins, the single-lambda fit on the same draws."""
    stage = RunDir.of(cfg).baseline("checkpoint-merge")
    if (stage / "model.json").is_file() or not acc.is_main_process:
        return
    rd = RunDir.of(cfg)
    lam = single_lambda(fit)
    meta = load_denoiser(rd.aux(fit["names"][0]))[1]
    merged = build_denoiser(meta)
    merged.load_state_dict(merge_weights(load_auxiliaries(rd.aux_dirs(cfg)), lam))
    export_denoiser(stage, merged, {**meta, "population": "checkpoint-merge", "lambda": lam})
    log(f"checkpoint-merge: weights averaged with lambda {' '.join(f'{v:.3f}' for v in lam)} -> {stage}")


BASELINES = {"target-scratch": _target_scratch, "target-finetune": _target_finetune,
             "checkpoint-merge": _checkpoint_merge}
