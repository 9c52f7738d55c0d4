"""DeepSeek Sparse Attention in plain PyTorch: the reference path (CPU, tests, fallback).

Everything here is written for clarity, in fp32, and materialises [batch, sq, sk] score
matrices: memory grows with S^2. The Triton kernels in `glm52_train/kernels` compute the same
functions in memory linear in S and are checked against these (and against float64).

Layouts follow Megatron-Core: sequence first. `q_pos` / `k_pos` are the absolute positions of
the local queries and keys (they differ from `arange` under context parallelism), and the
optional `q_doc` / `k_doc` ids keep packed documents apart.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the tests' references)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def allowed_keys(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (and same-document) visibility, [sq, sk] bool: key j is visible to query i when
    k_pos[j] <= q_pos[i] and both lie in the same document."""
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if q_doc is not None:
        allowed = allowed & (q_doc.unsqueeze(1) == k_doc.unsqueeze(0))
    return allowed


def lightning_index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I[b, i, j] = sum_h w[i, h] * relu(q[i, h] . k[j]).

    q: [sq, b, H, D]; k: [sk, b, D]; w: [sq, b, H] (already scaled). Returns fp32 [b, sq, sk].
    """
    acc = _acc(q)
    logits = torch.einsum("sbhd,tbd->bsht", q.to(acc), k.to(acc)).relu_()
    return torch.einsum("bsht,sbh->bst", logits, w.to(acc))


def select_topk(scores: torch.Tensor, allowed: torch.Tensor, topk: int) -> torch.Tensor:
    """The indices of the `topk` highest visible scores per query, [b, sq, topk] int64.

    Slots beyond the number of visible keys hold -1 (a query at position 10 has 11 keys).
    Equal scores (common: the ReLU zeroes every head for some keys) go to the earlier key, so
    the selection depends only on the keys' order, not on what else shares the sequence (a
    packed sample selects what each document would alone)."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    k = min(topk, scores.shape[-1])
    values, idx = masked.sort(dim=-1, descending=True, stable=True)
    values, idx = values[..., :k], idx[..., :k]
    idx = idx.masked_fill(values == float("-inf"), -1)
    if k < topk:
        pad = idx.new_full((*idx.shape[:-1], topk - k), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def selection_mask(idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[b, sq, topk] indices (-1 = none) -> [b, sq, num_keys] bool."""
    mask = torch.zeros(*idx.shape[:-1], num_keys + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, num_keys, idx), True)
    return mask[..., :num_keys]


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
