"""One training step of a run config in one rank of a pipeline, counting with saved-tensor
hooks which micro-batches' activations each model chunk keeps alive (started by
tests/test_plan.py under torchrun; writes OUT/rank<R>.json).

Every tensor autograd saves during a chunk's forward is tagged with (chunk, micro-batch); the
tag is alive while any of its tensors is still held by the graph (a weak-reference finalizer
on the packed object counts it down when Megatron-Core's backward releases it). After each
forward the live micro-batches per chunk are recorded, which is what `plan.schedule_in_flight`
predicts; the saved bytes of each chunk's first micro-batch and the largest live total are
recorded too."""

from __future__ import annotations

import json
import os
import sys
import warnings
import weakref
from collections import Counter
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


class Ledger:
    def __init__(self) -> None:
        self.live: Counter = Counter()  # (chunk, microbatch) -> packed objects alive
        self.bytes: dict = {}  # (chunk, microbatch) -> saved bytes, counted when its forward ends
        self.storages: dict = {}  # (chunk, microbatch) -> {storage pointer: tensor}
        self.tag = None
        self.after_forward: list = []
        self.peak_bytes = 0

    class Packed:
        def __init__(self, t):
            self.t = t

    def pack(self, t):
        holder = Ledger.Packed(t)
        tag = self.tag
        self.live[tag] += 1
        self.storages.setdefault(tag, {}).setdefault(t.untyped_storage().data_ptr(), t)
        weakref.finalize(holder, self._release, tag)
        return holder

    def _release(self, tag) -> None:
        self.live[tag] -= 1
        if self.live[tag] == 0:
            del self.live[tag]
            self.storages.pop(tag, None)

    @staticmethod
    def unpack(holder):
        return holder.t

    def forward_done(self, chunks: int) -> None:
        held = self.storages.get(self.tag, {})
        self.bytes[self.tag] = sum(t.untyped_storage().nbytes() for t in held.values())
        counts = [0] * chunks
        for chunk, _ in self.live:
            counts[chunk] += 1
        self.after_forward.append(counts)
        self.peak_bytes = max(self.peak_bytes, sum(self.bytes.get(tag, 0) for tag in self.live))


def main(config: str, out: Path) -> None:
    from megatron.core import parallel_state

    from glm52_train.run_config import load_run_config
    from glm52_train.training import setup, step

    cfg = load_run_config(config, []).validate()
    parts = setup.build(cfg)
    data = setup.Data(cfg, parts, 0)
    ledger = Ledger()
    index = {id(c): i for i, c in enumerate(parts.chunks)}
    seen: Counter = Counter()
    original = step.forward_step

    def counted_forward_step(data_iterator, model):
        chunk = index[id(model)]
        ledger.tag = (chunk, seen[chunk])
        seen[chunk] += 1
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, ledger.unpack):
            output = original(data_iterator, model)
        ledger.forward_done(len(parts.chunks))
        return output

    step.forward_step = counted_forward_step
    try:
        result = step.train_step(cfg, data.train, parts.chunks, parts.optimizer, parts.scheduler,
                                 parts.num_microbatches)
    finally:
        step.forward_step = original
    rank = parallel_state.get_pipeline_model_parallel_rank()
    first = {c: ledger.bytes.get((c, 0), 0) for c in range(len(parts.chunks))}
    record = {"pp_rank": rank, "microbatches": parts.num_microbatches, "after_forward": ledger.after_forward,
              "chunk_bytes": [first[c] for c in range(len(parts.chunks))], "peak_bytes": ledger.peak_bytes,
              "loss": result.loss, "left_alive": len(ledger.live)}
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    os._exit(0)
