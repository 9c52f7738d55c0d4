"""The longest sequence one GPU trains a single full-width GLM-5.2 layer at.

    python bench/long_context_layer.py --layer dense --json $OUT/long_context_layer.json
    python bench/long_context_layer.py --layer moe --experts 32

One decoder layer of `glm52-744b` (hidden 6144, 64 MLA heads, the 32 x 128 indexer with
top-2048; `dense`: the 12288-wide SwiGLU of layers 0-2, `moe`: routed experts + the shared
expert) runs forward and backward in bf16 on the DSA kernel path, with the layer recomputed in
backward (activation checkpointing). The sequence doubles until the step runs out of memory,
then bisects. The table gives time, peak memory and memory per token at each length, and the
GPUs `glm52 plan` needs for a 1M-token sequence. On a CPU it runs a smoke version at tiny
sizes (`--smoke`).

    python bench/long_context_layer.py --dsa-mode warmup          # the dense warm-up's longest
    python bench/long_context_layer.py --dense-vs-sparse 2048     # seq 2048 at top-2048

`--dsa-mode` picks the layer's `dsa.mode` (the warm-up and dense modes run the dense SDPA path).
`--dense-vs-sparse SEQ` instead times one layer at sequence SEQ with top-k = SEQ (Megatron-
Bridge's published GLM-5.2 run: 2048 / top-2048, where every query selects every earlier key)
two ways: the dense path that sparse training takes there, and the sparse kernels forced to
run anyway; median of a few steps each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def build_layer(model_cfg, moe: bool, bf16: bool, dsa_mode: str = "sparse"):
    from glm52_train.model.build import transformer_config
    from glm52_train.model.spec import glm52_layer_spec
    from glm52_train.run_config import RunConfig
    from megatron.core.transformer.spec_utils import build_module

    run = RunConfig()
    run.train.precision = "bf16" if bf16 else "fp32"
    run.dsa.mode = dsa_mode
    config = transformer_config(model_cfg, run, cpu_init=False)
    spec = glm52_layer_spec(config, moe=moe, use_te=False)
    layer = build_module(spec, config=config, layer_number=1)
    return layer.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu"), config


def step(layer, seq: int, hidden: int, dtype) -> float:
    from torch.utils.checkpoint import checkpoint

    device = next(layer.parameters()).device
    x = torch.randn(seq, 1, hidden, device=device, dtype=dtype, requires_grad=True)
    start = time.time()
    out, _ = checkpoint(lambda t: layer(hidden_states=t), x, use_reentrant=False)
    out.float().pow(2).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layer", choices=["dense", "moe"], default="dense")
    parser.add_argument("--experts", type=int, default=None, help="routed experts (default: the model's)")
    parser.add_argument("--start", type=int, default=32768)
    parser.add_argument("--limit", type=int, default=4 * 1048576)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dsa-mode", choices=["sparse", "warmup", "dense"], default="sparse")
    parser.add_argument("--dense-vs-sparse", type=int, default=None, metavar="SEQ",
                        help="time the dense path against the sparse kernels at SEQ with top-k = SEQ")
    args = parser.parse_args(argv)
    if args.dense_vs_sparse is not None:
        return dense_vs_sparse(args)

    from glm52_train import parallel
    from glm52_train.config import get_model_config
    from glm52_train.plan import GiB, plan

    cuda = torch.cuda.is_available()
    base = get_model_config("tiny" if args.smoke or not cuda else "glm52-744b")
    model_cfg = base.replace(num_layers=1, num_dense_layers=1 if args.layer == "dense" else 0,
                             index_pattern="F", mtp_layers=0, mtp_steps=0)
    if args.experts:
        model_cfg = model_cfg.replace(num_experts=args.experts, moe_topk=min(model_cfg.moe_topk, args.experts))
    parallel.initialize(seed=1234)
    layer, config = build_layer(model_cfg, args.layer == "moe", bf16=cuda, dsa_mode=args.dsa_mode)
    layer.train()
    dtype = torch.bfloat16 if cuda else torch.float32
    rows, seq, best = [], (args.start if cuda else 64), None
    lo, hi = None, None
    while seq <= args.limit:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = step(layer, seq, model_cfg.hidden_size, dtype)
        except torch.OutOfMemoryError:
            hi = seq
            rows.append({"seq": seq, "oom": True})
            print(f"{seq:>9d}  OOM")
        else:
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            rows.append({"seq": seq, "seconds": seconds, "peak_gib": peak / GiB,
                         "bytes_per_token": peak / seq if cuda else None})
            print(f"{seq:>9d}  {seconds:8.2f} s  {peak / GiB:8.2f} GiB  {peak / seq / 1024:8.1f} KiB/token")
            lo, best = seq, rows[-1]
        if hi is None:
            seq *= 2
        else:
            if lo is None or hi - lo <= max(lo // 16, 1024):
                break
            seq = (lo + hi) // 2 // 1024 * 1024
        if args.smoke and len(rows) >= 2:
            break
    projection = None
    if cuda and best:
        fitting, _ = plan(get_model_config("glm52-744b"), 1024, 80.0, 1048576)
        projection = fitting[0].layout.describe() if fitting else None
    result = {"layer": args.layer, "dsa_mode": args.dsa_mode, "model": model_cfg.to_dict(), "rows": rows, "max_seq": best["seq"] if best else None,
              "bytes_per_token_at_max": best.get("bytes_per_token") if best else None,
              "plan_for_1m_tokens_on_1024_gpus": projection}
    print(json.dumps({k: v for k, v in result.items() if k != "model"}, indent=1)[:2000])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def dense_vs_sparse(args) -> int:
    """One layer at sequence SEQ, top-k SEQ: the dense path against the sparse kernels."""
    import statistics

    from glm52_train import parallel
    from glm52_train.config import get_model_config

    cuda = torch.cuda.is_available()
    seq = args.dense_vs_sparse if cuda and not args.smoke else min(args.dense_vs_sparse, 32)
    base = get_model_config("tiny" if args.smoke or not cuda else "glm52-744b")
    model_cfg = base.replace(num_layers=1, num_dense_layers=1 if args.layer == "dense" else 0,
                             index_pattern="F", mtp_layers=0, mtp_steps=0, index_topk=seq)
    parallel.initialize(seed=1234)
    layer, _ = build_layer(model_cfg, args.layer == "moe", bf16=cuda, dsa_mode="sparse")
    layer.train()
    core = layer.self_attention.core_attention
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = {}
    step(layer, seq, model_cfg.hidden_size, dtype)  # warm-up: allocator, kernel compilation
    for path in ("dense_path", "sparse_kernels"):
        if path == "sparse_kernels":
            core.dense_plan = lambda sq, layout: None  # what sparse training ran before the shortcut
            step(layer, seq, model_cfg.hidden_size, dtype)  # warm-up of the sparse kernels
        assert (core.dense_plan(seq, None) is None) == (path == "sparse_kernels")
        times = [step(layer, seq, model_cfg.hidden_size, dtype) for _ in range(2 if args.smoke else 8)]
        rows[path] = {"median_s": statistics.median(times[1:] if len(times) > 2 else times), "times": times}
        print(f"{path:<16} seq {seq} top-{seq}: {rows[path]['median_s'] * 1e3:9.2f} ms")
    speedup = rows["sparse_kernels"]["median_s"] / rows["dense_path"]["median_s"]
    print(f"dense path {speedup:.2f}x the sparse kernels")
    result = {"layer": args.layer, "seq": seq, "topk": seq, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "rows": rows, "dense_speedup": speedup}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
