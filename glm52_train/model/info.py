"""Parameter and FLOP counts of a GLM-5.2 config, computed from the numbers (no model built).

`tests/test_info.py` checks these counts against a meta-device build of the model.

Conventions:
- `total_params` counts the decoder, embeddings and output head, without the MTP layer(s), which
  are reported separately (`mtp_params`, their own weights; they share the embedding and head).
- `active_params` is what one token touches, without the input embedding (a lookup, not a
  matmul): every non-expert weight, the shared experts and `moe_topk` routed experts per MoE
  layer, and the output head.
- FLOPs count multiply-adds as 2. Attention is counted as DSA computes it: each query attends
  to min(top-k, visible keys) keys in every layer, and each full (F) layer's indexer scores the
  query against every visible key, so the indexer is the one term that grows with the context.
  Training = 3x forward for weights and sparse attention (backward is two GEMMs per forward GEMM);
  the indexer's dense scoring pass runs forward only (its KL loss and gradient use the top-k set).
- Per `dsa.mode`: ``dense`` attends to every visible key and does no indexer work; ``warmup``
  attends to every visible key and its indexer KL covers them all (no top-k scoring pass);
  ``sparse`` as above, except where the sequence is at most top-k long: then it takes the dense
  path (model/dsa.py), with no top-k scoring pass and the KL over every visible key. Attention
  pairs are counted at MLA's per-head dims (q.k 192 + 64, v 256), what the dense path computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from glm52_train.config import ModelConfig


def _attention_params(m: ModelConfig, indexer: bool) -> int:
    qk = m.qk_head_dim
    p = m.hidden_size * m.q_lora_rank + m.q_lora_rank  # q_a + q_a_layernorm
    p += m.q_lora_rank * m.num_heads * qk  # q_b
    p += m.hidden_size * (m.kv_lora_rank + m.qk_rope_dim) + m.kv_lora_rank  # kv_a + norm
    p += m.kv_lora_rank * m.num_heads * (m.qk_nope_dim + m.v_head_dim)  # kv_b
    p += m.num_heads * m.v_head_dim * m.hidden_size  # o_proj
    if indexer:
        p += m.q_lora_rank * m.index_heads * m.index_head_dim  # wq_b
        p += m.hidden_size * m.index_head_dim + 2 * m.index_head_dim  # wk + LayerNorm
        p += m.hidden_size * m.index_heads  # weights_proj
    return p


def _mlp_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn


def _layer_params(m: ModelConfig, moe: bool, indexer: bool) -> tuple[int, int]:
    """(total, active) parameters of one decoder layer."""
    norms = 2 * m.hidden_size
    attn = _attention_params(m, indexer)
    if not moe:
        mlp = _mlp_params(m.hidden_size, m.dense_ffn_size)
        return norms + attn + mlp, norms + attn + mlp
    expert = _mlp_params(m.hidden_size, m.moe_ffn_size)
    router = m.num_experts * m.hidden_size
    shared = m.num_shared_experts * expert
    total = norms + attn + router + shared + m.num_experts * expert
    active = norms + attn + router + shared + m.moe_topk * expert
    return total, active


@dataclass
class ModelInfo:
    name: str
    total_params: int
    active_params: int
    embedding_params: int
    output_params: int
    mtp_params: int
    mtp_active_params: int
    layers: int
    dense_layers: int
    moe_layers: int
    indexer_layers: int
    shared_index_layers: int
    index_pattern: str
    layout: str
    seq_len: int
    forward_flops_per_token: float
    train_flops_per_token: float
    flops_breakdown: dict  # the forward's terms: they add up to forward_flops_per_token
    train_flops_breakdown: dict  # the training step's terms: they add up to train_flops_per_token
    dense_attention_fwd_equivalent: float  # what dense attention would cost (counted in neither)
    architecture: dict  # widths, heads, experts, top-k, MTP: the numbers the counts come from
    dsa_mode: str = "sparse"  # the dsa.mode the attention FLOPs are counted for

    def to_dict(self) -> dict:
        return asdict(self)


def attention_keys_per_query(seq_len: int, topk: int) -> tuple[float, float]:
    """Mean over positions 0..S-1 of (visible keys, attended keys = min(top-k, visible))."""
    visible = (seq_len + 1) / 2
    if seq_len <= topk:
        attended = visible
    else:
        # positions < topk attend to all visible keys, later ones to topk
        attended = (topk * (topk + 1) / 2 + (seq_len - topk) * topk) / seq_len
    return visible, attended


def model_info(m: ModelConfig, seq_len: int = 4096, dsa_mode: str = "sparse") -> ModelInfo:
    if dsa_mode not in ("sparse", "warmup", "dense"):
        raise ValueError(f"dsa_mode must be sparse, warmup or dense, not {dsa_mode!r}")
    m.validate()
    pattern = m.layer_index_pattern
    total = active = 0
    for i in range(m.num_layers):
        t, a = _layer_params(m, m.is_moe_layer(i), pattern[i] == "F")
        total += t
        active += a
    emb = m.vocab_size * m.hidden_size
    out = 0 if m.tie_embeddings else emb
    final_norm = m.hidden_size
    total += emb + out + final_norm
    active += out + final_norm
    mtp_layer_t, mtp_layer_a = _layer_params(m, m.num_moe_layers > 0, True)
    mtp_extra = 3 * m.hidden_size + 2 * m.hidden_size * m.hidden_size  # enorm, hnorm, final norm, eh_proj
    mtp_total = m.mtp_layers * (mtp_layer_t + mtp_extra)
    mtp_active = m.mtp_layers * (mtp_layer_a + mtp_extra)

    visible, attended = attention_keys_per_query(seq_len, m.index_topk)
    dense_path = dsa_mode != "sparse" or seq_len <= m.index_topk
    if dense_path:
        attended = visible
    scored = 0.0 if dense_path else visible  # keys the indexer scores for the top-k, per query
    kl_keys = 0.0 if dsa_mode == "dense" else attended  # keys of the indexer's KL, per query
    per_head = m.qk_head_dim + m.v_head_dim
    attn_fwd = 2 * m.num_heads * per_head * attended * m.num_layers
    n_full = pattern.count("F")
    indexer_fwd = 2 * m.index_heads * m.index_head_dim * scored * n_full
    indexer_loss = 2 * m.index_heads * m.index_head_dim * kl_keys * n_full
    dense_equiv = 2 * m.num_heads * per_head * visible * m.num_layers
    matmul_fwd = 2 * active
    mtp_fwd = m.mtp_steps * (2 * mtp_active + 2 * m.num_heads * per_head * attended
                             + 2 * m.index_heads * m.index_head_dim * scored + 2 * out)
    forward = matmul_fwd + attn_fwd + indexer_fwd
    train = 3 * (matmul_fwd + attn_fwd) + indexer_fwd + 3 * indexer_loss + 3 * mtp_fwd
    breakdown = {
        "weights_fwd": matmul_fwd,
        "attention_fwd": attn_fwd,
        "indexer_fwd": indexer_fwd,
    }
    train_breakdown = {
        "weights_and_attention_fwd_bwd": 3 * (matmul_fwd + attn_fwd),
        "indexer_fwd": indexer_fwd,
        "indexer_loss_fwd_bwd": 3 * indexer_loss,
        "mtp_fwd_bwd": 3 * mtp_fwd,
    }
    layout = "".join("D" if not m.is_moe_layer(i) else "M" for i in range(m.num_layers))
    architecture = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_heads=m.num_heads, q_lora_rank=m.q_lora_rank,
        kv_lora_rank=m.kv_lora_rank, qk_nope_dim=m.qk_nope_dim, qk_rope_dim=m.qk_rope_dim, v_head_dim=m.v_head_dim,
        dense_ffn_size=m.dense_ffn_size, num_experts=m.num_experts, moe_topk=m.moe_topk,
        num_shared_experts=m.num_shared_experts, moe_ffn_size=m.moe_ffn_size, index_topk=m.index_topk,
        index_heads=m.index_heads, index_head_dim=m.index_head_dim, mtp_layers=m.mtp_layers, mtp_steps=m.mtp_steps,
    )
    return ModelInfo(
        name=m.name,
        total_params=total,
        active_params=active,
        embedding_params=emb,
        output_params=out,
        mtp_params=mtp_total,
        mtp_active_params=mtp_active,
        layers=m.num_layers,
        dense_layers=m.num_dense_layers,
        moe_layers=m.num_moe_layers,
        indexer_layers=n_full,
        shared_index_layers=pattern.count("S"),
        index_pattern=pattern,
        layout=layout,
        seq_len=seq_len,
        forward_flops_per_token=forward,
        train_flops_per_token=train,
        flops_breakdown=breakdown,
        train_flops_breakdown=train_breakdown,
        dense_attention_fwd_equivalent=dense_equiv,
        architecture=architecture,
        dsa_mode=dsa_mode,
    )


_ROW_NAMES = {
    "weights_fwd": "weights (2 x active params)",
    "attention_fwd": "attention (top-k or all keys)",
    "indexer_fwd": "indexer scoring (all keys)",
    "weights_and_attention_fwd_bwd": "3 x (weights + attention)",
    "indexer_loss_fwd_bwd": "3 x indexer KL loss (its key set)",
    "mtp_fwd_bwd": "3 x MTP forward",
}


def format_info(info: ModelInfo) -> str:
    def b(n: float) -> str:
        return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"

    def flops(n: float) -> str:
        return f"{n / 1e9:,.2f} G" if n >= 1e8 else f"{n / 1e6:,.2f} M"

    a = info.architecture
    mtp = (f"{a['mtp_layers']} layer(s) over {a['mtp_steps']} step(s), each a full "
           f"{'MoE' if info.moe_layers else 'dense'} layer with its own indexer" if a["mtp_steps"] else "none")
    lines = [
        f"model              {info.name}",
        f"layers             {info.layers}: {info.dense_layers} dense + {info.moe_layers} MoE  [{info.layout}] "
        "(D dense MLP, M mixture of experts)",
        f"hidden size        {a['hidden_size']:,}, vocabulary {a['vocab_size']:,}",
        f"attention          MLA, {a['num_heads']} heads: query rank {a['q_lora_rank']}, key-value rank "
        f"{a['kv_lora_rank']}, qk {a['qk_nope_dim']}+{a['qk_rope_dim']} rope, v {a['v_head_dim']}",
        f"DSA                top-{a['index_topk']:,} keys per query; indexer {a['index_heads']} heads x "
        f"{a['index_head_dim']}",
        f"IndexShare         {info.indexer_layers} full + {info.shared_index_layers} shared  [{info.index_pattern}] "
        "(F runs its indexer, S reuses the last F's top-k)",
        f"MoE                {a['num_experts']} routed experts, top-{a['moe_topk']}, + {a['num_shared_experts']} "
        f"shared; expert width {a['moe_ffn_size']:,}, dense MLP width {a['dense_ffn_size']:,}",
        f"MTP                {mtp}",
        f"total params       {info.total_params:,} ({b(info.total_params)}; MTP excluded)",
        f"active params      {info.active_params:,} ({b(info.active_params)} per token, input embedding excluded)",
        f"embedding params   {info.embedding_params:,} (+ output head {info.output_params:,})",
        f"MTP params         {info.mtp_params:,} ({b(info.mtp_params)}; shares embedding and head)",
        f"FLOPs/token @ {info.seq_len} tokens, dsa.mode {info.dsa_mode} (a multiply-add is 2 FLOPs)",
        f"  forward                              {flops(info.forward_flops_per_token)}  (main model, = the rows below)",
    ]
    lines += [f"    {_ROW_NAMES[k]:<34} {flops(v)}" for k, v in info.flops_breakdown.items()]
    lines.append(f"  train                                {flops(info.train_flops_per_token)}  "
                 "(forward + backward, MTP included, = the rows below)")
    lines += [f"    {_ROW_NAMES[k]:<34} {flops(v)}" for k, v in info.train_flops_breakdown.items()]
    lines.append(f"  dense attention would be             {flops(info.dense_attention_fwd_equivalent)}  "
                 "(forward, all keys; counted in neither)")
    return "\n".join(lines)
