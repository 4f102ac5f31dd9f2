"""The run config: one typed schema, loaded from YAML plus `key=value` overrides, checked before any work.

A run config is the single source of truth for a run directory. Errors a user can make here
(a misspelt key, a wrong type, a file that is not there, a value out of range) raise ConfigError with
the key or path in the message, before any stage starts.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evaluation.spec import EvalSpec
from shards.spec import DataSpec
from trainer.spec import EDMSpec, FuseSpec, NetworkSpec, TrainSpec


BASELINES = ("target-scratch", "target-finetune", "checkpoint-merge")


class ConfigError(Exception):
    """A config problem a user can fix; the message names the key or path."""


@dataclass
class LaunchSpec:
    # Auxiliary models trained at the same time by `train-aux aux=all` / `run`.
    # 0 = automatic: on GPUs, one model per group of GPUs; on CPU, one at a time.
    aux_parallel: int = 0
    # Process-group timeout: long enough for a rank to wait while others evaluate or checkpoint.
    timeout_minutes: int = 60


@dataclass
class RunConfig:
    name: str = "digits"
    root: str = "runs"
    data: DataSpec = field(default_factory=DataSpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    edm: EDMSpec = field(default_factory=EDMSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    fuse: FuseSpec = field(default_factory=FuseSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


def load_config(path: str | Path, overrides: List[str] = ()) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> a validated RunConfig object."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        schema = OmegaConf.structured(RunConfig)
        cfg = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    _check(run)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown key '{key}'"
    if "Missing mandatory value" in msg:
        return f"missing value for '{key}'"
    return f"bad value for '{key}': {msg}" if key else msg


def _check(run: RunConfig) -> None:
    """Value and path checks OmegaConf's types cannot express."""
    src = run.data.source
    if src.kind not in ("digits", "cifar10", "lsun", "folder"):
        raise ConfigError(f"data.source.kind: unknown source {src.kind!r} (digits | cifar10 | lsun | folder)")
    if src.kind != "digits":
        if not src.path:
            raise ConfigError(f"data.source.path is required for the {src.kind} source")
        if not Path(src.path).exists():
            raise ConfigError(f"data.source.path: {src.path} does not exist")
    if run.eval.inception_weights and not Path(run.eval.inception_weights).is_file():
        raise ConfigError(f"eval.inception_weights: {run.eval.inception_weights} does not exist")
    if run.eval.extractor not in ("auto", "inception", "digit-classifier"):
        raise ConfigError(f"eval.extractor: {run.eval.extractor!r} is not auto | inception | digit-classifier")
    if run.train.precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.precision: {run.train.precision!r} is not no | bf16 | fp16")
    if run.train.keep_checkpoints < 2:
        raise ConfigError("train.keep_checkpoints must be at least 2 (the newest may be half-written)")
    if run.train.batch <= 0 or run.train.accum <= 0 or run.train.batch % run.train.accum:
        raise ConfigError(f"train.batch ({run.train.batch}) must be a positive multiple of train.accum ({run.train.accum})")
    fuse = run.fuse
    if fuse.method not in ("exact", "sgd"):
        raise ConfigError(f"fuse.method: {fuse.method!r} is not exact | sgd")
    unknown = sorted(set(fuse.baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f"fuse.baselines: unknown {unknown} (known: {', '.join(BASELINES)})")
    edges = list(fuse.sigma_bins)
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ConfigError(f"fuse.sigma_bins must be positive and increasing, got {edges}")
    if fuse.draws_per_image < 1 or fuse.batch < 1:
        raise ConfigError("fuse.draws_per_image and fuse.batch must be at least 1")
    if not run.data.aux:
        raise ConfigError("data.aux: at least one auxiliary population is required")
    names = [p.name for p in run.data.aux]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.aux: population names must be unique, got {names}")


def extractor_for(run: RunConfig) -> str:
    """The feature extractor the Frechet distances of this run use."""
    if run.eval.extractor != "auto":
        return run.eval.extractor
    return "digit-classifier" if run.data.source.kind == "digits" else "inception"
