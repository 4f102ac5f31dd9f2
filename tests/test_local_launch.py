"""How the processes of a stage are laid out on one machine. launch/local.py (`train-aux aux=all`): how the GPUs
are split between the auxiliaries, the children's commands and threads, the refusal to run under a launcher.
launch/slurm/stage.sbatch on one node, run by bash with stand-ins for srun, scontrol, nvidia-smi and python:
its GPUs, its processes and their threads."""
import os
import subprocess

import pytest
import torch

from launch import cli
from launch.local import aux_commands, aux_schedule, physical_gpu_ids, refuse_under_launcher
from launch.submit import SCRIPT
from shards.errors import ConfigError
from tests.conftest import DIGITS, scorefuse_here
from stages.config import load_config


@pytest.mark.parametrize("gpus, models, batch, accum, parallel, expected", [
    (8, 3, 512, 1, 0, (1, 8)),   # 3 rounds on 8 GPUs (3/8) beat 2 rounds on 4 (2/4) and 1 round on 2 (1/2)
    (6, 2, 512, 1, 0, (1, 4)),   # 3 does not divide 512: 1 x 4 and 2 x 2 both take 2/4 on 4 GPUs; fewer at once
    (6, 3, 512, 1, 0, (3, 2)),   # one round on all 6 GPUs (1/2) beats 3 rounds on 4 (3/4)
    (6, 3, 512, 1, 2, (1, 4)),   # at most 2 at a time: 3/4 beats 2 x 2 (2/2)
    (8, 2, 512, 1, 0, (1, 8)),   # 2/8 = 1/4 for 1 x 8 and 2 x 4: fewer at once
    (8, 4, 512, 1, 0, (1, 8)),   # 1 x 8, 2 x 4 and 4 x 2 all take 1/2 on 8 GPUs
    (8, 3, 100, 1, 0, (2, 4)),   # 8 does not divide 100: 2 x 4 (2/4, 8 GPUs) ties 3 x 2 (1/2, 6 GPUs)
    (4, 3, 6, 1, 0, (2, 2)),     # 1 x 3 (3/3), 2 x 2 (2/2) and 3 x 1 (1/1) tie: 2 x 2 uses the most GPUs
    (8, 2, 48, 16, 0, (2, 3)),   # a per-step batch of 3: groups of 3 GPUs, 2 GPUs idle
    (8, 2, 48, 1, 0, (1, 8)),    # the same batch without accumulation
    (2, 3, 512, 1, 0, (1, 2)),
    (3, 2, 512, 1, 0, (1, 2)),   # 1 x 2 and 2 x 1 tie on 2 GPUs: fewer at once
    (4, 5, 512, 1, 0, (1, 4)),   # 5/4 beats 3/2 (2 x 2) and 2/1 (4 x 1)
    (1, 3, 512, 1, 0, (1, 1)),
    (1, 1, 7, 1, 0, (1, 1)),
])
def test_aux_schedule_divides_the_batch_and_minimises_the_rounds(gpus, models, batch, accum, parallel, expected):
    assert aux_schedule(gpus, models, batch // accum, parallel) == expected


@pytest.mark.parametrize("group, visible, expected", [
    ([0, 1], None, ["0", "1"]),
    ([0, 1], "4,5,6,7", ["4", "5"]),           # a SLURM job's GPUs: never another job's 0 and 1
    ([2, 3], "4,5,6,7", ["6", "7"]),
    ([1], "GPU-aaaa,GPU-bbbb", ["GPU-bbbb"]),
])
def test_gpu_groups_index_the_visible_devices(group, visible, expected):
    assert physical_gpu_ids(group, visible) == expected


def _commands(monkeypatch, gpus: int, *overrides, threads: str | None = None):
    """aux_commands for the digits config's 3 auxiliaries on `gpus` GPUs of a 16-core machine, with
    OMP_NUM_THREADS=`threads` set for scorefuse (None: unset): (per model:
    its launcher options as a dict and its OMP_NUM_THREADS), how many at once, the lines logged."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "8,9,10,11,12,13,14,15")
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    cfg = load_config(DIGITS, list(overrides))
    lines = []
    jobs, parallel = aux_commands(cfg, str(DIGITS), list(overrides), log=lines.append)
    launches = []
    for _, cmd, env in jobs:
        options = cmd[cmd.index("accelerate.commands.launch") + 1:cmd.index("launch.cli") - 1] if gpus else []
        launches.append(({o: options[i + 1] for i, o in enumerate(options) if o in ("--num_processes", "--gpu_ids",
                          "--main_process_port")} | {"multi": "--multi_gpu" in options}, env["OMP_NUM_THREADS"]))
    return launches, parallel, lines


def test_three_models_on_six_gpus_train_at_once_on_two_each(monkeypatch):
    launches, parallel, lines = _commands(monkeypatch, 6, "train.batch=512")
    assert parallel == 3 and lines == []
    assert launches == [({"--num_processes": "2", "--gpu_ids": ids, "--main_process_port": port, "multi": True}, "2")
                        for ids, port in [("8,9", "29500"), ("10,11", "29501"), ("12,13", "29502")]]


def test_idle_gpus_are_one_line_saying_why(monkeypatch):
    launches, parallel, lines = _commands(monkeypatch, 6, "train.batch=512", "launch.aux_parallel=2")
    assert parallel == 1
    assert launches == [({"--num_processes": "4", "--gpu_ids": "8,9,10,11", "--main_process_port": "29500",
                          "multi": True}, "4")] * 3
    assert lines == ["aux=all: 2 of 6 GPUs stay idle: 1 model(s) at a time on 4 GPU(s) each is the fastest split "
                     "for 3 models (a model's GPU count must divide train.batch / train.accum = 512, at most "
                     "launch.aux_parallel=2 at a time)"]


def test_cpu_models_share_the_cores(monkeypatch):
    launches, parallel, lines = _commands(monkeypatch, 0, "launch.aux_parallel=2")
    assert parallel == 2 and lines == [] and [threads for _, threads in launches] == ["8"] * 3
    launches, parallel, _ = _commands(monkeypatch, 0, "launch.aux_parallel=5")
    assert parallel == 3 and [threads for _, threads in launches] == ["5"] * 3
    for asked, share in (("1", "1"), ("4", "4"), ("12", "8")):  # an OMP_NUM_THREADS set for scorefuse caps the share
        launches, _, _ = _commands(monkeypatch, 0, "launch.aux_parallel=2", threads=asked)
        assert [threads for _, threads in launches] == [share] * 3


@pytest.mark.parametrize("variable, value, refused", [
    ("WORLD_SIZE", "2", True), ("OMPI_COMM_WORLD_SIZE", "4", True), ("PMI_SIZE", "8", True),
    ("WORLD_SIZE", "1", False), ("LOCAL_RANK", "0", False),
])
def test_aux_all_is_refused_under_a_launcher_with_several_processes(monkeypatch, variable, value, refused):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    if refused:
        with pytest.raises(ConfigError, match=f"one of {value} started by a launcher \\({variable}={value}\\)"):
            refuse_under_launcher("scorefuse run")
    else:
        refuse_under_launcher("scorefuse run")


def test_train_aux_all_under_torchrun_is_refused_before_the_config_is_read(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="scorefuse train-aux aux=all starts its own launchers"):
        cli.run(["train-aux", "--config", str(tmp_path / "missing.yaml"), "aux=all"])


def test_run_under_a_launcher_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("WORLD_SIZE", "8")
    code, out, err = scorefuse_here(capfd, "run", "--config", DIGITS, f"root={tmp_path}")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "scorefuse: error: scorefuse run starts its own launchers (one per auxiliary model), but this process is one "
        "of 8 started by a launcher (WORLD_SIZE=8): run it as a plain process (scorefuse train-aux aux=all ...), or "
        "train one auxiliary per `accelerate launch` with aux=NAME"]
    assert list(tmp_path.iterdir()) == []


def _stage_script(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """stage.sbatch on a node of 64 cores whose SLURM job has the given environment; the stand-ins print the
    command they were given and the OMP_NUM_THREADS they see. nvidia-smi lists no GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in [("srun", 'echo "srun $* OMP_NUM_THREADS=$OMP_NUM_THREADS"'), ("nvidia-smi", "true"),
                       ("scontrol", "echo node1"), ("python", 'echo "python $* OMP_NUM_THREADS=$OMP_NUM_THREADS"')]:
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    job = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SCOREFUSE_PYTHON": str(bin_dir / "python"), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "64", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=job, capture_output=True, text=True, timeout=30)


def _ran(proc) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith(("srun ", "python ")))


def test_stage_script_gives_srun_the_nodes_gpus_and_each_rank_its_share_of_the_cores(tmp_path):
    proc = _stage_script(tmp_path, "train-aux", "aux=a", SLURM_GPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="8")
    assert proc.returncode == 0, proc.stderr
    ran = _ran(proc)
    assert ran.startswith("srun --ntasks-per-node=1 --nodes=1 --cpus-per-task=64 --gpus-per-node=8 --gpu-bind=none ")
    assert "--num_processes 8 " in ran and "--multi_gpu" in ran and ran.endswith("aux=a OMP_NUM_THREADS=8")
    user = _stage_script(tmp_path, "fuse", SLURM_GPUS_ON_NODE="8", OMP_NUM_THREADS="3")
    assert _ran(user).endswith("OMP_NUM_THREADS=3")  # the user's setting is kept


@pytest.mark.parametrize("stage, env, ran", [
    ("prepare", {"SLURM_GPUS_ON_NODE": "8"}, "python -m launch.cli prepare OMP_NUM_THREADS=64"),  # one process
    ("prepare", {}, "python -m launch.cli prepare OMP_NUM_THREADS=64"),
    ("fuse", {"SLURM_GPUS_PER_NODE": "0"}, "python -m launch.cli fuse OMP_NUM_THREADS=64"),  # asked for no GPU
])
def test_stage_script_runs_one_process_without_gpus_when_it_may(tmp_path, stage, env, ran):
    proc = _stage_script(tmp_path, stage, **env)
    assert proc.returncode == 0 and _ran(proc) == ran, proc.stderr


def test_stage_script_without_gpus_it_did_not_ask_to_miss_stops_with_one_line(tmp_path):
    proc = _stage_script(tmp_path, "train-aux", "aux=a")
    assert proc.returncode == 2 and not any(line.startswith(("srun ", "python ")) for line in proc.stdout.splitlines())
    assert proc.stderr.splitlines() == [
        "scorefuse stage train-aux: no GPUs on this node (SLURM_GPUS_ON_NODE=unset, nvidia-smi shows none): add "
        "#SBATCH --gpus-per-node=N to the script, or submit with --gpus-per-node=0 to run on CPU"]
