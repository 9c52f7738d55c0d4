"""Every parallel layout computes the same training run as one process.

Each layout starts from the same weights (`glm52 init-weights`, loaded with `--init-from`),
reads the same global batches and trains the tiny model for 4 steps in fp32 with gloo
processes; its losses and gradient norms must equal the single-process run's within 1e-5
relative. A checkpoint saved under one layout resumes under another.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train_helpers import ROOT, assert_same_curve, curve, env, init_weights, pretrain, tiny_run_config

pytestmark = pytest.mark.slow

LAYOUTS = {
    # name: (processes, overrides)
    "dp2_distributed_optimizer": (2, []),
    "tp2_sequence_parallel": (2, ["parallel.tp=2", "parallel.sp=true"]),
    # the indexer KL from the attention backward: each rank's head sums all-reduced over TP
    "tp2_sequence_parallel_dq_pass_kl": (2, ["parallel.tp=2", "parallel.sp=true", "dsa.indexer_loss=dq_pass"]),
    "ep2_alltoall": (2, ["parallel.ep=2"]),
    # stage 2 begins with IndexShare layer 1 (S): its top-k crosses the stage boundary
    "pp2_uneven_shared_layer_start": (2, ["parallel.pp=2", "parallel.first_stage_layers=1"]),
    "tp2_x_ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"]),
    "pp2_vpp2_x_dp2": (4, ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=1"]),
    "tp2_x_pp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.first_stage_layers=1"]),
    "ep2_x_dp2_expert_tp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]),
}


def torchrun(nproc: int, config, *overrides: str, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={port}", "-m", "glm52_train.cli", "pretrain", "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        errors = [line[:300] for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
        # the ranks' tracebacks, not only torchrun's own ChildFailedError line
        raise AssertionError(f"torchrun failed ({proc.returncode}): {errors[:6]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def reference(golden_data, tmp_path_factory):
    """Initial weights and the single-process run every layout is compared with."""
    tmp = tmp_path_factory.mktemp("parallel")
    init = init_weights(tmp / "init")
    base = tmp / "base"
    base.mkdir()
    cfg = tiny_run_config(base, golden_data, train={"iters": 4, "eval_interval": 100},
                          checkpoint={"interval": 1000, "init_from": str(init)},
                          logging={"wandb": "disabled"})
    pretrain(cfg)
    return {"init": init, "data": golden_data, "steps": curve(base / "run")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    cfg = tiny_run_config(tmp_path, reference["data"], train={"iters": 4, "eval_interval": 100},
                          checkpoint={"interval": 1000, "init_from": str(reference["init"])},
                          logging={"wandb": "disabled"})
    torchrun(nproc, cfg, *overrides, port=29400 + 7 * list(LAYOUTS).index(layout))
    assert_same_curve(curve(tmp_path / "run"), reference["steps"])


def test_micro_batch_size_does_not_change_the_run(reference, tmp_path):
    """One process, micro-batches of 1 instead of 2: only the order of summation changes.
    (Megatron-Core's sequence aux loss came out divided by the micro-batch size; compat item 14.)"""
    cfg = tiny_run_config(tmp_path, reference["data"], train={"iters": 4, "eval_interval": 100},
                          checkpoint={"interval": 1000, "init_from": str(reference["init"])},
                          logging={"wandb": "disabled"})
    pretrain(cfg, "train.micro_batch_size=1")
    assert_same_curve(curve(tmp_path / "run"), reference["steps"], rel=1e-6)


def test_checkpoint_reshards_across_layouts(reference, tmp_path):
    """TP2 x PP2 -> EP2 x DP4 -> one process: the run continues with the same losses as the
    single-process run."""
    straight = tmp_path / "straight"
    straight.mkdir()
    common = dict(train={"iters": 6, "eval_interval": 100},
                  checkpoint={"interval": 2, "init_from": str(reference["init"])},
                  logging={"wandb": "disabled"})
    pretrain(tiny_run_config(straight, reference["data"], **common))
    moved = tmp_path / "moved"
    moved.mkdir()
    cfg = tiny_run_config(moved, reference["data"], **common)
    torchrun(4, cfg, "parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "train.exit_after_iters=2", port=29480)
    meta = json.loads((moved / "ckpt" / "iter_0000002" / "glm52.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    second = torchrun(4, cfg, "parallel.ep=2", "train.micro_batch_size=1", "train.exit_after_iters=2", port=29487)
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    third = pretrain(cfg)
    assert "at step 4" in third.stdout
    assert_same_curve(curve(moved / "run"), curve(straight / "run"))


def test_async_checkpoints_under_tp2_x_dp2(golden_data, tmp_path):
    """Under TP2 x DP2 (4 processes; two launches): asynchronous saves at steps 2 and 4; a bit
    flipped in one rank's data file of step 4 is caught by the processes that read it and, with
    checkpoint.on_damaged=fallback, every rank warns and resumes from the asynchronous checkpoint
    of step 2; the resumed run reproduces the first run's losses and its synchronous save of step 4
    equals the first run's asynchronous one tensor for tensor."""
    import shutil

    import torch

    from tests.test_checkpoint_integrity import _dcp_tensors, _flip_a_byte

    layout = ["parallel.tp=2", "parallel.sp=true"]
    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 4, "eval_interval": 100},
                          checkpoint={"interval": 2, "async_save": True}, logging={"wandb": "disabled"})
    first = torchrun(4, cfg, *layout, port=29494)
    assert first.stdout.count("(written in the background in") == 2
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert {p.name for p in (ckpt / "iter_0000004").glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    shutil.copytree(ckpt / "iter_0000004", tmp_path / "async_iter_4")
    before = curve(tmp_path / "run")
    name = _flip_a_byte(ckpt / "iter_0000004")

    second = torchrun(4, cfg, *layout, "checkpoint.async_save=false", "checkpoint.on_damaged=fallback", port=29501)
    assert (f"WARNING: checkpoint {ckpt / 'iter_0000004'} (iteration 4) is damaged: {name} does not match its "
            f"checksum") in second.stdout
    assert f"resumed from {ckpt / 'iter_0000002'} at step 2" in second.stdout
    assert curve(tmp_path / "run") == before
    a, b = _dcp_tensors(tmp_path / "async_iter_4"), _dcp_tensors(ckpt / "iter_0000004")
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
