"""Checkpoint cost on CPU: how long a training step is blocked by a save (synchronous vs
asynchronous), and what the content checksums cost on save and on load.

    python bench/checkpoint_save.py [--mb 300] [--repeats 3] [--out bench/checkpoint_save.json]

The state is a Megatron-Core module in DDP with the distributed optimizer (AdamW, one step taken
so its state exists): `--mb` MB of model + optimizer state in all, saved through
`glm52_train.checkpoint.save_checkpoint` like a training checkpoint. Measured per save:

- state: the distributed optimizer's `fully_reshardable` state dict (gathered per parameter),
  built before either kind of save, timed apart;
- blocked: the time `save_checkpoint` holds the caller (synchronous: the whole save; asynchronous:
  planning, the snapshot and the fork), plus, for asynchronous saves, the extra time of the next
  optimizer step (it copies the pages it writes, copy-on-write, while the writer holds them);
- written: the asynchronous save's end-to-end time until committed;
- checksum on save: XXH3-64 over the bytes written, timed alone, against the synchronous save;
- load: `checkpoint.load_sharded` (sizes, shapes and checksums checked while reading) against
  Megatron-Core's stock load of the same folder and templates, and every file's checksum alone.
Prints one table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(mb: float):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    # fp32 params + grads (not saved) + AdamW's two moments and the fp32 main copy: state = 3-4x params
    width = 2048
    layers = max(1, round(mb * 2**20 / (3 * 4 * width * width)))

    class Stack(MegatronModule):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    config = TransformerConfig(num_layers=1, hidden_size=width, num_attention_heads=1)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True, bucket_size=None)
    model = DistributedDataParallel(config, ddp, Stack(config))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                       [model])
    model.module(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def state_of(model, optimizer):
    from glm52_train import checkpoint
    from glm52_train.training.state import _optimizer_sharded_state

    model_sd = checkpoint.model_sharded_state([model])
    return {"optimizer": _optimizer_sharded_state(optimizer, model_sd, is_loading=False)}


def load_templates(model, optimizer, with_model: bool) -> dict:
    from glm52_train import checkpoint
    from glm52_train.training.state import _optimizer_sharded_state

    model_sd = checkpoint.model_sharded_state([model])
    state = {"optimizer": _optimizer_sharded_state(optimizer, model_sd, is_loading=True)}
    return {**model_sd, **state} if with_model else state


def step(model) -> float:
    """What an optimizer step does to memory: write every parameter once."""
    t = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0000001)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", default="bench/checkpoint_save.json")
    args = parser.parse_args()

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from glm52_train import checkpoint, checksums, parallel

    torch.set_num_threads(1)
    parallel.initialize(seed=1)
    model, optimizer = build(args.mb)
    root = Path(args.dir or tempfile.mkdtemp(prefix="glm52-ckpt-bench-"))
    meta = {"kind": "bench"}
    rows: dict[str, list[float]] = {k: [] for k in (
        "state_build_s", "sync_save_s", "async_blocked_s", "async_next_step_extra_s", "async_written_s", "hash_written_s",
        "load_checked_s", "load_stock_s", "hash_files_s")}
    size = 0
    queue = AsyncCallsQueue(persistent=False)
    for r in range(args.repeats):
        base_step = statistics.median(step(model) for _ in range(3))
        t = time.perf_counter()
        extra = state_of(model, optimizer)
        rows["state_build_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        folder = checkpoint.save_checkpoint(root / "sync", r, [model], meta=meta, extra_sharded_state=extra)
        rows["sync_save_s"].append(time.perf_counter() - t)
        files = [folder / f for f in checkpoint.read_meta(folder)["files"]]
        size = sum(f.stat().st_size for f in files)

        extra = state_of(model, optimizer)
        t = time.perf_counter()
        checkpoint.save_checkpoint(root / "async", r, [model], meta=meta, extra_sharded_state=extra, async_queue=queue)
        rows["async_blocked_s"].append(time.perf_counter() - t)
        rows["async_next_step_extra_s"].append(max(0.0, step(model) - base_step))
        queue.maybe_finalize_async_calls(blocking=True)
        rows["async_written_s"].append(time.perf_counter() - t)

        t = time.perf_counter()
        for f in files:
            checksums.file_digest(f)
        rows["hash_files_s"].append(time.perf_counter() - t)
        data = [f.read_bytes() for f in files]
        t = time.perf_counter()
        for d in data:
            checksums.xxhash.xxh3_64(d).hexdigest()
        rows["hash_written_s"].append(time.perf_counter() - t)
        del data

        templates = load_templates(model, optimizer, True)
        t = time.perf_counter()
        checkpoint.load_sharded(folder, templates)
        rows["load_checked_s"].append(time.perf_counter() - t)
        templates = load_templates(model, optimizer, True)
        t = time.perf_counter()
        dist_checkpointing.load(templates, str(folder))
        rows["load_stock_s"].append(time.perf_counter() - t)
        for sub in ("sync", "async"):
            for old in checkpoint.complete_checkpoints(root / sub)[:-1]:
                shutil.rmtree(old)
    queue.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "checkpoint_mb": size / 2**20, "model_mb": model_bytes / 2**20, "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(), "median": med, "all": rows,
        "async_blocked_over_sync": (med["async_blocked_s"] + med["async_next_step_extra_s"]) / med["sync_save_s"],
        "async_blocked_over_sync_with_state": (med["state_build_s"] + med["async_blocked_s"] + med["async_next_step_extra_s"])
        / (med["state_build_s"] + med["sync_save_s"]),
        "checksum_over_save": med["hash_written_s"] / med["sync_save_s"],
        "checksum_over_load": (med["load_checked_s"] - med["load_stock_s"]) / med["load_stock_s"],
    }
    print(f"checkpoint {result['checkpoint_mb']:.0f} MiB (model {result['model_mb']:.0f} MiB + optimizer), "
          f"median of {args.repeats}, {root}")
    print(f"{'optimizer state gathered (both ways)':44s} {med['state_build_s']:8.3f} s")
    print(f"{'synchronous save (blocks the step)':44s} {med['sync_save_s']:8.3f} s")
    print(f"{'asynchronous save: blocks the step':44s} {med['async_blocked_s']:8.3f} s")
    print(f"{'  + next step slower (copy-on-write)':44s} {med['async_next_step_extra_s']:8.3f} s")
    print(f"{'  written and committed after':44s} {med['async_written_s']:8.3f} s")
    print(f"{'blocked, asynchronous / synchronous':44s} {100 * result['async_blocked_over_sync']:7.1f} %  "
          f"({100 * result['async_blocked_over_sync_with_state']:.1f} % with the state gathering)")
    print(f"{'XXH3-64 of the bytes written (save)':44s} {med['hash_written_s']:8.3f} s  "
          f"({100 * result['checksum_over_save']:.1f} % of the synchronous save)")
    print(f"{'XXH3-64 of the files, read from disk':44s} {med['hash_files_s']:8.3f} s")
    print(f"{'load, checksums checked while reading':44s} {med['load_checked_s']:8.3f} s")
    print(f"{'load, Megatron-Core stock (no checksums)':44s} {med['load_stock_s']:8.3f} s  "
          f"(checking costs {100 * result['checksum_over_load']:+.1f} %)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
