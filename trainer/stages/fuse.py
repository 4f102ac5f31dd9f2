"""fuse: fit the ScoreFusion weights lambda of the K frozen auxiliaries on the n target images, then build the
baselines fusion is compared with.

Two fits, on the same target images and the same loss (METHODS.md §1):
- exact (the default): one pass of forward evaluations accumulates the float64 Gram statistics
  A_ij = E[w <D_i, D_j>], b_i = E[w <D_i, x0>] (summed over ranks), then the quadratic program on the
  simplex is solved exactly, per sigma bin (trainer/lambda_fit.py). No backpropagation through any network.
- sgd (the paper's): lambda = softmax(logits) trained by SGD with momentum through the training engine, so it
  checkpoints and resumes like every other stage.
Both are written to fuse/lambda.json; fuse.method says which one is *the* fused model. Each fit is judged on
the same Gram statistics, so their losses compare exactly.

Baselines (fuse.baselines): target-scratch (the auxiliary recipe on the n target images), target-finetune
(the auxiliary with the lowest target loss, fine-tuned on them), checkpoint-merge (weights averaged with
lambda: a different model from the fused one).
"""
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from evaluation.plots import lambda_chart
from shards.atomic import write_atomically
from shards.errors import CheckpointError, ModelError
from shards.stream import read_population, train_loader
from trainer.config import RunConfig
from trainer.engine import Engine
from trainer.export import build_denoiser, export_denoiser, load_denoiser
from trainer.fused_denoiser import FusedDenoiser, merge_weights
from trainer.lambda_fit import accumulate_gram, fit_barycenter_weights, sgd_fit_parts
from shards.pixels import to_unit
from trainer.rundir import RunDir, mark_finished
from trainer.seeds import Stream, generator
from trainer.spec import BASELINES
from trainer.stages.context import StageContext
from trainer.stages.train_aux import model_meta, train_denoiser

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


# ---- what later stages read of a finished fuse stage ------------------------------------------------------

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


def fused_denoiser(fit: dict, auxiliaries: dict, which: str | None = None, batched: bool | None = None) -> FusedDenoiser:
    """The fused model of a fit: `which` = exact | sgd, or None for fuse.method's."""
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


# ---- the fits -----------------------------------------------------------------------------------------------

def target_batches(images: torch.Tensor, batch: int, seed: int, rank: int, world: int):
    """This rank's share of the target images as (x0, generator) pairs, batch i to rank i % world, each
    batch's draws seeded by its global index: the Gram sums do not depend on the world size."""
    for index, chunk in enumerate(to_unit(images).split(batch)):
        if index % world == rank:
            yield chunk, generator(seed, Stream.GRAM, index)


def sgd_spec(cfg: RunConfig, target_images: int):
    """The engine's TrainSpec of the paper's SGD fit: one epoch = one pass over the n target images."""
    f, kimg = cfg.fuse, cfg.fuse.sgd_epochs * target_images / 1000
    return replace(cfg.train, batch=f.batch, accum=1, lr=f.sgd_lr, lr_rampup_kimg=0, total_kimg=kimg,
                   eval_every_kimg=0, snapshot_every_kimg=0, log_every_kimg=max(kimg / 20, 1e-3),
                   checkpoint_every_kimg=max(kimg / 4, 1e-3))


def fit_lambda(ctx: StageContext, fused: FusedDenoiser) -> dict:
    """Both fits on the target images; returns (and on the main process writes) lambda.json's content."""
    cfg, acc, fuse = ctx.cfg, ctx.acc, ctx.cfg.fuse
    images, _ = read_population(ctx.run.data, cfg.data.target.name, cfg.data.max_bad_samples)
    if len(images) == 0:
        raise ModelError(f"target population {cfg.data.target.name} has no images")
    edges = list(fuse.sigma_bins) or None
    autocast = AUTOCAST[cfg.train.precision]
    rank, world = acc.process_index, acc.num_processes

    t0 = time.perf_counter()
    batches = ((x.to(ctx.device), g) for x, g in target_batches(images, fuse.batch, cfg.train.seed, rank, world))
    stats = accumulate_gram(fused, batches, fuse.draws_per_image, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data,
                            sigma_edges=edges, autocast_dtype=autocast,
                            reduce=(lambda t: acc.reduce(t, "sum")) if world > 1 else None)
    exact = fit_barycenter_weights(stats, fused.names)
    exact_seconds = time.perf_counter() - t0
    ctx.log(f"fuse (exact): lambda {_fmt(exact['lambda'])}, loss {exact['report']['loss']:.5f} "
            f"in {exact_seconds:.1f} s ({fuse.draws_per_image} draws x {len(images)} images)")

    spec = sgd_spec(cfg, len(images))
    modules, optimizers, updates = sgd_fit_parts(fused, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data,
                                                 sigma_edges=edges, momentum=fuse.sgd_momentum, autocast_dtype=autocast)
    micro = fuse.batch // world

    def target_stream(start_batch):
        loader = train_loader(ctx.run.data, cfg.data.target.name, batch_size=micro, seed=cfg.train.seed, rank=rank,
                              world_size=world, num_workers=0, start_batch=start_batch)
        for x, _ in loader:
            yield x.to(ctx.device)

    torch.manual_seed(cfg.train.seed * 7919 + rank)  # the SGD draws: per rank, saved in its checkpoints
    engine = Engine(acc, spec, ctx.run.sgd_fit, modules=modules, optimizers=optimizers, updates=updates,
                    batches=target_stream, log=ctx.log, trackers=ctx.trackers(ctx.run.sgd_fit))
    engine.run()
    sgd_lam = engine.unwrap("weights").weights().detach().double().cpu()
    sgd = {"lambda": sgd_lam.tolist(), "loss": float(stats.loss(sgd_lam)), "seconds": engine.seconds,
           "steps": engine.step, "epochs": fuse.sgd_epochs}
    ctx.log(f"fuse (sgd): lambda {_fmt(sgd_lam)}, loss {sgd['loss']:.5f} in {engine.seconds:.1f} s")
    return {"method": fuse.method, "names": fused.names, "sigma_edges": edges, "target": cfg.data.target.name,
            "target_images": len(images),
            "exact": {"lambda": exact["lambda"].tolist(), "seconds": exact_seconds, **exact["report"]}, "sgd": sgd}


# ---- the baselines ----------------------------------------------------------------------------------------

def target_scratch(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """The auxiliary recipe trained on the n target images alone."""
    train = replace(ctx.cfg.train, total_kimg=ctx.cfg.fuse.scratch_kimg)
    train_denoiser(ctx, stage, ctx.cfg.data.target.name, train, reference=ctx.fd_reference)


def target_finetune(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """The auxiliary with the lowest target loss (a vertex of the fit), fine-tuned on the n target images."""
    best = best_auxiliary(fit)
    ctx.log(f"target-finetune: starting from aux/{best} (target loss {fit['exact']['vertex_losses'][best]:.5f})")
    f = ctx.cfg.fuse
    train = replace(ctx.cfg.train, total_kimg=f.finetune_kimg, lr=f.finetune_lr, lr_rampup_kimg=0)
    train_denoiser(ctx, stage, ctx.cfg.data.target.name, train, reference=ctx.fd_reference,
                   init=auxiliaries[best].state_dict())


def checkpoint_merge(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """Weights averaged with the fitted lambda: a different model from the fused one (METHODS.md §1). Needs
    one lambda: with sigma bins, the single-lambda fit on the same draws."""
    if ctx.acc.is_main_process:
        lam = single_lambda(fit)
        meta = {**model_meta(ctx, "checkpoint-merge"), "lambda": lam}
        merged = build_denoiser(meta)
        merged.load_state_dict(merge_weights([auxiliaries[n] for n in fit["names"]], lam))
        export_denoiser(stage, merged, meta)
        mark_finished(stage, {"lambda": lam, "seconds": 0.0})
        ctx.log(f"checkpoint-merge: weights averaged with lambda {' '.join(f'{v:.3f}' for v in lam)}")
    ctx.acc.wait_for_everyone()


BUILDERS = {"target-scratch": target_scratch, "target-finetune": target_finetune,
            "checkpoint-merge": checkpoint_merge}
assert tuple(BUILDERS) == BASELINES


# ---- the stage ----------------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> dict:
    ctx = StageContext.open(cfg)
    run_dir = ctx.run
    auxiliaries = load_auxiliaries(cfg)
    if not ctx.begin(run_dir.fuse):
        fit = load_fit(cfg)
    else:
        names = list(auxiliaries)
        uniform = FusedDenoiser(list(auxiliaries.values()), torch.full((len(names),), 1 / len(names)), names=names,
                                batched=cfg.fuse.batched).to(ctx.device)
        fit = fit_lambda(ctx, uniform)
        if ctx.acc.is_main_process:
            write_atomically(run_dir.lambda_file, json.dumps(fit, indent=1).encode())
            edges = fit["sigma_edges"]
            lambda_chart(fit[fit["method"]]["lambda"], fit["names"], ["all sigma"] if not edges else _bin_labels(edges),
                         run_dir.lambda_chart,
                         title=f"ScoreFusion lambda ({fit['method']} fit, n = {fit['target_images']})")
            fused = fused_denoiser(fit, auxiliaries, batched=cfg.fuse.batched).to(ctx.device)
            ctx.save_grid(ctx.sampler(fused), run_dir.fuse)
            mark_finished(run_dir.fuse, {"seconds": fit["exact"]["seconds"] + fit["sgd"]["seconds"]})
        ctx.acc.wait_for_everyone()
    for name in cfg.fuse.baselines:
        stage = run_dir.baseline(name)
        if ctx.begin(stage):
            BUILDERS[name](ctx, fit, auxiliaries, stage)
    ctx.log(f"fuse: lambda in {run_dir.lambda_file}, baselines in {run_dir.baselines}")
    return fit


def _bin_labels(edges) -> list[str]:
    bounds = [0.0, *edges, float("inf")]
    return [f"{lo:g}-{hi:g}" if hi != float("inf") else f">= {lo:g}" for lo, hi in zip(bounds, bounds[1:])]


def _fmt(lam) -> str:
    return " | ".join(" ".join(f"{v:.3f}" for v in row) for row in torch.as_tensor(lam).reshape(-1, lam.shape[-1]).tolist())
