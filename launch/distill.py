"""`scorefuse distill` and `scorefuse sample`: the one-step generator stage (trainer/distill.py) as a
function of the run config, and sampling any finished model of a run into PNGs or an .npz."""
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from evaluation.frechet import metric_name
from evaluation.grid import save_grid
from launch.config import ConfigError, RunConfig
from launch.rundir import RunDir
from launch.stages import _grid_latents, frechet_evaluator, grid_scale, reference_statistics, sampler
from shards.manifest import image_shape, load_manifest
from trainer.distill import DistillError, load_generator, train_distill
from trainer.engine import Hook, make_accelerator
from trainer.export import load_denoiser
from trainer.fusion import merge_weights
from trainer.samples import chunk_latents, to_uint8
from trainer.scorefusion import best_auxiliary, load_fused, single_lambda


def distill_dir(cfg: RunConfig) -> Path:
    return RunDir.of(cfg).root / "distill"


def teacher_parts(cfg: RunConfig):
    """(fused teacher, warm-start state dict or None, description) of a finished fuse stage."""
    rd = RunDir.of(cfg)
    if cfg.distill.real_population:
        return None, None, {"real_population": cfg.distill.real_population}
    lambda_json = rd.fuse / "lambda.json"
    if not lambda_json.is_file():
        raise DistillError(f"distill needs the fused teacher, and {lambda_json} does not exist: "
                           "run `scorefuse fuse` first")
    fit = json.loads(lambda_json.read_text())
    which = cfg.distill.teacher_fit or fit["method"]
    teacher = load_fused(rd.fuse, rd.aux_dirs(cfg), which)
    info = {"fit": which, "lambda": fit[which]["lambda"], "names": fit["names"],
            "sigma_edges": fit["sigma_edges"]}
    d = cfg.distill
    warm = None
    if d.init == "warm" or d.score_init == "aux":
        # from the teacher's own (already loaded) auxiliaries
        if d.warm_from == "best":
            best = best_auxiliary(fit)
            warm = teacher.denoisers[teacher.names.index(best)].state_dict()
            info["warm"] = f"aux/{best}"
        else:
            lam = single_lambda(fit)
            warm = merge_weights(list(teacher.denoisers), lam)
            info["warm"] = f"merge {[round(v, 4) for v in lam]}"
    return teacher, warm, info


def distill_hooks(cfg: RunConfig, stage_dir: Path, acc):
    """Periodic Fréchet distance of the EMA one-step generator to the target's reference population
    (named by its sample count) and a sample grid, like launch.stages.training_hooks."""
    manifest = load_manifest(RunDir.of(cfg).data)
    shape = image_shape(manifest)

    def build(spec):
        hooks = []
        if spec.eval_every_kimg > 0:
            evaluator = frechet_evaluator(cfg, acc.device)
            reference = reference_statistics(evaluator, cfg, cfg.data.reference.name)
            name = metric_name(evaluator.extractor, spec.eval_samples)

            def frechet(engine):
                value = evaluator.distance(engine.ema["G"], shape, spec.eval_samples, reference,
                                           seed=spec.seed, rank=acc.process_index,
                                           world_size=acc.num_processes, gather=acc.gather)
                engine.log(f"distill: {name} = {value:.3f} at {engine.kimg:.1f} kimg")
                return {name: value}
            hooks.append(Hook(spec.eval_every_kimg, frechet))
        if spec.snapshot_every_kimg > 0:
            def snapshot(engine):
                if acc.is_main_process:
                    with torch.no_grad():
                        images = engine.ema["G"](_grid_latents(cfg, manifest, acc.device))
                    save_grid(images, stage_dir / "samples.png", scale=grid_scale(manifest))
            hooks.append(Hook(spec.snapshot_every_kimg, snapshot))
        return tuple(hooks)
    return build


# Accelerate gives each DeepSpeed engine one model and one optimizer, and backward() steps the engine
# prepared last; G and D would need two DeepSpeed plugins and R1's double backward through ZeRO's
# gradient hooks, neither of which is reliable. G and D are small next to the teacher, which ZeRO does
# not shard anyway (it is frozen), so DDP loses little.
DDP_BECAUSE = "distillation trains two models with two optimizers"


def distill_stage(cfg: RunConfig, log=None) -> None:
    rd = RunDir.of(cfg)
    stage_dir = distill_dir(cfg)
    acc = make_accelerator(cfg.train, cfg.launch.timeout_minutes, ddp_because=DDP_BECAUSE)
    log = log or acc.print
    if (stage_dir / "done.json").is_file():
        return log(f"{stage_dir}: already finished, skipping")
    manifest = load_manifest(rd.data)  # "run prepare first"
    teacher, warm, info = teacher_parts(cfg)
    if acc.is_main_process:
        rd.record_config(cfg)
    teacher = teacher.to(acc.device) if teacher is not None else None
    engine = train_distill(acc, stage_dir, teacher, warm, info, rd.data, cfg.data.target.name, cfg.distill,
                           cfg.network.preset, cfg.network.dropout, cfg.edm, cfg.train, workers=cfg.data.workers,
                           max_bad_samples=cfg.data.max_bad_samples, hooks=distill_hooks(cfg, stage_dir, acc),
                           log=log)
    if acc.is_main_process:
        G = load_generator(stage_dir)[0].to(acc.device)
        with torch.no_grad():
            save_grid(G(_grid_latents(cfg, manifest, acc.device)), stage_dir / "samples.png",
                      scale=grid_scale(manifest))
        (stage_dir / "done.json").write_text(json.dumps(
            {"kimg": engine.kimg, "steps": engine.step, "skipped_steps": engine.skipped,
             "seconds": round(engine.seconds, 1), "teacher_samples": cfg.distill.teacher_samples}, indent=1))
    acc.wait_for_everyone()


# ---- scorefuse sample ----------------------------------------------------------------------------------

def model_sampler(cfg: RunConfig, model: str, device):
    """(fn latents -> images in [-1, 1], image shape) of a finished model named as in the report:
    aux/NAME, fused (fuse.method's lambda), fused-exact, fused-sgd, target-scratch, target-finetune,
    checkpoint-merge, distill."""
    rd = RunDir.of(cfg)
    shape = image_shape(load_manifest(rd.data))
    if model == "distill":
        G = load_generator(distill_dir(cfg))[0].to(device)
        return G, shape
    if model in ("fused", "fused-exact", "fused-sgd"):
        which = None if model == "fused" else model.split("-")[1]
        return sampler(load_fused(rd.fuse, rd.aux_dirs(cfg), which).to(device), cfg), shape
    if model.startswith("aux/"):
        name = model.split("/", 1)[1]
        if name not in [p.name for p in cfg.data.aux]:
            raise ConfigError(f"model={model}: no such auxiliary (have: {', '.join(p.name for p in cfg.data.aux)})")
        return sampler(load_denoiser(rd.aux(name))[0].to(device), cfg), shape
    if model in ("target-scratch", "target-finetune", "checkpoint-merge"):
        return sampler(load_denoiser(rd.baseline(model))[0].to(device), cfg), shape
    raise ConfigError(f"model={model}: not one of aux/NAME, fused, fused-exact, fused-sgd, target-scratch, "
                      "target-finetune, checkpoint-merge, distill")


def sample_command(cfg: RunConfig, model: str, n: int, out: str | None, batch: int | None = None) -> Path:
    """n samples of `model` -> PNGs in a directory, or one .npz holding `images` (uint8 [n, H, W, C]).
    The latents are those `evaluate` draws (train.seed, chunks of eval.batch): with the default batch,
    these are the images the report scored."""
    if n < 1:
        raise ConfigError(f"n={n}: need at least one sample")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn, shape = model_sampler(cfg, model, device)
    b = batch or cfg.eval.batch
    parts = []
    with torch.no_grad():
        for i in range(math.ceil(n / b)):
            parts.append(to_uint8(fn(chunk_latents(cfg.train.seed, i, b, shape).to(device))).cpu())
    images = torch.cat(parts)[:n].permute(0, 2, 3, 1).numpy()  # NHWC
    path = Path(out) if out else RunDir.of(cfg).root / "samples" / re.sub(r"[^\w.-]", "_", model)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images)
    else:
        from PIL import Image
        path.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path / f"{i:06d}.png")
    print(f"wrote {n} samples of {model} to {path}")
    return path
