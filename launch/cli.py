"""`scorefuse`: the command line.

    scorefuse prepare   --config C [key=value ...]   populations -> WebDataset shards (+ digit classifier)
    scorefuse train-aux --config C aux=NAME|all [key=value ...]
    scorefuse fuse      --config C [key=value ...]   fit the ScoreFusion weights lambda, build the baselines
    scorefuse distill   --config C [key=value ...]   one-step generator by Score Mismatching (fused teacher)
    scorefuse sample    --config C model=M n=N [out=DIR|FILE.npz]   samples of a finished model
    scorefuse evaluate  --config C [key=value ...]   every finished model -> report.md / report.json
    scorefuse run       --config C [key=value ...]   prepare, train every auxiliary, fuse, distill, evaluate
    scorefuse submit    --config C [--dry-run] [key=value ...]   the same as chained SLURM jobs

Every command resumes what an earlier call left unfinished and skips what is done. Errors a user can
fix end with one line naming the culprit and exit code 2; a stage stopped by SIGTERM/SIGUSR1
checkpoints and exits with code 75 (trainer/preemption.py).
"""
import argparse
import sys

from evaluation.errors import EvaluationError
from launch.config import ConfigError, RunConfig, load_config
from shards.errors import DataError
from trainer.checkpoint import CheckpointError
from trainer.distill import DistillError
from trainer.engine import TrainingError
from trainer.fusion import FusionError

USER_ERRORS = (ConfigError, DataError, CheckpointError, EvaluationError, TrainingError, FusionError, DistillError)
EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scorefuse", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("prepare", "write the populations as WebDataset shards"),
                        ("train-aux", "train auxiliary diffusion models (aux=NAME or aux=all)"),
                        ("fuse", "fit the ScoreFusion weights on the target and build the baselines"),
                        ("distill", "train the one-step generator (Score Mismatching, fused teacher)"),
                        ("sample", "samples of a finished model: model=NAME n=N [out=DIR|FILE.npz]"),
                        ("evaluate", "evaluate every finished model and write the report"),
                        ("run", "the whole pipeline on this machine")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True, help="YAML run config, e.g. configs/digits.yaml")
        s.add_argument("overrides", nargs="*", help="config overrides as dotted key=value")
    from launch.submit import add_arguments
    add_arguments(sub.add_parser("submit", help="the whole pipeline as chained SLURM jobs (launch/submit.py)"))
    return p


def _split_command_args(command: str, overrides: list[str]) -> tuple[dict, list[str]]:
    """`aux=...` belongs to train-aux, not to the config."""
    args, rest = {}, []
    for item in overrides:
        key = item.split("=", 1)[0]
        if command == "train-aux" and key == "aux" or command == "sample" and key in ("model", "n", "out"):
            args[key] = item.split("=", 1)[1]
        else:
            rest.append(item)
    if command == "train-aux" and "aux" not in args:
        raise ConfigError("train-aux needs aux=NAME (one auxiliary population) or aux=all")
    if command == "sample" and ("model" not in args or not args.get("n", "").isdigit()):
        raise ConfigError("sample needs model=NAME (aux/NAME, fused, distill, ...) and n=<number of samples>")
    return args, rest


def _train_aux(cfg: RunConfig, config_path: str, overrides: list[str], aux: str) -> int:
    from launch.local import train_all
    from launch.stages import train_aux_stage
    if aux == "all":
        return train_all(cfg, config_path, overrides)
    train_aux_stage(cfg, aux)
    return 0


def run(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "submit":
        from launch.submit import submit
        return submit(ns)
    args, overrides = _split_command_args(ns.command, ns.overrides)
    cfg = load_config(ns.config, overrides)
    from launch import stages
    from launch.evaluate import evaluate_stage
    if ns.command == "prepare":
        stages.prepare_stage(cfg)
    elif ns.command == "train-aux":
        return _train_aux(cfg, ns.config, overrides, args["aux"])
    elif ns.command == "fuse":
        stages.fuse_stage(cfg)
    elif ns.command == "distill":
        from launch.distill import distill_stage
        distill_stage(cfg)
    elif ns.command == "sample":
        from launch.distill import sample_command
        sample_command(cfg, args["model"], int(args["n"]), args.get("out"))
    elif ns.command == "evaluate":
        evaluate_stage(cfg)
    elif ns.command == "run":
        stages.prepare_stage(cfg)
        code = _train_aux(cfg, ns.config, overrides, "all")
        if code:
            return code
        stages.fuse_stage(cfg)
        from launch.distill import distill_stage
        distill_stage(cfg)
        evaluate_stage(cfg)
    return 0


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
    except USER_ERRORS as e:
        print(f"scorefuse: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
