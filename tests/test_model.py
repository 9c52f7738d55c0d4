"""The tiny GLM-5.2 on CPU: forward/backward, DSA training modes, IndexShare, MTP, recompute."""

from __future__ import annotations

import pytest
import torch

from glm52_train.config import get_model_config
from glm52_train.model.build import build_model
from glm52_train.run_config import load_run_config
from glm52_train.model.dsa import DSALossTracker
from glm52_train.model.layer import GLMTransformerLayer

SEQ = 64


def _batch(vocab, b=2, s=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    return ids, pos


def _build(model_cfg, reference=None, *overrides):
    """The model under a run config of `key=value` overrides (`dsa.mode=warmup`, ...)."""
    model = build_model(model_cfg, load_run_config(None, list(overrides)))
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
    without_kl = _build(cfg, with_kl, "dsa.loss_coeff=0").train()
    loss_a, grads_a = _loss_and_grads(with_kl, ids, pos)
    loss_b, grads_b = _loss_and_grads(without_kl, ids, pos)
    assert torch.equal(loss_a, loss_b)  # the KL is not part of the reported loss
    for name in grads_a:
        if ".indexer." in name:
            assert grads_a[name].abs().sum() > 0 and grads_b[name] is None, name
        else:  # equal up to the order the autograd engine sums three or more contributions in
            scale = grads_b[name].abs().max().clamp_min(1e-12)
            assert ((grads_a[name] - grads_b[name]).abs().max() / scale).item() < 1e-5, name


def test_warmup_mode_attends_densely(single_process):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    sparse = _build(cfg).eval()
    warmup = _build(cfg, sparse, "dsa.mode=warmup").eval()
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


@pytest.mark.parametrize("overrides", [
    ["train.recompute=full"],
    ["train.recompute=selective", "train.recompute_modules=[mla_up_proj,mlp,moe]"],
], ids=["full", "selective"])
def test_recompute_matches(single_process, overrides):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    plain = _build(cfg).train()
    recomputed = _build(cfg, plain, *overrides).train()
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

    with pytest.raises(ConfigError, match="dsa.mode must be one of sparse, warmup, got 'dense'"):
        load_run_config(None, ["dsa.mode=dense"])


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_absorbed_attention_matches_per_head_mla(mode, single_process):
    """The model's attention (MLA absorbed into MQA on the 576-channel latent) equals
    Megatron-Core's per-head MLA (its own per-head q/k/v) attending over the same top-k keys:
    in output, and in the gradients of the input and of every attention weight outside the
    indexer (whose KL loss only the model's path attaches)."""
    from glm52_train.kernels import reference
    from tests import dsa_per_head as per_head

    cfg = get_model_config("tiny")
    attn = _build(cfg, None, f"dsa.mode={mode}").train().decoder.layers[0].self_attention
    core = attn.core_attention
    assert core.indexer is not None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ, 2, cfg.hidden_size, generator=g).requires_grad_()
    r = torch.randn(SEQ, 2, cfg.hidden_size, generator=g)

    out, _, topk = attn(x)
    query, key, value, q_compressed, _ = attn.get_query_key_value_tensors(x, None, None, None)
    freqs, mscale = attn.rope_frequencies(x)
    with torch.no_grad():
        iq, ik, iw = core._indexer_inputs(x, q_compressed, freqs, mscale)
        causal = reference.allowed_keys(torch.arange(SEQ), torch.arange(SEQ)).unsqueeze(0)
        idx = reference.select_topk(reference.index_scores(iq, ik, iw), causal, cfg.index_topk)
    assert torch.equal(idx, topk.long())
    allowed = causal if mode == "warmup" else causal & reference.selection_mask(idx, SEQ)
    want, _ = attn.linear_proj(per_head.masked_attention(query, key, value, allowed, core.softmax_scale))
    assert ((out - want).norm() / want.norm()).item() < 1e-5

    params = {n: p for n, p in attn.named_parameters() if ".indexer." not in f".{n}"}
    grads = []
    for y in (out, want):
        attn.zero_grad()
        x.grad = None
        (y * r).sum().backward(retain_graph=True)
        grads.append({"input": x.grad.clone(), **{n: p.grad.clone() for n, p in params.items() if p.grad is not None}})
    assert set(grads[0]) == set(grads[1])
    for name, a in grads[0].items():
        b = grads[1][name]
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-4, name


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
    assert attn_te.core_attention.module is attn_local.core_attention.module  # DSA either way
    assert attn_te.core_attention.params == attn_local.core_attention.params
    assert local.input_layernorm is RMSNorm and te.input_layernorm is te_ext.TENorm
    assert local.mlp.submodules.experts.module is experts.SequentialMLP
    assert te.mlp.submodules.experts.module is experts.TEGroupedMLP


def test_dsa_deterministic_reaches_the_core_attention():
    """`dsa.deterministic: true` selects the atomics-free sparse attention backward in every
    DSA layer's backend (the kernels' own tests check that backward)."""
    from glm52_train.kernels.backend import DSABackend
    from glm52_train.model.build import transformer_config
    from glm52_train.model.spec import glm52_layer_spec

    for value, want in (("false", False), ("true", True)):
        config = transformer_config(get_model_config("tiny"), load_run_config(None, [f"dsa.deterministic={value}"]))
        backend = glm52_layer_spec(config, moe=False, use_te=False).submodules.self_attention.submodules \
            .core_attention.params["backend"]
        assert backend == DSABackend("auto", deterministic=want)
