"""The run directory: every path and marker name of one experiment, and nothing else spells them.

    runs/<name>/config.yaml            the resolved config, written by the first stage
    runs/<name>/data/                  shards + manifest.json, the feature classifier
    runs/<name>/aux/<k>/               one auxiliary model: checkpoints/, ema.safetensors + model.json,
                                       samples.png, metrics.jsonl, done.json; or, for a pretrained one,
                                       pretrained.json (what was loaded) and done.json
    runs/<name>/aux/<k>-r<r>/          with sweep.aux_seeds, the sweep replicate r's own training of it
    runs/<name>/fuse/                  lambda.json, lambda.png, samples.png, sgd/ (the paper's SGD fit), mixture.json,
                                       mixture-samples.png, done.json
    runs/<name>/router/                the mixture's router: checkpoints/, router.safetensors + router.json, done.json,
                                       samples-<k>.safetensors (a pretrained auxiliary's samples it trains on)
    runs/<name>/baselines/<b>/         target-scratch, target-finetune (trained), checkpoint-merge (weights averaged),
                                       seed-ensemble (done.json naming its auxiliary; copy-<c>/, its copies);
                                       target-finetune/lr-<rate>/, each rate's fine-tune when there are several
    runs/<name>/distill/               teacher/ (shards), checkpoints/, generator.safetensors + generator.json,
                                       samples.png, metrics.jsonl, done.json
    runs/<name>/eval_cache/            reference statistics and every model's samples and features
    runs/<name>/samples/<model>/       what `scorefuse sample` writes by default
    runs/<name>/figures/               copies-<model>.png: each model's most-copied samples
    runs/<name>/slurm/                 batch job logs
    runs/<name>/measurements.json      what evaluate measured (evaluation/measurements.py)
    runs/<name>/report.md, report.json its view (evaluation/run_report.py)
    runs/<name>/sweep/n<n>/            the sweep over the target size: one run per n (its data, fuse, baselines,
                                       report), sharing the parent's auxiliaries, classifier and cache; its
                                       replicate r > 0 (another draw of the n target images) in n<n>-r<r>/
    runs/<name>/baselines/split/       the target images the early-stopped baselines train on
    runs/<name>/sweep/sweep.md, sweep.json, <metric>.png

A stage directory is finished when it holds done.json (one rule for every stage; the engine writes it last,
after the stage's model). The data directory's marker is its manifest.json, which `prepare` writes last.
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from evaluation.labels import SEED_ENSEMBLE
from shards.atomic import write_atomically
from trainer.engine import EnginePaths

DONE = "done.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # a stage's TensorBoard events (train.log_with)
GRID = "samples.png"
MIXTURE_GRID = "mixture-samples.png"  # the fuse stage's second grid: the mixture-fused model's samples
TEACHER_POPULATION = "teacher"  # the population name of the distillation teacher's samples (distill/teacher/)
BEST = "best.json"  # in best/: the kimg, step and held-out loss of the weights beside it (or of lambda)


def _file_name(label: str) -> str:
    """A model label as one path component (aux/aux-low -> aux_aux-low)."""
    return re.sub(r"[^\w.-]", "_", label)


def is_finished(stage_dir: Path) -> bool:
    return (Path(stage_dir) / DONE).is_file()


def mark_finished(stage_dir: Path, info: dict) -> None:
    """The stage's last write: done.json with what it did (kimg, steps, seconds ...), atomically."""
    write_atomically(Path(stage_dir) / DONE, (json.dumps(info, indent=1) + "\n").encode())


def set_aside(stage_dir: Path) -> Path:
    """Move a stage directory out of the way of a fresh run (train.resume=none), keeping what it holds:
    <stage>.replaced-<UTC time>."""
    stage_dir = Path(stage_dir)
    aside = stage_dir.with_name(f"{stage_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    stage_dir.rename(aside)
    return aside


def engine_paths(stage_dir: Path) -> EnginePaths:
    """Where the training run of a stage writes: <stage>/checkpoints/ and <stage>/metrics.jsonl."""
    return EnginePaths(Path(stage_dir) / CHECKPOINTS, Path(stage_dir) / METRICS)


def finished_info(stage_dir: Path) -> dict:
    return json.loads((Path(stage_dir) / DONE).read_text())


@dataclass(frozen=True)
class RunDir:
    """A run directory; a sweep's run at one target size (`parent` set) keeps its own data, fits, baselines
    and report, and reads the auxiliaries, the feature classifier and the evaluation cache of its parent. A sweep
    replicate r > 0 with sweep.aux_seeds reads its own training of the auxiliaries in `retrained`:
    aux/<name>-r<r>/."""
    root: Path
    parent: "RunDir | None" = None
    aux_replicate: int = 0            # r of aux/<name>-r<r>/, 0: the main training
    retrained: frozenset = frozenset()  # the auxiliaries the replicate trained (not the pretrained ones)

    @classmethod
    def of(cls, cfg) -> "RunDir":
        base = cls(Path(cfg.root) / cfg.name)
        r = cfg.sweep.replicate if cfg.sweep.aux_seeds else 0
        retrained = frozenset(a.name for a in cfg.data.aux if a.pretrained is None) if r else frozenset()
        if cfg.sweep.n:
            return cls(base.sweep_member(cfg.sweep.n, cfg.sweep.replicate), base, r, retrained)
        return cls(base.root, None, r, retrained)

    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    def sweep_member(self, n: int, replicate: int = 0) -> Path:
        return self.sweep / (f"n{n}" if replicate == 0 else f"n{n}-r{replicate}")

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def classifier(self) -> Path:
        """The feature classifier of the offline Fréchet distance and the class proportions."""
        return (self.parent or self).data / "classifier.safetensors"

    def aux(self, name: str) -> Path:
        own = f"{name}-r{self.aux_replicate}" if name in self.retrained else name
        return (self.parent or self).root / "aux" / own

    def aux_dirs(self, cfg) -> dict[str, Path]:
        return {p.name: self.aux(p.name) for p in cfg.data.aux}

    def pretrained_record(self, aux: str) -> Path:
        """What train-aux loaded for a pretrained auxiliary: its source, the sha256 of its weights, its schedule."""
        return self.aux(aux) / "pretrained.json"

    def train_log(self, aux: str) -> Path:
        """One auxiliary's log when several train at once on one machine."""
        return self.aux(aux) / "train.log"

    @property
    def fuse(self) -> Path:
        return self.root / "fuse"

    @property
    def lambda_file(self) -> Path:
        return self.fuse / "lambda.json"

    @property
    def lambda_chart(self) -> Path:
        return self.fuse / "lambda.png"

    @property
    def sgd_fit(self) -> Path:
        return self.fuse / "sgd"

    @property
    def mixture_file(self) -> Path:
        """The mixture fit: pi by EM on the router's density ratios (and on the auxiliaries' likelihoods)."""
        return self.fuse / "mixture.json"

    @property
    def router(self) -> Path:
        """The mixture's router, trained on the auxiliary populations (so a sweep's runs share the parent's)."""
        return (self.parent or self).root / "router"

    def router_samples(self, aux: str) -> Path:
        """A pretrained auxiliary's samples that the router trains on in place of its population (uint8)."""
        return self.router / f"samples-{aux}.safetensors"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def baseline(self, name: str) -> Path:
        return self.baselines / name

    def ensemble_copy(self, copy: int) -> Path:
        """Copy c (1, 2, ...) of the seed ensemble's auxiliary: trained like it, on its population, another seed."""
        return self.baseline(SEED_ENSEMBLE) / f"copy-{copy}"

    @staticmethod
    def finetune_rate(stage_dir: Path, rate: float) -> Path:
        """The fine-tune at one of several fuse.finetune_lr (the baseline is the best of them)."""
        return Path(stage_dir) / f"lr-{rate:g}"

    @property
    def validation_split(self) -> Path:
        """The training part of the target images, as shards: what the baselines train on when some of the
        target images are held out for early stopping (stages/early_stopping.py)."""
        return self.baselines / "split"

    @staticmethod
    def best_weights(stage_dir: Path) -> Path:
        """A baseline's lowest held-out loss so far (its EMA weights, model.json and best.json), or the SGD fit's
        (best.json with its lambda)."""
        return Path(stage_dir) / "best"

    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def teacher(self) -> Path:
        return self.distill / "teacher"

    @property
    def eval_cache(self) -> Path:
        return (self.parent or self).root / "eval_cache"

    def copies_figure(self, label: str) -> Path:
        """The most-copied samples of a model beside their nearest training images."""
        return self.root / "figures" / f"copies-{_file_name(label)}.png"

    @property
    def measurements(self) -> Path:
        """What evaluate measured: report.md, report.json and the sweep's summary are views of it."""
        return self.root / "measurements.json"

    @property
    def report(self) -> Path:
        """report.md; report.json beside it."""
        return self.root / "report.md"

    def samples(self, label: str) -> Path:
        return self.root / "samples" / _file_name(label)

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"
