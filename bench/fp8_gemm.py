"""Blockwise FP8 vs bf16 GEMM throughput at GLM-5.2's shapes (the GPU half of issue 13).

    python bench/fp8_gemm.py --json OUT.json            # CUDA: H100/H200, torch with CUDA >= 12.9
    python bench/fp8_gemm.py --dry-run --json OUT.json  # CPU: tiny shapes, the same code path

For each linear (dense FFN 6144 -> 2x12288 -> 6144 over `--tokens` tokens; routed experts
6144 -> 2x2048 -> 6144, `--experts` local experts with `--tokens-per-expert` each) and each of
its three GEMMs (forward, input grad, weight grad), times:
- bf16: `torch.mm` on bf16 operands;
- fp8 GEMM: `glm52_train.model.fp8.scaled_gemm` on operands quantised beforehand (the tensor
  cores' part; on CUDA torch's blockwise `scaled_mm`);
- fp8 linear: quantisation included, as `fp8_linear` pays it (on CUDA the fused Triton kernel
  of glm52_train/kernels/fp8_quant.py, one launch per operand here).
Experts run as the FP8 path runs them, one expert after another; whether torch's
`scaled_grouped_mm` accepts blockwise scales here is probed and reported, not used.
Before timing, every FP8 GEMM is checked against its dequantised fp32 product (max relative
error printed). Prints one table and writes JSON. `--budget` (seconds) bounds the timing loops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from glm52_train.model import fp8  # noqa: E402


def gemm_operands(m: int, k: int, n: int, device, dtype):
    """x [m, k], W [n, k], dy [m, n] and their quantised forms for the three GEMMs."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=g) * 1e-3
    return x, w, dy


def three_gemms(x, w, dy):
    """(name, bf16 thunk, quantised pair, quantise thunk) for forward, input grad, weight grad."""
    return [
        ("fwd", lambda: x @ w.t(),
         lambda: (fp8.quantize(x, fp8.ROW_TILE), fp8.quantize(w, fp8.WEIGHT_TILE))),
        ("dgrad", lambda: dy @ w,
         lambda: (fp8.quantize(dy, fp8.ROW_TILE), fp8.quantize(w, fp8.WEIGHT_TILE).t())),
        ("wgrad", lambda: dy.t() @ x,
         lambda: (fp8.quantize(dy, fp8.TOKEN_TILE).t(), fp8.quantize(x, fp8.TOKEN_TILE).t())),
    ]


def timed(fn, device, budget: float, min_iters: int = 3) -> float:
    """Median-free mean seconds per call over up to `budget` seconds (after one warm-up)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or (time.perf_counter() - start < budget and iters < 200):
        fn()
        iters += 1
        if iters % 5 == 0:
            sync()
    sync()
    return (time.perf_counter() - start) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the code path")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens-per-expert", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        hidden, ffn, expert_ffn = 256, 384, 128
        args.tokens, args.experts, args.tokens_per_expert, args.budget = 256, 2, 128, 0.05
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        hidden, ffn, expert_ffn = 6144, 12288, 2048
        problem = fp8.blockwise_support_problem(device)
        if problem:
            print(f"blockwise FP8 GEMMs unavailable: {problem}", file=sys.stderr)
            return 2

    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print(env)
    layers = {
        "dense fc1": (args.tokens, hidden, 2 * ffn, 1),
        "dense fc2": (args.tokens, ffn, hidden, 1),
        "expert fc1": (args.tokens_per_expert, hidden, 2 * expert_ffn, args.experts),
        "expert fc2": (args.tokens_per_expert, expert_ffn, hidden, args.experts),
    }
    rows = []
    print(f"{'linear':<11} {'gemm':<6} {'M x K x N':>20} {'bf16 TF/s':>10} {'fp8 TF/s':>9} {'speedup':>8} "
          f"{'fp8+quant':>10} {'max rel err':>11}")
    for name, (m, k, n, groups) in layers.items():
        x, w, dy = gemm_operands(m, k, n, device, dtype)
        for gemm, ref, quantise in three_gemms(x, w, dy):
            a, b = quantise()
            got = fp8.scaled_gemm(a, b, torch.float32)
            want = a.dequantize() @ b.dequantize().t()
            err = ((got - want).abs().max() / want.abs().max()).item()
            shape = tuple(ref().shape)
            contraction = {"fwd": k, "dgrad": n, "wgrad": m}[gemm]
            flops = 2 * shape[0] * shape[1] * contraction * groups
            # `groups` experts one after another: the loop the FP8 expert path runs
            t_bf16 = timed(lambda: [ref() for _ in range(groups)], device, args.budget)
            t_fp8 = timed(lambda: [fp8.scaled_gemm(a, b, dtype) for _ in range(groups)], device, args.budget)
            t_full = timed(lambda: [fp8.scaled_gemm(*quantise(), dtype) for _ in range(groups)], device, args.budget)
            row = dict(linear=name, gemm=gemm, m=shape[0], n=shape[1], k=contraction, groups=groups,
                       bf16_tflops=flops / t_bf16 / 1e12, fp8_tflops=flops / t_fp8 / 1e12,
                       fp8_with_quantize_tflops=flops / t_full / 1e12, max_rel_err=err)
            row["speedup"] = row["fp8_tflops"] / row["bf16_tflops"]
            rows.append(row)
            dims = f"{shape[0]}x{contraction}x{shape[1]}" + (f" x{groups}" if groups > 1 else "")
            print(f"{name:<11} {gemm:<6} {dims:>20} {row['bf16_tflops']:>10.4g} {row['fp8_tflops']:>9.4g} "
                  f"{row['speedup']:>7.2f}x {row['fp8_with_quantize_tflops']:>10.4g} {err:>11.2e}")
    grouped = probe_grouped(device, dtype)
    print(f"torch scaled_grouped_mm with blockwise scales: {grouped}")
    for kind in ("dense", "expert"):
        sel = [r for r in rows if r["linear"].startswith(kind)]
        flops = sum(2 * r["m"] * r["n"] * r["k"] * r["groups"] for r in sel)
        bf16 = flops / sum(2 * r["m"] * r["n"] * r["k"] * r["groups"] / r["bf16_tflops"] for r in sel)
        fp8_ = flops / sum(2 * r["m"] * r["n"] * r["k"] * r["groups"] / r["fp8_tflops"] for r in sel)
        print(f"{kind}: all six GEMMs bf16 {bf16:.1f} TF/s, fp8 {fp8_:.1f} TF/s, {fp8_ / bf16:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, dry_run=args.dry_run, rows=rows, grouped_blockwise=grouped), f, indent=1)
    return 0


def probe_grouped(device, dtype) -> str:
    """Whether torch's grouped scaled GEMM takes 1x128 / 128x128 scales here (two groups)."""
    F = torch.nn.functional
    if device.type != "cuda" or not hasattr(F, "scaled_grouped_mm"):
        return "not tried (no CUDA)" if device.type != "cuda" else f"absent in torch {torch.__version__}"
    x = torch.randn(256, 256, device=device, dtype=dtype)
    w = torch.randn(2, 256, 256, device=device, dtype=dtype)
    qx = fp8.quantize(x, fp8.ROW_TILE)
    qw = [fp8.quantize(w[i], fp8.WEIGHT_TILE) for i in range(2)]
    try:
        F.scaled_grouped_mm(qx.data, torch.stack([q.data for q in qw]).transpose(-2, -1),
                            fp8._kernel_scale(qx), F.ScalingType.BlockWise1x128,
                            torch.stack([fp8._kernel_scale(q) for q in qw]), F.ScalingType.BlockWise128x128,
                            offs=torch.tensor([128, 256], device=device, dtype=torch.int32), output_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - report whatever torch says
        return f"refused: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return "accepted (not yet used by the expert path)"


if __name__ == "__main__":
    sys.exit(main())
