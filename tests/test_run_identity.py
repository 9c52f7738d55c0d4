"""Runs never mix, nothing is lost (issue 22): a run's folders are named after the run (its config
file, or logging.name), never the model flavor; `resume: auto` refuses a checkpoint of another
run configuration and a changed schedule (unless train.override_schedule), each in one sentence;
`--resume none` into a folder holding checkpoints is refused, and `--overwrite` moves the earlier
run aside (checkpoints, metrics and W&B id) instead of writing over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glm52_train.run_config import RunConfig, load_run_config
from tests.train_helpers import ROOT, env


def test_folders_are_named_after_the_run_not_the_model(tmp_path):
    tiny = load_run_config(str(ROOT / "configs" / "tiny.yaml"))
    assert tiny.run_name == "tiny"
    assert (tiny.checkpoint_dir(), tiny.run_dir()) == (Path("checkpoints/tiny"), Path("runs/tiny"))  # as make train says
    mine = tmp_path / "my_run.yaml"
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["model"] = {"base": "tiny", "num_layers": 6, "index_pattern": "FSFSFS"}
    mine.write_text(yaml.safe_dump(data))
    cfg = load_run_config(str(mine))
    assert cfg.model_config().num_layers == 6
    assert (cfg.checkpoint_dir(), cfg.run_dir()) == (Path("checkpoints/my_run"), Path("runs/my_run"))
    assert load_run_config(str(mine), ["logging.name=exp7"]).checkpoint_dir() == Path("checkpoints/exp7")
    # built without a file: named after what makes the run itself, so only a run it may resume shares it
    a, b = RunConfig(), RunConfig()
    b.train.seed = 7
    assert a.run_name.startswith("run-") and a.run_name == RunConfig().run_name != b.run_name
    b.train.seed, b.parallel.tp, b.train.micro_batch_size = a.train.seed, 2, 4  # layout: the same run
    assert b.run_name == a.run_name


def _glm52(ws: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "glm52_train.cli", "pretrain", "--config", "configs/a.yaml", *args]
    return subprocess.run(cmd, cwd=ws, env=env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=600)


def _refused(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("glm52 pretrain: error: ")
    return line


@pytest.mark.slow
def test_resume_only_this_runs_checkpoints_on_its_schedule_and_never_write_over_a_run(golden_data, tmp_path):
    ws = tmp_path
    (ws / "configs").mkdir()
    (ws / "configs" / "a.yaml").write_text(yaml.safe_dump({
        "model": "tiny",
        "data": {"tokenizer": str(ROOT / "data" / "tokenizer" / "tokenizer.json"),
                 "blend": [{"path": golden_data}], "split": "90,10,0", "seq_length": 64,
                 "cache_dir": str(ws / "index-cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "iters": 2, "eval_interval": 100,
                  "log_interval": 1},
        "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_iters": 1},
        "checkpoint": {"interval": 2},
        "logging": {"wandb": "offline"},
    }))
    ckpt, run = Path("checkpoints/a"), ws / "runs" / "a"  # ckpt as the run prints it (relative)
    first = _glm52(ws)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "saves     checkpoints/a (every 2 steps" in first.stdout and (ws / ckpt / "iter_0000002").is_dir()
    metrics = (run / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in metrics.splitlines()] == [1, 2]

    # another data and training configuration: not resumed, the fields named
    line = _refused(_glm52(ws, "data.seq_length=32", "train.seed=7"))
    assert line == (f"glm52 pretrain: error: {ckpt / 'iter_0000002'} was saved by another run configuration "
                    f"(data.seq_length (64 -> 32); train.seed (1234 -> 7)), so it is not resumed: give this run a "
                    f"folder of its own (logging.name=NAME or checkpoint.dir=DIR), resume that checkpoint explicitly "
                    f"(--resume {ckpt / 'iter_0000002'}), or start over here (--resume none --overwrite).")
    # a longer run re-stretches the cosine: refused, naming the field and what the lr would do
    line = _refused(_glm52(ws, "train.iters=4"))
    assert line.startswith(f"glm52 pretrain: error: {ckpt / 'iter_0000002'} (step 2) was trained on another "
                           "learning-rate schedule (train.iters (2 -> 4)): resuming it would take the learning rate "
                           "at step 3 from 0.0003 to ")
    assert line.endswith("set train.override_schedule=true to continue from step 2 on the new schedule.")
    assert (run / "metrics.jsonl").read_text() == metrics  # the refused runs wrote nothing

    # told to: continues on the new schedule, saying where; another micro-batch is the same run
    longer = _glm52(ws, "train.iters=4", "train.override_schedule=true", "train.micro_batch_size=1")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"resumed from {ckpt / 'iter_0000002'} at step 2" in longer.stdout
    (note,) = [x for x in longer.stdout.splitlines() if x.startswith("train.override_schedule: ")]
    assert note.startswith("train.override_schedule: continuing from step 2 on the new schedule "
                           "(train.iters (2 -> 4)); lr ")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert float(note.split("; lr ")[1].split()[0]) == pytest.approx(records[2]["lr"], rel=1e-2)
    old_id = (run / "wandb_run_id").read_text()

    # checkpoints saved before the schedule was recorded (all before issue 22): their run config gives it
    from glm52_train import checkpoint

    meta_file = ws / ckpt / "iter_0000004" / checkpoint.META_NAME
    meta = json.loads(meta_file.read_text())
    del meta["schedule"]
    meta_file.write_text(checkpoint._meta_text(meta))
    assert "(train.iters (4 -> 6))" in _refused(_glm52(ws, "train.iters=6"))

    # starting over where checkpoints are: refused; with --overwrite the earlier run is moved aside
    line = _refused(_glm52(ws, "--resume", "none"))
    assert line.startswith(f"glm52 pretrain: error: {ckpt} holds the checkpoints of an earlier run "
                           "(newest iter_0000004) and --resume none would start another run over them")
    over = _glm52(ws, "--resume", "none", "--overwrite")
    assert over.returncode == 0, over.stderr[-3000:]
    assert "resumed" not in over.stdout
    assert "--overwrite: moved the earlier run's checkpoints from checkpoints/a to checkpoints/a.old-1" in over.stdout
    assert "runs/a held an earlier run's metrics and this run starts at step 0: moved them to runs/a.old-1" in over.stdout
    assert sorted(p.name for p in (ws / "checkpoints" / "a.old-1").iterdir()) == ["iter_0000002", "iter_0000004",
                                                                                   "latest"]
    assert (ws / ckpt / "latest").read_text().strip() == "iter_0000002"
    old = ws / "runs" / "a.old-1"
    assert [json.loads(x)["step"] for x in (old / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (old / "wandb_run_id").read_text() == old_id != (run / "wandb_run_id").read_text()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
