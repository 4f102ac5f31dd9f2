"""The run config: one typed schema, loaded from YAML plus `key=value` overrides, checked before any work.

A run config is the single source of truth for a run directory. Errors a user can make here
(a misspelt key, a wrong type, a file that is not there, a value out of range) raise ConfigError with
the key or path in the message, before any stage starts.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from evaluation.spec import EvalSpec
from shards.errors import ConfigError
from shards.spec import DataSpec
from trainer.spec import BASELINES, DistillSpec, EDMSpec, FuseSpec, NetworkSpec, TrainSpec


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
    distill: DistillSpec = field(default_factory=DistillSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)


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
        overrides = [_as_string_if_declared(schema, item) for item in overrides]
        cfg = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    _check(run)
    return run


def _as_string_if_declared(schema, item: str) -> str:
    """`train.precision=no` stays the string "no": the YAML parser behind overrides reads no/yes/on/off
    as booleans, which a string field would then hold as "False"."""
    key, value = item.split("=", 1)
    node = schema
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) else None
        if node is None:
            return item  # an unknown key: the merge names it
    if isinstance(node, StringNode) and value.lower() in ("no", "yes", "on", "off", "true", "false"):
        return f"{key}='{value}'"
    return item


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
    if run.eval.extractor not in ("auto", "inception", "classifier"):
        raise ConfigError(f"eval.extractor: {run.eval.extractor!r} is not auto | inception | classifier")
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
    _check_distill(run)


def _check_distill(run: RunConfig) -> None:
    d = run.distill
    choices = {"init": ("warm", "scratch"), "warm_from": ("best", "merge"), "score_init": ("aux", "scratch"),
               "teacher_fit": ("", "exact", "sgd")}
    for key, allowed in choices.items():
        if getattr(d, key) not in allowed:
            raise ConfigError(f"distill.{key}: {getattr(d, key)!r} is not {' | '.join(map(repr, allowed))}")
    from trainer.unet import PRESETS
    for key in ("g_preset", "d_preset"):
        if getattr(d, key) is not None and getattr(d, key) not in PRESETS:
            raise ConfigError(f"distill.{key}: unknown preset {getattr(d, key)!r} ({' | '.join(PRESETS)})")
    for key in ("g_preset", "d_preset"):
        uses_teacher = d.init == "warm" if key == "g_preset" else d.score_init == "aux"
        if uses_teacher and getattr(d, key) not in (None, run.network.preset):
            raise ConfigError(f"distill.{key}={getattr(d, key)} cannot start from the teacher's weights "
                              f"(network.preset={run.network.preset}); leave it unset or use scratch")
    if d.teacher_samples < 2 or d.teacher_steps < 0:
        raise ConfigError("distill.teacher_samples must be at least 2 and distill.teacher_steps at least 0")
    if d.real_population is not None:
        pops = [p.name for p in run.data.aux] + [run.data.target.name, run.data.reference.name]
        if d.real_population not in pops:
            raise ConfigError(f"distill.real_population: no population {d.real_population!r} (have: {', '.join(pops)})")
        if d.init != "scratch" or d.score_init != "scratch" or d.real_mix:
            raise ConfigError("distill.real_population trains without a teacher: set distill.init=scratch, "
                              "distill.score_init=scratch and distill.real_mix=0")
    if not 0 <= d.real_mix <= 1:
        raise ConfigError(f"distill.real_mix must be in [0, 1], got {d.real_mix}")
    if d.batch <= 0 or d.batch % run.train.accum:
        raise ConfigError(f"distill.batch ({d.batch}) must be a positive multiple of train.accum ({run.train.accum})")
    if d.lr <= 0 or (d.lr_d is not None and d.lr_d <= 0) or d.total_kimg <= 0 or d.ema_halflife_kimg <= 0:
        raise ConfigError("distill.lr, distill.lr_d, distill.total_kimg and distill.ema_halflife_kimg must be positive")
    if len(d.adam_betas) != 2 or not all(0 <= b < 1 for b in d.adam_betas):
        raise ConfigError(f"distill.adam_betas must be two numbers in [0, 1), got {list(d.adam_betas)}")
    if d.g_sigma is not None and d.g_sigma <= 0:
        raise ConfigError(f"distill.g_sigma must be positive, got {d.g_sigma}")
    if d.r1_gamma < 0 or d.r1_every < 0:
        raise ConfigError("distill.r1_gamma and distill.r1_every must be at least 0")


def extractor_for(run: RunConfig) -> str:
    """The feature extractor the Frechet distances of this run use."""
    if run.eval.extractor != "auto":
        return run.eval.extractor
    return "classifier" if run.data.source.kind == "digits" else "inception"
