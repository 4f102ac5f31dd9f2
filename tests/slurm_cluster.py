"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

`slurm_cluster` (session-scoped) installs the Debian packages when the daemons are missing, writes a
slurm.conf into a temporary directory (its own ports, state, spool, logs and pid files), starts the
daemons, waits until the node is idle, and stops what it started by pid at the end. Tests talk to it
through the real client commands with SLURM_CONF in their environment.
"""
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge", "unmunge"]
PARTITION = "debug"


@dataclass
class Cluster:
    conf: Path
    root: Path
    cpus: int
    pids: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, cmd)), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id) -> dict:
        """`scontrol show job -o` as a dict (the first record; an array job has one per task)."""
        return self.jobs(job_id)[0]

    def jobs(self, job_id) -> list[dict]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, what: str, predicate, timeout=300, poll=0.5, on_timeout=lambda: ""):
        t0 = time.time()
        while True:
            value = predicate()
            if value:
                return value
            if time.time() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_timeout()}")
            time.sleep(poll)

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _install() -> str | None:
    """apt-get install the daemons; None on success, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            return f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True,
                                                      timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> int | None:
    """Start munged as user munge unless one is running; returns the pid of the one we started."""
    if _munge_works():
        return None
    munge = pwd.getpwnam("munge")
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--force"], check=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
    pidfile = Path("/run/munge/munged.pid")
    pidfile.unlink(missing_ok=True)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
    t0 = time.time()
    while not _munge_works():
        if time.time() - t0 > 30:
            raise RuntimeError("munged did not start")
        time.sleep(0.2)
    return int(pidfile.read_text()) if pidfile.exists() else None


def write_conf(root: Path, cpus: int, memory_mb: int) -> Path:
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=scorefuse-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=30
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _pid(path: Path, timeout=30) -> int:
    t0 = time.time()
    while not path.exists() or not path.read_text().strip():
        if time.time() - t0 > timeout:
            raise RuntimeError(f"{path} not written")
        time.sleep(0.1)
    return int(path.read_text().strip())


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if _missing():
        why = _install()
        if _missing():
            pytest.skip(f"SLURM is not installed ({', '.join(_missing())} missing) and cannot be: {why}")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root")
    # a short path: slurmd's sockets live in the spool directory (sun_path has 108 bytes)
    root = Path(tmp_path_factory.mktemp("slurm"))
    cpus = os.cpu_count() or 1
    conf = write_conf(root, cpus, max(256, int(_memory_mb() * 0.8)))
    cluster = Cluster(conf, root, cpus)
    env = cluster.env
    munged = _start_munge()
    try:
        subprocess.run(["slurmctld", "-c"], env=env, check=True, timeout=60)
        cluster.pids.append(_pid(root / "run" / "slurmctld.pid"))
        subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, timeout=60)
        cluster.pids.append(_pid(root / "run" / "slurmd.pid"))
        cluster.wait("the node to be idle", lambda: "idle" in cluster.run(
            "sinfo", "-h", "-o", "%T", check=False).stdout, timeout=60,
            on_timeout=lambda: cluster.log("slurmctld.log")[-3000:] + cluster.log("slurmd.log")[-3000:])
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)  # for the client commands the tests and the CLI run
        try:
            yield cluster
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
    finally:
        for pid in reversed(cluster.pids):
            _stop(pid)
        if munged:
            _stop(munged)


def _stop(pid: int, timeout=20) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
