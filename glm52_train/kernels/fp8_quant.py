"""Fused blockwise FP8 quantisation (glm52_train/model/fp8.py): one Triton program per 128x128
tile of a 2-D tensor reads the tile once and writes, as asked, its 1x128 quantisation (one
scale per row of the tile), its 128x1 quantisation (one scale per column) and/or its 128x128
quantisation (one scale for the tile), each as e4m3 bytes with power-of-two fp32 scales.

Why Triton and not `torch.compile` (inductor): a hand-written program holds the whole tile, so
both tilings come from one read of the input by construction; inductor splits the row amax,
the column amax and the casts into kernels of its own choosing, and recompiles per dynamic
shape (expert token counts vary every step: measured here 12-80 s per CPU compile). Triton's
interpreter runs this same kernel on the CPU for the tests.

The e4m3 bytes are built with integer and exact fp32 operations rather than Triton's float8
cast: Triton 3.6's interpreter rounds some values to e4m3 wrongly (124.32 -> 64), and building
the bits keeps the CPU test and the GPU on one code path. Every step is exact:
- the scale: `2^k`, the smallest power of two with amax <= 448 * 2^k, from amax's exponent and
  mantissa bits (448 = 1.75 * 2^8: k = e - 8, plus one when the mantissa exceeds 0.75);
  fp32-subnormal amax is first scaled by 2^64; a tile whose amax/448 would underflow fp32
  (amax <= 1.75 * 2^-142) gets the reference's 0.5 (all its values round to zero either way);
  an all-zero tile 1;
- x / 2^k as multiplications by powers of two (two when 2^-k exceeds fp32's range);
- round to nearest even on e4m3's grid (3 mantissa bits, smallest normal 2^-6, subnormal step
  2^-9): |v| scaled to [8, 16) (or by 2^9 below 2^-6) is rounded by adding and subtracting
  2^23, then the bits are read from the rounded value's fp32 exponent and mantissa.
The result is bit-exact with `glm52_train.model.fp8.quantize_reference` (tests/test_fp8.py runs
the interpreter). A tile holding inf or NaN gets a NaN scale (its dequantised values are NaN,
so a training step with them is skipped as non-finite); `fp8.quantize` refuses such input.

Not measured on a GPU yet (bench/fp8_quant.py, the `fp8_quant` check of bench/gpu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _scale_bits(amax):
    """(k, pre, post) with 2^k the power-of-two scale of each `amax` (fp32, >= 0, finite) and
    x * pre * post == x / 2^k exactly; zero tiles get k = 0."""
    tiny = amax < 1.1754943508222875e-38
    a = tl.where(tiny, amax * 18446744073709551616.0, amax)  # * 2^64: normal
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0)
    k = e - 8 + tl.where((bits & 0x7FFFFF) > 0x600000, 1, 0)
    k = tl.where(k < -149, -1, k)  # amax/448 underflows: the reference's 0.5
    k = tl.where(amax > 0, k, 0)
    # 2^-k as two factors in fp32's normal range: -k lies in [-135, 150]
    big = -k > 100
    pre = tl.where(big, 18446744073709551616.0, 1.0)  # 2^64
    post = ((tl.where(big, -k - 64, -k) + 127) << 23).to(tl.float32, bitcast=True)
    return k, pre, post


@triton.jit
def _pow2(k):
    """2^k in fp32 for k in [-149, 127] (subnormal below -126)."""
    normal = ((tl.maximum(k, -126) + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(k + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, sub)


@triton.jit
def _e4m3_bits(x, pre, post):
    """The e4m3 byte (as int32) of x / scale, rounded to nearest even; |x / scale| <= 448."""
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    v = tl.abs(x) * pre * post
    vb = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((vb >> 23) & 0xFF) - 127, -6)  # the binade, e4m3 subnormals share -6's step
    up = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3-e): the step to 1
    down = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = ((v * up + 8388608.0) - 8388608.0) * down  # round to nearest even on the grid
    rb = r.to(tl.int32, bitcast=True)
    re = (rb >> 23) & 0xFF
    normal = ((re - 120) << 3) | ((rb >> 20) & 7)
    subnormal = (r * 512.0).to(tl.int32)  # r = m * 2^-9, m in 0..7
    return sign | tl.where(re >= 121, normal, subnormal)


@triton.jit
def _bad(x):
    """1 where x is inf or NaN."""
    return ((x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000).to(tl.int32)


@triton.jit
def _quantize_kernel(x_ptr, rows, cols, stride_r, stride_c, starts, ends,
                     row_q, row_s, tok_q, tok_s, blk_q, blk_s,
                     ROW: tl.constexpr, TOK: tl.constexpr, BLK: tl.constexpr, SEG: tl.constexpr, B: tl.constexpr):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    gc = tl.cdiv(cols, B)
    if SEG:  # row tile pr covers rows [starts[pr], ends[pr]): token tiles restart at each segment
        r = tl.load(starts + pr) + tl.arange(0, B)
        rmask = r < tl.load(ends + pr)
    else:
        r = pr * B + tl.arange(0, B)
        rmask = r < rows
    c = pc * B + tl.arange(0, B)
    cmask = c < cols
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    bad = _bad(x)
    nan = float("nan")
    out = r[:, None] * cols + c[None, :]
    if ROW:
        amax = tl.max(tl.where(bad > 0, 0.0, a), axis=1)
        k, pre, post = _scale_bits(amax)
        s = tl.where(tl.max(bad, axis=1) > 0, nan, _pow2(k))
        tl.store(row_s + r * gc + pc, s, mask=rmask)
        tl.store(row_q + out, _e4m3_bits(x, pre[:, None], post[:, None]).to(tl.uint8), mask=mask)
    if TOK:
        amax = tl.max(tl.where(bad > 0, 0.0, a), axis=0)
        k, pre, post = _scale_bits(amax)
        s = tl.where(tl.max(bad, axis=0) > 0, nan, _pow2(k))
        tl.store(tok_s + pr * cols + c, s, mask=cmask)
        tl.store(tok_q + out, _e4m3_bits(x, pre[None, :], post[None, :]).to(tl.uint8), mask=mask)
    if BLK:
        amax = tl.max(tl.max(tl.where(bad > 0, 0.0, a), axis=1), axis=0)
        k, pre, post = _scale_bits(amax)
        s = tl.where(tl.max(tl.max(bad, axis=1), axis=0) > 0, nan, _pow2(k))
        tl.store(blk_s + pr * gc + pc, s)
        tl.store(blk_q + out, _e4m3_bits(x, pre, post).to(tl.uint8), mask=mask)


def segment_tiles(sizes: list[int]) -> tuple[list[int], list[int], list[int]]:
    """For consecutive row segments of `sizes` rows: each 128-row tile's (start, end) row, tiles
    starting afresh at every segment, and each segment's first tile index (plus the total)."""
    starts, ends, first = [], [], [0]
    at = 0
    for n in sizes:
        starts += range(at, at + n, BLOCK)
        ends += [at + n] * len(range(at, at + n, BLOCK))
        at += n
        first.append(len(starts))
    return starts, ends, first


def quantize_tiles(x: torch.Tensor, row: bool = False, token: bool = False, block: bool = False,
                   segments: list[int] | None = None):
    """One launch over the 2-D `x`: for each tiling asked, (e4m3 data [rows, cols], fp32 scales)
    with scales [rows, C/128] (1x128), [R/128, cols] (128x1) or [R/128, C/128] (128x128);
    None for a tiling not asked. `segments`: row counts of consecutive segments (the local
    experts' token chunks) whose 128x1 tiles must not mix: R/128 is then the tiles of
    `segment_tiles`, and 128x128 tiles are not offered."""
    rows, cols = x.shape
    gr, gc = triton.cdiv(rows, BLOCK), triton.cdiv(cols, BLOCK)
    dev = x.device
    seg = segments is not None
    if seg:
        if block or sum(segments) != rows:
            raise ValueError("segments are for 1x128 / 128x1 tiles and must add up to the rows")
        starts, ends, _ = segment_tiles(segments)
        gr = len(starts)
        bounds = torch.tensor([starts, ends], dtype=torch.int32).to(dev, non_blocking=True)

    def buffers(on, scale_shape):
        if not on:
            return None, None
        return torch.empty(rows, cols, dtype=torch.uint8, device=dev), torch.empty(scale_shape, dtype=torch.float32,
                                                                                  device=dev)

    rq, rs = buffers(row, (rows, gc))
    tq, ts = buffers(token, (gr, cols))
    bq, bs = buffers(block, (gr, gc))
    if rows and cols:
        dummy = torch.empty(1, dtype=torch.uint8, device=dev)
        dummy_s = torch.empty(1, dtype=torch.float32, device=dev)
        dummy_i = bounds[0] if seg else torch.empty(1, dtype=torch.int32, device=dev)
        _quantize_kernel[(gr, gc)](x, rows, cols, x.stride(0), x.stride(1),
                                   dummy_i, bounds[1] if seg else dummy_i,
                                   rq if row else dummy, rs if row else dummy_s,
                                   tq if token else dummy, ts if token else dummy_s,
                                   bq if block else dummy, bs if block else dummy_s,
                                   ROW=row, TOK=token, BLK=block, SEG=seg, B=BLOCK)
    else:
        for s in (rs, ts, bs):
            if s is not None:
                s.fill_(1.0)

    def pair(q, s):
        return None if q is None else (q.view(torch.float8_e4m3fn), s)

    return pair(rq, rs), pair(tq, ts), pair(bq, bs)
