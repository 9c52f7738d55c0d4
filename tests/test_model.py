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
    ["dsa.mode=warmup", "train.recompute=selective", "train.recompute_modules=[mla_up_proj]"],
], ids=["full", "selective", "selective_dense_path"])
def test_recompute_matches(single_process, overrides):
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    plain = _build(cfg, None, *[o for o in overrides if o.startswith("dsa.")]).train()
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

    with pytest.raises(ConfigError, match="dsa.mode must be one of sparse, warmup, dense, got 'dsa'"):
        load_run_config(None, ["dsa.mode=dsa"])


@pytest.mark.parametrize("mode", ["sparse", "warmup", "dense"])
def test_absorbed_attention_matches_per_head_mla(mode, single_process):
    """The model's attention (sparse: MLA absorbed into MQA on the 576-channel latent; warmup
    and dense: our per-head SDPA path) equals Megatron-Core's per-head MLA (its own per-head
    q/k/v) attending over the same top-k keys (every visible key in warmup and dense): in
    output, and in the gradients of the input and of every attention weight outside the indexer
    (whose KL loss only the model's path attaches). The dense paths select no top-k."""
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
    if mode == "sparse":
        assert torch.equal(idx, topk.long())
    else:
        assert topk is None
    allowed = causal if mode != "sparse" else causal & reference.selection_mask(idx, SEQ)
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


@pytest.mark.parametrize("packed", [False, True])
def test_dense_mode_matches_absorbed_dense_reference(packed, single_process):
    """dsa.mode=dense (per-head MLA through SDPA, one call per document run) equals the
    absorbed dense reference (MQA on the latent over every visible key, reference.dense_mla)
    in fp32 within 1e-5: output, and gradients of the input and every attention weight. The
    indexer does no work (no gradient reaches it)."""
    from glm52_train.kernels import reference
    from glm52_train.model.sequence import GLMSequenceParams, TokenLayout

    cfg = get_model_config("tiny")
    attn = _build(cfg, None, "dsa.mode=dense").train().decoder.layers[0].self_attention
    core = attn.core_attention
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SEQ, 1, cfg.hidden_size, generator=g).requires_grad_()
    r = torch.randn(SEQ, 1, cfg.hidden_size, generator=g)
    layout = params = None
    if packed:  # documents of 20, 30 and 14 tokens
        pos = torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]).unsqueeze(0)
        layout = TokenLayout.build(SEQ, x.device, None, pos)
        params = GLMSequenceParams(qkv_format="sbhd", token_layout=layout)

    out, _, topk = attn(x, packed_seq_params=params)
    assert topk is None and len(core.dense_plan(SEQ, layout)) == (3 if packed else 1)
    query, kv, _, w_uv, _, _ = attn.latent_qkv(x, layout)
    visible = layout.visibility() if packed else {}
    latent = reference.dense_mla(query, kv, core.softmax_scale, cfg.kv_lora_rank, **visible)
    want, _ = attn.linear_proj(torch.einsum("sbhc,hdc->sbhd", latent, w_uv).reshape(SEQ, 1, -1))
    assert ((out - want).norm() / want.norm()).item() < 1e-5

    grads = []
    for y in (out, want):
        attn.zero_grad()
        x.grad = None
        (y * r).sum().backward(retain_graph=True)
        grads.append({"input": x.grad.clone(), **{n: p.grad.clone() for n, p in attn.named_parameters()
                                                  if p.grad is not None}})
    assert set(grads[0]) == set(grads[1]) and not any(".indexer." in n for n in grads[0])
    for name, a in grads[0].items():
        b = grads[1][name]
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-5, name


def test_dense_mode_with_indexer_freeze_is_one_sentence():
    from glm52_train.config import ConfigError

    with pytest.raises(ConfigError, match="dsa.mode=dense leaves unused"):
        load_run_config(None, ["dsa.mode=dense", "train.freeze=all_but_indexer"]).validate(1)


def test_sparse_takes_the_dense_path_exactly_where_topk_covers_every_key(single_process, monkeypatch):
    """Sparse training on a sequence of top-k tokens: the layer takes the dense path (no top-k
    returned), and its output, gradients and indexer KL equal those of the sparse kernels
    forced to run (which select every visible key)."""
    from glm52_train.model.dsa import DSACoreAttention

    cfg = get_model_config("tiny")
    seq = cfg.index_topk
    attn = _build(cfg, None, "dsa.mode=sparse").train().decoder.layers[0].self_attention
    g = torch.Generator().manual_seed(3)
    x = torch.randn(seq, 2, cfg.hidden_size, generator=g).requires_grad_()
    r = torch.randn(seq, 2, cfg.hidden_size, generator=g)
    results = []
    for forced_sparse in (False, True):
        if forced_sparse:
            monkeypatch.setattr(DSACoreAttention, "dense_plan", lambda self, sq, layout: None)
        DSALossTracker.pop()
        attn.zero_grad()
        x.grad = None
        out, _, topk = attn(x)
        assert (topk is None) != forced_sparse
        (out * r).sum().backward()
        grads = {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in attn.named_parameters()
                                             if p.grad is not None}}
        results.append((out.detach(), grads, DSALossTracker.pop()))
    (out_a, grads_a, kl_a), (out_b, grads_b, kl_b) = results
    assert ((out_a - out_b).norm() / out_b.norm()).item() < 1e-5
    assert set(grads_a) == set(grads_b) and any(".indexer." in n for n in grads_a)
    for name, a in grads_a.items():
        assert ((a - grads_b[name]).norm() / grads_b[name].norm().clamp_min(1e-12)).item() < 1e-5, name
    assert set(kl_a) == {1} and abs(kl_a[1] - kl_b[1]) < 1e-5 * max(1.0, abs(kl_b[1]))


def test_dense_and_sparse_train_the_same_losses_where_topk_covers_the_sequence(single_process):
    """Sequences of top-k tokens, indexer loss off: dsa.mode=dense and dsa.mode=sparse (which
    takes the dense path there) give the same LM losses step for step over a few Adam steps."""
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size, b=1, s=cfg.index_topk, seed=4)
    dense = _build(cfg, None, "dsa.mode=dense", "dsa.loss_coeff=0").train()
    sparse = _build(cfg, dense, "dsa.mode=sparse", "dsa.loss_coeff=0").train()
    curves = []
    for model in (dense, sparse):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            loss, _ = _loss_and_grads(model, ids, pos)
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][0] - curves[0][-1] > 0.05  # it trains
    assert curves[0] == pytest.approx(curves[1], rel=1e-6)


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


@pytest.mark.parametrize("overrides", [[], ["train.recompute=full"]], ids=["plain", "recompute_full"])
def test_indexer_loss_from_the_dq_pass_equals_the_forward_one(single_process, overrides):
    """`dsa.indexer_loss: dq_pass` (the KL from the sparse attention backward's head
    probabilities) trains what `forward` (the KL recomputed in the forward) does: the same LM
    loss, every parameter's gradient and the logged KL per layer, recorded once per layer in the
    backward (also when recomputation runs the forward twice)."""
    cfg = get_model_config("tiny")
    ids, pos = _batch(cfg.vocab_size)
    forward = _build(cfg, None, *overrides).train()
    dq_pass = _build(cfg, forward, "dsa.indexer_loss=dq_pass", *overrides).train()
    results = []
    for model in (forward, dq_pass):
        DSALossTracker.pop()
        model.zero_grad()
        loss = model(ids, pos, None, labels=ids).float().mean()
        before_backward = {k: len(v) for k, v in DSALossTracker.values.items()}
        loss.backward()
        counts = {k: len(v) for k, v in DSALossTracker.values.items()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, before_backward, counts, DSALossTracker.pop()))
    (loss_a, grads_a, _, counts_a, kl_a), (loss_b, grads_b, before_b, counts_b, kl_b) = results
    assert torch.equal(loss_a, loss_b)
    assert before_b == {} and counts_a == counts_b == {1: 1, 3: 1, 5: 1}
    for layer, value in kl_a.items():
        assert abs(kl_b[layer] - value) <= 1e-4 * abs(value), layer
    assert set(grads_a) == set(grads_b)
    for name, a in grads_a.items():
        err = ((grads_b[name] - a).norm() / a.norm().clamp_min(1e-30)).item()
        assert err < (1e-4 if ".indexer." in name else 1e-6), (name, err)
