"""How far torch's blockwise FP8 GEMM lands from the dequantised product, per GEMM of the
linear layer (forward, input gradient, weight gradient), for the scale layout
`glm52_train.model.fp8` passes and for the other layouts one could read torch's contract as.
A wrong layout gives relative errors of order 1; the FP8 tensor cores' accumulation, about
1e-4..1e-3. Needs a CUDA GPU with blockwise scaled_mm (sm90). One JSON line per row.

    python bench/fp8_scale_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variants(q, is_b: bool):
    """Candidate scale tensors for one operand."""
    from glm52_train.model import fp8

    out = {"ours": fp8._kernel_scale(q)}
    s = q.scale
    if q.tile == fp8.ROW_TILE:
        out["row-major"] = s.contiguous()
        if is_b:
            out["transposed"] = s.t().contiguous()
    else:
        out["unpadded K-major"] = s.contiguous().t()
        out["transposed row-major"] = s.t().contiguous()
        out["plain"] = s.contiguous()
        pad = (-s.shape[1]) % 4
        out["padded, sliced"] = torch.nn.functional.pad(s, (0, pad), value=1.0).contiguous()[:, :s.shape[1]].t()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from glm52_train.model import fp8

    F = torch.nn.functional
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for m, n, k in [(256, 256, 384), (512, 1024, 2048)]:
        x = torch.randn(m, k, device=dev, generator=gen)
        w = torch.randn(n, k, device=dev, generator=gen)
        dy = torch.randn(m, n, device=dev, generator=gen)
        cases = {
            "forward": (fp8.quantize(x, fp8.ROW_TILE), fp8.quantize(w, fp8.WEIGHT_TILE)),
            "input grad": (fp8.quantize(dy, fp8.ROW_TILE), fp8.quantize(w, fp8.WEIGHT_TILE).t()),
            "weight grad": (fp8.quantize(dy, fp8.TOKEN_TILE).t(), fp8.quantize(x, fp8.TOKEN_TILE).t()),
        }
        for name, (a, b) in cases.items():
            want = a.dequantize() @ b.dequantize().t()
            for va, sa in variants(a, False).items():
                for vb, sb in variants(b, True).items():
                    row = {"shape": [m, n, k], "gemm": name, "scale_a": va, "scale_b": vb,
                           "a_shape": list(sa.shape), "a_stride": list(sa.stride()),
                           "b_shape": list(sb.shape), "b_stride": list(sb.stride())}
                    try:
                        got = F.scaled_mm(a.data.contiguous(), b.data.contiguous().t(), sa, fp8._recipe(a.tile),
                                          sb, fp8._recipe(b.tile), output_dtype=torch.float32)
                        row["rel_err"] = ((got - want).norm() / want.norm()).item()
                        row["max_abs_err"] = (got - want).abs().max().item()
                        row["max_abs"] = want.abs().max().item()
                    except Exception as e:  # noqa: BLE001 - the refusal is the datum
                        row["error"] = str(e).splitlines()[0][:160]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    # the same GEMM without blockwise scales (tensor-wise, scale 1): the tensor cores' own error
    a = fp8.quantize(torch.randn(256, 2048, device=dev, generator=gen), fp8.ROW_TILE)
    b = fp8.quantize(torch.randn(1024, 2048, device=dev, generator=gen), fp8.ROW_TILE)
    ad, bd = a.dequantize(), b.dequantize()
    sa, sb = ad.abs().max() / 448, bd.abs().max() / 448
    qa, qb = (ad / sa).to(fp8.E4M3), (bd / sb).to(fp8.E4M3)
    want = (qa.float() * sa) @ (qb.float() * sb).t()
    got = torch._scaled_mm(qa, qb.t(), sa.reshape(()).float(), sb.reshape(()).float(), out_dtype=torch.float32)
    row = {"gemm": "tensor-wise reference", "rel_err": ((got - want).norm() / want.norm()).item()}
    rows.append(row)
    print(json.dumps(row), flush=True)
    print("support check:", fp8.blockwise_support_problem(dev))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
