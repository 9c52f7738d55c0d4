"""What a grouped FP8 GEMM's coarser scales would cost in accuracy (issue 26), on the CPU: the
expert GEMMs of GLM-5.2 with blockwise scales (ours: 1x128 activations and gradients, 128x128
weights, 128x1 along tokens for the weight gradient) against row-wise scales (what
`torch._scaled_grouped_mm` takes on Hopper: one per token row over the whole contraction, one
per weight output row; for the weight gradient one per feature over all of an expert's tokens)
and one tensor-wise scale.

    python bench/fp8_scaling_accuracy.py --json OUT.json [--tokens 512] [--seed 0]

For each GEMM and operand model it prints the relative Frobenius error of the product of the
quantised operands (dequantised, multiplied in float64) against the float64 product of the
unquantised ones, with bf16 operands as the floor, and the median relative error of the
activation (or, for the weight gradient, dy) operand's entries: the output's norm is carried by
its largest terms, the entry error shows what happens to the ordinary ones. Every granularity uses power-of-two scales
(torch's row-wise and tensor-wise scales may be any fp32; a power of two costs at most one bit
of range, not precision), so the table isolates the tile size.

The operands are synthetic, at GLM-5.2's expert shapes (hidden 6144, expert FFN 2048): tiny's
experts contract over 128 or 64 channels (one tile: row-wise is blockwise there), so its
activations cannot show the difference. `gaussian`: unit-variance entries. `outlier channels`:
as LLM activations are reported to have (LLM.int8(), SmoothQuant: a few channels 20-100x the
rest), 1 channel in 256 scaled by 64. `massive`: two channels scaled by 2^14 (the "massive
activations" reported at ~10^4 times the median), past e4m3's normal range (448 / 2^-6 = 2^14.8)
from the rest. Weights: N(0, 0.02^2). Weight-gradient `dy`: each token's row scaled by 10^u, u
uniform in [-3, 0] or [-6, 0] (gradients differ by orders of magnitude between tokens), against
`outlier channels` activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HIDDEN, FFN = 6144, 2048


def rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=512, help="tokens of one expert (a multiple of 128)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from glm52_train.model.fp8 import ROW_TILE, TOKEN_TILE, WEIGHT_TILE, quantize_reference

    g = torch.Generator().manual_seed(args.seed)
    m = args.tokens

    def q(t, tile):
        return quantize_reference(t, tile).dequantize(torch.float64)

    def element_err(t, tile) -> float:
        """The median over t's nonzero entries of |q(t) - t| / |t|: a typical entry's precision."""
        t64 = t.double()
        nz = t64 != 0
        return float(((q(t, tile) - t64).abs()[nz] / t64.abs()[nz]).median())

    def activations(k: int, outliers: str):
        x = torch.randn(m, k, generator=g)
        if outliers == "outlier channels":
            x[:, torch.randperm(k, generator=g)[: k // 256]] *= 64.0
        elif outliers == "massive":
            x[:, torch.randperm(k, generator=g)[:2]] *= 2.0 ** 14
        return x

    def forward_case(k: int, n: int, outliers: str):
        x, w = activations(k, outliers), torch.randn(n, k, generator=g) * 0.02
        want = x.double() @ w.double().t()
        tiles = {"blockwise": ROW_TILE, "row-wise": (1, k), "tensor-wise": (m, k)}
        return want, {k_: element_err(x, t) for k_, t in tiles.items()}, {
            "bf16": x.bfloat16().double() @ w.bfloat16().double().t(),
            "blockwise": q(x, ROW_TILE) @ q(w, WEIGHT_TILE).t(),
            "row-wise": q(x, (1, k)) @ q(w, (1, k)).t(),
            "tensor-wise": q(x, (m, k)) @ q(w, (n, k)).t(),
        }

    def wgrad_case(n: int, k: int, decades: float):
        dy = torch.randn(m, n, generator=g) * 10.0 ** (-decades * torch.rand(m, 1, generator=g))
        x = activations(k, "outlier channels")
        want = dy.double().t() @ x.double()
        tiles = {"blockwise": TOKEN_TILE, "row-wise": (m, 1), "tensor-wise": (m, n)}
        return want, {k_: element_err(dy, t) for k_, t in tiles.items()}, {
            "bf16": dy.bfloat16().double().t() @ x.bfloat16().double(),
            "blockwise": q(dy, TOKEN_TILE).t() @ q(x, TOKEN_TILE),
            "row-wise": q(dy, (m, 1)).t() @ q(x, (m, 1)),
            "tensor-wise": q(dy, (m, n)).t() @ q(x, (m, k)),
        }

    fc1, fc2 = f"fc1 forward {m}x{HIDDEN} @ {FFN}x{HIDDEN}", f"fc2 forward {m}x{FFN} @ {HIDDEN}x{FFN}"
    wgrad = f"fc2 weight grad {HIDDEN}x{m} @ {m}x{FFN}"
    cases = [(gemm, kind, (lambda gemm=gemm, kind=kind: forward_case(*shape, kind)))
             for gemm, shape in ((fc1, (HIDDEN, FFN)), (fc2, (FFN, HIDDEN)))
             for kind in ("gaussian", "outlier channels", "massive")]
    cases += [(wgrad, f"dy 1e-{d}..1", (lambda d=d: wgrad_case(HIDDEN, FFN, d))) for d in (3, 6)]
    rows = []
    kinds = ("blockwise", "row-wise", "tensor-wise")
    print(f"{'':<56} {'output error':<40} {'median entry error of A':<30}")
    print(f"{'GEMM':<36} {'operands':<19} {'bf16':>9} " + " ".join(f"{k:>10}" for k in kinds) + " "
          + " ".join(f"{k:>10}" for k in kinds))
    for gemm, operands, make in cases:
        want, entry, got = make()
        row = dict(gemm=gemm, operands=operands, output_error={k: rel_err(v, want) for k, v in got.items()},
                   entry_error_a=entry)
        rows.append(row)
        out = row["output_error"]
        print(f"{gemm:<36} {operands:<19} {out['bf16']:>9.2e} " + " ".join(f"{out[k]:>10.2e}" for k in kinds) + " "
              + " ".join(f"{entry[k]:>10.2e}" for k in kinds), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=m, seed=args.seed, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
