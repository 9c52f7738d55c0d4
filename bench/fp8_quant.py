"""Blockwise FP8 quantisation bandwidth: the fused Triton kernel against PyTorch's ops (issue 26).

    python bench/fp8_quant.py --json OUT.json            # CUDA
    python bench/fp8_quant.py --dry-run --json OUT.json  # CPU: small shapes, Triton's interpreter

For each case (an activation [tokens, hidden] quantised in both tilings from one read, as the
FP8 linear's forward does with x and its backward with dy; a weight [out, in] in 128x128
tiles, as the weight cache does once per step) and each path (`triton`: the fused kernel of
glm52_train/kernels/fp8_quant.py; `reference`: `quantize_reference` once per tiling, the torch
ops that ran before), times a call and reports GB/s: bytes read (the input once) plus bytes
written (one e4m3 byte per element per tiling, and the fp32 scales) over the time. Every
kernel output is first compared byte for byte with the reference. Target (issue 26): at least
2 TB/s on an H100 (torchao's quantisation kernels: 2.4-2.8 TB/s). `--budget` bounds the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cases(dry_run: bool) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """(name, rows, cols, tilings): GLM-5.2's hidden 6144, dense FFN 12288, experts 2048."""
    if dry_run:
        return [("activation", 256, 384, ("row", "token")), ("weight", 384, 256, ("block",))]
    return [
        ("activation 8192x6144", 8192, 6144, ("row", "token")),
        ("ffn activation 8192x12288", 8192, 12288, ("row", "token")),
        ("expert tokens 4096x2048", 4096, 2048, ("row", "token")),
        ("weight 24576x6144", 24576, 6144, ("block",)),
        ("expert weight 4096x6144", 4096, 6144, ("block",)),
    ]


def timed(fn, cuda: bool, budget: float) -> float:
    import torch

    fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - start < budget and n < 200):
        fn()
        n += 1
    sync()
    return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small shapes, Triton's interpreter")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case and path")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    from glm52_train.model import fp8

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/fp8_quant.py needs a CUDA GPU; --dry-run runs the kernel in Triton's interpreter.",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    rows_out = []
    for name, rows, cols, tilings in cases(args.dry_run):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(rows, cols, device=device, generator=g).to(dtype)
        flags = {t: t in tilings for t in ("row", "token", "block")}
        got = fp8.quantize_tilings(x, **flags, impl="triton")
        tiles = dict(row=fp8.ROW_TILE, token=fp8.TOKEN_TILE, block=fp8.WEIGHT_TILE)
        exact = True
        moved = x.numel() * x.element_size()
        for q, t in zip(got, ("row", "token", "block")):
            if q is None:
                continue
            want = fp8.quantize_reference(x, tiles[t])
            exact &= torch.equal(q.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(q.scale, want.scale)
            moved += q.data.numel() + q.scale.numel() * 4
        row = dict(case=name, rows=rows, cols=cols, tilings=list(tilings), dtype=str(dtype).removeprefix("torch."),
                   bytes=moved, bit_exact=bool(exact))
        budget = min(args.budget, 0.05) if args.dry_run else args.budget
        for path in ("triton", "reference"):
            if path == "triton":
                def fn():
                    fp8.quantize_tilings(x, **flags, impl="triton")
            else:
                def fn():
                    for t in tilings:
                        fp8.quantize_reference(x, tiles[t])
            s = timed(fn, device.type == "cuda", budget)
            row[f"{path}_ms"] = s * 1e3
            row[f"{path}_gb_per_s"] = moved / s / 1e9
        rows_out.append(row)
        print(f"{name:<28} {'exact' if exact else 'DIFFERS':<8} triton {row['triton_gb_per_s']:>9.4g} GB/s"
              f"   torch ops {row['reference_gb_per_s']:>9.4g} GB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, dry_run=args.dry_run, rows=rows_out), f, indent=1)
    return 0 if all(r["bit_exact"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
