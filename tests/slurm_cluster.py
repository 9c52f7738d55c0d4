"""A one-node Slurm cluster on localhost, for tests: Debian's Slurm (slurmctld, slurmd, munge),
a generated slurm.conf, every daemon in the foreground as a child of the test, stopped by its pid.

    with LocalSlurm(tmp_path) as cluster:
        job = cluster.sbatch("launch/slurm.sbatch", "--config", "run.yaml")
        cluster.wait(job, "COMPLETED")

Needs root (the daemons run as root, SlurmUser=root). Nothing outside `tmp_path` is written
apart from installing the packages when they are missing; the munge key, sockets, state and logs
all live under it, and the ports are free ones, so two clusters can run side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "munge", "slurm-client")


def missing_packages() -> list[str]:
    def installed(package: str) -> bool:  # `dpkg -s` also succeeds for removed packages
        proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                              capture_output=True, text=True)
        return proc.returncode == 0 and proc.stdout.strip() == "installed"

    return [p for p in PACKAGES if not installed(p)]


def install_slurm() -> None:
    """apt-get install Debian's Slurm when some part is missing (root only)."""
    missing = missing_packages()
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurmctld", "slurmd", "munge"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a stale package index: refresh it once
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or missing_packages():
        raise RuntimeError(f"could not install Slurm ({' '.join(missing)}): {proc.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]  # `hostname -s`: slurmd's node name
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- start / stop ------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():  # a private key: nothing shared with a system munged
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        self.conf.write_text(f"""\
ClusterName=glm52test
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        self._write_config()
        r = self.root
        log = open(r / "daemons.out", "ab")
        spawn = lambda cmd: self.procs.append(  # noqa: E731
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
               f"--log-file={r}/munge/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged")
        spawn(["slurmctld", "-D", "-f", str(self.conf)])
        spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout, "the node")
        return self

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"{what} did not come up ({', '.join(dead) or 'timeout'}); "
                                   f"logs:\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the daemons by their pids (never by name): SIGTERM, then SIGKILL."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """slurmstepd and job processes detach from slurmd; after a failed test some may remain.
        They carry this cluster's SLURM_CONF in their environment: find them by it, SIGKILL them."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in environ:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        out = []
        for name in ("daemons.out", "slurmctld.log", "slurmd.log", "munge/munged.log"):
            f = self.root / name
            if f.exists():
                out.append(f"--- {name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    # ---- clients -----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", self.host, "-o", "%T", check=False)
        return proc.stdout.strip().rstrip("*~#") if proc.returncode == 0 else ""

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}\n{self.logs()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, states=("COMPLETED",), timeout: float = 600.0, poll: float = 1.0) -> dict:
        """Wait until the job reaches a final state; return its record."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in final or info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(poll)


def have_slurm_tools() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch"))
