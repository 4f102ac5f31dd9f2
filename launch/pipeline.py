"""The commands of `scorefuse`, and the pipeline order the CLI, `scorefuse run` and `scorefuse submit` read.

Each command names its body ("module:function", imported only when it runs, so --help stays fast), its
`name=value` arguments (those that are not config keys) and the examples its --help shows. A body takes the
loaded config; one of a command with arguments also takes them (a dict) and the Invocation.
"""
import importlib
from dataclasses import dataclass, field
from typing import NamedTuple

from shards.errors import ConfigError


class Invocation(NamedTuple):
    """How the command was called: what a body that starts other commands (aux=all, run) hands them."""
    config_path: str
    overrides: list[str]


@dataclass(frozen=True)
class Command:
    name: str
    body: str  # "module:function"
    summary: str
    arguments: dict[str, str] = field(default_factory=dict)  # name=value arguments -> what they mean
    required: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    array_over: str = ""  # `submit` runs it as an array job, one task per value of this argument (aux, n)

    def run(self, cfg, args: dict, invocation: Invocation) -> int:
        """The body on a loaded config; its exit code. A stage body returns what it made (a manifest, a fit), which
        other stages use; only an int is an exit code."""
        module, function = self.body.split(":")
        body = getattr(importlib.import_module(module), function)
        result = body(cfg, args, invocation) if self.arguments else body(cfg)
        return result if isinstance(result, int) else 0


COMMANDS = {c.name: c for c in [
    Command("prepare", "stages.prepare:run", "cut the populations out of the source and write them as WebDataset shards",
            examples=("scorefuse prepare --config configs/cifar10.yaml data.source.path=/data/cifar-10-python.tar.gz",)),
    Command("train-aux", "launch.local:train_aux", "train auxiliary diffusion models, one per auxiliary population "
            "(a pretrained one is loaded, checked and recorded instead)",
            {"aux": "NAME (one data.aux entry), all (every one, on this machine's GPUs), or a,b,c"},
            required=("aux",), array_over="aux",
            examples=("scorefuse train-aux aux=all", "accelerate launch --multi_gpu --num_processes 8 -m launch.cli "
                      "train-aux --config configs/cifar10.yaml aux=animals")),
    Command("fuse", "stages.fuse:run", "fit the ScoreFusion weights lambda on the target images and build the baselines",
            examples=("scorefuse fuse --config configs/digits.yaml fuse.sigma_bins=[0.5,5]",)),
    Command("distill", "stages.distill:run", "train the one-step generator by Score Mismatching with the fused teacher",
            examples=("scorefuse distill distill.total_kimg=50",)),
    Command("evaluate", "stages.evaluate:run", "score every finished model and write report.md / report.json",
            examples=("scorefuse evaluate eval.num_samples=2000",)),
]}
PIPELINE = tuple(COMMANDS)  # in order: each stage reads what the ones before it wrote

COMMANDS.update({c.name: c for c in [
    Command("sample", "stages.sample:command", "draw images of any finished model, the ones the report scored",
            {"model": "a model label of report.md (aux/NAME, fused-exact, fused-sgd, target-scratch, ..., distill)",
             "n": "the number of images", "out": "FILE.npz (uint8 NHWC), FILE.png (a grid) or a directory of PNGs"},
            required=("model", "n"),
            examples=("scorefuse sample model=fused-exact n=64 out=fused.png", "scorefuse sample model=distill n=1000 out=g.npz")),
    Command("sweep", "stages.sweep:command", "the target size n against every method (the paper's figure): fuse, baselines and "
            "evaluate at each n of sweep.sizes, then sweep.md and plots",
            {"n": "comma-separated sizes of sweep.sizes to run (default: all; the summary waits for all)"},
            array_over="n",
            examples=("scorefuse sweep sweep.sizes=[16,32,64,100]", "scorefuse sweep n=32")),
    Command("run", "launch.cli:run_pipeline", "the whole pipeline (or some of its stages) on this machine",
            {"stages": f"comma-separated stages to run, in pipeline order (default: {','.join(PIPELINE)})"},
            examples=("scorefuse run", "scorefuse run stages=prepare,train-aux,fuse,evaluate name=nodistill")),
    Command("config", "launch.cli:print_config", "print the resolved config (defaults, the file, the overrides) and check it",
            examples=("scorefuse config --config configs/cifar10.yaml train.batch=256",)),
]})


def stages_to_run(value: str | None) -> list[str]:
    """The stages `run` runs: all of them, or the given ones in pipeline order."""
    if not value:
        return list(PIPELINE)
    wanted = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"stages={value}: unknown {unknown} (the pipeline: {','.join(PIPELINE)})")
    return [s for s in PIPELINE if s in wanted]
