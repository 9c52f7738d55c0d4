"""Blockwise FP8 linears (`train.fp8: blockwise`): DeepSeek-V3's recipe on torch, without
Transformer Engine.

Every GEMM of a linear `y = x @ W^T` (x: [M tokens, K], W: [N, K]) runs on e4m3 operands, each
with one fp32 scale per tile:

| GEMM | A (rows x contraction), tiles | B, tiles |
|---|---|---|
| forward `y = x W^T` | x [M, K], 1x128 along K | W [N, K], 128x128 |
| input grad `dx = dy W` | dy [M, N], 1x128 along N | W^T [K, N], the same 128x128 blocks, transposed |
| weight grad `dW = dy^T x` | dy^T [N, M], 1x128 along M | x^T [K, M], 1x128 along M |

The weight's 128x128 blocks are the same blocks read either way, so the input-gradient GEMM
reuses the forward's quantization of W (only its layout is transposed, no new rounding). The
weight-gradient GEMM contracts over tokens: it needs dy and x quantized again along the token
dimension (128x1 tiles, "transposed quantization"), from their unquantized values.

Scales are powers of two: `s = 2^ceil(log2(amax / 448))` per tile (DeepSeek-V3 used amax/448;
its later UE8M0 kernels round to powers of two as here). Dividing by a power of two is exact,
so the only rounding is e4m3's own (relative 2^-4 for normal values, absolute 2^-10 * s below
e4m3's smallest normal), and dequantising (q * s) is exact in fp32: the CPU path's dequantised
operands are exactly the numbers the GPU's tensor cores multiply. The cost is at most one bit
of range at the top of a tile (amax lands in (224, 448]), which e4m3's flat relative precision
does not notice.

Where the GEMM runs: on CUDA with torch's blockwise-scaled matmul
(`torch.nn.functional.scaled_mm`, BlockWise1x128 / BlockWise128x128: a torch built with CUDA
>= 12.9 on sm90), checked once per process against the dequantised product
(`blockwise_mm_supported`); shapes the kernel refuses (a contraction not a multiple of 128,
tiny dims) and every CPU GEMM use the same quantised operands, dequantised, in an fp32 matmul.
The accumulation is fp32 either way, the output in the input's dtype.

What stays in bf16 (or the run's precision) is decided in `spec.py`: embedding and output head
(DeepSeek-V3 keeps both in higher precision: the head's logits feed a softmax over 154,880
classes), the router (a [hidden x 256] GEMM whose scores pick experts: FP8 noise changes
routing and costs little to avoid), norms (not GEMMs), the DSA indexer (its own scores pick the
top-k; DeepSeek-V3.2 runs it in FP8 only for inference), the q/kv down projections (replicated
linears, not column/row-parallel) and MLA's absorbed kv up-projection (used as a weight inside
the attention core, which DeepSeek-V3 keeps in bf16).

The weights themselves stay in the run's dtype (fp32 master weights in the optimizer, as
always): checkpoints hold no FP8 tensor and no scale.

Where the time goes (issue 26; none of it measured on a GPU yet): quantisation is one fused
Triton kernel per tensor on CUDA (glm52_train/kernels/fp8_quant.py: both tilings of x, or of
dy, from one read; bit-exact with `quantize_reference`, the torch ops the CPU runs); each
weight is quantised once per optimizer step (`_WeightCache`); the forward saves x's 128x1
quantisation (1 byte an element) rather than x. The routed experts quantise each tensor once
for all local experts (`FP8SequentialMLP`: fc1's input, fc2's input, and in the backward fc2's
and fc1's output gradients: four launches per MoE layer and micro-batch, where fc1's input
took one and the other three one per (expert, source) chunk before); their GEMMs still run
one per chunk, and on the CPU so does their activation. Speed unmeasured (no GPU).
`train.fp8_dgrad` / `train.fp8_wgrad` put the input- or weight-gradient GEMM on the
unquantised path ("bf16") instead: both default to "fp8", today's behaviour, until a GPU
measures which is faster (issue 13's H100 numbers, before the fused quantisation: input
gradient 1.13x bf16 on dense shapes and 0.53x on experts, weight gradient 0.42-0.85x, GEMMs
alone; `bench/fp8_gemm.py`, `bench/fp8_step.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
ROW_TILE = (1, BLOCK)  # activations and gradients along the contraction
TOKEN_TILE = (BLOCK, 1)  # activations and gradients along tokens (weight-gradient GEMM)
WEIGHT_TILE = (BLOCK, BLOCK)
SUPPORT_REL_ERR = 2e-3  # relative Frobenius error the support check accepts from the GPU kernel


@dataclass(frozen=True)
class Quantized:
    """An e4m3 tensor [R, C] and its decode scales, one per `tile` ([ceil(R/tr), ceil(C/tc)]):
    value ~= data * scale of its tile."""

    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        tr, tc = self.tile
        rows, cols = self.data.shape
        scale = self.scale.to(dtype).repeat_interleave(tr, 0)[:rows].repeat_interleave(tc, 1)[:, :cols]
        return self.data.to(dtype) * scale

    def t(self) -> "Quantized":
        """The transposed matrix, same tiles read the other way (no new rounding)."""
        return Quantized(self.data.t(), self.scale.t(), (self.tile[1], self.tile[0]))


def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with amax / s <= 448 (1 for an all-zero tile)."""
    amax = amax.float()
    _, exponent = torch.frexp(amax / E4M3_MAX)  # amax/448 = m * 2^e, m in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    half = scale * 0.5
    scale = torch.where(amax <= half * E4M3_MAX, half, scale)  # exact: 448 * 2^k; guards rounding of amax/448
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_reference(x: torch.Tensor, tile: tuple[int, int]) -> Quantized:
    """e4m3 with one power-of-two scale per `tile` of the 2-D `x`, in PyTorch ops (the CPU path
    and the reference the fused kernel is tested against); tiles start at (0, 0), the last ones
    in each dimension may be partial (tails smaller than the tile). A tile holding inf or NaN
    gets a NaN scale."""
    if x.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    tr, tc = tile
    rows, cols = x.shape
    gr, gc = -(-rows // tr), -(-cols // tc)
    padded = torch.nn.functional.pad(x.float(), (0, gc * tc - cols, 0, gr * tr - rows))
    blocks = padded.view(gr, tr, gc, tc)
    amax = blocks.abs().amax(dim=(1, 3)) if x.numel() else torch.zeros(gr, gc, device=x.device)
    scale = power_of_two_scale(amax)
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return Quantized(q.view(gr * tr, gc * tc)[:rows, :cols], scale, tile)


def _use_kernel(x: torch.Tensor, impl: str) -> bool:
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be auto, triton or reference, not {impl!r}")
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def _kernel_module(x: torch.Tensor):
    """glm52_train.kernels.fp8_quant, in Triton's interpreter for CPU tensors."""
    from glm52_train.kernels.api import enable_interpreter

    if not x.is_cuda:
        enable_interpreter()
    from glm52_train.kernels import fp8_quant

    return fp8_quant


def quantize_tilings(x: torch.Tensor, row: bool = False, token: bool = False, block: bool = False,
                     impl: str = "auto") -> tuple[Quantized | None, Quantized | None, Quantized | None]:
    """The 1x128, 128x1 and/or 128x128 quantisations of the 2-D `x` (None for those not asked),
    from one read: the fused Triton kernel (glm52_train/kernels/fp8_quant.py, one program per
    128x128 tile) on CUDA tensors, or with impl="triton" on CPU tensors (Triton's interpreter;
    tests); PyTorch's ops otherwise (`quantize_reference`, bit-exact with the kernel). Tiles
    with inf or NaN get NaN scales (the training step then sees a non-finite gradient and is
    skipped); `quantize` refuses them."""
    if x.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    if _use_kernel(x, impl):
        got = _kernel_module(x).quantize_tiles(x, row, token, block)
        return tuple(None if g is None else Quantized(g[0], g[1], t)
                     for g, t in zip(got, (ROW_TILE, TOKEN_TILE, WEIGHT_TILE)))
    return tuple(quantize_reference(x, t) if on else None
                 for on, t in zip((row, token, block), (ROW_TILE, TOKEN_TILE, WEIGHT_TILE)))


def quantize_segments(x: torch.Tensor, sizes: list[int], row: bool = True, token: bool = True,
                      impl: str = "auto") -> list[tuple[Quantized | None, Quantized | None]]:
    """The 1x128 (with `row`) and 128x1 (with `token`) quantisations of each segment of `sizes`
    consecutive rows of the 2-D `x` (the local experts' token chunks), equal to quantising each
    segment on its own (128x1 tiles restart at every segment), in one launch of the fused kernel
    on CUDA; per segment in PyTorch's ops otherwise."""
    if not (row or token):
        return [(None, None) for _ in sizes]
    if not _use_kernel(x, impl):
        return [quantize_tilings(part, row=row, token=token, impl=impl)[:2] for part in torch.split(x, sizes)]
    kernel = _kernel_module(x)
    rows, tok, _ = kernel.quantize_tiles(x, row=row, token=token, segments=list(sizes))
    first = kernel.segment_tiles(sizes)[2]
    out, at = [], 0
    for i, n in enumerate(sizes):
        row_q = Quantized(rows[0][at:at + n], rows[1][at:at + n], ROW_TILE) if row else None
        tok_q = Quantized(tok[0][at:at + n], tok[1][first[i]:first[i + 1]], TOKEN_TILE) if token else None
        out.append((row_q, tok_q))
        at += n
    return out


def quantize(x: torch.Tensor, tile: tuple[int, int], impl: str = "auto") -> Quantized:
    """e4m3 with one power-of-two scale per `tile` (ROW_TILE, TOKEN_TILE or WEIGHT_TILE) of the
    2-D `x` (see `quantize_tilings`); refuses a tensor holding inf or NaN."""
    if tile not in (ROW_TILE, TOKEN_TILE, WEIGHT_TILE):
        raise ValueError(f"FP8 tiles are 1x128, 128x1 or 128x128, not {tile[0]}x{tile[1]}.")
    got = quantize_tilings(x, row=tile == ROW_TILE, token=tile == TOKEN_TILE, block=tile == WEIGHT_TILE, impl=impl)
    return _finite(next(q for q in got if q is not None))


def _finite(q: Quantized) -> Quantized:
    if not bool(torch.isfinite(q.scale).all()):
        raise ValueError("FP8 quantisation needs finite values, and this tensor holds inf or NaN.")
    return q


# ---- the GEMM: a @ b^T on quantised operands ---------------------------------------------------

def _recipe(tile: tuple[int, int]):
    F = torch.nn.functional
    return F.ScalingType.BlockWise128x128 if tile == WEIGHT_TILE else F.ScalingType.BlockWise1x128


def _kernel_scale(q: Quantized) -> torch.Tensor:
    """Scales in the layout torch's blockwise kernel reads: 1x128 outer-dim-major [rows, C/128];
    128x128 as [L4, rows/128] (K-blocks padded to a multiple of 4, K-major)."""
    if q.tile == ROW_TILE:
        return q.scale.t().contiguous().t()
    pad = (-q.scale.shape[1]) % 4
    return torch.nn.functional.pad(q.scale, (0, pad), value=1.0).contiguous().t()


def _kernel_fits(a: Quantized, b: Quantized) -> bool:
    (m, k), n = a.data.shape, b.data.shape[0]
    return k % BLOCK == 0 and m % 16 == 0 and n % BLOCK == 0 and min(m, n, k) > 0


def scaled_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b^T for a [M, K] with 1x128 tiles along K and b [N, K] with 1x128 or 128x128 tiles,
    accumulated in fp32. torch's blockwise FP8 kernel on a GPU that has it; otherwise the
    dequantised operands (exact) in an fp32 matmul."""
    if a.data.is_cuda and _kernel_fits(a, b) and blockwise_mm_supported(a.data.device):
        return _kernel_gemm(a, b, out_dtype)
    return (a.dequantize() @ b.dequantize().t()).to(out_dtype)


def _kernel_gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    F = torch.nn.functional
    return F.scaled_mm(a.data.contiguous(), b.data.contiguous().t(), _kernel_scale(a), _recipe(a.tile),
                       _kernel_scale(b), _recipe(b.tile), output_dtype=out_dtype)


def blockwise_support_problem(device: torch.device | str | None = None) -> str | None:
    """None when this torch runs blockwise-scaled FP8 GEMMs on `device` (a CUDA GPU) and they
    agree with the dequantised product; otherwise what is missing, in a few words."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm") or not hasattr(getattr(F, "ScalingType", None), "BlockWise128x128"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with blockwise scales"
    device = torch.device(device or "cuda")
    cap = torch.cuda.get_device_capability(device)
    where = f"torch {torch.__version__} with CUDA {torch.version.cuda} on sm{cap[0]}{cap[1]}"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 384, device=device, generator=gen)
    w = torch.randn(256, 384, device=device, generator=gen)
    dy = torch.randn(256, 256, device=device, generator=gen)
    try:
        cases = [
            (quantize(x, ROW_TILE), quantize(w, WEIGHT_TILE)),  # forward
            (quantize(dy, ROW_TILE), quantize(w, WEIGHT_TILE).t()),  # input grad
            (quantize(dy, TOKEN_TILE).t(), quantize(x, TOKEN_TILE).t()),  # weight grad
        ]
        for a, b in cases:
            got = _kernel_gemm(a, b, torch.float32)
            want = a.dequantize() @ b.dequantize().t()
            # Hopper's FP8 tensor cores accumulate each 128-wide block in reduced precision (the
            # DeepSeek-V3 report's ~14 bits) before the fp32 scaling: errors of 1e-4..1e-3 of the
            # product's norm; a misread scale layout errs by order 1
            err = ((got - want).norm() / want.norm()).item()
            if not err <= SUPPORT_REL_ERR:
                return (f"{where} computes blockwise FP8 GEMMs that disagree with the dequantised product "
                        f"(relative error {err:.2g})")
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        return f"{where} refuses blockwise FP8 GEMMs ({str(e).splitlines()[0][:120]})"
    return None


@functools.lru_cache(maxsize=None)
def _supported(device: str) -> bool:
    return blockwise_support_problem(device) is None


def blockwise_mm_supported(device: torch.device) -> bool:
    return _supported(str(device))


# ---- the linear ----------------------------------------------------------------------------------

GEMM_PATHS = ("fp8", "bf16")


def _check_paths(dgrad: str, wgrad: str) -> None:
    for name, path in (("dgrad", dgrad), ("wgrad", wgrad)):
        if path not in GEMM_PATHS:
            raise ValueError(f"train.fp8_{name} must be fp8 or bf16, not {path!r}.")


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with the forward GEMM in FP8, the input-gradient (`dgrad`) and weight-gradient
    (`wgrad`) GEMMs each in FP8 or unquantised in the activations' dtype ("bf16": the run's
    precision, fp32 on CPU). W comes quantised (`w_q`, 128x128: the weight cache's, or made per
    call); x is quantised in both of its tilings in one pass when the weight gradient is FP8,
    and the forward then saves x's 128x1 quantisation (1 byte an element) instead of x; dy's
    two tilings come from one pass in the backward."""

    @staticmethod
    def forward(ctx, x, weight, w_q: Quantized, dgrad: str, wgrad: str):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_row, x_tok, _ = quantize_tilings(x, row=True, token=need_dw and wgrad == "fp8")
        ctx.paths, ctx.dtypes = (dgrad, wgrad), (x.dtype, weight.dtype)
        keep_w = weight if need_dx and dgrad == "bf16" else None
        keep_x = x if need_dw and wgrad == "bf16" else None
        tok = (x_tok.data, x_tok.scale) if x_tok is not None else (None, None)
        ctx.save_for_backward(keep_w, keep_x, w_q.data, w_q.scale, *tok)
        return scaled_gemm(x_row, w_q, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        weight, x, w_data, w_scale, xt_data, xt_scale = ctx.saved_tensors
        (dgrad, wgrad), (x_dtype, w_dtype) = ctx.paths, ctx.dtypes
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.contiguous()
        dy_row, dy_tok, _ = quantize_tilings(dy, row=need_dx and dgrad == "fp8", token=need_dw and wgrad == "fp8")
        dx = dw = None
        if need_dx:
            w_q = Quantized(w_data, w_scale, WEIGHT_TILE)
            dx = scaled_gemm(dy_row, w_q.t(), x_dtype) if dgrad == "fp8" else (dy @ weight.to(dy.dtype)).to(x_dtype)
        if need_dw:
            if wgrad == "fp8":
                dw = scaled_gemm(dy_tok.t(), Quantized(xt_data, xt_scale, TOKEN_TILE).t(), w_dtype)
            else:
                dw = (dy.t() @ x.to(dy.dtype)).to(w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, w_q: Quantized | None = None, dgrad: str = "fp8",
               wgrad: str = "fp8") -> torch.Tensor:
    """x [..., K] @ W^T in blockwise FP8: tokens are the flattened leading dimensions. `w_q`:
    W's 128x128 quantisation if the caller holds it (the weight cache); `dgrad` / `wgrad`: the
    input- and weight-gradient GEMMs' path, "fp8" or "bf16" (unquantised)."""
    _check_paths(dgrad, wgrad)
    if w_q is None:
        w_q = quantize_tilings(weight.detach(), block=True)[2]
    out = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, w_q, dgrad, wgrad)
    return out.view(*x.shape[:-1], weight.shape[0])


# ---- the weight cache ----------------------------------------------------------------------------

class _WeightCache:
    """Each FP8 linear's weight quantised once per optimizer step (128x128 tiles, read by the
    forward and, transposed, by the input gradient; the weight gradient never reads W), reused
    by every micro-batch's forward and backward, recomputed with full recomputation's second
    forward for free. `invalidate_fp8_weights(model)` drops it: the training step calls it
    after every optimizer step and after every checkpoint load (both write the weights through
    `.data`, which autograd's version counter does not see); the cache also checks the
    weight's storage and version counter, so an in-place edit that autograd sees
    (`with torch.no_grad(): w.mul_(2)`) re-quantises too. Memory: 1 byte per weight element
    plus one fp32 per 128x128 tile, held from a step's first forward to its optimizer step
    (`glm52 plan` counts it as `fp8_weights`)."""

    _fp8_w_cache = None

    def _fp8_weight(self, weight: torch.Tensor) -> Quantized:
        if weight is not getattr(self, "weight", None):  # a weight handed in (tied embeddings): no cache
            return quantize_tilings(weight.detach(), block=True)[2]
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
        hit = self._fp8_w_cache
        if hit is None or hit[0] != key:
            hit = (key, quantize_tilings(weight.detach(), block=True)[2])
            self._fp8_w_cache = hit
        return hit[1]

    def _fp8_impl(self, input, weight, *args, **kwargs):
        return _fp8_forward_impl(input, weight, *args, w_q=self._fp8_weight(weight), **_gemm_paths(self.config),
                                 **kwargs)


def _gemm_paths(config) -> dict:
    return dict(dgrad=getattr(config, "fp8_dgrad", "fp8"), wgrad=getattr(config, "fp8_wgrad", "fp8"))


def invalidate_fp8_weights(model) -> int:
    """Drop every FP8 linear's cached weight quantisation under `model` (a module or a list of
    model chunks); the number dropped."""
    dropped = 0
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for m in chunk.modules():
            if isinstance(m, _WeightCache) and m._fp8_w_cache is not None:
                m._fp8_w_cache = None
                dropped += 1
    return dropped


def _fp8_forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, w_q=None, dgrad="fp8",
                      wgrad="fp8", **_):
    """Megatron-Core's linear (communication as in `linear_with_grad_accumulation_and_async_allreduce`:
    sequence-parallel all-gather / input-gradient all-reduce) with the GEMMs in FP8."""
    if gradient_accumulation_fusion:
        raise ValueError("train.fp8=blockwise does not fuse gradient accumulation into the GEMM.")
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = fp8_linear(input, weight, w_q, dgrad, wgrad)
    return output + bias if bias is not None else output


class FP8ColumnParallelLinear(ColumnParallelLinear, _WeightCache):
    """Megatron-Core's column-parallel linear with blockwise FP8 GEMMs; parameters, sharding and
    checkpoints unchanged."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self._fp8_impl(input, weight, *args, **kwargs)


class FP8RowParallelLinear(RowParallelLinear, _WeightCache):
    """Megatron-Core's row-parallel linear with blockwise FP8 GEMMs; parameters, sharding and
    checkpoints unchanged."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self._fp8_impl(input, weight, *args, **kwargs)


# ---- the experts -----------------------------------------------------------------------------

class _FP8GroupedLinear(torch.autograd.Function):
    """Consecutive row chunks of x [T, K], chunk c multiplied by its expert's weight:
    y[c] = x[c] @ W[owner[c]]^T, one GEMM per chunk as `_FP8Linear` runs it, but each tensor's
    quantisation in one launch over all chunks (`quantize_segments`: 1x128 tiles per token, 128x1
    tiles restarting at every chunk): x's in the forward, dy's in the backward. Each expert's
    weight gradient is the sum of its chunks' in reverse chunk order, the order autograd's
    engine adds them when each chunk is a node of its own (the last chunk's backward runs first),
    so the result is bitwise the per-chunk `_FP8Linear`'s."""

    @staticmethod
    def forward(ctx, x, sizes: list[int], owner: list[int], w_qs: list[Quantized], dgrad: str, wgrad: str,
                grad: bool, *weights):
        need_dx = grad and ctx.needs_input_grad[0]
        need_dw = [grad and n for n in ctx.needs_input_grad[7:]]
        want_tok = any(need_dw) and wgrad == "fp8"
        parts = quantize_segments(x, sizes, token=want_tok)
        y = torch.cat([scaled_gemm(row, w_qs[e], x.dtype) for (row, _), e in zip(parts, owner)])
        ctx.sizes, ctx.owner, ctx.paths, ctx.need = sizes, owner, (dgrad, wgrad), (need_dx, need_dw)
        ctx.dtypes, ctx.n_weights = (x.dtype, [w.dtype for w in weights]), len(weights)
        keep_w = list(weights) if need_dx and dgrad == "bf16" else [None] * len(weights)
        keep_x = x if any(need_dw) and wgrad == "bf16" else None
        tok = [t for _, q in parts for t in ((q.data, q.scale) if q is not None else (None, None))]
        w = [t for q in w_qs for t in (q.data, q.scale)] if need_dx and dgrad == "fp8" else []
        ctx.save_for_backward(keep_x, *keep_w, *w, *tok)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        n_w, sizes, owner = ctx.n_weights, ctx.sizes, ctx.owner
        (dgrad, wgrad), (need_dx, need_dw), (x_dtype, w_dtypes) = ctx.paths, ctx.need, ctx.dtypes
        x, keep_w = saved[0], saved[1:1 + n_w]
        rest = saved[1 + n_w:]
        w_fp8 = need_dx and dgrad == "fp8"
        w_qs = [Quantized(rest[2 * j], rest[2 * j + 1], WEIGHT_TILE) for j in range(n_w)] if w_fp8 else []
        tok = rest[2 * n_w:] if w_fp8 else rest
        dy = dy.contiguous()
        parts = quantize_segments(dy, sizes, row=w_fp8, token=any(need_dw) and wgrad == "fp8")
        dys = torch.split(dy, sizes)
        dx = None
        if need_dx:
            if dgrad == "fp8":
                dx = torch.cat([scaled_gemm(row, w_qs[e].t(), x_dtype) for (row, _), e in zip(parts, owner)])
            else:
                dx = torch.cat([(d @ keep_w[e].to(dy.dtype)).to(x_dtype) for d, e in zip(dys, owner)])
        dws = [None] * n_w
        xs = torch.split(x, sizes) if x is not None else None
        for c in reversed(range(len(sizes))):
            e = owner[c]
            if not need_dw[e]:
                continue
            if wgrad == "fp8":
                x_tok = Quantized(tok[2 * c], tok[2 * c + 1], TOKEN_TILE)
                dw = scaled_gemm(parts[c][1].t(), x_tok.t(), w_dtypes[e])
            else:
                dw = (dys[c].t() @ xs[c].to(dy.dtype)).to(w_dtypes[e])
            dws[e] = dw if dws[e] is None else dws[e] + dw
        return (dx, None, None, None, None, None, None, *dws)


def _expert_activation(h: torch.Tensor, probs: torch.Tensor, config, activation_func) -> torch.Tensor:
    """Megatron-Core's MLP between fc1 and fc2 (its unfused path: no bias, no fused or TE
    activation), weighted by each token's router probability, the same ops in the same order."""
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        a = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    else:
        a = activation_func(h)
    return (a * probs.unsqueeze(-1)).to(a.dtype)


def grouped_expert_activation(h: torch.Tensor, probs: torch.Tensor, sizes: list[int], config, activation_func,
                              whole: bool) -> torch.Tensor:
    """`_expert_activation` of the local experts' concatenated fc1 outputs: on the whole tensor
    (`whole`: what CUDA runs, its elementwise kernels computing every element alone, so the bits
    are each chunk's own), or chunk by chunk (the CPU: its vectorised exp rounds differently in a
    vector's tail and at the seams between threads' ranges, so values depend on the tensor's
    extent, and per chunk keeps them those of the per-expert path)."""
    if whole:
        return _expert_activation(h, probs, config, activation_func)
    return torch.cat([_expert_activation(hc, pc, config, activation_func)
                      for hc, pc in zip(torch.split(h, sizes), torch.split(probs, sizes))])


def _groupable(expert) -> bool:
    """The expert is Megatron-Core's MLP as this model builds it: FP8 linears without bias that
    communicate nothing themselves (experts' linears leave TP/EP communication to the token
    dispatcher), an activation `_expert_activation` reproduces."""
    fc1, fc2, c = expert.linear_fc1, expert.linear_fc2, expert.config
    linears = (fc1, fc2)
    return (all(isinstance(m, _WeightCache) and getattr(m, "bias", None) is None for m in linears)
            and all(m.explicit_expert_comm or m.tp_group.size() == 1 for m in linears)
            and not fc1.gather_output and fc2.input_is_parallel
            and not (c.use_te_activation_func or c.bias_activation_fusion or c.gradient_accumulation_fusion
                     or c._cpu_offloading_context is not None or getattr(c, "delay_wgrad_compute", False)))


class FP8SequentialMLP(SequentialMLP):
    """The routed experts with blockwise FP8 linears, one GEMM per expert chunk (the loop path:
    torch has no blockwise-scaled grouped GEMM we could check on the GPUs we have), each tensor
    the GEMMs read quantised once for all local experts.

    Each expert runs once per source chunk (the tokens one rank's microbatch sent it), so the
    weight-gradient GEMM's 128-token tiles never mix tokens of two microbatches: the tiles one
    process forms for each microbatch are the tiles any expert-parallel layout forms, and EP
    runs equal the one-process run. Forward and input-gradient GEMMs tile per token, so chunking
    does not change them.

    One launch of the fused quantiser (`quantize_segments`: 1x128 tiles, and 128x1 tiles
    restarting at every chunk) over all local experts' tokens for each of: fc1's input (forward),
    fc2's input (the activation of all chunks' fc1 outputs, concatenated), fc2's output gradient
    and fc1's output gradient (backward, each in the tilings its dgrad and wgrad GEMMs need):
    four per MoE layer and step instead of four per chunk. fc1, the activation and fc2 each span
    all chunks (`_FP8GroupedLinear` twice, `grouped_expert_activation` between), so autograd
    hands each backward the whole gradient. Still per chunk: the GEMMs (fc1, fc2, and in the
    backward each one's dgrad and wgrad), and on the CPU the activation (see
    `grouped_expert_activation`). Outputs and gradients are bitwise those of running each chunk
    through its expert alone (tests/test_fp8.py). An expert that `_groupable` does not recognise
    (biases, fused or TE activations) runs chunk by chunk through its own MLP. Speed unmeasured
    (no GPU).

    Departure from DeepSeek-V3 / torchao: no grouped GEMM. torch 2.11-2.13's
    `torch._scaled_grouped_mm` takes tensor-wise or row-wise fp32 scales (and MXFP8's 1x32 UE8M0
    blocks, on Blackwell only), not 1x128 / 128x128 blocks on Hopper. What its scales would cost
    in accuracy (`bench/fp8_scaling_accuracy.py`: CPU, synthetic operands at GLM-5.2's expert
    shapes, 512 tokens; docs/benchmarks.md; not GLM's own activations, which tiny's 128-wide
    experts cannot stand in for):
    - row-wise scales (one per token over the whole contraction of 6144 or 2048, one per weight
      output row; for the weight gradient one per feature over all of an expert's tokens instead
      of per 128 tokens): e4m3's relative precision is flat over its normal range (448 down to
      2^-6, a factor 2^14.8), so a row's small entries lose precision only when they lie that far
      below the row's amax. Gaussian operands, 1 channel in 256 at 64x (the 20-100x outliers
      LLM.int8() and SmoothQuant report), dy rows spread over 3 decades: row-wise errs as
      blockwise to 3 digits (GEMM output 3.7e-2 relative Frobenius error against bf16 operands'
      2.4e-3; median entry error 2.2e-2). Two "massive" channels at 2^14x (the ~10^4x reported in
      LLMs): the output error is still equal (the massive terms carry its norm), but the
      activation's ordinary entries become e4m3 subnormals: median entry error 3.8-4.0e-2
      row-wise against 2.3e-2 blockwise; dy over 6 decades: 3.1e-2 against 3.0e-2 (128-token
      tiles already mix such tokens);
    - tensor-wise scales: as row-wise without outliers, 8.6e-2-1.8e-1 median entry error with
      the massive channels;
    - MXFP8 (1x32 power-of-two blocks, finer than ours: no accuracy cost) needs sm100.
    So row-wise scales cost nothing on well-behaved operands and degrade the ordinary channels
    of tokens that carry massive activations, which 1x128 tiles confine to their own tile. The
    loop stays: 1x128 is DeepSeek-V3's recipe and the one this repository's accuracy runs
    measured, and without a GPU there is no speed to trade for it. Its launches are what
    `bench/fp8_gemm.py` times per expert."""

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, source_chunks=None):
        if source_chunks is None or self.config.moe_apply_probs_on_input:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        sizes = [n for row in source_chunks for n in row]
        owner = [e for e, row in enumerate(source_chunks) for _ in row]
        if not all(_groupable(e) for e in self.local_experts):
            chunks = zip(torch.split(permuted_local_hidden_states, sizes), torch.split(permuted_probs, sizes))
            return torch.cat([self.local_experts[e](x, p)[0] for e, (x, p) in zip(owner, chunks)]), None
        x = permuted_local_hidden_states
        h = self._grouped("linear_fc1", x, sizes, owner)
        a = grouped_expert_activation(h, permuted_probs, sizes, self.config, self.local_experts[0].activation_func,
                                      whole=h.is_cuda)
        return self._grouped("linear_fc2", a, sizes, owner), None

    def _grouped(self, name: str, x: torch.Tensor, sizes: list[int], owner: list[int]) -> torch.Tensor:
        linears = [getattr(e, name) for e in self.local_experts]
        paths = _gemm_paths(self.config)
        _check_paths(**paths)
        return _FP8GroupedLinear.apply(x, sizes, owner, [m._fp8_weight(m.weight) for m in linears], paths["dgrad"],
                                       paths["wgrad"], torch.is_grad_enabled(), *[m.weight for m in linears])


class FP8MoELayer(MoELayer):
    """Megatron-Core's MoE layer handing its FP8 experts the token count of each (local expert,
    source rank) chunk, as its all-to-all dispatcher laid them out."""

    def routed_experts_compute(self, hidden_states, probs):
        dispatched, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        output, bias = self.experts(dispatched, tokens_per_expert, permuted_probs,
                                    source_chunks=self._source_chunks(tokens_per_expert))
        return self.token_dispatcher.combine_preprocess(output), bias

    def _source_chunks(self, tokens_per_expert) -> list[list[int]]:
        """[local expert][source rank] token counts, in the order the dispatcher sorted them.
        One chunk per expert when the dispatcher keeps no per-source counts (a single local
        expert under EP/TP: its tiles may then span sources)."""
        d = self.token_dispatcher
        per_source = getattr(d, "num_global_tokens_per_local_expert", None)
        if self.num_local_experts > 1 and per_source is not None and (d.ep_size > 1 or d.tp_size > 1):
            return per_source.view(-1, self.num_local_experts).t().tolist()
        return [[n] for n in torch.as_tensor(tokens_per_expert).tolist()]


__all__ = ["Quantized", "quantize", "quantize_reference", "quantize_tilings", "quantize_segments", "invalidate_fp8_weights",
           "power_of_two_scale", "scaled_gemm", "fp8_linear",
           "FP8ColumnParallelLinear", "FP8RowParallelLinear", "FP8SequentialMLP", "FP8MoELayer", "grouped_expert_activation",
           "blockwise_support_problem"]
