"""fuse: fit the ScoreFusion weights lambda of the K frozen auxiliaries on the n target images, then build the
baselines fusion is compared with.

Two fits, on the same target images and the same loss (docs/METHODS.md §1):
- exact (the default): one pass of forward evaluations accumulates the float64 Gram statistics
  A_ij = E[w <D_i, D_j>], b_i = E[w <D_i, x0>] (summed over ranks), then the quadratic program on the
  simplex is solved exactly, per sigma bin (trainer/lambda_fit.py). No backpropagation through any network.
- sgd (the paper's): lambda = softmax(logits) trained by SGD with momentum through the training engine, so it
  checkpoints and resumes like every other stage; with fuse.validation_share > 0 on the baselines' training part,
  its lambda selected on their held-out part (stages/early_stopping.py).
Both are written to fuse/lambda.json; fuse.method says which one is *the* fused model. Each fit is judged on
the same Gram statistics, so their losses compare exactly; so is the uniform lambda = 1/K, the control
"fused-uniform" (plain ensembling, fitted to nothing).

Mixture fusion (fuse.mixture, trainer/mixture.py): a router trained on the auxiliary populations (through the
engine, resumable, data-parallel; shared by a sweep's runs), then the mixture weights pi by EM on the n target
images: on the router's density ratios, and as a check on each auxiliary's own PF-ODE likelihood of the images,
each with the mixture likelihood it reaches (fuse/mixture.json); the fused model "fused-mixture".

Baselines (fuse.baselines): target-scratch (the auxiliary recipe on the n target images), target-finetune
(the auxiliary with the lowest target loss, fine-tuned on them), both early-stopped on target images held out
from their training (fuse.validation_share, stages/early_stopping.py), and checkpoint-merge (weights averaged
with lambda: a different model from the fused one). The control seed-ensemble: the best trained auxiliary and
fuse.ensemble_copies copies of it, trained on its population with other seeds, averaged uniformly: what
ensembling gains without other populations.
"""
import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from evaluation.plots import lambda_chart
from shards.atomic import write_atomically
from shards.errors import ModelError
from shards.manifest import population_entry
from shards.stream import population_batches
from stages.catalogue import (barycenter_model, best_auxiliary, load_auxiliaries, load_fit, mixture_model,
                              sigma_limits, single_lambda, trained_auxiliaries)
from stages.config import RunConfig
from trainer.engine import Engine, Update, adam
from trainer.export import build_denoiser, export_denoiser, load_denoiser
from trainer.fused_denoiser import FusedDenoiser, merge_weights
from evaluation.labels import CHECKPOINT_MERGE, SEED_ENSEMBLE, TARGET_FINETUNE, TARGET_SCRATCH
from evaluation.likelihood import nll_bits_per_dim
from trainer.lambda_fit import Objective, SoftmaxWeights, accumulate_gram, fit_barycenter_weights, objective_of
from trainer.mixture import em_mixture_weights
from trainer.precision import autocast_dtype, forward_precision, with_autocast
from trainer.router import Router, calibration, load_router, log_density_ratios, router_loss, save_router
from shards.pixels import to_uint8, to_unit
from stages.rundir import MIXTURE_GRID, RunDir, engine_paths, finished_info, mark_finished
from shards.seeds import Stream, generator, per_image_normal, seed_of
from trainer.spec import BASELINES
from stages.context import StageContext
from stages.early_stopping import TRAINING_PART, BestLambda, BestWeights, split_target
from stages.train_aux import model_meta, train_denoiser

# ---- the fits -----------------------------------------------------------------------------------------------

def target_batches(batches, seed: int):
    """(x0 in [-1, 1], generator) pairs of the Gram pass from (batch index, uint8 images, ...) batches (a rank's
    share, shards.stream.population_batches), each batch's draws seeded by its global index: the Gram sums do
    not depend on the world size."""
    for index, images, *_ in batches:
        yield to_unit(images), generator(seed, Stream.GRAM, index)


def held_out_batches(images: torch.Tensor, batch: int, seed: int, rank: int, world: int, device):
    """(x0 on `device`, generator) pairs of the held-out target images (uint8): batch i on rank i mod world,
    its draws seeded by i, so that the statistics do not depend on the world size."""
    for index, chunk in enumerate(images.split(batch)):
        if index % world == rank:
            yield to_unit(chunk).to(device), generator(seed, Stream.VALIDATION_GRAM, index)


def fit_lambda(ctx: StageContext, fused: FusedDenoiser, n: int) -> dict:
    """Both fits on the n target images, streamed from their shards (one read per pass, one batch in memory);
    returns (and on the main process writes) lambda.json's content."""
    cfg, acc, fuse = ctx.cfg, ctx.acc, ctx.cfg.fuse
    edges = list(fuse.sigma_bins) or None
    autocast = autocast_dtype(fuse.precision)
    rank, world = acc.process_index, acc.num_processes

    t0 = time.perf_counter()
    shares = population_batches(ctx.run.data, cfg.data.target.name, fuse.batch, cfg.data.max_bad_samples, rank, world)
    batches = ((x.to(ctx.device), g) for x, g in target_batches(shares, cfg.train.seed))
    # draws outside the auxiliaries' common sigma range (pretrained models are valid on their tables only) are
    # moved to its nearest end, so that every auxiliary is fitted where it is valid
    objective = objective_of(fuse.objective, cfg.edm.p_mean, cfg.edm.p_std, cfg.edm.sigma_data).within(
        getattr(fused, "sigma_range", None))
    stats = accumulate_gram(fused, batches, fuse.draws_per_image, objective, sigma_edges=edges, autocast_dtype=autocast,
                            reduce=(lambda t: acc.reduce(t, "sum")) if world > 1 else None)
    exact = fit_barycenter_weights(stats, fused.names)
    exact_seconds = time.perf_counter() - t0
    ctx.log(f"fuse (exact, {fuse.objective} objective): lambda {_fmt(exact['lambda'])}, loss "
            f"{exact['report']['loss']:.5f} in {exact_seconds:.1f} s ({fuse.draws_per_image} draws x {n} images)")

    # The paper's SGD fit. With a validation split (fuse.validation_share) it trains on the baselines' training
    # part and keeps the lambda with the lowest loss on the held-out part, measured every epoch
    # (stages/early_stopping.py BestLambda), as the paper selects its checkpoint; the exact fit, K numbers from a
    # convex problem, uses all n. One epoch = one pass over the images it trains on; no accumulation.
    split = split_target(ctx)
    population, data_dir, trained_on = (cfg.data.target.name, None, n) if split is None else \
        (TRAINING_PART, split.data_dir, split.training)
    spec = replace(ctx.short_run(fuse.batch, fuse.sgd_lr, fuse.sgd_epochs * trained_on / 1000), accum=1)
    modules, optimizers, updates = sgd_fit_parts(fused, objective, sigma_edges=edges, momentum=fuse.sgd_momentum,
                                                 autocast_dtype=autocast,
                                                 init=generator(cfg.train.seed, Stream.LAMBDA_INIT))
    keep = None
    if split is not None:
        held_out = accumulate_gram(fused, held_out_batches(split.images, fuse.batch, cfg.train.seed, rank, world,
                                                           ctx.device),
                                   fuse.draws_per_image, objective, sigma_edges=edges, autocast_dtype=autocast,
                                   reduce=(lambda t: acc.reduce(t, "sum")) if world > 1 else None)
        keep = BestLambda(ctx, ctx.run.sgd_fit, held_out, split)
        if keep.best is None:  # the starting lambda is the first candidate (unless a resumed fit kept one)
            keep.offer(modules["weights"].weights(), 0.0, 0)
    micro = fuse.batch // world

    def target_stream(start_batch):
        return ctx.training_images(population, micro, cfg.train.seed, start_batch, data_dir=data_dir)

    torch.manual_seed(seed_of(cfg.train.seed, Stream.LAMBDA_SGD, rank))  # its draws: per rank, saved in its checkpoints
    engine = Engine(acc, spec, engine_paths(ctx.run.sgd_fit), modules=modules, optimizers=optimizers, updates=updates,
                    batches=target_stream, log=ctx.log, trackers=ctx.trackers(ctx.run.sgd_fit),
                    hooks=() if keep is None else (keep.hook(trained_on / 1000),))
    engine.run()
    selection = {} if keep is None else keep.summary()
    ctx.finish(ctx.run.sgd_fit, {**engine.summary(), **selection})
    sgd_lam = engine.unwrap("weights").weights().detach().double().cpu() if keep is None else keep.lam()
    sgd_loss, exact_loss = float(stats.loss(sgd_lam)), exact["report"]["loss"]
    sgd = {"lambda": sgd_lam.tolist(), "loss": sgd_loss, "seconds": engine.seconds, "steps": engine.step,
           "epochs": fuse.sgd_epochs, "gap_percent": 100 * (sgd_loss - exact_loss) / abs(exact_loss), **selection}
    ctx.log(f"fuse (sgd): lambda {_fmt(sgd_lam)}, loss {sgd_loss:.5f} ({sgd['gap_percent']:+.3f}% from the exact "
            f"optimum) in {engine.seconds:.1f} s")
    # The uniform control, lambda = 1/K: plain ensembling, which lowers the error by convexity whatever the target
    # is; fusion has to beat it for lambda to matter. Its loss on the same Gram statistics costs nothing.
    uniform_lam = torch.full_like(exact["lambda"], 1 / fused.num_models)
    uniform_loss = float(stats.loss(uniform_lam))
    uniform = {"lambda": uniform_lam.tolist(), "loss": uniform_loss, "seconds": 0.0,
               "gap_percent": 100 * (uniform_loss - exact_loss) / abs(exact_loss)}
    return {"method": fuse.method, "objective": fuse.objective, "names": fused.names, "sigma_edges": edges,
            "sigma_range": getattr(fused, "sigma_range", None), "target": cfg.data.target.name,
            "target_images": n,
            "exact": {"lambda": exact["lambda"].tolist(), "seconds": exact_seconds, **exact["report"]}, "sgd": sgd,
            "uniform": uniform}


def sgd_fit_parts(fused: FusedDenoiser, objective: Objective, sigma_edges=None, lr: float = 0.1,
                  momentum: float = 0.9, autocast_dtype: torch.dtype | None = None,
                  init: torch.Generator | None = None):
    """(modules, optimizers, updates) for trainer.engine.Engine to fit SoftmaxWeights by SGD, the paper's
    method: on a micro-batch x0, draw sigma (the objective's law) and noise from torch's global RNG (seeded
    per rank by the engine's caller, as in the diffusion stage), compute the K outputs without gradients,
    and return the mean over the batch of w(sigma) * the squared error summed over pixels, the paper's
    scaling (P times the GramStats value under the per-pixel edm objective; the same under paper). Logits
    start from `init` (N(0, 1)). Under the engine the optimizer's rate is the TrainSpec's, written every step
    (the fuse stage's spec carries fuse.sgd_lr); `lr` serves a loop of one's own (bench/fusion.py)."""
    weights = SoftmaxWeights(fused.num_models, sigma_edges, init)
    optimizer = torch.optim.SGD(weights.parameters(), lr=lr, momentum=momentum, fused=True)

    def loss(modules: dict, x0: torch.Tensor, step: int) -> torch.Tensor:
        x0 = x0.to(torch.float32)
        batch = x0.shape[0]
        sigma = objective.sample(batch, None, x0.device).reshape(batch, 1, 1, 1)
        noise = torch.randn_like(x0)
        with torch.no_grad(), forward_precision(x0.device.type, autocast_dtype):
            outputs = fused.all_outputs(x0 + sigma * noise, sigma)
        lam = modules["weights"](sigma.flatten()).to(torch.float32)  # through the DDP wrapper, if any
        denoised = torch.einsum("bk,kbchw->bchw", lam, outputs)
        error = (denoised - x0).square().flatten(1).sum(dim=1)
        return (objective.weight(sigma.flatten()) * error).mean()

    return {"weights": weights}, {"sgd": optimizer}, [Update("sgd", "weights", loss)]


# ---- mixture fusion -------------------------------------------------------------------------------------

CALIBRATION_BANDS = 6  # of ln sigma over the sampler's range: 0.002 to 80 in factors of 5.9


def train_router(ctx: StageContext, auxiliaries: dict) -> tuple[Router, dict]:
    """The router, trained on the K auxiliary populations in equal shares (or loaded when finished): a pretrained
    auxiliary's share is its own samples (fuse.router_samples, drawn once). Then its calibration per sigma band
    (trainer/router.py), on images of its training stream with noise of their own. (the router, its done.json:
    "samples", what drawing those samples cost, {name: {"images", "seconds"}}, and "calibration")."""
    cfg, acc, f = ctx.cfg, ctx.acc, ctx.cfg.fuse
    stage, names = ctx.run.router, list(auxiliaries)
    k = len(names)
    pretrained = {a.name for a in cfg.data.aux if a.pretrained is not None}
    samples, cost = {}, {}
    if ctx.begin(stage):
        for name in (n for n in names if n in pretrained):
            samples[name], cost[name] = auxiliary_samples(ctx, name, auxiliaries[name])
        world = acc.num_processes
        if f.router_batch % (world * cfg.train.accum * k):
            raise ModelError(f"fuse.router_batch={f.router_batch} must be a multiple of processes ({world}) x "
                             f"train.accum ({cfg.train.accum}) x auxiliaries ({k})")
        per = f.router_batch // (world * cfg.train.accum * k)  # images of each population per micro-batch
        c, size, _ = ctx.shape
        meta = {"image_size": size, "channels": c, "classes": k, "preset": f.router_preset,
                "sigma_data": cfg.edm.sigma_data, "populations": names}
        router = ctx.seeded(cfg.train.seed, lambda: Router(size, c, k, f.router_preset, cfg.edm.sigma_data))
        optimizer = adam(router.parameters(), f.router_lr, cfg.train.adam_betas, cfg.train.adam_eps)
        labels = torch.arange(k).repeat_interleave(per).to(ctx.device)

        def batches(start_batch: int):
            streams = [sample_stream(samples[name], per, seed_of(cfg.train.seed, Stream.ROUTER_SAMPLES, i),
                                     acc.process_index, start_batch, ctx.device) if name in samples else
                       ctx.training_images(name, per, seed_of(cfg.train.seed, Stream.ROUTER_DATA, i), start_batch)
                       for i, name in enumerate(names)]
            while True:
                # joined on the device: each pinned piece is copied on its own, asynchronously (a concatenation
                # on the host would not be pinned)
                yield torch.cat([next(stream) for stream in streams]), labels

        spec = ctx.short_run(f.router_batch, f.router_lr, f.router_kimg)
        sigma_min, sigma_max = sigma_limits(cfg)  # the range the mixture's sampler and likelihood ODE ask it for
        engine = Engine(acc, spec, engine_paths(stage), modules={"router": router}, optimizers={"adam": optimizer},
                        updates=[Update("adam", "router", lambda m, batch, step: router_loss(
                            m["router"], batch[0], batch[1], sigma_min, sigma_max))],
                        batches=batches, log=ctx.log, trackers=ctx.trackers(stage))
        engine.run()
        checked = None
        if acc.is_main_process:  # on the main process's share of the stream: 2,048 images or a little more
            check = itertools.islice(batches(0), math.ceil(2048 / (per * k)))
            checked = calibration(engine.unwrap("router").eval(), check, sigma_min, sigma_max, CALIBRATION_BANDS,
                                  seed_of(cfg.train.seed, Stream.ROUTER_CHECK))
        ctx.finish(stage, {**engine.summary(), "samples": cost, "calibration": checked},
                   lambda: save_router(stage, engine.unwrap("router"), meta))
    return load_router(stage), finished_info(stage)


def auxiliary_samples(ctx: StageContext, name: str, denoiser) -> tuple[torch.Tensor, dict]:
    """fuse.router_samples samples of a pretrained auxiliary, uint8 [N, C, H, W] on the CPU, drawn once by the
    main process (the run's sampler, image i from its own latents) and kept in the router's directory, so that a
    resumed router trains on the same ones; and what drawing them cost."""
    cfg, path, n = ctx.cfg, ctx.run.router_samples(name), ctx.cfg.fuse.router_samples
    if ctx.acc.is_main_process and not path.is_file():
        started = time.perf_counter()
        sample = with_autocast(ctx.sampler(denoiser.to(ctx.device)), cfg.eval.sample_precision)
        chunks = []
        with torch.no_grad():
            for indices in torch.arange(n).split(cfg.eval.sample_batch):
                latents = per_image_normal(cfg.train.seed, Stream.ROUTER_SAMPLES, indices.tolist(), ctx.shape)
                chunks.append(to_uint8(sample(latents.to(ctx.device))).cpu())
        denoiser.cpu()
        seconds = time.perf_counter() - started
        write_atomically(path, save({"images": torch.cat(chunks)}, metadata={"seconds": repr(seconds)}))
        ctx.log(f"router: {n} samples of aux/{name} in {seconds:.1f} s "
                f"({n * (2 * cfg.edm.sampler_steps - 1)} network evaluations), in place of its population")
    ctx.acc.wait_for_everyone()
    with safe_open(path, "pt") as stored:
        return stored.get_tensor("images"), {"images": n, "seconds": float(stored.metadata()["seconds"])}


def sample_stream(images: torch.Tensor, per: int, seed: int, rank: int, start_batch: int, device):
    """Endless batches of `per` of `images` (uint8), drawn with replacement, as float32 in [-1, 1] on `device`:
    batch i of a rank from a generator seeded by (seed, rank, i), a pure function of the position, so that a
    resumed router sees the stream an uninterrupted one would."""
    for index in itertools.count(start_batch):
        pick = torch.randint(len(images), (per,), generator=generator(seed, rank, index))
        yield to_unit(images[pick]).to(device)


def fit_mixture(ctx: StageContext, batches, auxiliaries: dict, router: Router) -> dict:
    """pi by EM on the n target images, read as (batch index, uint8 images, ...) `batches` (one pass, one batch in
    memory): on the router's density ratios at fuse.router_sigma, and (nll_check) on each auxiliary's PF-ODE
    log-likelihood of the images; each with the bits/dim the mixture of the auxiliaries' likelihoods reaches with
    it (a comparable yardstick for both). Main process."""
    cfg, f, ev = ctx.cfg, ctx.cfg.fuse, ctx.cfg.eval
    started = time.perf_counter()
    router = router.to(ctx.device)
    log_r, log_p, seen, dims = [], [], 0, None
    if f.nll_check:
        sigma_min, sigma_max = sigma_limits(cfg)  # one ODE for every auxiliary, where each is valid
    for index, images, *_ in batches:
        # each batch's noise from a generator seeded by the batch's index, as the Gram pass draws
        log_r.append(log_density_ratios(router, to_unit(images).to(ctx.device), f.router_sigma, f.router_draws,
                                        generator(cfg.train.seed, Stream.MIXTURE, index)))
        if f.nll_check:
            dims = images[0].numel() * math.log(2)
            log_p.append(torch.stack([-dims * nll_bits_per_dim(
                denoiser.to(ctx.device), images, range(seen, seen + len(images)), cfg.train.seed, steps=ev.nll_steps,
                probes=ev.nll_probes, sigma_min=sigma_min, sigma_max=sigma_max, rho=cfg.edm.rho,
                batch_size=ev.nll_batch, device=ctx.device) for denoiser in auxiliaries.values()], dim=1))
        seen += len(images)
    pi, _ = em_mixture_weights(torch.cat(log_r))
    result = {"names": list(auxiliaries), "priors": [1 / len(auxiliaries)] * len(auxiliaries),
              "router_sigma": f.router_sigma, "target_images": seen, "weights": f.mixture_weights,
              "router": {"pi": pi.tolist()}}
    if f.nll_check:
        log_p = torch.cat(log_p)
        pi_nll, best = em_mixture_weights(log_p)
        reached = float(torch.logsumexp(log_p + pi.clamp(min=1e-300).log(), dim=1).mean())
        result["router"]["nll_bits_per_dim"] = -reached / dims
        result["nll"] = {"pi": pi_nll.tolist(), "nll_bits_per_dim": -best / dims}
    result["seconds"] = time.perf_counter() - started
    return result


# ---- the baselines ----------------------------------------------------------------------------------------

def train_on_target(ctx: StageContext, stage: Path, train, init: dict | None = None) -> None:
    """A baseline trained on the n target images; with fuse.validation_share > 0 on part of them, keeping the
    EMA weights with the lowest loss on the rest (stages/early_stopping.py)."""
    split = split_target(ctx)
    if split is None:
        train_denoiser(ctx, stage, ctx.cfg.data.target.name, train, reference=ctx.fd_reference, init=init)
        return
    ctx.log(f"{stage.name}: training on {split.training} of the target images, early-stopped on the other "
            f"{len(split.indices)}")
    train_denoiser(ctx, stage, TRAINING_PART, train, reference=ctx.fd_reference, init=init,
                   data_dir=split.data_dir, keep=BestWeights(ctx, stage, split, model_meta(ctx, TRAINING_PART)),
                   keep_every_kimg=ctx.cfg.fuse.validation_every_kimg)


def target_scratch(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """The auxiliary recipe trained on the n target images alone."""
    train_on_target(ctx, stage, replace(ctx.cfg.train, total_kimg=ctx.cfg.fuse.scratch_kimg))


def target_finetune(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """The auxiliary trained here with the lowest target loss (a vertex of the fit), fine-tuned on the n target
    images. With several fuse.finetune_lr, a fine-tune per rate (RunDir.finetune_rate, each resumable), and the
    one whose kept weights have the lowest held-out loss is the baseline (the first listed on a tie)."""
    best = best_auxiliary(fit, trained_auxiliaries(ctx.cfg))
    ctx.log(f"target-finetune: starting from aux/{best} (target loss {fit['exact']['vertex_losses'][best]:.5f})")
    f = ctx.cfg.fuse
    init = auxiliaries[best].state_dict()

    def finetune(directory: Path, rate: float) -> None:
        train_on_target(ctx, directory, replace(ctx.cfg.train, total_kimg=f.finetune_kimg, lr=rate, lr_rampup_kimg=0),
                        init=init)

    if len(f.finetune_lr) == 1:
        finetune(stage, f.finetune_lr[0])
        return
    tried = {}
    for rate in f.finetune_lr:
        directory = RunDir.finetune_rate(stage, rate)
        if ctx.begin(directory):
            finetune(directory, rate)
        tried[rate] = finished_info(directory)
    chosen = min(tried, key=lambda rate: tried[rate]["early_stopping"]["loss"])
    ctx.log("target-finetune: held-out loss " + ", ".join(
        f"{t['early_stopping']['loss']:.5f} at lr {rate:g}" for rate, t in tried.items()) + f"; lr {chosen:g} kept")
    done = tried[chosen]
    ctx.finish(stage, {**done, "seconds": sum(t["seconds"] for t in tried.values()),
                       "early_stopping": {**done["early_stopping"], "learning_rate": chosen},
                       "learning_rates": {f"{rate:g}": {"loss": t["early_stopping"]["loss"],
                                                        "kept_kimg": t["early_stopping"]["kimg"], "kimg": t["kimg"]}
                                          for rate, t in tried.items()}},
               lambda: export_denoiser(stage, *load_denoiser(RunDir.finetune_rate(stage, chosen))))


def checkpoint_merge(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """Weights averaged with the fitted lambda: a different model from the fused one (docs/METHODS.md §1). Needs
    one lambda: with sigma bins, the single-lambda fit on the same draws."""
    if ctx.acc.is_main_process:
        lam = single_lambda(fit)
        meta = {**model_meta(ctx, CHECKPOINT_MERGE), "lambda": lam}
        merged = build_denoiser(meta)
        merged.load_state_dict(merge_weights([auxiliaries[n] for n in fit["names"]], lam))
        export_denoiser(stage, merged, meta)
        mark_finished(stage, {"lambda": lam, "seconds": 0.0})
        ctx.log(f"checkpoint-merge: weights averaged with lambda {_fmt(lam)}")
    ctx.acc.wait_for_everyone()


def seed_ensemble(ctx: StageContext, fit: dict, auxiliaries: dict, stage: Path) -> None:
    """Copies of the auxiliary trained here with the lowest target loss, each trained like it on its population
    with a seed of its own (train.seed's ENSEMBLE_COPY stream); the catalogue averages them with it."""
    best = best_auxiliary(fit, trained_auxiliaries(ctx.cfg))
    copies = ctx.cfg.fuse.ensemble_copies
    ctx.log(f"seed-ensemble: aux/{best} and {copies} copies of it trained with other seeds")
    seconds = 0.0
    for copy in range(1, copies + 1):
        directory = ctx.run.ensemble_copy(copy)
        if ctx.begin(directory):
            seed = seed_of(ctx.cfg.train.seed, Stream.ENSEMBLE_COPY, copy)
            train_denoiser(ctx, directory, best, replace(ctx.cfg.train, seed=seed), reference=best)
        seconds += finished_info(directory)["seconds"]
    ctx.finish(stage, {"population": best, "copies": copies, "seconds": seconds})


BUILDERS = {TARGET_SCRATCH: target_scratch, TARGET_FINETUNE: target_finetune, CHECKPOINT_MERGE: checkpoint_merge,
            SEED_ENSEMBLE: seed_ensemble}
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
        n = population_entry(ctx.manifest, cfg.data.target.name)["count"]
        fit = fit_lambda(ctx, uniform, n)
        if ctx.acc.is_main_process:
            write_atomically(run_dir.lambda_file, json.dumps(fit, indent=1).encode())
            edges = fit["sigma_edges"]
            lambda_chart(fit[fit["method"]]["lambda"], fit["names"], ["all sigma"] if not edges else _bin_labels(edges),
                         run_dir.lambda_chart,
                         title=f"ScoreFusion lambda ({fit['method']} fit, n = {fit['target_images']})")
            fused = barycenter_model(fit, auxiliaries, batched=cfg.fuse.batched).to(ctx.device)
            ctx.save_grid(ctx.sampler(fused), run_dir.fuse)
        if cfg.fuse.mixture:
            router, trained = train_router(ctx, auxiliaries)
            if ctx.acc.is_main_process:
                batches = population_batches(ctx.run.data, cfg.data.target.name, cfg.fuse.batch,
                                             cfg.data.max_bad_samples)
                mixture = {**fit_mixture(ctx, batches, auxiliaries, router),
                           "router_samples": trained.get("samples", {}), "router_calibration": trained.get("calibration")}
                write_atomically(run_dir.mixture_file, (json.dumps(mixture, indent=1) + "\n").encode())
                ctx.log(f"fuse (mixture): pi {_fmt(mixture['router']['pi'])} (router EM)"
                        + (f", {_fmt(mixture['nll']['pi'])} (likelihood EM)"
                           if "nll" in mixture else ""))
                model = mixture_model(cfg, mixture, auxiliaries, router).to(ctx.device)
                ctx.save_grid(ctx.sampler(model), run_dir.fuse, MIXTURE_GRID)
        if ctx.acc.is_main_process:
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
    """Weights for the log: one row, or rows per sigma bin separated by |."""
    lam = torch.as_tensor(lam)
    return " | ".join(" ".join(f"{v:.3f}" for v in row) for row in lam.reshape(-1, lam.shape[-1]).tolist())
