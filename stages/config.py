"""The run config: one typed schema, loaded from YAML plus `key=value` overrides, checked before any work.

A run config is the single source of truth for a run directory. Errors a user can make here
(a misspelt key, a wrong type, a file that is not there, a value out of range) raise ConfigError with
the key or path in the message, before any stage starts.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from evaluation.labels import CHECKPOINT_MERGE, SEED_ENSEMBLE, TARGET_FINETUNE
from evaluation.spec import INCEPTION_FILE, EvalSpec
from shards.atomic import write_atomically
from shards.errors import ConfigError
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.prepare import data_fingerprint
from shards.ranges import check_values, positive, zero_or_more
from shards.seeds import Stream, seed_of
from shards.spec import DataSpec
from trainer.spec import BASELINES, DistillSpec, EDMSpec, FuseSpec, NetworkSpec, TrainSpec


@dataclass
class LaunchSpec:
    # Auxiliary models trained at the same time by `train-aux aux=all` / `run`.
    # 0 = automatic: on GPUs, one model per group of GPUs; on CPU, one at a time.
    aux_parallel: int = zero_or_more(0, "automatic")
    # Process-group timeout: long enough for a rank to wait while others evaluate or checkpoint.
    timeout_minutes: int = positive(60)


@dataclass
class SweepSpec:
    """The sweep over the target size n (`scorefuse sweep`): each n is a run of its own under
    <run>/sweep/n<n>/ with a target of n images (nested: a smaller n's target inside a larger one's),
    the same auxiliaries, reference and feature classifier."""
    sizes: List[int] = field(default_factory=list)
    # Target draws per size: replicate r > 0 draws its n target images with a seed of its own (sweep_member); the
    # reference and the training seeds are shared. r = 0 in sweep/n<n>/, r > 0 in sweep/n<n>-r<r>/.
    replicates: int = positive(1)
    # true: replicate r > 0 also has auxiliaries of its own, each trained here retrained with a seed of its own
    # (aux/<name>-r<r>/; a pretrained one is shared), so that the intervals cover the auxiliaries' training seeds
    aux_seeds: bool = False
    # set: the sweep's run at target size n (data.target.count becomes n), e.g. to re-evaluate it ...
    n: Optional[int] = positive(None)
    # ... and its replicate (its own target draw; with aux_seeds, and without n, its auxiliaries: `scorefuse
    # train-aux aux=all sweep.replicate=1` trains replicate 1's)
    replicate: int = zero_or_more(0)


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
    sweep: SweepSpec = field(default_factory=SweepSpec)


def load_config(path: str | Path, overrides: List[str] = ()) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> a validated RunConfig object.

    An override may address a list element (data.aux.0.count=300) and replaces what it names: a dict given
    on the command line (data.target.mixture={"0": 0.5, "1": 0.5}) is the new dict, not merged into the old.
    Values are parsed as YAML, except that a string field keeps what was typed (train.precision=no)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = _node(cfg, key)
        if node is None:
            raise ConfigError(f"unknown key '{key}' (scorefuse config prints every key)")
        try:
            value = None if text in ("null", "~") else text if isinstance(node, StringNode) else _parse(text)
            OmegaConf.update(cfg, key, value, merge=False)
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"{key}={text}: {_describe(e)}") from None
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    _check(run)
    return sweep_member(run, run.sweep.n, run.sweep.replicate) if run.sweep.n else run


def sweep_member(run: RunConfig, n: int, replicate: int = 0) -> RunConfig:
    """The config of the sweep's run at target size n, replicate `replicate`: the same run with a target of n
    images drawn with the main run's data.target.seed (replicate 0) or a seed of its own stream (replicate r > 0):
    not seed + r, which is the main draw of the run whose data.target.seed is r larger."""
    seed = run.data.target.seed if replicate == 0 else seed_of(run.data.target.seed, Stream.REPLICATE, replicate)
    target = replace(run.data.target, count=n, seed=seed)
    # The seed ensemble trains on an auxiliary population, not on the n target images: the main run's control,
    # not trained again for every n and replicate.
    fuse = replace(run.fuse, baselines=[b for b in run.fuse.baselines if b != SEED_ENSEMBLE])
    return replace(run, data=replace(run.data, target=target), fuse=fuse,
                   sweep=replace(run.sweep, n=n, replicate=replicate))


def _node(cfg, key: str):
    """The config node `key` names (list indices included), or None when there is none."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig):
            node = node._get_node(part) if part in node else None
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return None
        if node is None:
            return None
    return node


def _parse(text: str):
    """A command-line value as OmegaConf's YAML reads it (1e-3 is a float, [1, 2] a list, {a: 1} a dict)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def record_config(cfg: RunConfig, run) -> None:
    """Write the run directory's config.yaml once (`run`: its RunDir). A later stage may change training,
    evaluation or reader settings, but not what decides the populations: a run directory holds one set of them."""
    if (run.data / MANIFEST_NAME).is_file() and load_manifest(run.data)["fingerprint"] != data_fingerprint(cfg.data):
        raise ConfigError(f"{run.root}: its shards were prepared from a different `data` section "
                          "(populations or source); use another run name (name=...) or delete the directory")
    if not run.config_file.exists():
        write_atomically(run.config_file, to_yaml(cfg).encode())


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown key '{key}'"
    if "Missing mandatory value" in msg:
        return f"missing value for '{key}'"
    return f"bad value for '{key}': {msg}" if key else msg


def _value(run: RunConfig, key: str):
    value = run
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check(run: RunConfig) -> None:
    """Every value against the range or choices declared beside its field (shards/ranges.py), and the checks
    that relate several keys or name files: all before any stage writes a byte."""
    check_values(run)
    _check_data(run)
    src = run.data.source
    if src.kind != "digits":
        if not src.path:
            raise ConfigError(f"data.source.path is required for the {src.kind} source")
        if not Path(src.path).exists():
            raise ConfigError(f"data.source.path: {src.path} does not exist")
    if run.eval.inception_weights and not Path(run.eval.inception_weights).is_file():
        raise ConfigError(f"eval.inception_weights: {run.eval.inception_weights} is not a file")
    from trainer.unet import PRESETS
    for key in ("network.preset", "fuse.router_preset"):
        if _value(run, key) not in PRESETS:
            raise ConfigError(f"{key}: unknown preset {_value(run, key)!r} ({' | '.join(PRESETS)})")
    t, e = run.train, run.edm
    if t.batch % t.accum:
        raise ConfigError(f"train.batch ({t.batch}) must be a multiple of train.accum ({t.accum})")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {list(t.adam_betas)}")
    if e.sigma_min >= e.sigma_max:
        raise ConfigError(f"edm.sigma_min ({e.sigma_min}) must be below edm.sigma_max ({e.sigma_max})")
    if t.resume not in ("latest", "none") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: {t.resume} is not latest, none or a checkpoint directory")
    if any(n < 1 for n in run.sweep.sizes) or len(set(run.sweep.sizes)) != len(run.sweep.sizes):
        raise ConfigError(f"sweep.sizes must be distinct positive target sizes, got {list(run.sweep.sizes)}")
    if run.sweep.replicate >= run.sweep.replicates:
        raise ConfigError(f"sweep.replicate={run.sweep.replicate}: the sweep has sweep.replicates="
                          f"{run.sweep.replicates} (0 to {run.sweep.replicates - 1})")
    fuse = run.fuse
    unknown = sorted(set(fuse.baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f"fuse.baselines: unknown {unknown} (known: {', '.join(BASELINES)})")
    edges = list(fuse.sigma_bins)
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ConfigError(f"fuse.sigma_bins must be positive and increasing, got {edges}")
    rates = list(fuse.finetune_lr)
    if not rates or any(r <= 0 for r in rates) or len(set(rates)) < len(rates):
        raise ConfigError(f"fuse.finetune_lr must be distinct positive learning rates, got {rates}")
    if len(rates) > 1 and fuse.validation_share == 0:
        raise ConfigError(f"fuse.finetune_lr={rates}: choosing among rates needs held-out target images; set "
                          "fuse.validation_share above 0 or give one rate")
    _check_distill(run)
    _check_pretrained(run)


def _check_data(run: RunConfig) -> None:
    if not run.data.aux:
        raise ConfigError("data.aux: at least one auxiliary population is required")
    populations = [*run.data.aux, run.data.target, run.data.reference]
    names = [p.name for p in populations]
    if len(set(names)) != len(names):
        raise ConfigError(f"data: population names must be unique, got {names}")
    drawn = []
    for i, aux in enumerate(run.data.aux):
        role = f"data.aux.{i}"
        if aux.pretrained is not None:
            if aux.mixture or aux.count:
                raise ConfigError(f"{role} ({aux.name}) is the pretrained model {aux.pretrained}, not a population: "
                                  "remove its mixture and count")
            continue
        for key in ("revision", "subfolder"):
            if getattr(aux, key) is not None:
                raise ConfigError(f"{role}.{key} names a version of a pretrained model, and {role} has no pretrained")
        if aux.count < 1 and not aux.mixture:
            raise ConfigError(f"{role} ({aux.name}): give a population (mixture and count) or a model (pretrained)")
        drawn.append((role, aux))
    for role, pop in [*drawn, ("data.target", run.data.target), ("data.reference", run.data.reference)]:
        if pop.count < 1:
            raise ConfigError(f"{role}.count={pop.count}: a population needs at least one image")
        if not pop.mixture or any(not v >= 0 for v in pop.mixture.values()):
            raise ConfigError(f"{role}.mixture: proportions must be 0 or more, got {dict(pop.mixture)}")
        total = sum(pop.mixture.values())
        if abs(total - 1) > 1e-6:
            raise ConfigError(f"{role}.mixture: proportions sum to {total:.6g}, not 1 ({dict(pop.mixture)})")
    drawn_names = [p.name for p in populations if getattr(p, "pretrained", None) is None]
    for key in ("eval.fd_reference", "distill.real_population"):
        if _value(run, key) is not None and _value(run, key) not in drawn_names:
            raise ConfigError(f"{key}: no population {_value(run, key)!r} (have: {', '.join(drawn_names)})")


def _check_pretrained(run: RunConfig) -> None:
    """What needs the auxiliaries' populations or one architecture: refused, by key, where data.aux holds
    pretrained models."""
    pretrained = [a.name for a in run.data.aux if a.pretrained is not None]
    if not pretrained:
        return
    trained = len(run.data.aux) - len(pretrained)
    one = len(pretrained) == 1
    which = f"the pretrained auxiliar{'y' if one else 'ies'} {', '.join(pretrained)}"
    if CHECKPOINT_MERGE in run.fuse.baselines:
        raise ConfigError(f"fuse.baselines: checkpoint-merge averages the weights of auxiliaries of one "
                          f"architecture trained here, and {which} {'is' if one else 'are'} not; remove it")
    for baseline in (TARGET_FINETUNE, SEED_ENSEMBLE):
        if baseline in run.fuse.baselines and not trained:
            raise ConfigError(f"fuse.baselines: {baseline} starts from an auxiliary trained here, and every "
                              "auxiliary is pretrained; remove it")
    d = run.distill
    starts_warm = (d.init == "warm" or d.score_init == "aux") and not d.real_population
    if starts_warm and (d.warm_from == "merge" or not trained):
        what = "a weight average of the auxiliaries" if d.warm_from == "merge" else "an auxiliary trained here"
        raise ConfigError(f"distill.warm_from={d.warm_from}: the generator and score network start from {what} "
                          f"(network.preset), and {which} {'is' if one else 'are'} not; set distill.init=scratch and "
                          f"distill.score_init=scratch" + (" or distill.warm_from=best" if trained else ""))


def _check_distill(run: RunConfig) -> None:
    d = run.distill
    from trainer.unet import PRESETS
    for key in ("g_preset", "d_preset"):
        if getattr(d, key) is not None and getattr(d, key) not in PRESETS:
            raise ConfigError(f"distill.{key}: unknown preset {getattr(d, key)!r} ({' | '.join(PRESETS)})")
        uses_teacher = d.init == "warm" if key == "g_preset" else d.score_init == "aux"
        if uses_teacher and getattr(d, key) not in (None, run.network.preset):
            raise ConfigError(f"distill.{key}={getattr(d, key)} cannot start from the teacher's weights "
                              f"(network.preset={run.network.preset}); leave it unset or use scratch")
    if d.real_population is not None and (d.init != "scratch" or d.score_init != "scratch" or d.real_mix):
        raise ConfigError("distill.real_population trains without a teacher: set distill.init=scratch, "
                          "distill.score_init=scratch and distill.real_mix=0")
    if d.batch % run.train.accum:
        raise ConfigError(f"distill.batch ({d.batch}) must be a multiple of train.accum ({run.train.accum})")
    if d.teacher_fit == "mixture" and not run.fuse.mixture:
        raise ConfigError("distill.teacher_fit=mixture needs the mixture fit: set fuse.mixture=true")
    if run.fuse.mixture_weights == "nll" and not run.fuse.nll_check:
        raise ConfigError("fuse.mixture_weights=nll needs the likelihood fit: set fuse.nll_check=true")
    if len(d.adam_betas) != 2 or not all(0 <= b < 1 for b in d.adam_betas):
        raise ConfigError(f"distill.adam_betas must be two numbers in [0, 1), got {list(d.adam_betas)}")


def extractor_for(run: RunConfig) -> str:
    """The feature space of the run's Fréchet distances: eval.extractor, where "auto" means Inception (FID)
    when its weights are here (eval.inception_weights, or torch-fidelity's download in torch's hub cache)
    and the feature classifier trained on the auxiliaries' labels otherwise (offline runs, the digits)."""
    if run.eval.extractor != "auto":
        return run.eval.extractor
    import torch.hub
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return "inception" if run.eval.inception_weights or cached.is_file() else "classifier"
