"""Early stopping of the target-only baselines on target images they do not train on (docs/METHODS.md §1): a
baseline trained a fixed length at every n over-fits a small target (at n = 16, 10 kimg of fine-tuning is 625
epochs) and makes fusion look better than it is. So the fuse stage holds out fuse.validation_share of the n
target images; target-scratch and target-finetune train on the rest, their EMA weights are measured on the
held-out part every fuse.validation_every_kimg (and at the start and the end), and the weights with the lowest
held-out loss are the ones exported. The starting weights are measured too, so a fine-tune never ends worse,
on that loss, than the auxiliary it started from. With fuse.patience_kimg, training ends once the lowest loss is
that many kimg old: fuse.scratch_kimg and fuse.finetune_kimg are then caps, so a baseline trains as long as it
improves at every n instead of a fixed length that under-trains it at large n. Several fuse.finetune_lr are a rate
search: a fine-tune per rate, and the one whose kept weights have the lowest held-out loss is the baseline.

The SGD fit of lambda (stages/fuse.py) is selected on the same held-out images: it trains on the training
part, and its lambda with the lowest held-out loss is kept (BestLambda). The loss is quadratic in lambda, so the
held-out images' Gram statistics, computed once, give it exactly at every step for free.

The split: a permutation of the n images seeded by (train.seed, Stream.VALIDATION); its first
round(share x n) images (at least 1, at most n - 1) are held out, by index in the target population. The
training part is written once as shards (RunDir.validation_split) that the baselines' streams read like any
population. The held-out loss is evaluation.score_matching's, with eval.test_draws_per_image fixed draws per
image, so successive measurements differ only by the weights.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast

from evaluation.score_matching import held_out_loss
from shards.atomic import sha256_text, write_atomically
from shards.errors import ConfigError
from shards.manifest import MANIFEST_NAME, MANIFEST_VERSION, load_manifest
from shards.prepare import canonical_json, write_manifest, write_shard
from shards.seeds import Stream, generator
from shards.stream import read_population
from stages.context import StageContext
from stages.rundir import BEST, RunDir
from trainer.engine import Hook
from trainer.export import export_denoiser, load_denoiser
from trainer.lambda_fit import GramStats

TRAINING_PART = "target-training"  # the training part's population name in the split's data directory


@dataclass
class TargetSplit:
    data_dir: Path         # the training part's shards
    images: torch.Tensor   # the held-out images, uint8 [M, C, H, W]
    indices: list[int]     # their indices in the target population
    training: int          # how many images the baselines train on


def split_target(ctx: StageContext) -> TargetSplit | None:
    """The target images split for early stopping (the training part written once, on the main process), or
    None when fuse.validation_share is 0."""
    cfg = ctx.cfg
    share = cfg.fuse.validation_share
    if share == 0:
        return None
    images, labels = read_population(ctx.run.data, cfg.data.target.name, cfg.data.max_bad_samples)
    n = len(images)
    if n < 2:
        raise ConfigError(f"fuse.validation_share={share}: early stopping needs at least 2 target images, the "
                          f"target has {n}; set fuse.validation_share=0")
    held = min(max(round(share * n), 1), n - 1)
    order = torch.randperm(n, generator=generator(cfg.train.seed, Stream.VALIDATION)).tolist()
    validation, training = sorted(order[:held]), sorted(order[held:])
    out = ctx.run.validation_split
    target_hash = ctx.manifest["populations"][cfg.data.target.name]["hash"]
    fingerprint = sha256_text(canonical_json({"target": target_hash, "training": training}))
    if ctx.acc.is_main_process and not _holds(out, fingerprint):
        out.mkdir(parents=True, exist_ok=True)
        pixels = images.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC, as shards hold them
        shard = write_shard(out / "shard-000000.tar",
                            ((f"target-{i:07d}", pixels[i], int(labels[i])) for i in training))
        population = {"role": "target", "split": "training part", "count": len(training), "mixture": {},
                      "class_histogram": {}, "shards": [shard], "hash": fingerprint}
        write_manifest(out, {"version": MANIFEST_VERSION, "fingerprint": fingerprint,
                             "image_size": ctx.manifest["image_size"], "channels": ctx.manifest["channels"],
                             "class_names": ctx.manifest["class_names"], "held_out": validation,
                             "populations": {TRAINING_PART: population}})  # last: the split is complete
    ctx.acc.wait_for_everyone()
    return TargetSplit(out, images[validation], validation, len(training))


def _holds(data_dir: Path, fingerprint: str) -> bool:
    return (data_dir / MANIFEST_NAME).is_file() and load_manifest(data_dir).get("fingerprint") == fingerprint


class BestWeights:
    """The EMA weights with the lowest held-out loss so far, kept on disk in RunDir.best_weights(stage) beside
    BEST ({"kimg", "step", "loss"}), so that a resumed run goes on comparing with them. A resumed run replays
    the steps after its checkpoint exactly, so weights kept from such a step are the ones it would keep again.
    Only the main process measures and writes; every rank knows the kept weights' kimg (`kept_kimg`), on which
    the patience rule (`until`) rests."""

    def __init__(self, ctx: StageContext, stage_dir: Path, split: TargetSplit, meta: dict):
        self.ctx, self.split, self.meta = ctx, split, meta
        self.directory = RunDir.best_weights(stage_dir)
        self.best = json.loads((self.directory / BEST).read_text()) if (self.directory / BEST).is_file() else None
        self.kept_kimg = None if self.best is None else self.best["kimg"]

    def loss(self, denoiser) -> float:
        """The mean held-out loss of `denoiser` (on the context's device) over the held-out images."""
        cfg = self.ctx.cfg
        e = cfg.edm
        return float(held_out_loss(denoiser, self.split.images, self.split.indices, cfg.eval.test_draws_per_image,
                                   e.p_mean, e.p_std, e.sigma_data, seed=cfg.train.seed, batch_size=cfg.eval.batch,
                                   device=self.ctx.device).mean())

    def offer(self, denoiser, kimg: float, step: int) -> float | None:
        """Measure `denoiser` and keep it when it is the lowest so far (a tie keeps the earlier weights);
        its loss on the main process, None on the others."""
        if not self.ctx.acc.is_main_process:
            return None
        loss = self.loss(denoiser)
        if self.best is None or loss < self.best["loss"]:
            self.best = {"kimg": kimg, "step": step, "loss": loss}
            self.kept_kimg = kimg
            export_denoiser(self.directory, denoiser, self.meta)
            write_atomically(self.directory / BEST, (json.dumps(self.best) + "\n").encode())
        return loss

    def start(self, denoiser) -> None:
        """The starting weights are the first candidates (unless a resumed run kept some already)."""
        if self.best is None:
            self.offer(denoiser, 0.0, 0)
            self.kept_kimg = 0.0
        self.ctx.acc.wait_for_everyone()

    def hook(self, every_kimg: float, ema: str = "net") -> Hook:
        def measure(engine):
            loss = self.offer(engine.ema[ema], engine.kimg, engine.step)
            # the main process's on every rank (a no-op for one process)
            self.kept_kimg = float(broadcast(torch.tensor([self.kept_kimg], dtype=torch.float64,
                                                          device=self.ctx.device)).item())
            return None if loss is None else {"validation_loss": loss}
        return Hook(every_kimg, measure)

    def until(self, engine) -> str | None:
        """The patience rule (fuse.patience_kimg; 0: never): why training ends now, or None."""
        patience = self.ctx.cfg.fuse.patience_kimg
        if patience <= 0 or engine.kimg - self.kept_kimg < patience - 1e-9:
            return None
        return f"no lower held-out loss for {patience:g} kimg (the lowest at {self.kept_kimg:g} kimg)"

    def export(self, stage_dir: Path) -> None:
        """The kept weights as the stage's model (main process)."""
        denoiser, meta = load_denoiser(self.directory)
        export_denoiser(stage_dir, denoiser, meta)

    def summary(self) -> dict:
        """What done.json records of the choice (on the main process, which writes it)."""
        if self.best is None:
            return {}
        return {"early_stopping": {**self.best, "held_out_images": len(self.split.indices),
                                   "training_images": self.split.training}}


class BestLambda:
    """The SGD fit's lambda with the lowest loss on the held-out target images, `held_out` their GramStats (the
    same on every rank), measured at the start, every `every_kimg` and at the end, and kept in
    RunDir.best_weights(stage)/BEST beside the kimg and step, so that a resumed fit goes on comparing with it (a
    tie keeps the earlier). Every rank measures; the main process writes."""

    def __init__(self, ctx: StageContext, stage_dir: Path, held_out: GramStats, split: TargetSplit):
        self.ctx, self.held_out, self.split = ctx, held_out, split
        self.path = RunDir.best_weights(stage_dir) / BEST
        self.best = json.loads(self.path.read_text()) if self.path.is_file() else None

    def offer(self, lam: torch.Tensor, kimg: float, step: int) -> float:
        lam = lam.detach().double().cpu()
        loss = float(self.held_out.loss(lam))
        if self.best is None or loss < self.best["loss"]:
            self.best = {"kimg": kimg, "step": step, "loss": loss, "lambda": lam.tolist()}
            if self.ctx.acc.is_main_process:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(self.path, (json.dumps(self.best) + "\n").encode())
        return loss

    def hook(self, every_kimg: float, module: str = "weights") -> Hook:
        def measure(engine):
            return {"validation_loss": self.offer(engine.unwrap(module).weights(), engine.kimg, engine.step)}
        return Hook(every_kimg, measure)

    def lam(self) -> torch.Tensor:
        return torch.tensor(self.best["lambda"], dtype=torch.float64)

    def summary(self) -> dict:
        return {"early_stopping": {**{k: self.best[k] for k in ("kimg", "step", "loss")},
                                   "held_out_images": len(self.split.indices), "training_images": self.split.training}}
