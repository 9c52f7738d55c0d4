"""The tiny GLM-5.2 on CPU: forward/backward, DSA training modes, IndexShare, MTP, recompute."""

from __future__ import annotations

import pytest
import torch

from glm52_train.config import get_model_config
from glm52_train.model.build import RuntimeOptions, build_model
from glm52_train.model.dsa import DSALossTracker
from glm52_train.model.layer import GLMTransformerLayer

SEQ = 64


def _batch(vocab, b=2, s=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    return ids, pos


def _build(model_cfg, reference=None, **run):
    model = build_model(model_cfg, RuntimeOptions(**run))
    if reference is not None:
        model.load_state_dict(reference.state_dict())
    return model


def _loss_and_grads(model, ids, pos):
    model.zero_grad()
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    return loss.detach(), grads


def test_tiny_has_every_feature():
    m = get_model_config("tiny").validate()
    assert m.num_dense_layers >= 1 and m.num_moe_layers >= 1 and m.num_shared_experts == 1
    assert m.mtp_layers >= 1 and "S" in m.layer_index_pattern
    assert m.index_topk < SEQ


def test_forward_backward_reaches_every_parameter(single_process):
    cfg = get_model_config("tiny")
    model = _build(cfg).train()
    ids, pos = _batch(cfg.vocab_size)
    DSALossTracker.pop()
    loss, grads = _loss_and_grads(model, ids, pos)
    assert torch.isfinite(loss) and 8.0 < loss.item() < 10.0  # ~ln(8192) at init
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing
    assert all(torch.isfinite(g).all() for g in grads.values())
    indexer = [n for n in grads if ".indexer." in n]
    assert indexer and all(grads[n].abs().sum() > 0 for n in indexer)
    assert any(n.startswith("mtp.") for n in grads)
    assert set(DSALossTracker.pop()) == {1, 3, 5}  # the two full layers and the MTP layer


def test_indexer_loss_trains_the_indexer_only(single_process):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    with_kl = _build(cfg).train()
    without_kl = _build(cfg, reference=with_kl, dsa_loss_coeff=0.0).train()
    loss_a, grads_a = _loss_and_grads(with_kl, ids, pos)
    loss_b, grads_b = _loss_and_grads(without_kl, ids, pos)
    assert torch.equal(loss_a, loss_b)  # the KL is not part of the reported loss
    for name in grads_a:
        if ".indexer." in name:
            assert grads_a[name].abs().sum() > 0 and grads_b[name] is None, name
        else:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_warmup_mode_attends_densely(single_process):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    sparse = _build(cfg).eval()
    warmup = _build(cfg, reference=sparse, dsa_mode="warmup").eval()
    all_keys = _build(cfg.replace(index_topk=SEQ), reference=sparse).eval()
    with torch.no_grad():
        out_sparse, out_warmup, out_all = (m(ids, pos, None) for m in (sparse, warmup, all_keys))
    assert torch.allclose(out_warmup, out_all, atol=1e-5)
    assert not torch.allclose(out_sparse, out_all, atol=1e-3)


def test_index_share_reuses_the_previous_full_layer(single_process):
    cfg = get_model_config("tiny")
    assert cfg.layer_index_pattern == "FSFS"
    model = _build(cfg).eval()
    returned = []
    for layer in model.decoder.layers:
        assert isinstance(layer, GLMTransformerLayer)
        layer.register_forward_hook(lambda mod, args, out: returned.append(out[1]))
    ids, pos = _batch(cfg.vocab_size)
    with torch.no_grad():
        model(ids, pos, None)
    assert len(returned) == 4
    assert returned[1] is returned[0] and returned[3] is returned[2]
    assert not torch.equal(returned[0], returned[2])
    assert returned[0].shape == (2, SEQ, cfg.index_topk)
    shared_attn = model.decoder.layers[1].self_attention.core_attention
    assert shared_attn.indexer is None and not shared_attn.is_full


def test_full_recompute_matches(single_process):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    plain = _build(cfg).train()
    recomputed = _build(cfg, reference=plain, recompute="full").train()
    loss_a, grads_a = _loss_and_grads(plain, ids, pos)
    loss_b, grads_b = _loss_and_grads(recomputed, ids, pos)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_mtp_shares_one_layer_over_three_steps(single_process):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    cfg = get_model_config("tiny").replace(mtp_steps=3)
    one_step = _build(get_model_config("tiny"))
    model = _build(cfg, reference=one_step).train()
    assert len(model.mtp.layers) == 1
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in one_step.parameters())
    MTPLossLoggingHelper.tracker.clear()
    ids, pos = _batch(cfg.vocab_size)
    loss, grads = _loss_and_grads(model, ids, pos)
    values = MTPLossLoggingHelper.tracker["values"]
    assert values.shape == (3,) and bool((values > 0).all())
    assert grads["mtp.layers.0.eh_proj.weight"].abs().sum() > 0


def test_bad_dsa_mode_is_one_sentence():
    from glm52_train.config import ConfigError
    from glm52_train.model.build import transformer_config

    with pytest.raises(ConfigError, match="dsa mode 'dense'"):
        transformer_config(get_model_config("tiny"), RuntimeOptions(dsa_mode="dense"))


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_latent_kernel_path_matches_reference(mode, single_process):
    """The GPU path (MLA absorbed into MQA on the latent, through glm52_train.kernels; their
    PyTorch reference on CPU) computes the same losses and gradients as the per-head path."""
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    per_head = _build(cfg, dsa_backend="torch", dsa_mode=mode).train()
    latent = _build(cfg, reference=per_head, dsa_backend="kernels", dsa_mode=mode).train()
    DSALossTracker.pop()  # drop values other tests left behind
    loss_a, grads_a = _loss_and_grads(per_head, ids, pos)
    kl_a = DSALossTracker.pop()
    loss_b, grads_b = _loss_and_grads(latent, ids, pos)
    kl_b = DSALossTracker.pop()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert set(kl_a) == set(kl_b) and all(kl_a[k] == pytest.approx(kl_b[k], rel=1e-4) for k in kl_a)
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp_min(1e-12)
        assert ((grads_a[name] - grads_b[name]).abs().max() / scale).item() < 1e-4, name


def test_one_spec_function_chooses_te_or_local():
    """With Transformer Engine the same spec function picks TE's layers (replicated latent down
    projections, column/row-parallel TE linears, TE norms, grouped experts); without it,
    Megatron-Core's local ones. (TE itself is not installable here: the choice is checked, the
    TE layers are not run.)"""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe import experts

    from glm52_train.model.build import transformer_config
    from glm52_train.model.norms import RMSNorm
    from glm52_train.model.spec import glm52_layer_spec

    config = transformer_config(get_model_config("tiny"))
    local = glm52_layer_spec(config, moe=True, use_te=False).submodules
    te = glm52_layer_spec(config, moe=True, use_te=True).submodules
    attn_local, attn_te = local.self_attention.submodules, te.self_attention.submodules
    assert attn_local.linear_q_down_proj is Linear and attn_te.linear_q_down_proj is te_ext.TELinear
    assert attn_local.linear_q_up_proj is ColumnParallelLinear
    assert attn_te.linear_q_up_proj is te_ext.TEColumnParallelLinear
    assert attn_local.linear_proj is RowParallelLinear and attn_te.linear_proj is te_ext.TERowParallelLinear
    assert attn_te.core_attention is attn_local.core_attention  # DSA either way
    assert local.input_layernorm is RMSNorm and te.input_layernorm is te_ext.TENorm
    assert local.mlp.submodules.experts.module is experts.SequentialMLP
    assert te.mlp.submodules.experts.module is experts.TEGroupedMLP
