"""The step profiler: kernel time split by model part, backward included."""

from __future__ import annotations

import json

import pytest
import torch
from torch.autograd.profiler import record_function

from glm52_train.training.profile import PARTS, summarize
from tests.train_helpers import pretrain, tiny_run_config


def test_backward_time_goes_to_the_part_of_its_forward():
    """A labelled matmul's backward (two products of the same size, run by the autograd
    engine outside any label) is counted with its forward: the labelled part holds about
    all of the time. Without the sequence-number link it would hold about a third (0.43 measured)."""
    torch.manual_seed(0)
    w = torch.randn(2048, 2048, requires_grad=True)
    small = torch.randn(2048, 4, requires_grad=True)
    x = torch.randn(2048, 2048)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("glm52::experts"):
                h = x @ w
            out = (h @ small).sum()  # unlabelled, and ~500x cheaper
            out.backward()
    b = summarize(prof.events(), steps=3, device=False)
    assert set(b["parts_ms_per_step"]) == set(PARTS)
    assert abs(sum(b["parts_share"].values()) - 1) < 1e-9
    assert b["parts_share"]["experts"] > 0.7, b["parts_share"]


@pytest.mark.slow
def test_pretrain_profile_and_no_checkpoint(golden_data, tmp_path):
    """`logging.profile_at` writes the breakdown and the op table; `checkpoint.enable: false`
    neither resumes nor saves."""
    cfg = tiny_run_config(tmp_path, golden_data, train={"iters": 3, "eval_interval": 100},
                          logging={"wandb": "disabled", "profile_at": 2, "profile_steps": 1},
                          checkpoint={"enable": False, "dir": str(tmp_path / "ckpt")})
    out = pretrain(cfg)
    assert "profile of steps 2-2" in out.stdout
    breakdown = json.loads((tmp_path / "run" / "profile" / "breakdown_rank0.json").read_text())
    parts = breakdown["parts_ms_per_step"]
    for part in ("sparse attention", "indexer", "experts", "router", "optimizer", "output head + loss"):
        assert parts[part] > 0, part
    assert breakdown["total_ms_per_step"] <= 1.05 * breakdown["wall_ms_per_step"][0]
    assert "Name" in (tmp_path / "run" / "profile" / "ops_rank0.txt").read_text()
    assert not (tmp_path / "ckpt").exists()
