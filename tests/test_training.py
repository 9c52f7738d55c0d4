"""The pretraining driver end to end on CPU: golden loss curve, exact resume, interrupted saves,
the offline W&B run and weights-only starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm52_train import checkpoint
from glm52_train.training.wandb_reader import run_config, run_history
from tests.train_helpers import kill_in_save, losses, metrics, pretrain, tiny_run_config

GOLDEN = Path(__file__).parent / "data" / "golden_tiny_losses.json"


def test_golden_loss_curve_and_wandb_run(golden_data, tmp_path):
    """Tiny on the committed corpus, seed 1234: the losses match the committed curve, fall,
    and the offline W&B run holds the same metrics as metrics.jsonl."""
    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 12, "eval_interval": 6})
    pretrain(cfg)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text()).items()}
    for step, value in golden.items():
        assert got[step] == pytest.approx(value, rel=2e-3), f"step {step}"
    assert got[12] < got[1] - 0.8

    rows = [r for r in run_history(tmp_path / "run") if "loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, 13))
    for row, record in zip(rows, [m for m in metrics(tmp_path / "run") if m.get("loss") is not None]):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "indexer_kl", "expert_load_max_over_mean"):
            assert row[key] == pytest.approx(record[key]), key
    assert any(k.startswith("expert_load/decoder.layers.1/") for k in rows[0])
    assert any(k.startswith("indexer_kl/layer") for k in rows[0])
    assert run_config(tmp_path / "run")["model"]["name"] == "tiny"
    assert checkpoint.find_latest_good(tmp_path / "ckpt").name == "iter_0000012"


@pytest.mark.slow
def test_resume_gives_the_same_losses(golden_data, tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    pretrain(tiny_run_config(straight, golden_data))

    halves = tmp_path / "halves"
    halves.mkdir()
    cfg = tiny_run_config(halves, golden_data, logging={"tensorboard": True})
    first = pretrain(cfg, "train.exit_after_iters=4")
    assert "saved checkpoint" in first.stdout
    assert sorted(losses(halves / "run")) == [1, 2, 3, 4]
    second = pretrain(cfg)  # checkpoint.resume: auto
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert losses(halves / "run") == losses(straight / "run")
    val = lambda d: {m["step"]: m["val_loss"] for m in metrics(d / "run") if "val_loss" in m}  # noqa: E731
    assert val(halves) == val(straight)
    assert list((halves / "run" / "tensorboard").glob("events.out.tfevents.*"))  # logging.tensorboard


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(golden_data, tmp_path):
    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 8}, checkpoint={"interval": 4})
    kill_in_save(cfg, pause_s=30, timeout_s=300)  # in the first save (step 4), before its commit
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "iter_0000004.incomplete").is_dir()
    assert checkpoint.find_latest_good(ckpt) is None  # nothing committed yet: no false positive

    # Now a complete checkpoint at 4, then a kill in the middle of the save at 8.
    pretrain(cfg, "train.exit_after_iters=4")
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    kill_in_save(cfg, pause_s=30, timeout_s=300)
    assert (ckpt / "iter_0000008.incomplete").is_dir()
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    good = checkpoint.find_latest_good(ckpt)
    assert good.name == "iter_0000004"
    checkpoint.verify_checkpoint(good)
    resumed = pretrain(cfg)
    assert "at step 4" in resumed.stdout
    assert checkpoint.find_latest_good(ckpt).name == "iter_0000008"
    assert not (ckpt / "iter_0000008.incomplete").exists()


@pytest.mark.slow
def test_damaged_checkpoint_stops_resume_and_init_from_or_falls_back_loudly(golden_data, tmp_path):
    """One bit flipped in a data file of the newest checkpoint (its size unchanged): resuming and
    `--init-from` stop with one sentence naming the file and the iteration (exit status 2);
    with checkpoint.on_damaged=fallback the run says which one is damaged and resumes from the
    previous one. (A truncated file is caught before reading, by its recorded size.)"""
    from tests.test_checkpoint_integrity import _flip_a_byte

    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 8}, checkpoint={"interval": 4},
                          logging={"wandb": "disabled"})
    pretrain(cfg)
    ckpt = tmp_path / "ckpt"
    name = _flip_a_byte(ckpt / "iter_0000008")
    checkpoint.verify_checkpoint(ckpt / "iter_0000008")  # sizes agree
    damaged = f"checkpoint {ckpt / 'iter_0000008'} (iteration 8) is damaged: {name} does not match its checksum"

    longer = "train.override_schedule=true"  # 10 or 5 steps: another schedule than the checkpoint's 8
    proc = pretrain(cfg, "train.iters=10", longer, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("glm52 ")]
    assert len(errors) == 1 and errors[0].startswith(f"glm52 pretrain: error: {damaged}"), errors
    assert "An older checkpoint exists (iter_0000004)" in errors[0]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = pretrain(tiny_run_config(fresh, golden_data, logging={"wandb": "disabled"}), f"--init-from={ckpt}",
                    check=False)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("glm52 ")][0].startswith(
        f"glm52 pretrain: error: {damaged}")

    proc = pretrain(cfg, "train.iters=5", longer, "checkpoint.on_damaged=fallback")
    assert f"WARNING: {damaged}" in proc.stdout
    assert f"Falling back to the previous checkpoint, {ckpt / 'iter_0000004'}" in proc.stdout
    assert f"resumed from {ckpt / 'iter_0000004'} at step 4" in proc.stdout


@pytest.mark.slow
def test_async_save_killed_keeps_the_last_good_checkpoint_and_resumes_exactly(golden_data, tmp_path):
    """checkpoint.async_save: the save of step 4 is written by a forked process and committed
    later; kill -9 while the save of step 8 is in flight (its writer held before the commit by
    GLM52_FAULT_PAUSE_IN_SAVE) leaves `latest` at step 4; the next run reports and removes the
    partial folder, resumes from the asynchronous checkpoint and reproduces an uninterrupted
    synchronous run's losses; the asynchronous checkpoints equal the synchronous ones tensor for
    tensor."""
    from tests.test_checkpoint_integrity import _dcp_tensors

    straight = tmp_path / "straight"
    straight.mkdir()
    pretrain(tiny_run_config(straight, golden_data, logging={"wandb": "disabled"}))
    runs = tmp_path / "async"
    runs.mkdir()
    cfg = tiny_run_config(runs, golden_data, checkpoint={"async_save": True}, logging={"wandb": "disabled"})
    first = pretrain(cfg, "train.exit_after_iters=4")
    assert "(written in the background in" in first.stdout
    ckpt = runs / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"

    kill_in_save(cfg, pause_s=60, timeout_s=600)  # in the save of step 8 (its writer held)
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert (ckpt / "iter_0000008.incomplete").is_dir() and not (ckpt / "iter_0000008").exists()

    resumed = pretrain(cfg)
    assert f"removed {ckpt / 'iter_0000008.incomplete'}: left by a save that never finished" in resumed.stdout
    assert "at step 4" in resumed.stdout
    assert losses(runs / "run") == losses(straight / "run")
    for it in ("iter_0000004", "iter_0000008"):
        a, b = _dcp_tensors(straight / "ckpt" / it), _dcp_tensors(ckpt / it)
        assert sorted(a) == sorted(b), it
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (it, key)


@pytest.mark.slow
def test_bad_run_config_is_one_sentence(golden_data, tmp_path):
    cfg = tiny_run_config(tmp_path, golden_data)
    proc = pretrain(cfg, "train.global_batch_size=3", check=False)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("glm52 ")]
    assert errors == ["glm52 pretrain: error: train.global_batch_size (3) must be a multiple of "
                      "micro_batch_size x data-parallel size (2 x 1)."]
    proc = pretrain(cfg, "train.itres=3", check=False)
    assert proc.returncode == 2 and "unknown key train.itres (did you mean train.iters?)" in proc.stderr


@pytest.mark.slow
def test_init_from_imported_weights(golden_data, tmp_path):
    """Weights-only start (the HF import path): a fresh schedule from step 0 on loaded weights."""
    first = tmp_path / "first"
    first.mkdir()
    pretrain(tiny_run_config(first, golden_data, train={"iters": 4}))
    second = tmp_path / "second"
    second.mkdir()
    proc = pretrain(tiny_run_config(second, golden_data, train={"iters": 4}),
                    f"--init-from={first / 'ckpt'}")
    assert "resumed" not in proc.stdout
    a, b = losses(first / "run"), losses(second / "run")
    assert sorted(b) == [1, 2, 3, 4]
    assert b[1] < a[1] - 0.5  # starts from trained weights, not from scratch


def test_bf16_gradients_train(golden_data, tmp_path):
    """`train.grad_reduce_in_fp32: false` (Megatron-Bridge's GLM-5.2 recipes): under bf16 the
    gradient buffers DDP reduces are bf16, and two steps of tiny train to finite losses."""
    from glm52_train import parallel
    from glm52_train.run_config import load_run_config
    from glm52_train.training import setup

    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 2, "precision": "bf16",
                                                        "grad_reduce_in_fp32": False},
                          optimizer={"warmup_iters": 1}, checkpoint={"enable": False}, logging={"wandb": "disabled", "run_dir": str(tmp_path / "run")})
    pretrain(cfg)
    steps = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(steps) >= 2 and all(m["loss"] == m["loss"] and m["loss"] < 20 for m in steps)
    run = load_run_config(str(cfg), [])
    parallel.initialize(seed=1234)
    try:
        chunks, config = setup.build_model_chunks(run.model_config(), run, 64)
        chunks = setup.wrap_ddp(chunks, config, True, grad_reduce_in_fp32=run.train.grad_reduce_in_fp32)
        dtypes = {p.main_grad.dtype for c in chunks for p in c.parameters()}
        assert dtypes == {torch.bfloat16}
    finally:
        parallel.destroy()
