"""train-aux: one EDM denoiser trained on one auxiliary population's shards.

The same body trains the fuse stage's target-only baselines (stages/fuse.py), which may keep the EMA weights
with the lowest loss on held-out target images instead of the last (stages/early_stopping.py). It is the
engine plus three stage-specific parts: the network, the EDM loss, and the population's stream. When it
finishes, the EMA weights are exported (trainer/export.py) and the engine marks the stage finished, so a re-run
skips it. A pretrained auxiliary (data.aux.*.pretrained) is not trained: it is loaded, checked and recorded
(stages/pretrained.py), and its stage is finished at once.
"""
import time
from dataclasses import replace
from pathlib import Path

from shards.errors import ConfigError
from shards.seeds import Stream, seed_of
from shards.manifest import load_manifest, population_entry
from shards.spec import AuxSpec
from stages.config import RunConfig
from trainer.edm import Denoiser, denoising_loss
from trainer.engine import Engine, Update, adam
from trainer.export import export_denoiser
from trainer.spec import TrainSpec
from stages.context import StageContext
from stages.pretrained import load_pretrained, save_record
from stages.rundir import engine_paths, mark_finished
from trainer.unet import build_unet
from stages.early_stopping import BestWeights


def model_meta(ctx: StageContext, population: str) -> dict:
    """model.json: what rebuilds the denoiser without the run config."""
    c, size, _ = ctx.shape
    return {"preset": ctx.cfg.network.preset, "dropout": ctx.cfg.network.dropout, "image_size": size,
            "channels": c, "sigma_data": ctx.cfg.edm.sigma_data, "population": population}


def train_denoiser(ctx: StageContext, stage_dir: Path, population: str, train: TrainSpec,
                   reference: str, init: dict | None = None, data_dir: Path | None = None,
                   keep: BestWeights | None = None, keep_every_kimg: float = 0.0) -> Engine:
    """Train (or resume) one denoiser on `population` (of the run's data, or of `data_dir`), its periodic
    Fréchet distance measured against `reference`; `init` is a state dict to start from instead of random
    weights (fine-tuning). A resumed run takes its weights from the checkpoint either way. With `keep`, the
    EMA weights are offered to it at the start, every `keep_every_kimg` and at the end, and the ones it kept
    are exported, and its patience rule may end the training early."""
    cfg, acc = ctx.cfg, ctx.acc
    # a clear error for an unknown population, before any work
    population_entry(ctx.manifest if data_dir is None else load_manifest(data_dir), population)
    meta = model_meta(ctx, population)

    def build() -> Denoiser:
        denoiser = Denoiser(build_unet(cfg.network.preset, meta["image_size"], meta["channels"], cfg.network.dropout),
                            sigma_data=cfg.edm.sigma_data)
        if init is not None:
            denoiser.load_state_dict(init)
        return denoiser

    denoiser = ctx.seeded(train.seed, build)
    optimizer = adam(denoiser.parameters(), train.lr, train.adam_betas, train.adam_eps)
    micro_batch = train.batch // (acc.num_processes * train.accum)

    def batches(start_batch: int):
        return ctx.training_images(population, micro_batch, train.seed, start_batch, data_dir=data_dir)

    def loss(modules, x0, step):
        # Noise from the global RNG: it is seeded per rank and saved in every checkpoint.
        e = cfg.edm
        return denoising_loss(modules["net"], x0, None, p_mean=e.p_mean, p_std=e.p_std, sigma_data=e.sigma_data).mean()

    engine = Engine(acc, train, engine_paths(stage_dir), modules={"net": denoiser}, optimizers={"adam": optimizer},
                    updates=[Update("adam", "net", loss)], batches=batches, ema=("net",), log=ctx.log,
                    trackers=ctx.trackers(stage_dir),
                    hooks=ctx.training_hooks(stage_dir, reference, train, lambda e: ctx.sampler(e.ema["net"]))
                    + ((keep.hook(keep_every_kimg),) if keep is not None else ()),
                    until=None if keep is None else keep.until)
    if keep is None:
        engine.run()
        ctx.finish(stage_dir, engine.summary(), lambda: export_denoiser(stage_dir, engine.ema["net"], meta))
        return engine
    keep.start(engine.ema["net"])  # before any step (and any resume): the starting weights
    engine.run()
    ctx.finish(stage_dir, {**engine.summary(), **keep.summary()}, lambda: keep.export(stage_dir))
    return engine


def record(ctx: StageContext, spec: AuxSpec, stage_dir: Path) -> None:
    """A pretrained auxiliary is not trained: loaded once, which checks it against the run's images (on every
    rank, so that a refusal stops them alike), recorded by the main process, and marked finished."""
    started = time.perf_counter()
    _, info = load_pretrained(spec, ctx.shape)
    if ctx.acc.is_main_process:
        save_record(info, ctx.run.pretrained_record(spec.name))
        mark_finished(stage_dir, {"pretrained": spec.pretrained, "seconds": time.perf_counter() - started})
        lo_hi = "any sigma" if info["sigma_range"] is None else "sigma {:.4g} to {:.4g}".format(*info["sigma_range"])
        ctx.log(f"aux {spec.name}: pretrained {spec.pretrained} ({info['kind']}, {info['parameters']:,} parameters, "
                f"{lo_hi}, weights sha256 {info['weights_sha256'][:12]}) recorded in {stage_dir}")
    ctx.acc.wait_for_everyone()


def run(cfg: RunConfig, aux: str) -> None:
    """Train one auxiliary model (any number of processes, under `accelerate launch` or not), or record a
    pretrained one."""
    specs = {p.name: p for p in cfg.data.aux}
    if aux not in specs:
        raise ConfigError(f"aux={aux}: no such auxiliary (have: {', '.join(specs)})")
    ctx = StageContext.open(cfg)
    stage_dir = ctx.run.aux(aux)
    if not ctx.begin(stage_dir):
        return
    if specs[aux].pretrained is not None:
        record(ctx, specs[aux], stage_dir)
        return
    r = ctx.run.aux_replicate  # a sweep replicate's own training (sweep.aux_seeds): the same recipe, its own seed
    train = replace(cfg.train, seed=seed_of(cfg.train.seed, Stream.AUX_REPLICATE, r)) if r else cfg.train
    train_denoiser(ctx, stage_dir, aux, train, reference=aux)
    ctx.log(f"aux {aux}: model in {stage_dir}")

