"""Sparse MLA attention (MQA on the 576-dim latent) in Triton, forward and backward.

    out[i, h] = sum_{j in idx[i]} softmax_j(scale * q[i, h] . kv[j]) * kv[j, :DV]

q [sq, b, H, DV + DR] (H = 64 heads, DV = 512 latent = value, DR = 64 rope), kv [sk, b, DV + DR]
shared by all heads, idx [b, sq, topk] int32 (-1 = no key). One program handles one query
token and all its heads: the 64 heads are the M dimension of every matrix product, the
gathered keys (BK per step) the N (scores) or K (values) dimension.

Forward: online softmax in base 2; saves lse [b, H, sq] (natural log, -inf for a query with
no key). Backward: dq by a query-major kernel (dq in registers), dkv by a second query-major
kernel that scatters each query's [BK, 576] contribution into an fp32 buffer with atomic adds
(relaxed `red.global.add.f32`, non-deterministic summation order). The score path and the
value path are summed before the atomic, so each (query, key, channel) costs one atomic.
Both backward kernels recompute the scores; see docs/kernels.md for why the fused single
kernel is not the default (registers) and what the split costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm52_train.kernels.common import LOG2E, empty, launch


@triton.jit
def _fwd_kernel(
    Q, KV, IDX, OUT, LSE, topk, scale_log2,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_ib, s_is, s_os, s_ob, s_oh, s_lb, s_lh,
    H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BK: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, H)
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    q_row = Q + i.to(tl.int64) * s_qs + b * s_qb + h[:, None] * s_qh
    q_lat = tl.load(q_row + dv[None, :])
    q_rope = tl.load(q_row + DV + dr[None, :])
    m = tl.full([H], float("-inf"), tl.float32)
    l = tl.zeros([H], tl.float32)
    acc = tl.zeros([H, DV], tl.float32)
    idx_row = IDX + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is
    for t in range(0, topk, BK):
        offs = t + tl.arange(0, BK)
        j = tl.load(idx_row + offs, mask=offs < topk, other=-1)
        valid = j >= 0
        kv_row = KV + tl.where(valid, j, 0).to(tl.int64) * s_ks + b * s_kb
        k_lat = tl.load(kv_row[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
        k_rope = tl.load(kv_row[:, None] + DV + dr[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat))
        s = tl.dot(q_rope, tl.trans(k_rope), s)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(k_lat.dtype), k_lat, acc)
        m = m_new
    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    o_row = OUT + i.to(tl.int64) * s_os + b * s_ob + h[:, None] * s_oh
    tl.store(o_row + dv[None, :], out.to(OUT.dtype.element_ty))
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) * 0.6931471805599453)
    tl.store(LSE + b.to(tl.int64) * s_lb + h * s_lh + i, lse)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_os, s_ob, s_oh, s_dos, s_dob, s_doh, s_db, s_dh,
                  H: tl.constexpr, DV: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, H)
    dv = tl.arange(0, DV)
    o = tl.load(O + i.to(tl.int64) * s_os + b * s_ob + h[:, None] * s_oh + dv[None, :]).to(tl.float32)
    do = tl.load(DO + i.to(tl.int64) * s_dos + b * s_dob + h[:, None] * s_doh + dv[None, :]).to(tl.float32)
    tl.store(DELTA + b.to(tl.int64) * s_db + h * s_dh + i, tl.sum(o * do, 1))


@triton.jit
def _bwd_kernel(
    Q, KV, DO, IDX, LSE, DELTA, DQ, DKV, topk, scale, scale_log2,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_dos, s_dob, s_doh, s_ib, s_is, s_lb, s_lh,
    s_dqs, s_dqb, s_dqh, s_dks, s_dkb,
    H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BK: tl.constexpr,
    WANT_DQ: tl.constexpr, WANT_DKV: tl.constexpr,
):
    """dq (WANT_DQ) and/or the atomic dkv scatter (WANT_DKV) for one query token."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, H)
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    q_row = Q + i.to(tl.int64) * s_qs + b * s_qb + h[:, None] * s_qh
    q_lat = tl.load(q_row + dv[None, :])
    q_rope = tl.load(q_row + DV + dr[None, :])
    do = tl.load(DO + i.to(tl.int64) * s_dos + b * s_dob + h[:, None] * s_doh + dv[None, :])
    lse = tl.load(LSE + b.to(tl.int64) * s_lb + h * s_lh + i)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + b.to(tl.int64) * s_lb + h * s_lh + i)
    dq_lat = tl.zeros([H, DV], tl.float32)
    dq_rope = tl.zeros([H, DR], tl.float32)
    idx_row = IDX + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is
    for t in range(0, topk, BK):
        offs = t + tl.arange(0, BK)
        j = tl.load(idx_row + offs, mask=offs < topk, other=-1)
        valid = j >= 0
        jj = tl.where(valid, j, 0).to(tl.int64)
        kv_row = KV + jj * s_ks + b * s_kb
        k_lat = tl.load(kv_row[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
        k_rope = tl.load(kv_row[:, None] + DV + dr[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat))
        s = tl.dot(q_rope, tl.trans(k_rope), s)
        p = tl.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(k_lat))
        ds = (p * (dp - delta[:, None]) * scale).to(k_lat.dtype)
        if WANT_DQ:
            dq_lat = tl.dot(ds, k_lat, dq_lat)
            dq_rope = tl.dot(ds, k_rope, dq_rope)
        if WANT_DKV:
            # dkv[j]^T = q^T ds + do^T p (latent) and q_rope^T ds (rope), as [channel, key].
            dk_lat = tl.dot(tl.trans(q_lat), ds)
            dk_lat = tl.dot(tl.trans(do), p.to(k_lat.dtype), dk_lat)
            dk_rope = tl.dot(tl.trans(q_rope), ds)
            dkv_row = DKV + jj * s_dks + b * s_dkb
            tl.atomic_add(dkv_row[None, :] + dv[:, None], dk_lat, mask=valid[None, :], sem="relaxed")
            tl.atomic_add(dkv_row[None, :] + DV + dr[:, None], dk_rope, mask=valid[None, :], sem="relaxed")
    if WANT_DQ:
        dq_row = DQ + i.to(tl.int64) * s_dqs + b * s_dqb + h[:, None] * s_dqh
        tl.store(dq_row + dv[None, :], dq_lat.to(DQ.dtype.element_ty))
        tl.store(dq_row + DV + dr[None, :], dq_rope.to(DQ.dtype.element_ty))


# Launch configurations for the H100 (docs/kernels.md). Forward: 64 keys per step, 8 warps,
# 3 stages: 255 registers, no spill, 222 KB of shared memory (Q 72 KB + two 72 KB stages of
# gathered rows). Backward: 32 keys per step, 8 warps, 2 stages, the dq and dkv passes apart
# (552 B and 128 B of spill; the fused kernel spills 824 B).
FWD_CFG = dict(BK=64, num_warps=8, num_stages=3)
# Measured on an H100 (docs/benchmarks.md, 32K sweep): the dq pass with one stage ran 6% faster
# (211 ms against 224 ms); the fused kernel was 13% slower, BK=16 50% slower.
BWD_CFG = dict(BK=32, num_warps=8, num_stages=2, fused=False, dq_stages=1, dkv_stages=None)


def _check(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, v_dim: int):
    sq, b, n, d = q.shape
    if kv.shape[1:] != (b, d) or idx.shape[:2] != (b, sq):
        raise ValueError(f"shapes q {tuple(q.shape)}, kv {tuple(kv.shape)}, idx {tuple(idx.shape)} disagree")
    dr = d - v_dim
    for name, v in (("heads", n), ("v_dim", v_dim), ("rope dim", dr)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} = {v} must be a power of two for the Triton kernel")
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("q and kv need a contiguous last dimension")
    return sq, b, n, d, dr


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                   v_dim: int = 512, cfg: dict | None = None):
    """(out [sq, b, n, v_dim] in q's dtype, lse [b, n, sq] fp32)."""
    c = dict(FWD_CFG, **(cfg or {}))
    sq, b, n, d, dr = _check(q, kv, idx, v_dim)
    idx = idx.to(torch.int32).contiguous()
    topk = idx.shape[-1]
    out = empty((sq, b, n, v_dim), q.dtype, q.device)
    lse = empty((b, n, sq), torch.float32, q.device)
    if sq == 0:
        return out, lse
    args = (q, kv, idx, out, lse, topk, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1))
    tuned = dict(BK=c["BK"], num_warps=c["num_warps"], num_stages=c["num_stages"])
    launch(_fwd_kernel, (sq, b), args, dict(H=n, DV=v_dim, DR=dr), _smaller(tuned))
    return out, lse


def _smaller(tuned: dict) -> list[dict]:
    """`tuned`, then fewer pipeline stages, then half the keys per step (resource fallbacks)."""
    out = [tuned]
    for stages in range(tuned["num_stages"] - 1, 0, -1):
        out.append(dict(tuned, num_stages=stages))
    if tuned["BK"] > 16:
        out += [dict(tuned, BK=tuned["BK"] // 2, num_stages=s) for s in (2, 1)]
    return out


def sparse_mla_bwd(q, kv, idx, out, lse, dout, scale: float, v_dim: int = 512, cfg: dict | None = None):
    """(dq like q, dkv like kv)."""
    c = dict(BWD_CFG, **(cfg or {}))
    sq, b, n, d, dr = _check(q, kv, idx, v_dim)
    idx = idx.to(torch.int32).contiguous()
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    topk = idx.shape[-1]
    dq = empty(q.shape, q.dtype, q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    if sq == 0:
        return dq.zero_(), dkv.to(kv.dtype)
    delta = empty(lse.shape, torch.float32, lse.device)
    _delta_kernel[(sq, b)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), delta.stride(0), delta.stride(1),
        H=n, DV=v_dim, num_warps=4,
    )
    args = (q, kv, dout, idx, lse, delta, dq, dkv, topk, scale, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            dout.stride(0), dout.stride(1), dout.stride(2), idx.stride(0), idx.stride(1),
            lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
            dkv.stride(0), dkv.stride(1))
    meta = dict(H=n, DV=v_dim, DR=dr)

    def run(want_dq: bool, want_dkv: bool, stages: int):
        tuned = dict(BK=c["BK"], num_warps=c["num_warps"], num_stages=stages)
        launch(_bwd_kernel, (sq, b), args, dict(meta, WANT_DQ=want_dq, WANT_DKV=want_dkv), _smaller(tuned))

    if c["fused"]:
        run(True, True, c["num_stages"])
    else:
        run(True, False, c["dq_stages"] or c["num_stages"])
        run(False, True, c["dkv_stages"] or c["num_stages"])
    return dq, dkv.to(kv.dtype)


class SparseMLAFunction(torch.autograd.Function):
    """out = sparse_mla(q, kv, idx); lse is returned too (no gradient) for the indexer loss."""

    @staticmethod
    def forward(ctx, q, kv, idx, scale, v_dim, fwd_cfg=None, bwd_cfg=None):
        out, lse = sparse_mla_fwd(q, kv, idx, scale, v_dim, fwd_cfg)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.scale, ctx.v_dim, ctx.bwd_cfg = scale, v_dim, bwd_cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, idx, out, lse = ctx.saved_tensors
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, ctx.scale, ctx.v_dim, ctx.bwd_cfg)
        return dq, dkv, None, None, None, None, None
