"""Run `glm52 pretrain` in a subprocess (a fresh process per run, as users run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_config(tmp: Path, data_prefix: str, **sections) -> Path:
    """A small, fast run of the tiny model: 64-token sequences, every step logged."""
    cfg = {
        "model": "tiny",
        "data": {
            "tokenizer": str(ROOT / "data" / "tokenizer" / "tokenizer.json"),
            "blend": [{"path": data_prefix, "weight": 1.0}],
            "split": "90,10,0",
            "seq_length": 64,
            "cache_dir": str(tmp / "index-cache"),
        },
        "train": {"seed": 1234, "micro_batch_size": 2, "global_batch_size": 4, "iters": 8,
                  "eval_interval": 4, "eval_iters": 1, "log_interval": 1},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_iters": 2},
        "checkpoint": {"dir": str(tmp / "ckpt"), "interval": 4, "keep_last": 5},
        "logging": {"run_dir": str(tmp / "run"), "wandb": "offline"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra or {})
    return e


def pretrain(config: Path, *overrides: str, extra_env: dict | None = None, timeout: int = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def init_weights(out: Path) -> Path:
    """`glm52 init-weights --model tiny --out OUT` in a subprocess; returns OUT."""
    subprocess.run([sys.executable, "-m", "glm52_train.cli", "init-weights", "--model", "tiny", "--out", str(out)],
                   cwd=ROOT, env=env(), check=True, capture_output=True, timeout=300)
    return out


def kill_in_save(config: Path, pause_s: int, timeout_s: int) -> None:
    """Start `glm52 pretrain` with its checkpoint saves held before the commit for `pause_s`
    seconds (GLM52_FAULT_PAUSE_IN_SAVE) and SIGKILL it as soon as its first save is held;
    fails if the run exits before, or `timeout_s` seconds pass."""
    mark = config.parent / "in-save"  # GLM52_FAULT_MARK: created when the pause starts
    mark.unlink(missing_ok=True)
    log = config.parent / "killed-run.log"  # a file, not a pipe: a pipe nobody reads can fill and block the run
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", str(config)],
            cwd=ROOT, env=env({"GLM52_FAULT_PAUSE_IN_SAVE": str(pause_s), "GLM52_FAULT_MARK": str(mark)}),
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.time() + timeout_s
            while not mark.exists():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            proc.kill()  # SIGKILL
            proc.wait()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if m.get("loss") is not None}


def curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Loss and gradient norm per training step, from metrics.jsonl."""
    return {m["step"]: (m["loss"], m["grad_norm"]) for m in metrics(run_dir) if m.get("loss") is not None}


def assert_same_curve(got: dict, reference: dict, rel: float = 1e-5) -> None:
    """The same steps as `reference`, each with its loss and gradient norm within `rel`."""
    assert sorted(got) == sorted(reference)
    for step, (loss, gnorm) in reference.items():
        assert got[step][0] == pytest.approx(loss, rel=rel), f"loss at step {step}"
        assert got[step][1] == pytest.approx(gnorm, rel=rel), f"grad norm at step {step}"
