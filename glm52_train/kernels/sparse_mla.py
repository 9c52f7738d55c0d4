"""Sparse MLA attention (MQA on the 576-dim latent) in Triton, forward and backward.

    out[i, h] = sum_{j in idx[i]} softmax_j(scale * q[i, h] . kv[j]) * kv[j, :DV]

q [sq, b, H, DV + DR] (H = 64 heads, DV = 512 latent = value, DR = 64 rope), kv [sk, b, DV + DR]
shared by all heads, idx [b, sq, topk] int32 (-1 = no key). One program handles one query
token and all its heads: the heads are the M dimension of every matrix product, the
gathered keys (BK per step) the N (scores) or K (values) dimension.

Forward: online softmax in base 2; saves lse [b, H, sq] (natural log, -inf for a query with
no key). Backward: dq by a query-major kernel (dq in registers), dkv by a second query-major
kernel that scatters each query's [BK, 576] contribution into an fp32 buffer with atomic adds
(relaxed `red.global.add.f32`, non-deterministic summation order). The score path and the
value path are summed before the atomic, so each (query, key, channel) costs one atomic.
Both backward kernels recompute the scores; see docs/kernels.md for why the fused single
kernel is not the default (registers) and what the split costs.

Without atomics (`cfg["atomic"] = False`, deterministic): the same dq kernel, then dkv
key-major (`_dkv_key_major_kernel`): one program per 16 consecutive keys loops over the
queries that chose any of them (`invert_selection`, built once per top-k tensor) and writes its
rows once. Fewer than 16 heads (8 per rank at TP8) run padded to 16 rows (`padded_heads`).
The dq pass can also write the head-summed probabilities per top-k slot (`head_probs`) for the
indexer loss (`indexer_loss.indexer_kl_from_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glm52_train.kernels.common import LOG2E, empty, launch


@triton.jit
def _fwd_kernel(
    Q, KV, IDX, OUT, LSE, topk, scale_log2,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_ib, s_is, s_os, s_ob, s_oh, s_lb, s_lh,
    H: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BK: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, HP)
    hm = h < H
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    q_row = Q + i.to(tl.int64) * s_qs + b * s_qb + h[:, None] * s_qh
    q_lat = tl.load(q_row + dv[None, :], mask=hm[:, None], other=0.0)
    q_rope = tl.load(q_row + DV + dr[None, :], mask=hm[:, None], other=0.0)
    m = tl.full([HP], float("-inf"), tl.float32)
    l = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, DV], tl.float32)
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
    tl.store(o_row + dv[None, :], out.to(OUT.dtype.element_ty), mask=hm[:, None])
    lse = tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) * 0.6931471805599453)
    tl.store(LSE + b.to(tl.int64) * s_lb + h * s_lh + i, lse, mask=hm)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_os, s_ob, s_oh, s_dos, s_dob, s_doh, s_db, s_dh,
                  H: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, HP)
    hm = h < H
    dv = tl.arange(0, DV)
    o = tl.load(O + i.to(tl.int64) * s_os + b * s_ob + h[:, None] * s_oh + dv[None, :], mask=hm[:, None], other=0.0)
    do = tl.load(DO + i.to(tl.int64) * s_dos + b * s_dob + h[:, None] * s_doh + dv[None, :], mask=hm[:, None],
                 other=0.0)
    tl.store(DELTA + b.to(tl.int64) * s_db + h * s_dh + i, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=hm)


@triton.jit
def _bwd_kernel(
    Q, KV, DO, IDX, LSE, DELTA, DQ, DKV, PSUM, topk, scale, scale_log2,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_dos, s_dob, s_doh, s_ib, s_is, s_lb, s_lh,
    s_dqs, s_dqb, s_dqh, s_dks, s_dkb,
    H: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BK: tl.constexpr,
    WANT_DQ: tl.constexpr, WANT_DKV: tl.constexpr, WANT_PSUM: tl.constexpr,
):
    """dq (WANT_DQ) and/or the atomic dkv scatter (WANT_DKV) for one query token; with
    WANT_PSUM also the attention probabilities summed over the heads, per top-k slot (laid out
    like idx), for the indexer loss."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.arange(0, HP)
    hm = h < H
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    q_row = Q + i.to(tl.int64) * s_qs + b * s_qb + h[:, None] * s_qh
    q_lat = tl.load(q_row + dv[None, :], mask=hm[:, None], other=0.0)
    q_rope = tl.load(q_row + DV + dr[None, :], mask=hm[:, None], other=0.0)
    do = tl.load(DO + i.to(tl.int64) * s_dos + b * s_dob + h[:, None] * s_doh + dv[None, :], mask=hm[:, None],
                 other=0.0)
    lse = tl.load(LSE + b.to(tl.int64) * s_lb + h * s_lh + i, mask=hm, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + b.to(tl.int64) * s_lb + h * s_lh + i, mask=hm, other=0.0)
    dq_lat = tl.zeros([HP, DV], tl.float32)
    dq_rope = tl.zeros([HP, DR], tl.float32)
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
        if WANT_PSUM:  # padded head rows have p = 1 (zero q, lse 0): left out
            tl.store(PSUM + b.to(tl.int64) * s_ib + i.to(tl.int64) * s_is + offs,
                     tl.sum(tl.where(hm[:, None], p, 0.0), 0), mask=offs < topk)
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
        tl.store(dq_row + dv[None, :], dq_lat.to(DQ.dtype.element_ty), mask=hm[:, None])
        tl.store(dq_row + DV + dr[None, :], dq_rope.to(DQ.dtype.element_ty), mask=hm[:, None])


@triton.jit
def _dkv_key_major_kernel(
    Q, KV, DO, LSE, DELTA, DKV, OFFSETS, QUERIES, MASKS, sk, n_blocks, scale, scale_log2,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_dos, s_dob, s_doh, s_lb, s_lh, s_dks, s_dkb,
    H: tl.constexpr, HP: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BKEY: tl.constexpr,
    HC: tl.constexpr,
):
    """dkv of BKEY consecutive keys, no atomics: loops over the queries that chose any of them
    (the inverted selection, ascending query order), HC heads at a time (a query's 64 x 1088
    rows at once would need ~290 KB of shared memory), and writes each key row once."""
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    dv = tl.arange(0, DV)
    dr = tl.arange(0, DR)
    slot = tl.arange(0, BKEY)
    keys = blk * BKEY + slot
    key_ok = keys < sk
    kv_row = KV + tl.where(key_ok, keys, 0).to(tl.int64) * s_ks + b * s_kb
    k_lat = tl.load(kv_row[:, None] + dv[None, :], mask=key_ok[:, None], other=0.0)
    k_rope = tl.load(kv_row[:, None] + DV + dr[None, :], mask=key_ok[:, None], other=0.0)
    acc_lat = tl.zeros([BKEY, DV], tl.float32)
    acc_rope = tl.zeros([BKEY, DR], tl.float32)
    start = tl.load(OFFSETS + pid)
    end = tl.load(OFFSETS + pid + 1)
    for u in range(start, end):
        i = tl.load(QUERIES + u).to(tl.int64)
        chosen = ((tl.load(MASKS + u) >> slot) & 1) != 0
        for hc in tl.static_range(0, HP, HC):
            h = hc + tl.arange(0, HC)
            hm = h < H
            q_row = Q + i * s_qs + b * s_qb + h[:, None] * s_qh
            q_lat = tl.load(q_row + dv[None, :], mask=hm[:, None], other=0.0)
            q_rope = tl.load(q_row + DV + dr[None, :], mask=hm[:, None], other=0.0)
            do = tl.load(DO + i * s_dos + b * s_dob + h[:, None] * s_doh + dv[None, :], mask=hm[:, None],
                         other=0.0)
            lse = tl.load(LSE + b.to(tl.int64) * s_lb + h * s_lh + i, mask=hm, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + b.to(tl.int64) * s_lb + h * s_lh + i, mask=hm, other=0.0)
            s = tl.dot(q_lat, tl.trans(k_lat))
            s = tl.dot(q_rope, tl.trans(k_rope), s)
            p = tl.exp2(s * scale_log2 - lse2[:, None])
            p = tl.where(chosen[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(k_lat))
            ds = (p * (dp - delta[:, None]) * scale).to(k_lat.dtype)
            # dkv[j] = sum over (query, head) of ds q + p do (latent), ds q_rope (rope)
            acc_lat = tl.dot(tl.trans(ds), q_lat, acc_lat)
            acc_lat = tl.dot(tl.trans(p.to(k_lat.dtype)), do, acc_lat)
            acc_rope = tl.dot(tl.trans(ds), q_rope, acc_rope)
    out_row = DKV + tl.where(key_ok, keys, 0).to(tl.int64) * s_dks + b * s_dkb
    tl.store(out_row[:, None] + dv[None, :], acc_lat.to(DKV.dtype.element_ty), mask=key_ok[:, None])
    tl.store(out_row[:, None] + DV + dr[None, :], acc_rope.to(DKV.dtype.element_ty), mask=key_ok[:, None])


@dataclass(frozen=True)
class InvertedSelection:
    """The top-k selection read key-major: for each block of `block` consecutive keys (per
    sample), the queries that chose at least one of them, ascending, and which ones.

    queries [U] int32 and masks [U] int32 (bit t: key block * block + t was chosen) for the U
    distinct (key block, query) pairs, U <= the number of selected pairs; offsets [b *
    n_blocks + 1] int32 into them. Memory: 8 bytes per distinct pair (at most 8 * topk bytes
    per query, twice the int32 top-k itself) plus 4 per key block; `nbytes` has it. Built by
    `invert_selection` in O(S * top-k); a function of the indices only, so the IndexShare
    layers that attend with the same top-k can share it (`api.sparse_mla(..., inverse=)`)."""

    queries: torch.Tensor
    masks: torch.Tensor
    offsets: torch.Tensor
    num_queries: int
    num_keys: int
    block: int

    @property
    def n_blocks(self) -> int:
        return -(-self.num_keys // self.block)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.queries, self.masks, self.offsets))


def invert_selection(idx: torch.Tensor, num_keys: int, block: int = 16) -> InvertedSelection:
    """[b, sq, topk] indices (-1 = none) -> the `InvertedSelection` over `num_keys` keys.

    One stable sort of the (query, slot) pairs by key block (int32 keys, int64 permutation):
    the pairs come in query-major order, so each block's queries stay ascending; empty slots
    sort last and are cut off. Transient memory about 30 bytes per top-k slot (the sorted
    blocks, the permutation, query, bit, run starts and a prefix sum of the bits).
    Deterministic: an integer sort, prefix sums and a binary search."""
    if not 16 <= block <= 31:
        raise ValueError(f"key block = {block} must be in 16..31 (one int32 bit per key, tl.dot N >= 16)")
    b, sq, topk = idx.shape
    dev = idx.device
    n_blocks = -(-num_keys // block)
    if b * n_blocks >= 2**31 - 1 or b * sq * topk >= 2**31:
        raise ValueError(f"{b} x {n_blocks} key blocks or {b * sq * topk} slots overflow int32")
    idx = idx.to(torch.int32)
    sample = torch.arange(b, dtype=torch.int32, device=dev).view(b, 1, 1) * n_blocks
    group = torch.where(idx >= 0, sample + idx // block, b * n_blocks).reshape(-1)
    group, order = torch.sort(group, stable=True)
    query = ((order // topk) % sq).to(torch.int32)
    bit = torch.bitwise_left_shift(torch.ones((), dtype=torch.int32, device=dev), idx.reshape(-1)[order] % block)
    del order
    new = torch.ones(group.numel(), dtype=torch.bool, device=dev)
    if group.numel() > 1:
        new[1:] = (group[1:] != group[:-1]) | (query[1:] != query[:-1])
    first = torch.nonzero(new).squeeze(1)
    del new
    bounds = torch.arange(b * n_blocks + 1, dtype=torch.int32, device=dev)
    offsets = torch.searchsorted(group[first].contiguous(), bounds).to(torch.int32)
    runs = int(offsets[-1])  # runs past this one are the empty slots'
    # a run's mask: the sum (= OR: the bits differ) of its bits, from a prefix sum (no scatter)
    prefix = torch.cumsum(bit, 0, dtype=torch.int64)
    last = torch.cat([first[1:], first.new_tensor([group.numel()])])[:runs] - 1
    first = first[:runs]
    masks = (prefix[last] - prefix[first] + bit[first]).to(torch.int32)
    return InvertedSelection(query[first].contiguous(), masks, offsets, sq, num_keys, block)


# Launch configurations for the H100 (docs/kernels.md). Forward: 64 keys per step, 8 warps,
# 3 stages: 255 registers, no spill, 222 KB of shared memory (Q 72 KB + two 72 KB stages of
# gathered rows). Backward: 32 keys per step, 8 warps, 2 stages, the dq and dkv passes apart
# (552 B and 128 B of spill; the fused kernel spills 824 B).
FWD_CFG = dict(BK=64, num_warps=8, num_stages=3)
# Measured on an H100 (docs/benchmarks.md, 32K sweep): the dq pass with one stage ran 6% faster
# (211 ms against 224 ms); the fused kernel was 13% slower, BK=16 50% slower.
BWD_CFG = dict(BK=32, num_warps=8, num_stages=2, fused=False, dq_stages=1, dkv_stages=None)
# atomic=False: the deterministic backward (dq as above, dkv key-major over the inverted
# selection, BKEY keys per program, HC heads of a query per step). Compiled for sm_90 on a CPU
# machine: 255 registers, 552 B of spill, 54 KB of shared memory, mma.sync (M = 16 rows);
# all 64 heads per step would need ~290 KB. Unmeasured on a GPU.
KEY_MAJOR_CFG = dict(BKEY=16, HC=16, num_warps=8, num_stages=2)


def padded_heads(n: int) -> int:
    """Heads as the M side of tl.dot: at least 16 (Hopper's wgmma minimum); fewer heads per
    rank (8 at TP8) run with masked zero rows, at the cost of 16-head FLOPs."""
    return max(16, n)


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
    launch(_fwd_kernel, (sq, b), args, dict(H=n, HP=padded_heads(n), DV=v_dim, DR=dr), _smaller(tuned))
    return out, lse


def _smaller(tuned: dict) -> list[dict]:
    """`tuned`, then fewer pipeline stages, then half the keys per step (resource fallbacks)."""
    out = [tuned]
    for stages in range(tuned["num_stages"] - 1, 0, -1):
        out.append(dict(tuned, num_stages=stages))
    if tuned["BK"] > 16:
        out += [dict(tuned, BK=tuned["BK"] // 2, num_stages=s) for s in (2, 1)]
    return out


def sparse_mla_bwd(q, kv, idx, out, lse, dout, scale: float, v_dim: int = 512, cfg: dict | None = None,
                   inverse: InvertedSelection | None = None, head_probs: torch.Tensor | None = None):
    """(dq like q, dkv like kv). cfg["atomic"] False: dkv key-major without atomics (bitwise
    reproducible) over `inverse` (built here from idx when None). `head_probs` (fp32, idx's
    shape, contiguous): filled by the dq pass with sum_h p[i, h, slot], the indexer loss's
    target times the head count (`indexer_loss.indexer_kl_from_probs`)."""
    c = {**BWD_CFG, "atomic": True, **(cfg or {})}
    unknown = set(c) - set(BWD_CFG) - {"atomic", "BKEY", "HC", "key_major_warps", "key_major_stages"}
    if unknown:
        raise ValueError(f"unknown backward settings {sorted(unknown)}")
    sq, b, n, d, dr = _check(q, kv, idx, v_dim)
    idx = idx.to(torch.int32).contiguous()
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    topk = idx.shape[-1]
    dq = empty(q.shape, q.dtype, q.device)
    if sq == 0:
        return dq.zero_(), torch.zeros_like(kv)
    atomic = c["atomic"]
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if atomic else empty(kv.shape, kv.dtype, kv.device)
    delta = empty(lse.shape, torch.float32, lse.device)
    _delta_kernel[(sq, b)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), delta.stride(0), delta.stride(1),
        H=n, HP=padded_heads(n), DV=v_dim, num_warps=4,
    )
    if head_probs is not None and (head_probs.shape != idx.shape or head_probs.dtype != torch.float32
                                   or not head_probs.is_contiguous()):
        raise ValueError(f"head_probs must be a contiguous fp32 tensor of idx's shape {tuple(idx.shape)}")
    psum = dq if head_probs is None else head_probs
    args = (q, kv, dout, idx, lse, delta, dq, dkv, psum, topk, scale, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            dout.stride(0), dout.stride(1), dout.stride(2), idx.stride(0), idx.stride(1),
            lse.stride(0), lse.stride(1), dq.stride(0), dq.stride(1), dq.stride(2),
            dkv.stride(0), dkv.stride(1))
    meta = dict(H=n, HP=padded_heads(n), DV=v_dim, DR=dr)

    def run(want_dq: bool, want_dkv: bool, stages: int):
        tuned = dict(BK=c["BK"], num_warps=c["num_warps"], num_stages=stages)
        flags = dict(WANT_DQ=want_dq, WANT_DKV=want_dkv, WANT_PSUM=want_dq and head_probs is not None)
        launch(_bwd_kernel, (sq, b), args, dict(meta, **flags), _smaller(tuned))

    if not atomic:
        run(True, False, c["dq_stages"] or c["num_stages"])
        _dkv_key_major(q, kv, dout, lse, delta, dkv, scale, idx, inverse, meta, c)
        return dq, dkv
    if c["fused"]:
        run(True, True, c["num_stages"])
    else:
        run(True, False, c["dq_stages"] or c["num_stages"])
        run(False, True, c["dkv_stages"] or c["num_stages"])
    return dq, dkv.to(kv.dtype)


def _dkv_key_major(q, kv, dout, lse, delta, dkv, scale, idx, inverse, meta, c):
    sk, b = kv.shape[0], kv.shape[1]
    block = c.get("BKEY", KEY_MAJOR_CFG["BKEY"])
    if inverse is None:
        inverse = invert_selection(idx, sk, block)
    if (inverse.num_keys, inverse.num_queries, inverse.block) != (sk, idx.shape[1], block) \
            or inverse.offsets.numel() != b * inverse.n_blocks + 1:
        raise ValueError(f"the inverted selection ({inverse.num_queries} queries, {inverse.num_keys} keys, "
                         f"blocks of {inverse.block}) was built for other indices")
    args = (q, kv, dout, lse, delta, dkv, inverse.offsets, inverse.queries, inverse.masks, sk, inverse.n_blocks,
            scale, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
            dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
            dkv.stride(0), dkv.stride(1))
    stages = c.get("key_major_stages", KEY_MAJOR_CFG["num_stages"])
    tuned = dict(num_warps=c.get("key_major_warps", KEY_MAJOR_CFG["num_warps"]), num_stages=stages)
    configs = [tuned] + [dict(tuned, num_stages=s) for s in range(stages - 1, 0, -1)]
    hc = min(meta["HP"], c.get("HC", KEY_MAJOR_CFG["HC"]))
    launch(_dkv_key_major_kernel, (b * inverse.n_blocks,), args, dict(meta, BKEY=block, HC=hc), configs)


class SparseMLAFunction(torch.autograd.Function):
    """out = sparse_mla(q, kv, idx); lse is returned too (no gradient) for the indexer loss."""

    @staticmethod
    def forward(ctx, q, kv, idx, scale, v_dim, fwd_cfg=None, bwd_cfg=None, inverse=None):
        out, lse = sparse_mla_fwd(q, kv, idx, scale, v_dim, fwd_cfg)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.scale, ctx.v_dim, ctx.bwd_cfg, ctx.inverse = scale, v_dim, bwd_cfg, inverse
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, idx, out, lse = ctx.saved_tensors
        inverse = ctx.inverse() if callable(ctx.inverse) else ctx.inverse
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, ctx.scale, ctx.v_dim, ctx.bwd_cfg, inverse)
        return dq, dkv, None, None, None, None, None, None
