"""Peak GPU memory of training `proxy-h100` on one GPU, next to `glm52 plan`'s estimate.

    python bench/proxy_memory.py --seq-len 4096 --steps 3 --json $OUT/proxy_memory.json

Builds the proxy model exactly as `glm52 pretrain` does (Megatron-Core DDP, distributed
optimizer, bf16, full recomputation, DSA kernels), trains a few steps on random tokens, and
prints the measured peak (torch.cuda.max_memory_reserved, what the allocator took from the
device) and the estimate for the same layout. On a CPU it runs a tiny smoke version
(`--model tiny`) so the script itself stays tested; the comparison needs a GPU.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="proxy-h100")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--gpu-mem", type=float, default=80.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from glm52_train import compat, parallel
    from glm52_train.config import get_model_config
    from glm52_train.plan import GiB, Layout, estimate
    from glm52_train.run_config import RunConfig
    from glm52_train.training import setup
    from glm52_train.training.step import loss_func

    cuda = torch.cuda.is_available()
    cfg = RunConfig(model=args.model)
    cfg.train.micro_batch_size = args.micro_batch
    cfg.train.global_batch_size = args.micro_batch
    cfg.train.recompute = "full"
    cfg.train.precision = "bf16" if cuda else "fp32"
    cfg.data.seq_length = args.seq_len
    parallel.initialize(cfg.parallel, seed=1234)
    model_cfg = get_model_config(args.model)
    chunks, config = setup.build_model_chunks(model_cfg, cfg, args.seq_len)
    chunks = setup.wrap_ddp(chunks, config, cfg.use_bf16())
    optimizer, scheduler, _ = setup.build_optimizer(cfg, chunks, config, cfg.use_bf16())
    device = compat.default_device()

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, model_cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
            yield ids[:, :-1].to(device), ids[:, 1:].to(device)

    data = batches()

    def forward_step(iterator, model):
        tokens, labels = next(iterator)
        pos = torch.arange(args.seq_len, device=device).unsqueeze(0).expand_as(tokens)
        mask = torch.ones_like(tokens, dtype=torch.float)
        out = model(tokens, pos, None, labels=labels, loss_mask=mask)
        return out, lambda o: loss_func(mask, o)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.time()
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=1,
            seq_length=args.seq_len, micro_batch_size=args.micro_batch, forward_only=False,
        )
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - start)
    measured = torch.cuda.max_memory_reserved() if cuda else 0
    allocated = torch.cuda.max_memory_allocated() if cuda else 0
    est = estimate(model_cfg, Layout(), args.seq_len, args.gpu_mem, args.micro_batch, num_microbatches=1,
                   recompute=True)
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "measured_peak_reserved_gib": measured / GiB,
        "measured_peak_allocated_gib": allocated / GiB,
        "estimate_gib": est.total / GiB,
        "estimate": {k: v / GiB for k, v in est.to_dict().items() if isinstance(v, float)},
        "ratio_estimate_over_measured": (est.total / measured) if measured else None,
        "step_seconds": times,
    }
    print(f"{'model':12s} {'seq':>7s} {'measured':>10s} {'estimate':>10s} {'ratio':>7s}")
    ratio = f"{result['ratio_estimate_over_measured']:.3f}" if measured else "n/a"
    print(f"{args.model:12s} {args.seq_len:7d} {measured / GiB:9.1f}G {est.total / GiB:9.1f}G {ratio:>7s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
