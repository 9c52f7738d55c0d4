"""Run launch/torchrun.sh from tests: start it, watch its run, find its training processes by
their environment, and clean up every process it started (by pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.train_helpers import ROOT, env, losses, tiny_run_config

TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SLURM_SBATCH = ROOT / "launch" / "slurm.sbatch"

# One thread per process everywhere: the same arithmetic in every layout and launcher.
THREADS = {"OMP_NUM_THREADS": "1"}


def run_config(tmp: Path, data: str, **sections) -> Path:
    """The tiny run of tests/train_helpers.py without W&B (faster to start; losses unchanged)."""
    sections.setdefault("logging", {})["wandb"] = "disabled"
    return tiny_run_config(tmp, data, **sections)


def launch(*args: str, log: Path, extra_env: dict | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    """Start launch/torchrun.sh ARGS in the background, output to `log`."""
    out = open(log, "ab")
    environ = {k: v for k, v in env({**THREADS, **(extra_env or {})}).items() if not k.startswith("SLURM_")}
    try:
        return subprocess.Popen([*(prefix or []), str(TORCHRUN_SH), *args], cwd=ROOT, env=environ,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun puts its workers in their own sessions, so a process
    group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def training_ranks(pid: int) -> dict[int, int]:
    """{global rank: pid} of the training processes under launcher `pid`, read from their environment."""
    ranks = {}
    for p in descendants(pid):
        try:
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"glm52_train.cli" not in cmdline:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = p
    return ranks


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything it started (for cleanup after a failure)."""
    if proc.poll() is None:
        for p in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def wait_until(ready, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.1)


def tail(log: Path | None, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.exists() else ""


def last_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in f.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def latest(ckpt: Path) -> str | None:
    f = ckpt / "latest"
    return f.read_text().strip() if f.exists() else None


def reference_losses(tmp_path_factory, data: str) -> dict[int, float]:
    """The uninterrupted tiny run as 1 node x 2 processes through launch/torchrun.sh: the losses
    every launcher and fault test must reproduce exactly. Run once per session."""
    ref = tmp_path_factory.getbasetemp() / "reference-1x2"
    done = ref / "done"
    if not done.exists():
        ref.mkdir(exist_ok=True)
        cfg = run_config(ref, data)
        log = ref / "launcher.log"
        proc = launch("--nproc-per-node", "2", "--config", str(cfg), log=log)
        try:
            assert proc.wait(timeout=600) == 0, tail(log)
        finally:
            kill_tree(proc)
        done.write_text("ok\n")
    got = losses(ref / "run")
    assert sorted(got) == list(range(1, 9))
    return got
