"""Muon (`optimizer.name: muon`): one step equals a float64 plain-PyTorch reference on the full
matrices; the parallel layouts, an interrupted run and a resharded checkpoint give the
single-process run's losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train_helpers import ROOT, curve, init_weights, metrics, pretrain, tiny_run_config

NS = (3.4445, -4.7750, 2.0315)


def reference_orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The published quintic Newton-Schulz iteration on one matrix, float64."""
    a, b, c = NS
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def reference_step(name: str, p: torch.Tensor, g: torch.Tensor, lr: float, model_cfg, o) -> torch.Tensor:
    """The first update of one parameter (float64, unsharded), written from the algorithm's
    description: Nesterov momentum, Newton-Schulz per head / per matrix, RMS-matched scale;
    AdamW (bias-corrected first step) for embeddings, head, norms, router, indexer weights."""
    adamw = p.dim() == 1 or "embedding" in name or "output_layer" in name or "router" in name or "weights_proj" in name
    if adamw:
        m, v = (1 - o.beta1) * g, (1 - o.beta2) * g * g
        update = (m / (1 - o.beta1)) / ((v / (1 - o.beta2)).sqrt() + o.eps)
        wd = 0.0 if p.dim() == 1 else o.weight_decay
        return p * (1 - lr * wd) - lr * update
    u = g + o.muon_momentum * g  # Nesterov, first step: the buffer is the gradient
    if name.endswith("linear_q_up_proj.weight") or name.endswith("linear_kv_up_proj.weight"):
        rows = model_cfg.qk_nope_dim + (model_cfg.qk_rope_dim if "_q_up" in name else model_cfg.v_head_dim)
        heads = [reference_orthogonalize(u[h * rows:(h + 1) * rows]) * 0.2 * math.sqrt(max(rows, u.shape[1]))
                 for h in range(u.shape[0] // rows)]
        update = torch.cat(heads)
    else:
        update = reference_orthogonalize(u) * 0.2 * math.sqrt(max(u.shape))
    return p * (1 - lr * o.weight_decay) - lr * update


@pytest.mark.slow
def test_one_step_equals_float64_reference(single_process):
    from glm52_train.run_config import load_run_config
    from glm52_train.training import setup, step

    cfg = load_run_config(str(ROOT / "configs" / "tiny.yaml"), [
        "optimizer.name=muon", "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
        "optimizer.warmup_iters=0", "train.clip_grad=0.5"])
    model_cfg = cfg.model_config()
    chunks, config = setup.build_model_chunks(model_cfg, cfg, 64)
    chunks = setup.wrap_ddp(chunks, config, False, distributed_optimizer=False)
    optimizer, _, _ = setup.build_optimizer(cfg, chunks, config, False)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 65), generator=gen)
    sample = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 64),
              "position_ids": torch.arange(64).expand(2, 64)}
    for c in chunks:
        c.zero_grad_buffer()
    step.DSALossScaler.set_loss_scale(1.0)
    step._run_schedule(cfg, iter([sample]), chunks, 1, forward_only=False)

    named = [(n.replace("module.", ""), p) for c in chunks for n, p in c.named_parameters()]
    before = {n: (p.detach().double().clone(), p.main_grad.detach().double().clone()) for n, p in named}
    norm = math.sqrt(sum(float(g.square().sum()) for _, g in before.values()))
    clip = min(1.0, cfg.train.clip_grad / (norm + 1e-6))
    assert clip < 1.0  # the clipping is part of what is compared
    lr = optimizer.param_groups[0]["lr"]
    assert all(g["lr"] == lr for g in optimizer.param_groups)
    _, grad_norm, _ = optimizer.step()
    assert grad_norm == pytest.approx(norm, rel=1e-6)

    kinds = {"muon": 0, "per_head": 0, "adamw": 0}
    for name, p in named:
        p0, g = before[name]
        want = reference_step(name, p0, g * clip, lr, model_cfg, cfg.optimizer)
        got = p.detach().double()
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-6, f"{name}: relative difference {rel:.2e}"
        # the update itself (a few per cent of the weight) to 1e-4
        rel_update = (got - p0 - (want - p0)).norm() / (want - p0).norm()
        assert rel_update < 1e-4, f"{name}: update differs by {rel_update:.2e}"
        kinds["per_head" if "up_proj" in name else "adamw" if p.dim() == 1 or "embedding" in name
              or "output_layer" in name or "router" in name or "weights_proj" in name else "muon"] += 1
    assert all(kinds.values()), kinds
    rms = optimizer.update_rms()
    assert set(rms) == {"update_rms/adamw", "update_rms/muon_attention", "update_rms/muon_experts", "update_rms/muon_mlp"}
    # Newton-Schulz's quintic stops short of exact orthogonality (singular values ~0.7-1.2);
    # experts that received no token this step have a zero update
    assert 0.12 < rms["update_rms/muon_attention"] < 0.25 and 0.12 < rms["update_rms/muon_mlp"] < 0.25, rms
    assert 0 < rms["update_rms/muon_experts"] < 0.25, rms


def test_stacked_experts_and_bad_coefficients_are_refused():
    from glm52_train.config import ConfigError
    from glm52_train.config import get_model_config
    from glm52_train.run_config import load_run_config
    from glm52_train.training.muon import param_role

    with pytest.raises(ConfigError, match="one matrix per expert"):
        param_role("decoder.layers.1.mlp.experts.weight1", torch.zeros(4, 8), get_model_config("tiny"))
    cfg = load_run_config(str(ROOT / "configs" / "tiny.yaml"), ["optimizer.name=muon", "optimizer.muon_ns_coeffs=[1, 2]"])
    with pytest.raises(ConfigError, match="muon_ns_coeffs needs 3 numbers"):
        cfg.validate(1)


# ---- the layouts, resume and resharding (torchrun, gloo) ------------------------------------

@pytest.fixture(scope="module")
def muon_reference(golden_data, tmp_path_factory):
    """Initial weights and the single-process Muon run (4 steps) every other run is compared with."""
    tmp = tmp_path_factory.mktemp("muon")
    init = init_weights(tmp / "init")
    base = tmp / "base"
    base.mkdir()
    pretrain(_muon_config(base, golden_data, init))
    return {"init": init, "data": golden_data, "steps": curve(base / "run"), "metrics": metrics(base / "run")}


def _muon_config(tmp, data, init):
    return tiny_run_config(tmp, data, train={"iters": 4, "eval_interval": 100},
                           optimizer={"name": "muon", "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_iters": 1},
                           checkpoint={"interval": 2, "init_from": str(init)}, logging={"wandb": "disabled"})


def _assert_same(got, reference, steps, rel=1e-5):
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step][0] == pytest.approx(reference[step][0], rel=rel), f"loss at step {step}"
        assert got[step][1] == pytest.approx(reference[step][1], rel=rel), f"grad norm at step {step}"


@pytest.mark.slow
def test_muon_metrics_and_exact_resume(muon_reference, tmp_path):
    """The update RMS per group is in metrics.jsonl; stopped after step 2 and resumed (momentum
    buffers and Adam moments from the checkpoint), the run equals the uninterrupted one exactly."""
    first = muon_reference["metrics"][0]
    assert {"update_rms/adamw", "update_rms/muon_attention", "update_rms/muon_mlp", "update_rms/muon_experts"} <= set(first)
    cfg = _muon_config(tmp_path, muon_reference["data"], muon_reference["init"])
    pretrain(cfg, "train.exit_after_iters=2")
    second = pretrain(cfg)
    assert "at step 2" in second.stdout
    assert curve(tmp_path / "run") == muon_reference["steps"]


@pytest.mark.slow
def test_muon_layouts_and_resharded_checkpoint(muon_reference, tmp_path):
    """TP2+SP x PP2 for steps 1-2 (TP-gathered and per-head orthogonalisation, two stages),
    saved, then resumed under EP2 with DP4 (experts' state over expert-DP 2, dense over DP 4):
    every step's loss and gradient norm equal the single-process run's."""
    from tests.test_parallel import torchrun

    cfg = _muon_config(tmp_path, muon_reference["data"], muon_reference["init"])
    torchrun(4, cfg, "parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.first_stage_layers=1",
             "train.exit_after_iters=2", port=29520)
    meta = json.loads((tmp_path / "ckpt" / "iter_0000002" / "glm52.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
    second = torchrun(4, cfg, "parallel.ep=2", "train.micro_batch_size=1", port=29527)
    assert "at step 2" in second.stdout
    _assert_same(curve(tmp_path / "run"), muon_reference["steps"], steps=[1, 2, 3, 4])


@pytest.mark.slow
def test_muon_context_and_data_parallel(muon_reference, tmp_path):
    """CP2 x DP2 from the start: whole matrices owned by one of two data-parallel ranks."""
    from tests.test_parallel import torchrun

    cfg = _muon_config(tmp_path, muon_reference["data"], muon_reference["init"])
    torchrun(4, cfg, "parallel.cp=2", "checkpoint.enable=false", port=29534)
    _assert_same(curve(tmp_path / "run"), muon_reference["steps"], steps=[1, 2, 3, 4])
