"""distill: a one-step generator trained by Score Mismatching (trainer/score_mismatch.py) with the fused
ScoreFusion model as the teacher.

Teacher data: N samples of the fused teacher (deterministic Heun, distill.teacher_steps) are drawn once and
written as WebDataset shards + manifest.json under distill/teacher/, in the format `prepare` writes (uint8
PNG, read back by shards.stream.train_loader like real data). Sample i has its own latents (per-image seeds),
and chunk i of the set is sampled by rank i % world, so the shards do not depend on the world size. Each
shard is written atomically, so an interrupted sampling pass continues where it stopped; the manifest is
written last and marks the set complete; later calls (resume) reuse it, and the teacher is then never moved
to the device. After sampling the teacher leaves the device: training needs only G and D.

The paper's own setting (distill.real_population) trains on a prepared population instead, with no teacher.
"""
import math
from dataclasses import replace
from pathlib import Path

import torch

from evaluation.labels import auxiliary
from shards.atomic import sha256_file, sha256_text
from shards.errors import ModelError
from shards.manifest import MANIFEST_NAME, MANIFEST_VERSION, load_manifest
from shards.prepare import canonical_json, write_manifest, write_shard
from stages.config import RunConfig
from trainer.precision import with_autocast
from trainer.engine import Engine, Update, adam
from trainer.fused_denoiser import merge_weights
from shards.pixels import to_uint8
from trainer.score_mismatch import (build_networks, check_shapes, d_step_loss, export_generator, g_step_loss,
                                    lazy_adam_scaling, r1_step_loss)
from shards.seeds import Stream, generator, per_image_normal, seed_of
from trainer.spec import DistillSpec, TrainSpec
from stages.context import StageContext
from stages.rundir import TEACHER_POPULATION, engine_paths
from trainer.router import load_router
from stages.catalogue import (barycenter_model, best_auxiliary, load_auxiliaries, load_fit, load_mixture,
                              mixture_model, single_lambda, trained_auxiliaries)

TEACHER_CHUNK = 250      # teacher samples per chunk = per shard
# Accelerate gives each DeepSpeed engine one model and one optimizer, and backward() steps the engine prepared
# last; G and D would need two DeepSpeed plugins and R1's double backward through ZeRO's gradient hooks, neither
# of which is reliable. G and D are small next to the teacher, which ZeRO does not shard anyway (it is frozen).
DDP_BECAUSE = "distillation trains two models with two optimizers"


def train_spec(train: TrainSpec, spec: DistillSpec) -> TrainSpec:
    """The engine's TrainSpec of the distill stage: its lr is G's (D's through Update.lr_scale)."""
    def pick(own, default):
        return default if own is None else own
    return replace(train, batch=spec.batch, lr=spec.lr, lr_rampup_kimg=spec.lr_rampup_kimg,
                   adam_betas=list(spec.adam_betas), total_kimg=spec.total_kimg,
                   ema_halflife_kimg=spec.ema_halflife_kimg,
                   eval_every_kimg=pick(spec.eval_every_kimg, train.eval_every_kimg),
                   snapshot_every_kimg=pick(spec.snapshot_every_kimg, train.snapshot_every_kimg),
                   checkpoint_every_kimg=pick(spec.checkpoint_every_kimg, train.checkpoint_every_kimg))


def teacher_parts(ctx: StageContext):
    """(the fused teacher, the warm-start state dict or None, a description) of a finished fuse stage, all
    on the CPU."""
    cfg = ctx.cfg
    if cfg.distill.real_population:
        return None, None, {"real_population": cfg.distill.real_population}
    fit = load_fit(cfg)
    which = cfg.distill.teacher_fit or fit["method"]
    auxiliaries = load_auxiliaries(cfg)
    if which == "mixture":
        mixture = load_mixture(cfg)
        teacher = mixture_model(cfg, mixture, auxiliaries, load_router(ctx.run.router))
        info = {"fit": which, "pi": mixture[mixture["weights"]]["pi"], "names": mixture["names"]}
    else:
        teacher = barycenter_model(fit, auxiliaries, which, batched=cfg.fuse.batched)
        info = {"fit": which, "lambda": fit[which]["lambda"], "names": fit["names"], "sigma_edges": fit["sigma_edges"]}
    d, warm = cfg.distill, None
    if d.init == "warm" or d.score_init == "aux":
        if d.warm_from == "best":
            best = best_auxiliary(fit, trained_auxiliaries(cfg))
            warm, info["warm"] = auxiliaries[best].state_dict(), auxiliary(best)
        else:
            lam = single_lambda(fit)
            warm = merge_weights([auxiliaries[n] for n in fit["names"]], lam)
            info["warm"] = f"merge {[round(v, 4) for v in lam]}"
    return teacher, warm, info


def sample_teacher(ctx: StageContext, teacher, out_dir: Path, info: dict) -> dict:
    """Draw distill.teacher_samples samples of `teacher` into shards + manifest under out_dir, once. `info`
    describes the teacher (lambda, steps...); a manifest made from another teacher is an error, not silently
    reused. Returns the manifest."""
    cfg, acc, shape = ctx.cfg, ctx.acc, ctx.shape
    n, steps = cfg.distill.teacher_samples, cfg.distill.teacher_steps or cfg.edm.sampler_steps
    info = {**info, "samples": n, "steps": steps, "seed": cfg.train.seed, "shape": list(shape),
            **({"precision": cfg.distill.teacher_precision} if cfg.distill.teacher_precision != "no" else {})}
    fingerprint = sha256_text(canonical_json(info))
    if (out_dir / MANIFEST_NAME).is_file():
        manifest = load_manifest(out_dir)
        if manifest.get("fingerprint") != fingerprint:
            raise ModelError(f"{out_dir} holds teacher samples made with other settings ({manifest.get('teacher')}); "
                             f"delete {out_dir.parent} to distill again")
        ctx.log(f"teacher samples: reusing {n} in {out_dir}")
        return manifest
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    chunks = math.ceil(n / TEACHER_CHUNK)
    rank, world = acc.process_index, acc.num_processes
    mine = [i for i in range(rank, chunks, world) if not (out_dir / f"shard-{i:06d}.tar").is_file()]
    if mine:
        ctx.log(f"teacher samples: {n} in {chunks} chunks of {TEACHER_CHUNK} ({steps}-step Heun)")
        teacher.to(ctx.device)
    sample = with_autocast(ctx.sampler(teacher, steps), cfg.distill.teacher_precision)
    for i in mine:
        indices = range(i * TEACHER_CHUNK, min((i + 1) * TEACHER_CHUNK, n))
        z = per_image_normal(cfg.train.seed, Stream.TEACHER, indices, shape).to(ctx.device)
        images = to_uint8(sample(z)).permute(0, 2, 3, 1).cpu().numpy()
        write_shard(out_dir / f"shard-{i:06d}.tar",
                    ((f"teacher-{j:07d}", image, -1) for j, image in zip(indices, images)))
    teacher.cpu()  # training needs only G and D on the device
    acc.wait_for_everyone()
    if acc.is_main_process:
        shards = [{"file": f"shard-{i:06d}.tar", "count": min(TEACHER_CHUNK, n - i * TEACHER_CHUNK),
                   "sha256": sha256_file(out_dir / f"shard-{i:06d}.tar")} for i in range(chunks)]
        population = {"role": "teacher", "split": "generated", "count": n, "mixture": {}, "class_histogram": {},
                      "shards": shards, "hash": fingerprint}
        write_manifest(out_dir, {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "teacher": info,
                                 "image_size": shape[-1], "channels": shape[0], "class_names": ctx.manifest["class_names"],
                                 "populations": {TEACHER_POPULATION: population}})  # last: the set is complete
    acc.wait_for_everyone()
    return load_manifest(out_dir)


def train(ctx: StageContext, teacher, warm_state: dict | None, teacher_info: dict) -> Engine:
    """Sample the teacher (once), then train G and D with the engine; exports the EMA generator."""
    cfg, acc, spec, stage_dir = ctx.cfg, ctx.acc, ctx.cfg.distill, ctx.run.distill
    shape = ctx.shape
    teacher_shape = getattr(teacher, "image_shape", None)
    if teacher_shape is not None and tuple(teacher_shape) != shape:
        raise ModelError(f"distill: the teacher was trained on {tuple(teacher_shape)} images, the data are {shape}")
    if spec.real_population:  # the paper's setting: real images, no teacher
        real_dir, real_name = ctx.run.data, spec.real_population
    else:
        real_dir, real_name = ctx.run.teacher, TEACHER_POPULATION
        sample_teacher(ctx, teacher, real_dir, teacher_info)

    engine_spec = train_spec(cfg.train, spec)

    def build():
        G, D = build_networks(spec, cfg.network.preset, cfg.network.dropout, shape, cfg.edm, warm_state)
        check_shapes(G, D, shape)
        return G, D

    G, D = ctx.seeded(cfg.train.seed, build)
    r1 = spec.r1_every > 0 and spec.r1_gamma > 0
    c = lazy_adam_scaling(spec.r1_every) if r1 else 1.0
    opt_g = adam(G.parameters(), spec.lr, spec.adam_betas, cfg.train.adam_eps)
    opt_d = adam(D.parameters(), spec.lr_d or spec.lr, [b ** c for b in spec.adam_betas], cfg.train.adam_eps)
    rank = acc.process_index
    micro = spec.batch // (acc.num_processes * cfg.train.accum)

    def batches(start_batch: int):
        # The "real" micro-batches of the D and R1 updates. The target images are mixed in per sample with
        # probability real_mix, from a generator seeded by the position.
        mix = (ctx.training_images(cfg.data.target.name, micro, seed_of(cfg.train.seed, Stream.REAL_MIX_DATA),
                                   start_batch) if spec.real_mix > 0 else None)
        real_stream = ctx.training_images(real_name, micro, cfg.train.seed, start_batch, data_dir=real_dir)
        for index, images in enumerate(real_stream, start=start_batch):
            if mix is not None:
                pick = torch.rand(len(images), generator=generator(cfg.train.seed, Stream.REAL_MIX, rank, index)) < spec.real_mix
                images = torch.where(pick.to(ctx.device)[:, None, None, None], next(mix), images)
            yield images

    def grad_scale() -> float:
        return float(acc.scaler.get_scale()) if acc.scaler is not None else 1.0

    lr_scale_d = (spec.lr_d or spec.lr) / spec.lr * c
    updates = [Update("adam_d", "D", lambda m, real, step: d_step_loss(m["D"], m["G"], real),
                      lr_scale=lr_scale_d, name="score")]
    if r1:
        updates.append(Update("adam_d", "D", lambda m, real, step: r1_step_loss(
            m["D"], real, spec.r1_gamma, spec.batch, grad_scale=grad_scale()),
            lr_scale=lr_scale_d, every=spec.r1_every, name="r1", double_backward=True))
    updates.append(Update("adam_g", "G", lambda m, _, step: g_step_loss(m["D"], m["G"], micro, shape, ctx.device),
                          takes_batch=False, name="generator"))
    engine = Engine(acc, engine_spec, engine_paths(stage_dir), modules={"G": G, "D": D}, optimizers={"adam_g": opt_g, "adam_d": opt_d},
                    updates=updates, batches=batches, ema=("G",), log=ctx.log, trackers=ctx.trackers(stage_dir),
                    hooks=ctx.training_hooks(stage_dir, ctx.fd_reference, engine_spec, lambda e: e.ema["G"]))
    meta = {"kind": "one-step-generator", "preset": spec.g_preset or cfg.network.preset, "dropout": cfg.network.dropout,
            "image_size": shape[-1], "channels": shape[0], "sigma_max": spec.g_sigma or cfg.edm.sigma_max,
            "sigma_data": cfg.edm.sigma_data, "init": spec.init,
            "warm_from": spec.warm_from if spec.init == "warm" else None, "score_init": spec.score_init,
            "teacher": teacher_info}

    def export():
        export_generator(stage_dir, engine.ema["G"], meta)
        ctx.save_grid(engine.ema["G"], stage_dir)
    engine.run()
    ctx.finish(stage_dir, engine.summary(), export)
    return engine


def run(cfg: RunConfig) -> None:
    ctx = StageContext.open(cfg, ddp_because=DDP_BECAUSE)
    if not ctx.begin(ctx.run.distill):
        return
    teacher, warm, info = teacher_parts(ctx)
    train(ctx, teacher, warm, info)
    ctx.log(f"distill: one-step generator in {ctx.run.distill}")
