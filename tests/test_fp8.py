"""Blockwise FP8 (`train.fp8: blockwise`, glm52_train/model/fp8.py) on the CPU: the quantisation
against e4m3's error bound and against an independent float64 rounding, the linear's three
GEMMs against a float64 quantise-then-matmul reference, what tensor-parallel sharding does to
it, where the spec puts FP8, and the run config's sentences."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from glm52_train.config import ConfigError
from glm52_train.model.fp8 import (
    ROW_TILE,
    TOKEN_TILE,
    WEIGHT_TILE,
    fp8_linear,
    invalidate_fp8_weights,
    power_of_two_scale,
    quantize,
    quantize_reference,
    quantize_segments,
    quantize_tilings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TILES = {"1x128": ROW_TILE, "128x1": TOKEN_TILE, "128x128": WEIGHT_TILE}
# full tiles, tails smaller than 128 in either dimension, a single element, fewer rows than a tile
SHAPES = [(256, 384), (300, 200), (1, 1), (7, 129), (129, 7), (128, 127)]


def wide_range(shape, seed):
    """Values over ten decades, so tiles hold both normal and subnormal e4m3 values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(shape, generator=g, dtype=torch.float64) * 10 - 6)


def tiles(x: torch.Tensor, tile) -> torch.Tensor:
    """x in float64, zero-padded to whole tiles, viewed [row tiles, tr, column tiles, tc]."""
    tr, tc = tile
    rows, cols = x.shape
    gr, gc = -(-rows // tr), -(-cols // tc)
    blocks = torch.zeros(gr * tr, gc * tc, dtype=torch.float64)
    blocks[:rows, :cols] = x.double()
    return blocks.view(gr, tr, gc, tc)


def reference_quantize(x: torch.Tensor, tile) -> torch.Tensor:
    """Independent float64 quantise-dequantise: per tile, s = 2^ceil(log2(amax/448)) from Python
    floats, then round-to-nearest-even onto e4m3's grid (3 mantissa bits, smallest normal
    2^-6, subnormal spacing 2^-9) without torch's float8 cast."""
    blocks = tiles(x, tile)
    amax = blocks.abs().amax(dim=(1, 3)).flatten().tolist()
    s = torch.tensor([1.0 if a == 0 else 2.0 ** math.ceil(math.log2(a / 448.0)) for a in amax],
                     dtype=torch.float64).view(blocks.shape[0], 1, blocks.shape[2], 1)
    rows, cols = x.shape
    tr, tc = tile
    gr, gc = blocks.shape[0], blocks.shape[2]
    v = blocks / s
    ulp = 2.0 ** (torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6))) - 3)
    return (torch.round(v / ulp) * ulp * s).view(gr * tr, gc * tc)[:rows, :cols]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tile", list(TILES), ids=str)
def test_round_trip_within_e4m3_bound(tile, shape):
    x = wide_range(shape, seed=shape[0] * 1000 + shape[1]).float()
    q = quantize(x, TILES[tile])
    tr, tc = TILES[tile]
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape
    assert q.scale.shape == (-(-shape[0] // tr), -(-shape[1] // tc))
    # power-of-two scales that put each tile's amax in (224, 448]
    mantissa, _ = torch.frexp(q.scale)
    assert torch.all(mantissa == 0.5)
    scale = q.scale.repeat_interleave(tr, 0)[: shape[0]].repeat_interleave(tc, 1)[:, : shape[1]]
    amax = tiles(x, TILES[tile]).abs().amax(dim=(1, 3))
    assert torch.all((amax / q.scale > 224) & (amax / q.scale <= 448))
    # e4m3's bound: half a unit in the last place, 2^-4 relative for normal values, 2^-10 * s below
    error = (q.dequantize().double() - x.double()).abs()
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, scale.double() * 2.0 ** -10)
    assert torch.all(error <= bound)
    # and exactly the independent float64 rounding
    assert torch.equal(q.dequantize().double(), reference_quantize(x, TILES[tile]))


def test_zero_tiles_and_empty_tensors():
    x = torch.zeros(3, 200)
    x[1, 150] = 5.0
    q = quantize(x, ROW_TILE)
    assert q.scale.tolist() == [[1.0, 1.0], [1.0, 2.0 ** -6], [1.0, 1.0]]
    assert torch.equal(q.dequantize(), x)
    assert quantize(torch.zeros(0, 64), ROW_TILE).dequantize().shape == (0, 64)
    assert power_of_two_scale(torch.tensor([448.0, 448.5, 224.0, 1e-30])).tolist() == [1.0, 2.0, 0.5, 2.0 ** -108]


def reference_linear(x, w, dy):
    """float64 quantise-then-matmul: y = q(x) q(W)^T, dx = q(dy) q(W), dW = q_t(dy)^T q_t(x)
    with q along the contraction (1x128; W 128x128) and q_t along tokens (128x1)."""
    w_q = reference_quantize(w, WEIGHT_TILE)
    y = reference_quantize(x, ROW_TILE) @ w_q.t()
    dx = reference_quantize(dy, ROW_TILE) @ w_q
    dw = reference_quantize(dy, TOKEN_TILE).t() @ reference_quantize(x, TOKEN_TILE)
    return y, dx, dw


def test_fp8_linear_forward_and_gradients_match_float64_reference():
    tokens, k, n = 200, 300, 160  # tails in every dimension
    x = wide_range((tokens, k), 1).float().requires_grad_()
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05).requires_grad_()
    dy = torch.randn(tokens, n, generator=torch.Generator().manual_seed(3))
    y = fp8_linear(x.view(10, 20, k), w).view(tokens, n)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = reference_linear(x.detach().double(), w.detach().double(), dy.double())
    for got, want in ((y, ref_y), (x.grad, ref_dx), (w.grad, ref_dw)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # the reference is not the unquantised product: the test sees the quantisation
    exact = x.detach().double() @ w.detach().double().t()
    assert (ref_y - exact).abs().max() > 1e-3 * exact.abs().max()


def test_tensor_parallel_shards_on_and_off_tile_boundaries():
    """Column-parallel (W split by output rows) and row-parallel (split along the contraction),
    emulated in one process. Shards on 128 boundaries form the same tiles as the whole matrix:
    outputs and weight gradients are bitwise those of one process, the summed partial products
    equal up to fp32 summation order. A shard cut inside a tile (at 64) gives each half its own
    amax; with power-of-two scales that moves the scale by a power of two, which rounds every
    value in e4m3's normal range identically: only values below 2^-6 of the larger scale (e4m3
    subnormals, 2^15 under the tile's amax) round differently, by at most 2^-9 of that scale."""
    tokens, k, n = 128, 256, 256
    g = torch.Generator().manual_seed(4)
    # rows of W and columns of x over five decades, so that half a tile has its own amax
    x = (torch.randn(tokens, k, generator=g) * 10 ** (5 * torch.rand(k, generator=g))).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 10 ** (5 * torch.rand(n, 1, generator=g))).requires_grad_()
    dy = torch.randn(tokens, n, generator=torch.Generator().manual_seed(6))
    y = fp8_linear(x, w)
    y.backward(dy)
    full = (y.detach(), x.grad.clone(), w.grad.clone())

    def column(split):
        xs = x.detach().clone().requires_grad_()
        parts = [w.detach()[:split].clone().requires_grad_(), w.detach()[split:].clone().requires_grad_()]
        outs = [fp8_linear(xs, p) for p in parts]
        torch.autograd.backward(outs, [dy[:, :split], dy[:, split:]])
        return torch.cat([o.detach() for o in outs], 1), xs.grad, torch.cat([p.grad for p in parts], 0)

    def row(split):
        xs = [x.detach()[:, :split].clone().requires_grad_(), x.detach()[:, split:].clone().requires_grad_()]
        ws = [w.detach()[:, :split].clone().requires_grad_(), w.detach()[:, split:].clone().requires_grad_()]
        out = fp8_linear(xs[0], ws[0]) + fp8_linear(xs[1], ws[1])
        out.backward(dy)
        return out.detach(), torch.cat([a.grad for a in xs], 1), torch.cat([a.grad for a in ws], 1)

    y_c, dx_c, dw_c = column(128)
    assert torch.equal(y_c, full[0]) and torch.equal(dw_c, full[2])
    assert torch.allclose(dx_c, full[1], rtol=1e-5, atol=1e-5)
    y_r, dx_r, dw_r = row(128)
    assert torch.equal(dx_r, full[1]) and torch.equal(dw_r, full[2])
    assert torch.allclose(y_r, full[0], rtol=1e-5, atol=1e-4)

    # off tile boundaries: per element, only e4m3 subnormals of the whole tile's scale move
    w_big = w.detach().clone()
    w_big[64:128] *= 2.0 ** 12  # the tile's amax in its second half: the first half's scale drops
    whole = quantize(w_big, WEIGHT_TILE)
    half = quantize(w_big[:64], WEIGHT_TILE)
    s = whole.scale.repeat_interleave(128, 0)[:64].repeat_interleave(128, 1)
    moved = half.dequantize() != whole.dequantize()[:64]
    assert moved.any() and torch.all(w_big[:64].abs()[moved] < 2.0 ** -6 * s[moved])
    assert torch.all((half.dequantize() - whole.dequantize()[:64]).abs() <= 2.0 ** -9 * s)
    # and so the GEMMs differ, slightly (here the row-parallel y, whose x tiles are cut); the
    # column-parallel dW cannot change (its tiles run along tokens)
    diffs = [((got - want).abs().max() / want.abs().max()).item() for got, want in zip(column(64) + row(64), full + full)]
    assert diffs[2] == 0 and diffs[3] > 0 and max(diffs) < 1e-4, diffs


def test_spec_puts_fp8_in_the_parallel_and_expert_linears_only(single_process):
    from glm52_train.config import get_model_config
    from glm52_train.model import fp8
    from glm52_train.model.build import build_model
    from glm52_train.run_config import RunConfig

    run = RunConfig()
    run.train.fp8 = "blockwise"
    model = build_model(get_model_config("tiny"), run)
    kinds = {name: type(m) for name, m in model.named_modules()}
    fp8_names = {n for n, t in kinds.items() if t in (fp8.FP8ColumnParallelLinear, fp8.FP8RowParallelLinear)}
    layer = "decoder.layers.1."
    for part in ("self_attention.linear_q_up_proj", "self_attention.linear_proj", "mlp.experts.local_experts.0.linear_fc1",
                 "mlp.experts.local_experts.7.linear_fc2", "mlp.shared_experts.linear_fc1"):
        assert layer + part in fp8_names
    assert "decoder.layers.0.mlp.linear_fc2" in fp8_names and kinds[layer + "mlp.experts"] is fp8.FP8SequentialMLP
    for name in fp8_names:  # never the embedding, output head, router, norms, indexer or down projections
        assert not any(k in name for k in ("embedding", "output_layer", "router", "norm", "indexer", "down_proj"))
    assert "output_layer" in kinds and kinds["output_layer"].__name__ == "ColumnParallelLinear"
    # the parameters (and so checkpoints) are the bf16 model's
    plain = build_model(get_model_config("tiny"), RunConfig())
    def shapes(m):
        return {k: getattr(v, "shape", None) for k, v in m.state_dict().items()}

    assert shapes(model) == shapes(plain)


def adversarial_cases() -> dict[str, torch.Tensor]:
    """Inputs where a fused quantiser could depart from the reference: zeros and -0.0, fp32
    subnormals and tiles whose amax/448 underflows fp32, amax exactly at and just above
    448 * 2^k, amax in a tile's last row/column and in a partial tail, e4m3 rounding ties,
    bf16 input and a transposed (non-contiguous) view."""
    g = torch.Generator().manual_seed(7)
    cases = {f"wide{r}x{c}": wide_range((r, c), r + c).float() for r, c in ((256, 384), (300, 200), (7, 129))}
    z = torch.zeros(130, 260)
    z[0, :5] = -0.0
    z[129, 259] = 3.0  # the tails' only non-zero, at their last element
    z[127, 127] = -7.5  # amax at the full tile's corner
    cases["zeros_and_edges"] = z
    tiny = torch.randn(129, 256, generator=g)
    tiny[:, :128] *= 1e-40  # fp32 subnormal tiles
    tiny[:64, 128:] *= 2.0 ** -142 / tiny[:64, 128:].abs().max() * 1.75  # amax/448 exactly 2^-150
    tiny[64:128, 128:] *= 2.0 ** -141 / tiny[64:128, 128:].abs().max()
    tiny[128, 200] = 2.0 ** -126  # smallest normal as a tail's amax
    cases["fp32_subnormals"] = tiny
    edge = torch.randn(128, 384, generator=g).abs() * 100
    edge[:, 0] = 448.0  # amax exactly 448: scale 1
    edge[:, 128] = 448.0 * 1.0000001  # just above: scale 2
    edge[:, 256] = 224.0  # exactly 448 * 2^-1
    ties = torch.arange(8, 16, 0.5).repeat(7)  # halfway between e4m3 grid points in [8, 16)
    edge[0, 257:257 + ties.numel()] = ties
    edge[1, 257:270] = torch.tensor([2.0 ** -7 * k for k in range(13)])  # e4m3 subnormal steps and ties
    cases["amax_and_ties"] = edge
    cases["bf16"] = (torch.randn(200, 256, generator=g) * 30).bfloat16()
    cases["transposed"] = wide_range((300, 130), 9).float().t()
    return cases


def kernel_matches_reference() -> None:
    """Run in a fresh process with TRITON_INTERPRET=1 (Triton picks interpret or compile when it
    is first imported): the fused kernel against `quantize_reference`, byte for byte."""
    failures = []
    for name, x in adversarial_cases().items():
        got = quantize_tilings(x, row=True, token=True, block=True, impl="triton")
        for q, tile in zip(got, (ROW_TILE, TOKEN_TILE, WEIGHT_TILE)):
            want = quantize_reference(x, tile)
            if not (torch.equal(q.data.view(torch.uint8), want.data.view(torch.uint8))
                    and torch.equal(q.scale, want.scale)):
                failures.append(f"{name} {tile}")
    # segments (the local experts' chunks: empty, one token, tails): each as if quantised alone
    x = wide_range((600, 256), 13).float()
    sizes = [0, 130, 1, 256, 127, 0, 86]
    for (row, tok), part in zip(quantize_segments(x, sizes, impl="triton"), torch.split(x, sizes)):
        for q, tile in ((row, ROW_TILE), (tok, TOKEN_TILE)):
            want = quantize_reference(part, tile)
            if not (torch.equal(q.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(q.scale, want.scale)):
                failures.append(f"segment of {part.shape[0]} rows {tile}")
    # inf and NaN: the tiles holding them get NaN scales, the others are the reference's
    x = torch.randn(256, 256)
    x[3, 200] = float("inf")
    x[140, 5] = float("nan")
    row, tok, blk = quantize_tilings(x, row=True, token=True, block=True, impl="triton")
    nan_tiles = [row.scale.isnan().nonzero().tolist(), tok.scale.isnan().nonzero().tolist(),
                 blk.scale.isnan().nonzero().tolist()]
    ok = row.data[:, :128][torch.arange(256) != 140].view(torch.uint8).equal(
        quantize_reference(x, ROW_TILE).data[:, :128][torch.arange(256) != 140].view(torch.uint8))
    try:
        quantize(x, ROW_TILE, impl="triton")
        refused = ""
    except ValueError as e:
        refused = str(e)
    print(json.dumps({"failures": failures, "nan_tiles": nan_tiles, "others_equal": ok, "refused": refused}))


@pytest.mark.slow  # ~15-30 s: a fresh process imports Megatron-Core and interprets the kernel
def test_fused_kernel_is_bit_exact_with_the_reference():
    code = "from tests.test_fp8 import kernel_matches_reference; kernel_matches_reference()"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["failures"] == []
    assert got["nan_tiles"] == [[[3, 1], [140, 0]], [[0, 200], [1, 5]], [[0, 1], [1, 0]]]
    assert got["others_equal"]
    assert got["refused"] == "FP8 quantisation needs finite values, and this tensor holds inf or NaN."


def test_reference_refuses_inf_and_nan_and_marks_their_tiles():
    x = torch.ones(4, 256)
    x[2, 130] = float("nan")
    with pytest.raises(ValueError, match="^FP8 quantisation needs finite values, and this tensor holds inf or NaN.$"):
        quantize(x, ROW_TILE)
    row, tok, _ = quantize_tilings(x, row=True, token=True)
    assert row.scale.isnan().nonzero().tolist() == [[2, 1]] and tok.scale.isnan().nonzero().tolist() == [[0, 130]]
    with pytest.raises(ValueError, match="FP8 tiles are 1x128, 128x1 or 128x128, not 64x64."):
        quantize(x, (64, 64))


def test_gradient_paths_fp8_or_unquantised():
    """train.fp8_dgrad / fp8_wgrad: "bf16" runs that GEMM unquantised (here in fp32, the CPU's
    precision), the other GEMMs stay the FP8 path's, bit for bit."""
    g = torch.Generator().manual_seed(11)
    x0, w0 = torch.randn(130, 256, generator=g), torch.randn(192, 256, generator=g) * 0.05
    dy = torch.randn(130, 192, generator=g)

    def run(**paths):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_linear(x, w, **paths)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    y, dx, dw = run()
    y_d, dx_d, dw_d = run(dgrad="bf16")
    y_w, dx_w, dw_w = run(wgrad="bf16")
    assert torch.equal(y_d, y) and torch.equal(y_w, y) and torch.equal(dw_d, dw) and torch.equal(dx_w, dx)
    assert torch.equal(dx_d, dy @ w0) and torch.equal(dw_w, dy.t() @ x0)
    assert not torch.equal(dx, dx_d) and not torch.equal(dw, dw_w)  # the FP8 path is quantised
    with pytest.raises(ValueError, match="train.fp8_wgrad must be fp8 or bf16, not 'fp4'."):
        fp8_linear(x0, w0, wgrad="fp4")


def test_weight_quantised_once_per_step_until_invalidated(single_process):
    """Every micro-batch's forward and backward read the same quantised weight; the optimizer
    step (which writes through .data, unseen by autograd) and checkpoint loads drop it through
    `invalidate_fp8_weights`; an in-place edit autograd sees re-quantises by itself."""
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model
    from glm52_train.run_config import RunConfig

    run = RunConfig()
    run.train.fp8 = "blockwise"
    model = build_model(get_model_config("tiny"), run)
    lin = model.decoder.layers[0].mlp.linear_fc1
    h = lin.weight.shape[1]
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(8, 1, h, generator=g).requires_grad_() for _ in range(2)]  # two micro-batches
    assert invalidate_fp8_weights([model]) == 0
    outs = []
    for x in xs:
        outs.append(lin(x)[0])
        if x is xs[0]:
            first = lin._fp8_w_cache[1]
    assert lin._fp8_w_cache[1] is first  # the second micro-batch reused it
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    want = sum(fp8_linear(x.detach(), lin.weight.detach()).sum() for x in xs)
    assert torch.equal(sum(o.sum() for o in outs).detach(), want)

    lin.weight.data.mul_(2.0)  # as the optimizer writes: the cache cannot see it
    assert torch.equal(lin(xs[0])[0], outs[0])  # stale until invalidated (why the step invalidates)
    assert invalidate_fp8_weights([model]) >= 1 and lin._fp8_w_cache is None
    assert torch.equal(lin(xs[0])[0], fp8_linear(xs[0], lin.weight))
    with torch.no_grad():
        lin.weight.mul_(0.5)  # seen by autograd's version counter
    assert torch.equal(lin(xs[0])[0], fp8_linear(xs[0], lin.weight))


def _tiny_experts(dgrad: str = "fp8", wgrad: str = "fp8"):
    from glm52_train.config import get_model_config
    from glm52_train.model.build import build_model
    from glm52_train.run_config import RunConfig

    run = RunConfig()
    run.train.fp8, run.train.fp8_dgrad, run.train.fp8_wgrad = "blockwise", dgrad, wgrad
    return build_model(get_model_config("tiny"), run).decoder.layers[1].mlp.experts


def grouped_experts_match_per_chunk(experts, chunks=None, seed: int = 14, impl: str = "auto") -> dict:
    """Two micro-batches (the second accumulating into the first's gradients) through the
    grouped FP8 experts (their `quantize_segments` calls with `impl`) and through each (expert,
    source) chunk's own MLP: whether outputs and the gradients of the tokens, the router
    probabilities and every weight are bitwise equal, and how often the grouped path quantised.
    `chunks`: [expert][source] token counts (default: three sources, empty chunks, single tokens
    and chunks across 128-token tiles)."""
    from glm52_train.model import fp8

    n = len(experts.local_experts)
    if chunks is None:
        chunks = [[(37 * e + 91 * s) % 170 if (e + s) % 5 else (e + s) % 2 for s in range(3)] for e in range(n)]
    sizes = sum(chunks, [])
    g = torch.Generator().manual_seed(seed)
    hidden = experts.local_experts[0].linear_fc1.weight.shape[1]
    batches = [(torch.randn(sum(sizes), hidden, generator=g), torch.rand(sum(sizes), generator=g),
                torch.randn(sum(sizes), hidden, generator=g)) for _ in range(2)]
    calls = []
    segments = fp8.quantize_segments

    def counted(*a, **k):
        calls.append(1)
        return segments(*a, **k, impl=impl)

    def run(grouped: bool):
        for p in experts.parameters():
            p.grad = None
        outs, grads = [], []
        for x0, p0, dy in batches:
            x, probs = x0.clone().requires_grad_(), p0.clone().requires_grad_()
            if grouped:
                out, _ = experts(x, torch.tensor([sum(c) for c in chunks]), probs, source_chunks=chunks)
            else:
                owner = [e for e, row in enumerate(chunks) for _ in row]
                out = torch.cat([experts.local_experts[e](xc, pc)[0]
                                 for e, xc, pc in zip(owner, torch.split(x, sizes), torch.split(probs, sizes))])
            out.backward(dy)
            outs.append(out.detach())
            grads += [x.grad, probs.grad]
        return outs + grads + [p.grad.clone() for p in experts.parameters()]

    fp8.quantize_segments = counted
    try:
        got = run(grouped=True)
        grouped_calls = len(calls)
        calls.clear()
        want = run(grouped=False)
    finally:
        fp8.quantize_segments = segments
    return {"equal": [bool(torch.equal(a, b)) for a, b in zip(got, want)], "grouped_calls": grouped_calls,
            "per_chunk_calls": len(calls), "chunks": len(sizes)}


@pytest.mark.parametrize("paths", [("fp8", "fp8"), ("bf16", "fp8"), ("fp8", "bf16")], ids="-".join)
def test_experts_quantise_each_tensor_once_for_all_chunks(single_process, paths):
    """FP8SequentialMLP runs fc1, the activation and fc2 over all local experts' chunks at once,
    one GEMM per chunk: each of fc1's input, fc2's input and (backward) fc2's and fc1's output
    gradients quantised in one call (`quantize_segments`), and outputs and gradients (tokens,
    router probabilities, weights, accumulated over two micro-batches) bitwise those of each
    (expert, source) chunk run through its own MLP, under train.fp8_dgrad / fp8_wgrad too."""
    got = grouped_experts_match_per_chunk(_tiny_experts(*paths))
    assert got["equal"] and all(got["equal"]), got
    assert got["grouped_calls"] == 2 * 2 * 2 and got["per_chunk_calls"] == 0  # 2 micro-batches x fwd/bwd x fc1/fc2


def test_experts_activation_on_the_whole_tensor_is_each_chunks(single_process):
    """What CUDA runs (the activation over all chunks at once) computes, on one CPU thread (each
    row one contiguous run of the vectorised loop, as each chunk's rows are), the per-chunk bits,
    forward and backward; the CPU runs it per chunk (vector tails and threads' seams move with
    the tensor's extent)."""
    from glm52_train.model.fp8 import grouped_expert_activation

    experts = _tiny_experts()
    config, act = experts.config, experts.local_experts[0].activation_func
    width = 2 * experts.local_experts[0].linear_fc2.weight.shape[1]
    sizes = [0, 1, 130, 77, 256, 3]
    g = torch.Generator().manual_seed(15)
    h0, p0 = torch.randn(sum(sizes), width, generator=g) * 4, torch.rand(sum(sizes), generator=g)
    dy = torch.randn(sum(sizes), width // 2, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for whole in (True, False):
            h, p = h0.clone().requires_grad_(), p0.clone().requires_grad_()
            a = grouped_expert_activation(h, p, sizes, config, act, whole=whole)
            a.backward(dy)
            out.append((a.detach(), h.grad, p.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))


def grouped_experts_in_the_interpreter() -> None:
    """In a fresh process with TRITON_INTERPRET=1: the grouped experts' quantisations through
    the fused kernel (one segmented launch per tensor, as on CUDA) against each chunk's own MLP
    quantising with PyTorch's ops (the kernel's bit-exactness with them is tested above)."""
    from glm52_train import parallel
    from glm52_train.kernels import api

    parallel.initialize(seed=1234)
    api.enable_interpreter()
    from glm52_train.kernels import fp8_quant

    launches = []
    tiles = fp8_quant.quantize_tiles

    def counted(x, *a, segments=None, **k):
        launches.append(segments is not None)
        return tiles(x, *a, segments=segments, **k)

    fp8_quant.quantize_tiles = counted
    chunks = [[0, 131], [1, 0], [5, 2], [0, 0], [17, 1], [3, 9], [0, 1], [2, 0]]  # tails, empties, 128 crossed
    got = grouped_experts_match_per_chunk(_tiny_experts(), chunks, seed=17, impl="triton")
    got["segmented_launches"] = sum(launches)
    print(json.dumps(got))


@pytest.mark.slow  # ~20 s: a fresh process imports Megatron-Core and interprets the kernel
def test_grouped_experts_bit_exact_through_the_fused_kernel():
    code = "from tests.test_fp8 import grouped_experts_in_the_interpreter; grouped_experts_in_the_interpreter()"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["equal"] and all(got["equal"]), got
    assert got["grouped_calls"] == 8 and got["segmented_launches"] == 8 and got["per_chunk_calls"] == 0, got


def test_plan_counts_the_quantised_weights(single_process):
    """`glm52 plan`'s fp8_weights: the FP8 linears' weight elements of tiny, as built, at one
    byte plus a scale per 128x128 tile."""
    from glm52_train.config import get_model_config
    from glm52_train.layout import Layout
    from glm52_train.model import fp8
    from glm52_train.model.build import build_model
    from glm52_train.plan import FP8_WEIGHT_BYTES, estimate
    from glm52_train.run_config import RunConfig

    run = RunConfig()
    run.train.fp8 = "blockwise"
    tiny = get_model_config("tiny")
    model = build_model(tiny, run)
    built = sum(m.weight.numel() for m in model.modules()
                if isinstance(m, (fp8.FP8ColumnParallelLinear, fp8.FP8RowParallelLinear)))
    layout = Layout(tp=1, pp=1, vpp=1, ep=1, etp=1, cp=1, dp=1, sp=False)
    est = estimate(tiny, layout, 256, 80.0, fp8=True)
    assert est.fp8_weights == pytest.approx(built * FP8_WEIGHT_BYTES)
    plain = estimate(tiny, layout, 256, 80.0)
    assert plain.fp8_weights == 0 and est.weights == pytest.approx(plain.weights + est.fp8_weights)


def test_glm52_plan_counts_fp8_weights_from_the_run_config(tmp_path, capsys):
    from glm52_train.cli import main as glm52
    from glm52_train.plan import FP8_WEIGHT_BYTES

    for fp8_key, want in (("blockwise", True), ("null", False)):
        cfg = tmp_path / f"{fp8_key}.yaml"
        cfg.write_text(f"model: tiny\ndata: {{seq_length: 256}}\ntrain: {{fp8: {fp8_key}}}\n")
        assert glm52(["plan", "--config", str(cfg), "--gpus", "1", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["fp8_weights"]
        assert (got > 1e6 / FP8_WEIGHT_BYTES) if want else got == 0


@pytest.mark.parametrize("overrides, sentence", [
    (["train.fp8_wgrad=bf16"], "train.fp8_dgrad and train.fp8_wgrad choose the GEMM paths of train.fp8=blockwise"),
    (["train.fp8=blockwise", "train.fp8_dgrad=fp4"], "train.fp8_dgrad must be one of fp8, bf16"),
    (["train.fp8=te-e4m3"], "train.fp8=te-e4m3 is Transformer Engine's recipe, and Transformer Engine is not importable"),
    (["train.fp8=e4m3"], "train.fp8 must be one of blockwise, te-e4m3, te-hybrid"),
])
def test_fp8_choices_are_validated_in_one_sentence(golden_data, overrides, sentence):
    from glm52_train.run_config import load_run_config

    with pytest.raises(ConfigError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [f"data.blend=[{{path: {golden_data}}}]", *overrides]).validate(world_size=1)
    # blockwise validates on a CPU (emulated) and leaves Transformer Engine off
    cfg = load_run_config(None, [f"data.blend=[{{path: {golden_data}}}]", "train.fp8=blockwise"]).validate(world_size=1)
    assert not cfg.use_transformer_engine()
