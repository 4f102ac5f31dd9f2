"""`scorefuse submit`: the pipeline (launch/pipeline.py) as a chain of SLURM jobs.

    prepare  ->  train-aux (an array job, one task per auxiliary population)  ->  fuse  ->  distill  ->  evaluate

Each job is the batch script launch/slurm/stage.sbatch (or a copy of it, --script), started with
`--dependency=afterok:<previous job>`, so a stage starts only when the one before it has finished. A
preempted job requeues itself and resumes; its dependents wait for its final run.

Cluster settings (partition, account, nodes, GPUs, time, the USR1 lead) live in the batch script's
#SBATCH lines, the one place a user edits; `--sbatch=OPTION` adds sbatch options to every job and
overrides those lines. They are deliberately not part of the run config: the run config decides what is
trained and is recorded in the run directory, while the same run may move between clusters.
"""
import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.pipeline import COMMANDS, stages_to_run
from shards.errors import ConfigError
from stages.config import RunConfig, load_config
from stages.rundir import RunDir

SCRIPT = Path(__file__).parent / "slurm" / "stage.sbatch"


@dataclass
class Job:
    stage: str          # also the shell variable the dry run assigns its id to
    sbatch: list[str]   # sbatch options of this stage
    args: list[str]     # the scorefuse command line the batch script runs
    after: str | None = None  # the job it waits for (afterok); None: the job queued before it


def add_arguments(p: argparse.ArgumentParser, default_config: str, overrides_help: str) -> None:
    p.add_argument("--config", default=default_config, help="YAML run config (default: %(default)s)")
    p.add_argument("--script", default=str(SCRIPT), help="the batch script (your edited copy of "
                   "launch/slurm/stage.sbatch); default: %(default)s")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an sbatch option for every job, overriding the script's #SBATCH lines, "
                        "e.g. --sbatch=--partition=debug (repeatable)")
    p.add_argument("--array-parallel", type=int, default=0, metavar="N",
                   help="at most N auxiliaries train at once (--array=...%%N); 0 = no limit")
    p.add_argument("--after", metavar="JOBID", help="the first job waits for this job (afterok)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.add_argument("--stages", metavar="A,B", help="the stages to queue, in pipeline order, and sweep (default: "
                   "the pipeline, and the sweep when sweep.sizes is set)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def plan(cfg: RunConfig, config_path: str, overrides: list[str], ns) -> list[Job]:
    """The jobs in pipeline order, each waiting for the one before it; then, with sweep.sizes, the sweep: an
    array job over n after the auxiliaries, and its summary after the array."""
    run_args = ["--config", config_path, *overrides]
    names = [p.name for p in cfg.data.aux]
    if any("," in n for n in names):
        raise ConfigError(f"data.aux: a population name with a comma cannot be an array task: {names}")
    wanted = [s.strip() for s in ns.stages.split(",")] if ns.stages else None
    sweep = bool(cfg.sweep.sizes) and (wanted is None or "sweep" in wanted)
    stages = stages_to_run(",".join(s for s in wanted if s != "sweep") if wanted else None) if wanted != ["sweep"] else []
    jobs = []
    for stage in stages:
        if stage == "prepare":  # one process writes the shards: one node is enough
            jobs.append(Job(stage, ["--nodes=1"], [stage, *run_args]))
        elif COMMANDS[stage].array_over:  # the batch script turns aux=a,b,c into its task's name
            jobs.append(Job(stage.replace("-", "_"), [_array(len(names), ns)], [stage, *run_args, "aux=" + ",".join(names)]))
        else:
            jobs.append(Job(stage, [], [stage, *run_args]))
    if sweep:
        after = "train_aux" if "train-aux" in stages else jobs[-1].stage if jobs else None
        trained = [a.name for a in cfg.data.aux if a.pretrained is None]
        for r in range(1, cfg.sweep.replicates) if cfg.sweep.aux_seeds and trained else ():
            # replicate r's own auxiliaries, before any size's run reads them (not in the array over n, whose
            # tasks would train them at once)
            jobs.append(Job(f"train_aux_r{r}", [_array(len(trained), ns)],
                            ["train-aux", *run_args, "aux=" + ",".join(trained), f"sweep.replicate={r}"], after=after))
            after = jobs[-1].stage
        sizes = ",".join(map(str, cfg.sweep.sizes))
        jobs.append(Job("sweep_runs", [_array(len(cfg.sweep.sizes), ns)], ["sweep", *run_args, f"n={sizes}"],
                        after=after))
        jobs.append(Job("sweep", [], ["sweep", *run_args]))
    return jobs


def _array(tasks: int, ns) -> str:
    return f"--array=0-{tasks - 1}" + (f"%{ns.array_parallel}" if ns.array_parallel > 0 else "")


def sbatch_command(job: Job, cfg: RunConfig, ns, after: str | None) -> list[str]:
    logs = RunDir.of(cfg).slurm_logs.absolute()
    # an array task's log is named by the array's id and the task's index (%A_%a), not its own job id
    name = "%x-%A_%a.out" if any(o.startswith("--array") for o in job.sbatch) else "%x-%j.out"
    cmd = ["sbatch", "--parsable", f"--job-name={cfg.name}-{job.stage.replace('_', '-')}",
           f"--output={logs}/{name}", f"--export=ALL,SCOREFUSE_PYTHON={sys.executable}"]
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    # Later options win: the user's --sbatch options override ours and the script's #SBATCH lines.
    return [*cmd, *job.sbatch, *ns.sbatch, ns.script, *job.args]


def submit(ns) -> int:
    cfg = load_config(ns.config, ns.overrides)  # a config error stops here, before anything is queued
    if not Path(ns.script).is_file():
        raise ConfigError(f"--script: {ns.script} does not exist")
    jobs = plan(cfg, ns.config, ns.overrides, ns)
    if ns.dry_run:
        previous = ns.after
        for job in jobs:
            cmd = sbatch_command(job, cfg, ns, f"${job.after}" if job.after else previous)
            # a shell script: each job id goes into a variable the next command expands
            line = " ".join(f'"{c}"' if "$" in c else shlex.quote(c) for c in cmd)
            print(f"{job.stage}=$({line})")
            previous = f"${job.stage}"
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: submit from a SLURM login node (or use --dry-run)")
    logs = RunDir.of(cfg).slurm_logs
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create it
    previous, ids = ns.after, {}
    for job in jobs:
        cmd = sbatch_command(job, cfg, ns, ids[job.after] if job.after else previous)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            reason = lines[-1].removeprefix("sbatch: error: ") if lines else f"exit code {proc.returncode}"
            done = f" ({', '.join(j.stage for j in jobs[:jobs.index(job)])} already queued)" if job is not jobs[0] else ""
            raise ConfigError(f"sbatch refused the {job.stage} job: {reason}{done}")
        previous = ids[job.stage] = proc.stdout.strip().split(";")[0]
        print(f"{job.stage}: job {previous}", flush=True)
    print(f"logs: {logs.absolute()}/ (squeue --me shows the chain)")
    return 0
