"""Plain-PyTorch references for the DSA kernels, written for clarity and float64-capable.

These are the functions the Triton kernels in this package compute, and the CPU path of
`glm52_train.kernels.api`. They materialise [b, sq, sk] (dense) or [b, sq, topk, dim]
(gathered) tensors, so they are for tests and small problems only. Every function computes in
float64 when given float64 inputs and in float32 otherwise.

Layout (Megatron, sequence first):
- indexer: q [sq, b, H, D], k [sk, b, D], w [sq, b, H] (already scaled);
- sparse MLA (MQA on the latent): q [sq, b, n, 576], kv [sk, b, 576], the first `v_dim`
  channels of kv are also the value; idx [b, sq, topk] with -1 for "no key";
- positions: key j is visible to query i iff k_pos[j] <= q_pos[i] (and k_doc[j] == q_doc[i]).
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the tests' references)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None = None,
                 k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (and same-document) visibility, [sq, sk] bool: key j is visible to query i when
    k_pos[j] <= q_pos[i] and both lie in the same document."""
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if q_doc is not None:
        allowed = allowed & (q_doc.unsqueeze(1) == k_doc.unsqueeze(0))
    return allowed


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
    mask.scatter_(-1, torch.where(idx < 0, num_keys, idx).long(), True)
    return mask[..., :num_keys]


def default_positions(sq: int, sk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries are the last `sq` of `sk` positions: q_pos = arange(sq) + sk - sq."""
    return torch.arange(sq, device=device) + (sk - sq), torch.arange(sk, device=device)


def visible(sq: int, sk: int, device, q_pos=None, k_pos=None, q_doc=None, k_doc=None) -> torch.Tensor:
    """[sq, sk] bool: key j visible to query i."""
    dq, dk = default_positions(sq, sk, device)
    q_pos = dq if q_pos is None else q_pos.to(device)
    k_pos = dk if k_pos is None else k_pos.to(device)
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc go together")
    return allowed_keys(q_pos, k_pos, q_doc, k_doc)


def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """I[b, i, j] = sum_h w[i, b, h] * relu(q[i, b, h] . k[j, b]), [b, sq, sk] (differentiable)."""
    acc = _acc(q)
    logits = torch.einsum("sbhd,tbd->bsht", q.to(acc), k.to(acc)).relu()
    return torch.einsum("bsht,sbh->bst", logits, w.to(acc))


def indexer_topk(q, k, w, topk: int, q_pos=None, k_pos=None, q_doc=None, k_doc=None) -> torch.Tensor:
    """Top-`topk` visible keys per query by index score, [b, sq, topk] int64, -1 padded."""
    sq, sk = q.shape[0], k.shape[0]
    allowed = visible(sq, sk, q.device, q_pos, k_pos, q_doc, k_doc)
    with torch.no_grad():
        return select_topk(index_scores(q, k, w), allowed.unsqueeze(0), topk)


def _gather_kv(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv [sk, b, d], idx [b, sq, topk] -> [b, sq, topk, d] (rows of -1 entries are row 0)."""
    b, d = kv.shape[1], kv.shape[2]
    safe = idx.clamp_min(0).long()
    kv_b = kv.permute(1, 0, 2)  # [b, sk, d]
    # index_select, not advanced indexing: its backward (index_add_) sums repeated keys in a
    # fixed order on CPU, so training on this path is bitwise reproducible (resume is exact)
    return torch.stack([kv_b[bi].index_select(0, safe[bi].reshape(-1)).view(*safe.shape[1:], d) for bi in range(b)])


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, v_dim: int = 512):
    """Sparse MQA attention on the latent. Returns (out [sq, b, n, v_dim], lse [b, n, sq]).

    out[i, h] = sum_{j in idx[i]} softmax_j(scale * q[i, h] . kv[j]) * kv[j, :v_dim]; a query with
    no valid index gets out = 0 and lse = -inf. Differentiable w.r.t. q and kv."""
    acc = _acc(q)
    keys = _gather_kv(kv.to(acc), idx)  # [b, sq, k, d]
    valid = (idx >= 0).unsqueeze(2)  # [b, sq, 1, k]
    s = torch.einsum("sbnd,bskd->bsnk", q.to(acc), keys) * scale
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, sq, n]
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~valid, 0.0)
    out = torch.einsum("bsnk,bskd->sbnd", p, keys[..., :v_dim])
    return out.to(q.dtype), lse.permute(0, 2, 1)


def sparse_mla_head_probs(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                          lse: torch.Tensor) -> torch.Tensor:
    """What the sparse attention's dq pass writes for the indexer loss (`sparse_mla_bwd(...,
    head_probs=)`): sum_h exp(scale * q[i, h] . kv[j] - lse[h, i]) per top-k slot, [b, sq, topk]
    (fp32, fp64 for fp64 inputs), 0 in -1 slots; `lse` [b, n, sq] from `sparse_mla`. No gradient."""
    acc = _acc(q)
    with torch.no_grad():
        keys = _gather_kv(kv.to(acc), idx)  # [b, sq, k, d]
        s = torch.einsum("sbnd,bskd->bsnk", q.to(acc), keys) * scale
        lse = lse.to(acc).permute(0, 2, 1).unsqueeze(-1)  # [b, sq, n, 1]
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), float("inf")))
        return p.sum(dim=2).masked_fill(idx < 0, 0.0)


def mla_lse(q, kv, idx, scale: float, q_pos=None, k_pos=None, q_doc=None, k_doc=None) -> torch.Tensor:
    """Log-sum-exp of the main attention scores, [b, n, sq]: over idx[i] (sparse) or over all
    visible keys (idx None, dense warm-up)."""
    with torch.no_grad():
        if idx is not None:
            return sparse_mla(q, kv, idx, scale)[1]
        acc = _acc(q)
        allowed = visible(q.shape[0], kv.shape[0], q.device, q_pos, k_pos, q_doc, k_doc)
        s = torch.einsum("sbnd,tbd->bnst", q.to(acc), kv.to(acc)) * scale
        return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)


def indexer_kl_loss(iq, ik, iw, q, kv, idx, scale: float, v_dim: int = 512,
                    q_pos=None, k_pos=None, q_doc=None, k_doc=None) -> torch.Tensor:
    """mean_i KL(p_i || softmax(I_i)) on the key set of query i.

    p_i: the main attention's probabilities averaged over heads (no gradient); the key set is
    idx[i] (sparse: -1 entries ignored, the rest taken as visible) or all visible keys (idx
    None). Gradients reach iq, ik, iw only.
    Queries with an empty key set contribute 0 (they still count in the mean)."""
    sq, b = iq.shape[:2]
    sk = ik.shape[0]
    acc = _acc(iq)
    if idx is not None:  # like sparse_mla, the selected set is taken as given
        allowed = selection_mask(idx.long(), sk)
    else:
        allowed = visible(sq, sk, iq.device, q_pos, k_pos, q_doc, k_doc).unsqueeze(0).expand(b, sq, sk)
    with torch.no_grad():
        s = torch.einsum("sbnd,tbd->bnst", q.to(acc), kv.to(acc)) * scale
        s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).mean(dim=1)  # [b, sq, sk]
    scores = index_scores(iq, ik, iw)
    log_q = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - log_q), torch.zeros_like(p))
    return kl.sum(dim=-1).mean()


def indexer_kl_from_probs(iq, ik, iw, idx, head_probs, num_heads: int) -> torch.Tensor:
    """`indexer_kl_loss` on the selected keys with the target given: p = head_probs / num_heads
    ([b, sq, topk], the attention probabilities summed over heads per top-k slot)."""
    acc = _acc(iq)
    valid = idx >= 0
    p = (head_probs.to(acc) / num_heads).masked_fill(~valid, 0.0)
    scores = index_scores(iq, ik, iw)  # [b, sq, sk]
    picked = scores.gather(-1, idx.clamp_min(0).long()).masked_fill(~valid, float("-inf"))
    log_q = torch.log_softmax(picked, dim=-1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - log_q), torch.zeros_like(p))
    return kl.sum(dim=-1).mean()


def dense_mla(q: torch.Tensor, kv: torch.Tensor, scale: float, v_dim: int = 512, q_pos=None, k_pos=None,
              q_doc=None, k_doc=None) -> torch.Tensor:
    """Dense MQA attention on the latent over every visible key (the DSA warm-up): out [sq, b,
    n, v_dim]. Differentiable; materialises the [sq, sk] visibility mask."""
    sq, b, n, _ = q.shape
    allowed = visible(sq, kv.shape[0], q.device, q_pos, k_pos, q_doc, k_doc)
    qh = q.permute(1, 2, 0, 3)  # [b, n, sq, d]
    k = kv.permute(1, 0, 2).unsqueeze(1).expand(b, n, -1, -1)
    v = kv[..., :v_dim].permute(1, 0, 2).unsqueeze(1).expand(b, n, -1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale)
    return out.permute(2, 0, 1, 3)
