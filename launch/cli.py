"""`scorefuse`: the command line. `scorefuse --help` lists the commands, `scorefuse COMMAND --help` their
arguments and examples; launch/pipeline.py is the table they come from.

Every command resumes what an earlier call left unfinished and skips what is done. A problem the user can
fix ends with one line naming the culprit and exit code 2; a stage stopped by SIGTERM/SIGUSR1 checkpoints
and exits with 75 (requeue), by Ctrl-C with 130.
"""
import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from launch.pipeline import COMMANDS, PIPELINE, Invocation, stages_to_run
from shards.errors import ConfigError, UserError
from stages.config import load_config, to_yaml
from trainer.preemption import EXIT_INTERRUPTED

DEFAULT_CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"
EXIT_USER_ERROR = 2
OVERRIDES_HELP = ("config overrides as dotted key=value (train.total_kimg=20, data.aux.0.count=300, "
                  "data.target.mixture={\"0\": 0.5, \"1\": 0.5}); `scorefuse config` prints every key")


def _version() -> str:
    try:
        return version("scorefuse")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scorefuse", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Diffusion models for a target population with few images: train auxiliary models, fuse "
                    "them with ScoreFusion, distill the fused model into a one-step generator, evaluate.",
        epilog=f"The pipeline: {' -> '.join(PIPELINE)} (`scorefuse run` runs it; `scorefuse submit` queues it on "
               "SLURM).\nThe default config is configs/digits.yaml (the embedded digits).")
    p.add_argument("--version", action="version", version=f"scorefuse {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        lines = [f"  {name}=VALUE  {meaning}" for name, meaning in command.arguments.items()]
        epilog = ("arguments:\n" + "\n".join(lines) + "\n\n" if lines else "") + \
            "examples:\n" + "\n".join(f"  {e}" for e in command.examples)
        s = sub.add_parser(command.name, help=command.summary, description=command.summary, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="YAML run config (default: %(default)s)")
        s.add_argument("items", nargs="*", metavar="key=value",
                       help=(f"{', '.join(f'{a}=...' for a in command.arguments)} and " if command.arguments else "")
                       + OVERRIDES_HELP)
    from launch.submit import add_arguments
    add_arguments(sub.add_parser("submit", help="the pipeline as chained SLURM jobs",
                                 description="the pipeline as chained SLURM jobs (launch/submit.py)"),
                  str(DEFAULT_CONFIG), OVERRIDES_HELP)
    return p


def split_arguments(command: str, items: list[str]) -> tuple[dict, list[str]]:
    """The command's own name=value arguments, and the config overrides."""
    known = COMMANDS[command].arguments
    args, overrides = {}, []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not of the form key=value (scorefuse {command} --help)")
        key, value = item.split("=", 1)
        if key in known:
            args[key] = value
        else:
            overrides.append(item)
    missing = [name for name in COMMANDS[command].required if name not in args]
    if missing:
        raise ConfigError(f"{command} needs {' and '.join(f'{m}=...' for m in missing)} "
                          f"({'; '.join(f'{m}: {known[m]}' for m in missing)})")
    return args, overrides


def run_pipeline(cfg, args: dict, invocation: Invocation) -> int:
    """`scorefuse run`: the stages in pipeline order, the auxiliaries all of them; the first failure's code."""
    for name in stages_to_run(args.get("stages")):
        code = COMMANDS[name].run(cfg, {"aux": "all"}, invocation)
        if code:
            return code
    return 0


def print_config(cfg) -> None:
    print(to_yaml(cfg), end="")


def run(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "submit":
        from launch.submit import submit
        return submit(ns)
    args, overrides = split_arguments(ns.command, ns.items)
    # aux=all starts a launcher per model: refused under a launcher before anything is written (run's prepare
    # comes before its train-aux)
    if args.get("aux") == "all" or ns.command == "run" and "train-aux" in stages_to_run(args.get("stages")):
        from launch.local import refuse_under_launcher
        refuse_under_launcher("scorefuse run" if ns.command == "run" else "scorefuse train-aux aux=all")
    cfg = load_config(ns.config, overrides)
    import torch
    if not torch.cuda.is_available():  # DeepSpeed would say "Setting accelerator to CPU" in every stage
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return COMMANDS[ns.command].run(cfg, args, Invocation(ns.config, overrides))


def _one_line(error: Exception) -> str:
    """The message of a user error. One raised in a DataLoader worker reaches us re-raised with the
    worker's traceback in its text; its last line is the original message."""
    text = str(error)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"scorefuse: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:  # outside a training loop (which checkpoints first)
        print("scorefuse: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
