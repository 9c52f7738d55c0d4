"""Lightning indexer top-k in Triton, memory-linear in the sequence length.

    I[b, i, j] = sum_h w[i, b, h] * relu(q[i, b, h, :] . k[j, b, :]),   top-k over visible j.

Two kernels per chunk of queries (see docs/kernels.md for the choice and its cost model):

1. `_index_score_kernel`: index scores of a block of BQ queries against key blocks of BK keys,
   written to a bounded fp32 buffer [chunk rows, sk]. The matrix-unit product is
   K [BK, D] x Q^T [D, BQ*H] (`KEYS_AS_M`, the default): a query's heads are adjacent columns,
   8 of them in each thread, so the sum over heads is mostly in-thread (2 shuffle rounds).
   The other orientation, [BQ*H, D] x [D, BK], orders its rows (head group, query, head in
   group) so that the 16 rows of an MMA warp tile belong to one query and the head sum stays
   inside a warp (3 shuffle rounds). Key blocks of one query block are split over several
   programs (grid axis 1): scores need no reduction across keys, so this is free parallelism.
2. `_topk_select_kernel`: exact radix selection per query row on the order-preserving int32
   key of the fp32 score: two 8-bit histogram passes over the row, then one compaction pass
   that writes every key above the 16-bit threshold prefix straight to the output and the
   (few) keys equal to it to a candidate list; the last two radix digits and the tie-break
   run on the candidates only (falling back to the whole row if they overflow `cand_cap`).

The score buffer holds `chunk` rows; `chunk` is chosen so the buffer fits a byte budget, so
peak memory is O(budget + S * topk), never S x S. Visibility is a contiguous key range per
query, [lo_i, hi_i), computed by `visible_ranges` from positions and document ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm52_train.kernels.common import empty, launch


# --------------------------------------------------------------------------------------------
# Visibility as per-query key ranges
# --------------------------------------------------------------------------------------------

def visible_ranges(sq: int, sk: int, device, q_pos=None, k_pos=None, q_doc=None, k_doc=None,
                   validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the visible keys as a half-open index range [lo, hi) (int32 [sq] each).

    Key j is visible to query i iff k_pos[j] <= q_pos[i] and k_doc[j] == q_doc[i]. This is a
    contiguous range when the keys are ordered by (document, position), which holds for
    packed sequences and for context-parallel all-gathered keys; `validate` checks it (one
    host sync) and raises otherwise."""
    if q_pos is None and k_pos is None and q_doc is None and k_doc is None:
        i = torch.arange(sq, device=device, dtype=torch.int64)
        hi = (i + (sk - sq) + 1).clamp(0, sk)
        return torch.zeros(sq, dtype=torch.int32, device=device), hi.to(torch.int32)
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc go together")
    if q_pos is None:
        q_pos = torch.arange(sq, device=device) + (sk - sq)
    if k_pos is None:
        k_pos = torch.arange(sk, device=device)
    q_pos, k_pos = q_pos.to(device=device, dtype=torch.int64), k_pos.to(device=device, dtype=torch.int64)
    if q_doc is None:
        if validate and sk > 1 and bool((k_pos[1:] < k_pos[:-1]).any()):
            raise ValueError("keys must be ordered by position (k_pos non-decreasing)")
        hi = torch.searchsorted(k_pos.contiguous(), q_pos.contiguous(), right=True)
        return torch.zeros(sq, dtype=torch.int32, device=device), hi.to(torch.int32)
    q_doc, k_doc = q_doc.to(device=device, dtype=torch.int64), k_doc.to(device=device, dtype=torch.int64)
    if validate:
        bad_range = bool((k_pos < 0).any() | (k_pos >= 2**31).any() | (k_doc < 0).any())
        if bad_range:
            raise ValueError("positions must lie in [0, 2^31) and document ids be >= 0")
    composite = (k_doc << 32) + k_pos
    if validate and sk > 1 and bool((composite[1:] < composite[:-1]).any()):
        raise ValueError("keys must be ordered by (document, position) for the Triton DSA kernels")
    lo = torch.searchsorted(k_doc.contiguous(), q_doc.contiguous(), right=False)
    hi = torch.searchsorted(composite.contiguous(), ((q_doc << 32) + q_pos).contiguous(), right=True)
    hi = torch.maximum(hi, lo)
    return lo.to(torch.int32), hi.to(torch.int32)


# --------------------------------------------------------------------------------------------
# Kernel 1: index scores into a bounded buffer
# --------------------------------------------------------------------------------------------

@triton.jit
def _index_score_kernel(
    Q, K, W, LO, HI, BUF,
    sq, sk, q0, rows,
    s_qs, s_qb, s_qh, s_ks, s_kb, s_ws, s_wb, s_wh,
    s_buf_b, s_buf_r,
    H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    SPLIT: tl.constexpr, L: tl.constexpr, KEYS_AS_M: tl.constexpr = False,
):
    qblk = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    r_loc = qblk * BQ + tl.arange(0, BQ)  # rows of this query block within the chunk
    qi = q0 + r_loc
    q_ok = (r_loc < rows) & (qi < sq)
    lo = tl.load(LO + qi, mask=q_ok, other=2147483647)
    hi = tl.load(HI + qi, mask=q_ok, other=0)
    kb_lo = tl.min(lo, 0) // BK
    kb_hi = (tl.max(hi, 0) + BK - 1) // BK
    kb0 = kb_lo + split * SPLIT
    kb1 = tl.minimum(kb_hi, kb0 + SPLIT)
    if kb0 < kb1:
        # Row r of the Q tile is (head group a, query qq, head-in-group l): an MMA warp tile of
        # 16 rows holds 16 heads of one query, so the head sum needs no cross-warp traffic.
        r = tl.arange(0, BQ * H)
        a = r // (BQ * L)
        qq = (r // L) % BQ
        head = a * L + (r % L)
        r_qi = q0 + qblk * BQ + qq
        r_ok = (qblk * BQ + qq < rows) & (r_qi < sq)
        d = tl.arange(0, D)
        q_row = Q + r_qi.to(tl.int64) * s_qs + b * s_qb + head * s_qh
        q = tl.load(q_row[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)
        w = tl.load(W + r_qi.to(tl.int64) * s_ws + b * s_wb + head * s_wh, mask=r_ok, other=0.0)
        buf_rows = BUF + b.to(tl.int64) * s_buf_b + r_loc.to(tl.int64) * s_buf_r
        for kb in range(kb0, kb1):
            j = kb * BK + tl.arange(0, BK)
            j_ok = j < sk
            k = tl.load(K + j.to(tl.int64)[:, None] * s_ks + b * s_kb + d[None, :],
                        mask=j_ok[:, None], other=0.0)
            if KEYS_AS_M:
                # [BK, BQ*H]: a query's heads are adjacent columns, mostly held by one thread.
                st = tl.dot(k, tl.trans(q))
                st = tl.maximum(st, 0.0) * w[None, :]
                st = tl.sum(tl.reshape(st, (BK, H // L, BQ, L)), axis=1)
                st = tl.sum(st, axis=2)  # [BK, BQ]
                tl.store(buf_rows[None, :] + j[:, None], st, mask=q_ok[None, :] & j_ok[:, None])
            else:
                s = tl.dot(q, tl.trans(k))  # [BQ*H, BK] fp32
                s = tl.maximum(s, 0.0) * w[:, None]
                s = tl.sum(tl.reshape(s, (H // L, BQ, L, BK)), axis=0)
                s = tl.sum(s, axis=1)  # [BQ, BK]
                tl.store(buf_rows[:, None] + j[None, :], s, mask=q_ok[:, None] & j_ok[None, :])


# --------------------------------------------------------------------------------------------
# Kernel 2: exact top-k per row by radix selection
# --------------------------------------------------------------------------------------------

@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same total order (for non-NaN values)."""
    ib = x.to(tl.int32, bitcast=True)
    return tl.where(ib < 0, ib ^ 0x7FFFFFFF, ib)


@triton.jit
def _threshold_bin(hist, need):
    """The largest bin b with count(bins >= b) >= need, and count(bins > b)."""
    bins = tl.arange(0, 256)
    total = tl.sum(hist, 0)
    suffix = total - tl.cumsum(hist, 0) + hist
    b = tl.max(tl.where(suffix >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > b, hist, 0), 0)
    return b, above


@triton.jit
def _topk_select_kernel(
    BUF, LO, HI, OUT, CAND,
    q0, rows, s_buf_b, s_buf_r, s_out_b, s_out_s, s_cand_b, s_cand_r,
    TOPK: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1)
    qi = q0 + r
    lo = tl.load(LO + qi)
    hi = tl.load(HI + qi)
    n = hi - lo
    out_row = OUT + b.to(tl.int64) * s_out_b + qi.to(tl.int64) * s_out_s
    offs = tl.arange(0, BLOCK)
    if n <= TOPK:
        for t in range(0, TOPK, BLOCK):
            o = t + offs
            tl.store(out_row + o, tl.where(o < n, lo + o, -1), mask=o < TOPK)
    else:
        row = BUF + b.to(tl.int64) * s_buf_b + r.to(tl.int64) * s_buf_r
        cand = CAND + b.to(tl.int64) * s_cand_b + r.to(tl.int64) * s_cand_r
        start = (lo // BLOCK) * BLOCK

        # Digit 1 (bits 31..24) over the row.
        hist = tl.zeros([256], tl.int32)
        for c in range(start, hi, BLOCK):
            j = c + offs
            m = (j >= lo) & (j < hi)
            key = _ordered_key(tl.load(row + j, mask=m, other=0.0))
            hist += tl.histogram((key >> 24) + 128, 256, mask=m)
        b1, above = _threshold_bin(hist, TOPK)
        need = TOPK - above
        p8 = b1 - 128

        # Digit 2 (bits 23..16) over the row, among keys with that top byte.
        hist = tl.zeros([256], tl.int32)
        for c in range(start, hi, BLOCK):
            j = c + offs
            m = (j >= lo) & (j < hi)
            key = _ordered_key(tl.load(row + j, mask=m, other=0.0))
            hist += tl.histogram((key >> 16) & 255, 256, mask=m & ((key >> 24) == p8))
        b2, above = _threshold_bin(hist, need)
        need = need - above
        p16 = p8 * 256 + b2

        # Compaction: keys above the 16-bit prefix are selected; keys on it become candidates.
        n_out = 0
        n_cand = 0
        for c in range(start, hi, BLOCK):
            j = c + offs
            m = (j >= lo) & (j < hi)
            k16 = _ordered_key(tl.load(row + j, mask=m, other=0.0)) >> 16
            sel = m & (k16 > p16)
            pos = n_out + tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(out_row + pos, j, mask=sel)
            n_out += tl.sum(sel.to(tl.int32), 0)
            cnd = m & (k16 == p16)
            cpos = n_cand + tl.cumsum(cnd.to(tl.int32), 0) - 1
            tl.store(cand + cpos, j, mask=cnd & (cpos < CAP))
            n_cand += tl.sum(cnd.to(tl.int32), 0)

        # Digits 3 and 4 on the candidates (or on the whole row if they overflowed CAP).
        use_cand = n_cand <= CAP
        src_n = tl.where(use_cand, n_cand, n)
        hist = tl.zeros([256], tl.int32)
        for t in range(0, src_n, BLOCK):
            o = t + offs
            mo = o < src_n
            j = tl.where(use_cand, tl.load(cand + o, mask=mo & use_cand, other=0), lo + o)
            key = _ordered_key(tl.load(row + j, mask=mo, other=0.0))
            hist += tl.histogram((key >> 8) & 255, 256, mask=mo & ((key >> 16) == p16))
        b3, above = _threshold_bin(hist, need)
        need = need - above
        p24 = p16 * 256 + b3
        hist = tl.zeros([256], tl.int32)
        for t in range(0, src_n, BLOCK):
            o = t + offs
            mo = o < src_n
            j = tl.where(use_cand, tl.load(cand + o, mask=mo & use_cand, other=0), lo + o)
            key = _ordered_key(tl.load(row + j, mask=mo, other=0.0))
            hist += tl.histogram(key & 255, 256, mask=mo & ((key >> 8) == p24))
        b4, above = _threshold_bin(hist, need)
        need = need - above
        thr = p24 * 256 + b4

        # Keys above the exact threshold, then the first `need` keys equal to it.
        n_eq = 0
        for t in range(0, src_n, BLOCK):
            o = t + offs
            mo = o < src_n
            j = tl.where(use_cand, tl.load(cand + o, mask=mo & use_cand, other=0), lo + o)
            key = _ordered_key(tl.load(row + j, mask=mo, other=0.0))
            on_prefix = mo & ((key >> 16) == p16)
            gt = on_prefix & (key > thr)
            pos = n_out + tl.cumsum(gt.to(tl.int32), 0) - 1
            tl.store(out_row + pos, j, mask=gt)
            n_out += tl.sum(gt.to(tl.int32), 0)
            eq = on_prefix & (key == thr)
            epos = n_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
            tl.store(out_row + (TOPK - need) + epos, j, mask=eq & (epos < need))
            n_eq += tl.sum(eq.to(tl.int32), 0)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

# Block shapes for the H100 (see docs/kernels.md): 128 keys x (8 queries x 32 heads) per
# product, 8 warps (two warpgroups of 64 keys), 3 pipeline stages of K (32 KB each) next to the
# stationary Q tile (64 KB): 228 registers, no spill, 164 KB of shared memory. 16 key blocks
# (2048 keys) per program amortise the Q tile load. Selection: 1024 scores per step, 4 warps.
SCORE_CFG = dict(BQ=8, BK=128, SPLIT=16, KEYS_AS_M=True, num_warps=8, num_stages=3)
SELECT_CFG = dict(BLOCK=1024, num_warps=4)


def indexer_topk_triton(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, topk: int,
                        lo: torch.Tensor, hi: torch.Tensor, budget_bytes: int = 1 << 30,
                        cand_cap: int = 4096, score_cfg: dict | None = None,
                        select_cfg: dict | None = None) -> torch.Tensor:
    """Top-k key indices per query, [b, sq, topk] int32 (-1 padded; unordered within a row).

    q [sq, b, H, D] (bf16/fp16/fp32), k [sk, b, D], w [sq, b, H] fp32; lo/hi [sq] int32 from
    `visible_ranges`. `budget_bytes` bounds the score buffer (plus candidate lists)."""
    sc = dict(SCORE_CFG, **(score_cfg or {}))
    se = dict(SELECT_CFG, **(select_cfg or {}))
    sq, b, H, D = q.shape
    sk = k.shape[0]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dimension")
    if H & (H - 1) or D & (D - 1):
        raise ValueError("index heads and head dim must be powers of two")
    w = w.float()
    out = empty((b, sq, topk), torch.int32, q.device)
    if sq == 0:
        return out
    if sk == 0:
        return out.fill_(-1)
    BQ, BK = sc["BQ"], sc["BK"]
    L = min(16, H)
    sk_pad = triton.cdiv(sk, 16) * 16
    cap = triton.cdiv(max(cand_cap, 16), 16) * 16
    per_row = b * 4 * (sk_pad + cap)
    chunk = max(BQ, (budget_bytes // per_row) // BQ * BQ)
    chunk = min(chunk, triton.cdiv(sq, BQ) * BQ)
    buf = empty((b, chunk, sk_pad), torch.float32, q.device)
    cand = empty((b, chunk, cap), torch.int32, q.device)
    lo = lo.to(device=q.device, dtype=torch.int32).contiguous()
    hi = hi.to(device=q.device, dtype=torch.int32).contiguous()
    n_kblocks = triton.cdiv(sk, BK)
    for q0 in range(0, sq, chunk):
        rows = min(chunk, sq - q0)
        grid = (triton.cdiv(rows, BQ), triton.cdiv(n_kblocks, sc["SPLIT"]), b)
        args = (q, k, w, lo, hi, buf, sq, sk, q0, rows,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                w.stride(0), w.stride(1), w.stride(2), buf.stride(0), buf.stride(1))
        meta = dict(H=H, D=D, BQ=BQ, BK=BK, SPLIT=sc["SPLIT"], L=L, KEYS_AS_M=sc["KEYS_AS_M"])
        tuned = dict(num_warps=sc["num_warps"], num_stages=sc["num_stages"])
        launch(_index_score_kernel, grid, args, meta, [tuned] + [dict(tuned, num_stages=s) for s in (2, 1)])
        _topk_select_kernel[(rows, b)](
            buf, lo, hi, out, cand, q0, rows, buf.stride(0), buf.stride(1),
            out.stride(0), out.stride(1), cand.stride(0), cand.stride(1),
            TOPK=topk, CAP=cap, BLOCK=se["BLOCK"], num_warps=se["num_warps"],
        )
    return out
