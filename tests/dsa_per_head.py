"""Per-head DSA attention in plain PyTorch: a test reference for the model's latent path.

The model computes MLA in its absorbed (MQA on the latent) form only; these functions compute
the same attention the way Megatron-Core's MLA lays it out, with per-head keys and values
(`MLASelfAttention.get_query_key_value_tensors`), and materialise [b, n, sq, sk] scores. The
shared primitives (visibility, index scores, top-k) come from `glm52_train.kernels.reference`.
"""

from __future__ import annotations

import torch

from glm52_train.kernels.reference import _acc


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention restricted to `allowed` ([sq, sk] or [b, sq, sk]).

    q: [sq, b, n, dk]; k: [sk, b, n, dk]; v: [sk, b, n, dv]. Returns [sq, b, n * dv] in q's
    dtype; the arithmetic is fp32."""
    sq, b, n, _ = q.shape
    acc = _acc(q)
    scores = torch.einsum("sbnd,tbnd->bnst", q.to(acc), k.to(acc)) * scale
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bnst,tbnd->sbnd", probs, v.to(acc))
    return out.reshape(sq, b, -1).to(q.dtype)


def head_summed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """The indexer's target: main-attention probabilities summed over heads and L1-normalised
    per query, [b, sq, sk] fp32 (no gradient). Heads split over tensor-parallel ranks are summed
    across `tp_group`."""
    with torch.no_grad():
        acc = _acc(q)
        scores = torch.einsum("sbnd,tbnd->bnst", q.to(acc), k.to(acc)) * scale
        if allowed.dim() == 2:
            allowed = allowed.unsqueeze(0)
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        target = torch.softmax(scores, dim=-1).sum(dim=1)
        if tp_group is not None and tp_group.size() > 1:
            torch.distributed.all_reduce(target, group=tp_group)
        return target / target.sum(dim=-1, keepdim=True)


def indexer_kl_loss(index_scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(index_scores)) on the `allowed` keys.

    Dense warm-up passes the causal mask; sparse training passes causal & selected, so both
    distributions live on the selected set (DeepSeek-V3.2, section 2.1)."""
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    log_q = torch.log_softmax(index_scores.masked_fill(~allowed, float("-inf")), dim=-1)
    p = target * allowed
    p = p / p.sum(dim=-1, keepdim=True)
    log_p = torch.log(p.clamp_min(1e-30))
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)
    return kl.mean()
