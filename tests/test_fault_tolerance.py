"""Fault tolerance of the driver under launch/torchrun.sh, on CPU: a signal saves and exits 0 and
the resumed run reproduces the uninterrupted losses; a killed rank is restarted by torchrun and
resumes the same way; non-finite steps are skipped, and too many in a row stop the run; a hung
collective ends the run with one sentence naming the rank. Faults are injected through the
GLM52_FAULT_* variables of glm52_train/training/faults.py or sent for real (signals, SIGKILL)."""

from __future__ import annotations

import math
import os
import signal

import pytest

from glm52_train.training import faults
from tests.launch_helpers import (
    kill_tree,
    last_step,
    latest,
    launch,
    reference_losses,
    run_config,
    tail,
    training_ranks,
    wait_until,
)
from tests.train_helpers import losses, metrics, pretrain


@pytest.fixture(scope="module")
def reference(tmp_path_factory, golden_data):
    return reference_losses(tmp_path_factory, golden_data)


def test_step_lists_of_the_fault_variables():
    assert [s for s in range(1, 10) if faults._in_steps("2,5-6,8-", s)] == [2, 5, 6, 8, 9]
    assert not faults._in_steps("", 1) and not faults._in_steps(None, 1)
    assert faults._ranks([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"


def test_nan_fault_poisons_the_training_losses_of_its_steps_only(monkeypatch):
    """The hook that GLM52_FAULT_NAN_AT_STEP installs: NaN losses on the listed steps while
    training, untouched in evaluation, on other steps and on chunks that compute no loss."""
    import torch

    last, first = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    last.post_process, first.post_process = True, False
    monkeypatch.setattr(faults, "_step", 0)
    faults.poison_losses([first, last])
    assert not last._forward_hooks  # unset: nothing installed
    monkeypatch.setenv("GLM52_FAULT_NAN_AT_STEP", "2")
    faults.poison_losses([first, last])
    x = torch.ones(1, 2)
    for step, expect_nan in ((1, False), (2, True), (3, False)):
        faults.at_step(step)
        assert bool(last(x).isnan().all()) == expect_nan, step
        assert torch.isfinite(first(x)).all()
    faults.at_step(2)
    with torch.no_grad():
        assert torch.isfinite(last(x)).all()


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resume_matches(golden_data, tmp_path, reference):
    cfg = run_config(tmp_path, golden_data)
    log = tmp_path / "launcher.log"
    proc = launch("--nproc-per-node", "2", "--config", str(cfg), log=log)
    try:
        wait_until(lambda: last_step(tmp_path / "run") >= 2, 300, "step 2", proc, log)
        proc.send_signal(signal.SIGTERM)  # to launch/torchrun.sh, which forwards it to the ranks
        assert proc.wait(timeout=300) == 0, tail(log)
    finally:
        kill_tree(proc)
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("signal 15: saved at step")]
    assert len(stopped) == 1, tail(log)
    at = int(stopped[0].split("step ")[1].split(",")[0])
    assert 2 <= at < 8
    assert latest(tmp_path / "ckpt") == f"iter_{at:07d}"

    proc = launch("--nproc-per-node", "2", "--config", str(cfg), log=log)  # resume: auto
    try:
        assert proc.wait(timeout=600) == 0, tail(log)
    finally:
        kill_tree(proc)
    assert f"at step {at}" in log.read_text().split("signal 15: saved")[1]
    assert losses(tmp_path / "run") == reference


@pytest.mark.slow
def test_killed_rank_is_restarted_and_resumes(golden_data, tmp_path, reference):
    cfg = run_config(tmp_path, golden_data)
    log = tmp_path / "launcher.log"
    proc = launch("--nproc-per-node", "2", "--max-restarts", "1", "--config", str(cfg), log=log)
    try:
        wait_until(lambda: latest(tmp_path / "ckpt") is not None, 300, "the first checkpoint", proc, log)
        assert latest(tmp_path / "ckpt") == "iter_0000004"
        ranks = training_ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, tail(log)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert "failed (exitcode: -9) local_rank: 1" in text  # torchrun saw the kill, then restarted
    assert "resumed from" in text and "iter_0000004 at step 4" in text, tail(log)
    # every logged step, including the ones logged twice around the kill, has the reference loss
    for m in metrics(tmp_path / "run"):
        if m.get("loss") is not None:
            assert m["loss"] == reference[m["step"]], m["step"]
    assert losses(tmp_path / "run") == reference
    assert latest(tmp_path / "ckpt") == "iter_0000008"


@pytest.mark.slow
def test_nan_steps_are_skipped_and_too_many_stop_the_run(golden_data, tmp_path):
    cfg = run_config(tmp_path, golden_data, train={"max_skipped_steps": 2})
    proc = pretrain(cfg, extra_env={"GLM52_FAULT_NAN_AT_STEP": "2,5-"}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "step 2: non-finite loss or gradient, update skipped" in proc.stdout
    rows = {m["step"]: m for m in metrics(tmp_path / "run") if "skipped_steps" in m}
    assert rows[1]["skipped_steps"] == 0 and math.isfinite(rows[1]["loss"])
    assert rows[2]["skipped_steps"] == 1 and rows[2]["grad_norm"] is None
    assert rows[2]["loss"] is None or math.isnan(rows[2]["loss"])  # logged as null
    # training went on after the skipped step
    assert rows[3]["skipped_steps"] == 1 and math.isfinite(rows[3]["loss"]) and rows[3]["grad_norm"] > 0
    assert rows[4]["skipped_steps"] == 1 and math.isfinite(rows[4]["loss"])
    assert rows[6]["skipped_steps"] == 3
    errors = [line for line in proc.stderr.splitlines() if line.startswith("glm52 ")]
    assert errors == ["glm52 pretrain: error: 3 consecutive steps had a non-finite loss or gradient "
                      "(last loss nan); stopping. Lower the learning rate or check the data."]
    assert max(rows) == 6 and latest(tmp_path / "ckpt") == "iter_0000007"


@pytest.mark.slow
def test_hung_collective_names_the_rank(golden_data, tmp_path):
    cfg = run_config(tmp_path, golden_data, train={"collective_timeout_minutes": 0.2})
    log = tmp_path / "launcher.log"
    proc = launch("--nproc-per-node", "2", "--config", str(cfg), log=log,
                  extra_env={"GLM52_FAULT_HANG_RANK_AT_STEP": "1:2"})
    try:
        rc = proc.wait(timeout=300)
    finally:
        kill_tree(proc)
    assert rc != 0
    errors = [line for line in log.read_text().splitlines() if line.startswith("glm52 pretrain: error:")]
    assert len(errors) == 1, tail(log)
    assert errors[0].startswith(
        "glm52 pretrain: error: a collective timed out after 0.2 min (train.collective_timeout_minutes) "
        "at step 2: rank 1 (")
    assert errors[0].endswith("never arrived, while rank(s) 0 waited for it.")
    assert last_step(tmp_path / "run") == 1


@pytest.mark.slow
@pytest.mark.parametrize("hang", ["python", "native"])
def test_sigterm_stops_a_hung_data_build_within_seconds(golden_data, tmp_path, hang):
    """SIGTERM while the data is being built stops the run within seconds, in one line, exit 0
    (nothing to save before the first step): a pure-Python hang (Megatron-Core's
    _get_num_epochs on an empty split was one) through the signal handler, a native call that
    never returns through the watchdog of training/stop.py."""
    import subprocess
    import sys
    import time

    from glm52_train.training.stop import GRACE_S
    from tests.train_helpers import ROOT, env

    cfg = run_config(tmp_path, golden_data)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", str(cfg)],
                                cwd=ROOT, env=env({"GLM52_FAULT_HANG_IN_SETUP": hang}), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "fault injection: data building hangs" in log.read_text(), 300, "the hang", proc, log)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GRACE_S + 10) == 0, tail(log)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < GRACE_S + 2 if hang == "native" else took < 2, took
    lines = log.read_text().splitlines()
    assert lines[-1] == "glm52 pretrain: stopped by SIGTERM during setup, before the first step (nothing to save)."
    assert "Traceback" not in log.read_text()
    assert latest(tmp_path / "ckpt") is None
