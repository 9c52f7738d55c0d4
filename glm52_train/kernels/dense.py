"""Dense causal attention in MLA's per-head form, through PyTorch's scaled_dot_product_attention.

    runs = dense_runs(sq, sk, device, **visibility)   # once per layout: where each query looks
    out = dense_attention(q, k, v, scale, runs)      # q, k [s, b, n, 256], v [sk, b, n, 256]

This is `dsa.mode: dense` (GLM-5's pre-DSA stage), the main attention of `dsa.mode: warmup`, and
`dsa.mode: sparse` wherever top-k covers every visible key (see model/dsa.py).

Per-head form, not the absorbed one: q and k have qk_nope + rope = 192 + 64 channels and v 256
(GLM-5.2), against 576 / 512 shared latent channels for the absorbed MQA the sparse kernels run:
about half the FLOPs per (query, key) pair, and the shape cuDNN / flash attention kernels take.

Packed documents and context parallelism without an S x S buffer: the keys (gathered from
every CP rank, see sequence.py) are in sample order, so the keys a query sees are one contiguous
range, [start of its document, its own index]. Consecutive local queries of one document form a
*run* whose keys are one range ending at the run's last query: the run attends causally with
the diagonal in the lower-right corner (`torch.nn.attention.bias.causal_lower_right`, which
SDPA's flash / efficient / cuDNN kernels take without a mask tensor; a plain `is_causal` when
the run starts its document). One SDPA call per run: a plain sequence is one run, a packed
sample one per document, a CP rank's two chunks one or two per document they cut. Why this and
not the alternatives: nested / varlen SDPA would still need each CP chunk's queries cut per
document and offset into it (the runs above) and is not on every backend (CPU), and
FlexAttention's block masks are memory-linear only under torch.compile; runs need neither, at
one host synchronisation per layout (the run bounds, shared by the layers) and one kernel launch
per run, which costs little beside the attention unless documents are very short. Unmeasured on
a GPU so far (`bench/gpu.py`'s `train_step_dense`). On CPU, SDPA runs its CPU kernels (the math
path where q/k and v head sizes differ, as in `tiny`, which forms each run's scores).

Departure: SDPA's public API does not return the log-sum-exp, so the warm-up's indexer KL
recomputes it (`api.mla_lse`, blockwise on the Triton path) instead of reusing the attention's.
"""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function
from torch.nn.attention.bias import causal_lower_right

from glm52_train.kernels.reference import default_positions

Run = tuple[int, int, int, int]  # queries [q0, q1) attend keys [k0, k1), lower-right causal


def dense_runs(sq: int, sk: int, device, q_pos=None, k_pos=None, q_doc=None, k_doc=None) -> list[Run]:
    """The runs of `sq` local queries over `sk` keys in sample order (k_pos = arange(sk));
    visibility as in `kernels.api` (key j visible to query i iff j <= q_pos[i], same document)."""
    dq, dk = default_positions(sq, sk, device)
    q_pos = dq if q_pos is None else q_pos.to(device)
    if k_pos is not None and not torch.equal(k_pos.to(device), dk):
        raise ValueError("dense attention needs the keys in sample order (k_pos = arange(sk))")
    if q_doc is None:
        starts = torch.zeros_like(q_pos)
        new_doc = torch.zeros_like(q_pos, dtype=torch.bool)
    else:
        k_doc = k_doc.to(device)
        first = torch.ones(sk, dtype=torch.bool, device=device)
        first[1:] = k_doc[1:] != k_doc[:-1]
        doc_start = torch.cummax(torch.where(first, dk, torch.zeros_like(dk)), dim=0).values
        starts = doc_start[q_pos]
        q_doc = q_doc.to(device)
        new_doc = torch.zeros_like(q_pos, dtype=torch.bool)
        new_doc[1:] = q_doc[1:] != q_doc[:-1]
    breaks = torch.ones(sq, dtype=torch.bool, device=device)
    breaks[1:] = (q_pos[1:] != q_pos[:-1] + 1) | new_doc[1:]
    begin = torch.nonzero(breaks).flatten()
    end = torch.cat([begin[1:], begin.new_tensor([sq])])
    bounds = torch.stack([begin, end, starts[begin], q_pos[end - 1] + 1]).tolist()  # one sync
    return [tuple(r) for r in zip(*bounds)]


def max_visible(runs: list[Run]) -> int:
    """The most keys any query sees (its run's last query sees the whole key range)."""
    return max((k1 - k0 for _, _, k0, k1 in runs), default=0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    runs: list[Run]) -> torch.Tensor:
    """q [sq, b, n, dqk], k [sk, b, n, dqk], v [sk, b, n, dv] -> out [sq, b, n, dv] over each
    query's visible keys (differentiable). Queries that see no key cannot occur (a query sees
    itself). Labelled `glm52::dense attention` in profiles (training/profile.py)."""
    with record_function("glm52::dense attention"):
        return _dense_attention(q, k, v, scale, runs)


def _dense_attention(q, k, v, scale: float, runs: list[Run]) -> torch.Tensor:
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
    outs = []
    for q0, q1, k0, k1 in runs:
        lq, lk = q1 - q0, k1 - k0
        qs, ks, vs = qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1]
        if lq == lk:
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=causal_lower_right(lq, lk), scale=scale)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.permute(2, 0, 1, 3)
