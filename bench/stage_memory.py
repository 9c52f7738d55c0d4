"""What one pipeline stage of a full-width GLM-5.2 keeps alive per micro-batch, measured on one
GPU, next to `glm52 plan`'s activation term for the same layers.

    python bench/stage_memory.py --json $OUT/stage_memory.json [--recompute selective full none]

The stage is rank 1 of Megatron-Bridge's 352-GPU layout (issue 17): eight MoE layers of
`glm52-744b` (hidden 6144, 64 MLA heads, the 32 x 128 indexer with top-2048, the shared
expert), sequence 2048, micro-batch 1, bf16, on the DSA kernel path. Expert parallelism is
emulated on one GPU: under EP32 each rank holds 8 of the 256 experts and receives, on average,
8 routed copies of each of its 2048 tokens, so the stage here has 8 experts, every token routed
to all of them (top-8 of 8): the same expert work and the same saved tensors per token, with a
router over 8 instead of 256 experts (2 KiB per token less, counted in the comparison).

For each recomputation setting it runs micro-batches forward one after another, keeping their
graphs as a pipeline stage does before its first backward, and reads
torch.cuda.memory_allocated after each: what the micro-batch keeps alive, less its output
(Megatron-Core frees a sent output's data), plus its input (saved by the first layer, allocated
before the forward: the pipeline holds it); then the backwards, with the
peak above the kept state (the working set of the layer being recomputed or differentiated).
The planner's numbers come from `glm52_train.plan` at the emulated config, so the comparison is
like for like. On a CPU `--smoke` runs `tiny` (the plumbing only).
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

MiB = 1024**2


def stage_config(smoke: bool, first: int, layers: int):
    from glm52_train.config import get_model_config

    full = get_model_config("tiny" if smoke else "glm52-744b")
    pattern = full.layer_index_pattern[first:first + layers]
    # the stage's first layer runs its own indexer here (in the real run a shared first layer
    # receives the top-k from the previous stage; it saves no indexer tensors either way)
    pattern = "F" + pattern[1:]
    experts = min(full.num_experts, 8)
    return full.replace(num_layers=layers, num_dense_layers=0, index_pattern=pattern, mtp_layers=0, mtp_steps=0,
                        num_experts=experts, moe_topk=experts), pattern


def measure(model_cfg, recompute: str, modules: list[str], seq: int, micro_batches: int, device) -> dict:
    from glm52_train import parallel
    from glm52_train.model.build import build_model
    from glm52_train.plan import BF16, _chunk_saved_bytes
    from glm52_train.run_config import RunConfig

    cuda = device.type == "cuda"
    run = RunConfig()
    run.train.precision = "bf16" if cuda else "fp32"
    run.train.recompute = recompute
    if recompute == "selective":
        run.train.recompute_modules = modules
    parallel.initialize(seed=1234)
    model = build_model(model_cfg, run, pre_process=False, post_process=False, cpu_init=not cuda).to(device)
    model.train()
    dtype = torch.bfloat16 if cuda else torch.float32
    h = model_cfg.hidden_size

    def allocated() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return 0

    pos = torch.arange(seq, device=device).unsqueeze(0)
    inputs = [torch.randn(seq, 1, h, device=device, dtype=dtype, requires_grad=True) for _ in range(micro_batches)]
    base = allocated()
    outputs, kept = [], []
    start = time.time()
    for x in inputs:
        before = allocated()
        model.set_input_tensor(x)
        out = model(None, pos, None)
        outputs.append(out)
        kept.append(allocated() - before)
    forward_s = time.time() - start
    state = allocated()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for out in outputs:
        out.backward(torch.ones_like(out) / out.numel())
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    backward_s = time.time() - start
    out_bytes = outputs[0].untyped_storage().nbytes()
    del outputs, inputs
    model.zero_grad(set_to_none=True)
    del model
    if cuda:
        torch.cuda.empty_cache()
    act, dsa, _, largest, _ = _chunk_saved_bytes(model_cfg, list(range(model_cfg.num_layers)), 1, False, seq,
                                                 recompute, modules, 1)
    # what the micro-batch adds, less its output (sent and freed by the pipeline), plus its
    # input: the stage's first layer saves it, but it was allocated before the forward
    in_bytes = seq * h * (2 if cuda else 4)
    per_mb = sum(kept) / len(kept) - out_bytes + in_bytes
    return {
        "recompute": recompute if recompute != "selective" else f"selective ({','.join(modules)})",
        "kept_per_microbatch_mib": [k / MiB for k in kept],
        "output_mib": out_bytes / MiB,
        "input_mib": in_bytes / MiB,
        "measured_mib": per_mb / MiB,
        "planned_mib": act / MiB,
        "planned_dsa_mib": dsa / MiB,
        "plan_over_measured": act / per_mb if per_mb > 0 else None,
        "backward_peak_above_kept_mib": (peak - state) / MiB if cuda else None,
        "planned_largest_layer_mib": largest / MiB,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "bf16_bytes": BF16,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recompute", nargs="+", default=["selective", "full", "none"])
    parser.add_argument("--modules", default="mla_up_proj")
    parser.add_argument("--first-layer", type=int, default=6, help="the stage's first layer in the full model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny, any device")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        from glm52_train.kernels import api

        api.enable_interpreter()
    model_cfg, pattern = stage_config(not cuda, args.first_layer if cuda else 1, args.layers if cuda else 3)
    seq = args.seq_len if cuda else 64
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "pattern": pattern, "seq_len": seq, "layers": model_cfg.num_layers,
              "experts": model_cfg.num_experts, "rows": []}
    print(f"{'recompute':28s} {'measured':>10s} {'planned':>10s} {'plan/meas':>9s} {'bwd peak':>9s}  MiB per micro-batch")
    for recompute in args.recompute:
        row = measure(model_cfg, recompute, args.modules.split(","), seq, args.micro_batches, device)
        result["rows"].append(row)
        ratio = f"{row['plan_over_measured']:.3f}" if row["plan_over_measured"] else "n/a"
        peak = f"{row['backward_peak_above_kept_mib']:.0f}" if row["backward_peak_above_kept_mib"] is not None else "n/a"
        print(f"{row['recompute']:28s} {row['measured_mib']:10.1f} {row['planned_mib']:10.1f} {ratio:>9s} {peak:>9s}",
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
