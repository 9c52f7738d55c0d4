"""The launchers, for real on one CPU machine: launch/torchrun.sh's command per node; two "hosts"
made of Linux network namespaces rendezvousing over a veth pair (2 nodes x 1 process must give the
1 node x 2 processes losses exactly); and launch/slurm.sbatch on a real one-node Slurm cluster,
including the time-limit warning (SIGUSR1 -> save -> requeue -> resume)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.launch_helpers import (
    SLURM_SBATCH,
    THREADS,
    TORCHRUN_SH,
    kill_tree,
    last_step,
    latest,
    launch,
    reference_losses,
    run_config,
    tail,
    wait_until,
)
from tests.train_helpers import ROOT, losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory, golden_data):
    return reference_losses(tmp_path_factory, golden_data)


def _dry_run(*args: str, **extra_env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "RDZV_", "LOCAL_ADDR", "GLOO_SOCKET"))}
    environ.update(extra_env)
    return subprocess.run([str(TORCHRUN_SH), *args], env=environ, capture_output=True, text=True, timeout=60)


def test_torchrun_dry_run_prints_each_nodes_command():
    single = _dry_run("--dry-run", "--config", "configs/tiny.yaml", "train.iters=5")
    assert single.returncode == 0, single.stderr
    cmd = single.stdout.splitlines()[-1]
    assert "-m torch.distributed.run --nproc-per-node 1 --max-restarts 0" in cmd
    assert "--standalone" in cmd
    assert cmd.rstrip().endswith("-m glm52_train.cli pretrain --config configs/tiny.yaml train.iters=5")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in single.stdout and "OMP_NUM_THREADS=" in single.stdout

    nodes = []
    for rank in (0, 1):  # the node rank comes from the environment (as Slurm sets it)
        proc = _dry_run("--dry-run", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node0:29400",
                        "--max-restarts", "3", "--ifname", "ib0", "--config", "my.yaml", "parallel.tp=2",
                        SLURM_NODEID=str(rank), SLURM_JOB_ID="77")
        assert proc.returncode == 0, proc.stderr
        nodes.append(proc.stdout)
    for rank, out in enumerate(nodes):
        cmd = out.splitlines()[-1]
        assert ("--nproc-per-node 8 --max-restarts 3" in cmd and "--nnodes 2 --rdzv-backend c10d "
                "--rdzv-endpoint node0:29400 --rdzv-id 77" in cmd)
        assert f"--rdzv-conf is_host={1 - rank}" in cmd
        assert cmd.rstrip().endswith("pretrain --config my.yaml parallel.tp=2")
        assert "GLOO_SOCKET_IFNAME=ib0" in out and "NCCL_SOCKET_IFNAME=ib0" in out

    missing = _dry_run("--dry-run", "train.iters=5")
    assert missing.returncode == 2 and "give --config FILE" in missing.stderr
    no_endpoint = _dry_run("--dry-run", "--nnodes", "2", "--config", "x.yaml")
    assert no_endpoint.returncode == 2 and "needs --rdzv-endpoint HOST:PORT" in no_endpoint.stderr


@pytest.mark.slow
def test_torchrun_sh_checks_the_config_once_before_torchrun(golden_data, tmp_path):
    """A bad option, or a dataset whose .idx was cut short, under launch/torchrun.sh with
    --max-restarts: one sentence from the check before torchrun starts, exit status 2, no
    torchrun report and no restart."""
    import shutil

    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(golden_data + suffix, tmp_path / f"cut{suffix}")
    prefix = str(tmp_path / "cut")
    cfg = run_config(tmp_path, prefix)
    log = tmp_path / "launcher.log"
    proc = launch("--nproc-per-node", "2", "--max-restarts", "3", "--config", str(cfg), "train.iters=-5", log=log)
    try:
        assert proc.wait(timeout=120) == 2, tail(log)
    finally:
        kill_tree(proc)
    assert log.read_text().splitlines() == [
        "glm52 pretrain: error: train.iters must be a positive whole number, got -5."]

    idx = tmp_path / "cut.idx"
    idx.write_bytes(idx.read_bytes()[:-5])
    log.unlink()
    proc = launch("--nproc-per-node", "2", "--max-restarts", "3", "--config", str(cfg), log=log)
    try:
        assert proc.wait(timeout=120) == 2, tail(log)
    finally:
        kill_tree(proc)
    assert log.read_text().splitlines() == [
        f"glm52 pretrain: error: dataset {prefix}: {prefix}.idx is truncated or corrupt (ValueError: buffer is "
        "smaller than requested size)."]


# ---- two hosts from network namespaces ---------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@pytest.mark.slow
def test_two_namespace_hosts_rendezvous_and_match_one_host(golden_data, tmp_path, reference):
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")
    tag = str(os.getpid() % 100000)
    hosts = [(f"glm52-{tag}-a", f"g52a{tag}", "10.231.7.1"), (f"glm52-{tag}-b", f"g52b{tag}", "10.231.7.2")]
    probe = _ip("netns", "add", hosts[0][0], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here ({probe.stderr.strip()}); needs root / CAP_SYS_ADMIN")
    procs = []
    try:
        _ip("netns", "add", hosts[1][0])
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

        cfg = run_config(tmp_path, golden_data)
        endpoint = f"{hosts[0][2]}:29400"
        for rank, (ns, dev, addr) in enumerate(hosts):
            procs.append(launch("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
                                "--rdzv-id", f"netns-{tag}", "--local-addr", addr, "--ifname", dev,
                                "--config", str(cfg), log=tmp_path / f"node{rank}.log",
                                extra_env={"NODE_RANK": str(rank)}, prefix=["ip", "netns", "exec", ns]))
        for rank, proc in enumerate(procs):
            assert proc.wait(timeout=600) == 0, tail(tmp_path / f"node{rank}.log")
    finally:
        for proc in procs:
            kill_tree(proc)
        for ns, _, _ in hosts:
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
    assert not any(ns in _ip("netns", "list").stdout for ns, _, _ in hosts)
    text = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "step      8/8" in text
    assert losses(tmp_path / "run") == reference


# ---- a real Slurm cluster ------------------------------------------------------------------------

@pytest.mark.slow
def test_slurm_job_trains_saves_on_warning_requeues_and_resumes(golden_data, tmp_path, reference):
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster (slurmctld, slurmd, munged) must run as root")
    from tests.slurm_cluster import LocalSlurm, install_slurm

    try:
        install_slurm()
    except RuntimeError as e:
        pytest.skip(str(e))
    work = tmp_path / "work"
    work.mkdir()
    cfg = run_config(work, golden_data)
    cluster = LocalSlurm(tmp_path / "slurm")
    job = None
    try:
        cluster.start()
        overcommit = ["--overcommit"] if cluster.cpus < 2 else []
        job = cluster.sbatch(*overcommit, f"--output={work}/slurm-%j.out", str(SLURM_SBATCH),
                             "--config", str(cfg), cwd=ROOT, env={**THREADS, "GLM52_PROCS_PER_NODE": "2"})
        log = work / f"slurm-{job}.out"
        running = lambda: cluster.job(job)["JobState"] in ("PENDING", "RUNNING")  # noqa: E731
        wait_until(lambda: last_step(work / "run") >= 2 or not running(), 300, "step 2", log=log)
        assert running(), tail(log)
        # What Slurm does at the time limit minus 300 s (--signal=B:USR1@300): SIGUSR1 to the batch shell.
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        requeued = lambda: cluster.job(job).get("Restarts") == "1" and cluster.job(job)["JobState"] == "PENDING"  # noqa: E731
        wait_until(lambda: requeued() or not running(), 300, "the requeue", log=log)
        # Slurm holds a requeued job for two minutes before it may start again. Start it sooner,
        # but not within the second slurmd revoked the first run's credential (a launch in that
        # same second is refused as "Job credential revoked").
        wait_until(lambda: cluster.node_state() == "idle", 120, "the node to be idle", log=log)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now+5")
        info = cluster.wait(job, timeout=600)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log) + cluster.logs()
    finally:
        if job is not None and cluster.procs:
            with contextlib.suppress(Exception):
                cluster.run("scancel", job, check=False)
                deadline = time.time() + 60
                while time.time() < deadline and running():
                    time.sleep(0.5)
        cluster.stop()  # the daemons by pid, then any process left with this cluster's SLURM_CONF
    assert info["Restarts"] == "1"
    assert "glm52: time limit near (SIGUSR1)" in text
    stopped = re.findall(r"^signal 10: saved at step (\d+), exiting$", text, re.M)
    assert len(stopped) == 1, text[-3000:]
    at = int(stopped[0])
    assert "glm52: training stopped with status 0; requeueing job" in text
    assert "(restart 1)" in text and f"at step {at}" in text
    assert latest(work / "ckpt") == "iter_0000008"
    console = [float(x) for x in re.findall(r"^step +\d+/8 \| loss ([\d.]+)", text, re.M)]
    assert len(console) == 8 and console[-1] < console[0] - 0.5
    assert losses(work / "run") == reference
