"""Where a training step's time goes: torch.profiler over a few steps, split by model part.

    glm52 pretrain --config ... logging.profile_at=10 logging.profile_steps=3

Steps `profile_at` .. `profile_at + profile_steps - 1` run under `torch.profiler`. While they
do, forward hooks label the model's parts with `record_function` ranges (`glm52::experts`,
...); the DSA kernel API labels its own calls. A backward op belongs to the part whose forward
op created its autograd node (the profiler's sequence numbers link the two), so backward and
recomputation time land in the same part as the forward. Writes, under `<run_dir>/profile/`:

- `breakdown_rank<R>.json`: milliseconds per step for each part (device time on a GPU, CPU
  time on a CPU), its share, and the wall time per profiled step;
- `ops_rank<R>.txt`: torch.profiler's table of the 40 most expensive ops and kernels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

PARTS = ("sparse attention", "dense attention", "indexer", "indexer loss", "attention projections", "experts",
         "shared expert", "router", "moe dispatch", "dense mlp", "embedding", "output head + loss",
         "optimizer", "grad sync", "other")
LABEL = "glm52::"
# CUDA runtime markers that kineto links to kernels already counted on the op that launched
# them: on an H100, "Command Buffer Full" (a launch that waited for queue space) carried 665 ms
# of kernel time per step that was also the launching op's, inflating the total past the wall
# time of the step.
RUNTIME_MARKERS = frozenset({"Command Buffer Full"})


def _module_part(name: str, module) -> str | None:
    """The part a module's forward belongs to (the innermost labelled module wins)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from glm52_train.model.attention import GLMSelfAttention
    from glm52_train.model.dsa import DSACoreAttention, LightningIndexer

    kinds = [(LightningIndexer, "indexer"), (DSACoreAttention, "sparse attention"), (GLMSelfAttention, "attention projections"),
             (SequentialMLP, "experts"), (SharedExpertMLP, "shared expert"), (TopKRouter, "router")]
    try:
        from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP

        kinds += [(GroupedMLP, "experts"), (TEGroupedMLP, "experts")]
    except ImportError:
        pass
    for cls, part in kinds:
        if isinstance(module, cls):
            return part
    if isinstance(module, MLP) and not isinstance(module, SharedExpertMLP):
        return "dense mlp" if ".experts." not in name else "experts"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "embedding":
        return "embedding"
    if leaf == "output_layer":
        return "output head + loss"
    return None


class _Range:
    """A `record_function` range opened by a forward pre-hook and closed by the forward hook."""

    def __init__(self, part: str) -> None:
        self.name = LABEL + part
        self.stack: list = []

    def enter(self, *_args, **_kwargs):
        rf = record_function(self.name)
        rf.__enter__()
        self.stack.append(rf)

    def exit(self, *_args, **_kwargs):
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


class StepProfiler:
    """Profiles steps [start, start + steps) of a run; a no-op when `start` is None."""

    def __init__(self, start: int | None, steps: int, run_dir: Path, chunks, optimizer, rank: int) -> None:
        self.start, self.stop = start, (start + steps if start is not None else None)
        self.out_dir = Path(run_dir) / "profile"
        self.chunks, self.optimizer, self.rank = chunks, optimizer, rank
        self.prof = None
        self.handles: list = []
        self.patched: list = []
        self.step_walls: list[float] = []
        self._t0 = 0.0

    @property
    def active(self) -> bool:
        return self.prof is not None

    def before_step(self, step: int) -> None:
        if self.start is None or step != self.start:
            if self.active:
                self._t0 = _now()
            return
        self._install()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self.prof.__enter__()
        self._t0 = _now()

    def after_step(self, step: int) -> dict | None:
        """Close the profile after its last step; returns the breakdown then."""
        if not self.active:
            return None
        self.step_walls.append(_now() - self._t0)
        if step + 1 < self.stop:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self._remove()
        breakdown = summarize(self.prof.events(), len(self.step_walls), torch.cuda.is_available())
        breakdown["wall_ms_per_step"] = [1e3 * w for w in self.step_walls]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"breakdown_rank{self.rank}.json").write_text(json.dumps(breakdown, indent=1) + "\n")
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
        (self.out_dir / f"ops_rank{self.rank}.txt").write_text(format_breakdown(breakdown) + "\n\n" + table + "\n")
        self.prof = None
        return breakdown

    # ---- labelling ------------------------------------------------------------------------
    def _install(self) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        for chunk in self.chunks:
            for name, module in chunk.named_modules():
                part = _module_part(name, module)
                if part is not None:
                    r = _Range(part)
                    self.handles.append(module.register_forward_pre_hook(r.enter))
                    self.handles.append(module.register_forward_hook(r.exit, always_call=True))
                if isinstance(module, MoELayer):
                    for method in ("preprocess", "dispatch", "routed_experts_compute", "combine", "postprocess"):
                        self._wrap(module, method, "moe dispatch")
        from glm52_train.checkpoint import unwrap

        for chunk in self.chunks:  # the cross-entropy runs outside the output layer module
            self._wrap(unwrap(chunk), "compute_language_model_loss", "output head + loss")
        self._wrap(unwrap(self.chunks[0]).config, "finalize_model_grads_func", "grad sync")
        if self.optimizer is not None:
            self._wrap(self.optimizer, "step", "optimizer")

    def _wrap(self, owner, method: str, part: str) -> None:
        original = getattr(owner, method, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            with record_function(LABEL + part):
                return original(*args, **kwargs)

        own = method in vars(owner)
        setattr(owner, method, wrapped)
        self.patched.append((owner, method, original if own else None))

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        for owner, method, original in reversed(self.patched):
            if original is None:
                delattr(owner, method)  # back to the class's method
            else:
                setattr(owner, method, original)
        self.handles, self.patched = [], []


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def summarize(events, steps: int, device: bool) -> dict:
    """Milliseconds per step for each part, from the profiler's events.

    Each host-side event's own time (the device kernels it launched, or its CPU time without a
    GPU; kernel events and GPU-side ranges are not counted again) goes to the innermost scope
    around it on its thread: a `glm52::` range, or an autograd node in backward, which goes to
    the part whose forward op created the node (the profiler's sequence numbers link the two).
    Scopes are found by time containment, which also covers the CUDA runtime's own events."""
    seq_part: dict[int, str] = {}
    placed = []
    for e, scope, in_backward in _scoped(events):
        seq = getattr(e, "sequence_nr", -1)
        label = _label(scope)
        if not in_backward and seq is not None and seq >= 0:
            if label is not None:  # the op that creates the node is the last to see its number
                seq_part[seq] = label
            else:
                seq_part.pop(seq, None)
        placed.append((e, scope, label))

    totals = {p: 0.0 for p in PARTS}
    for e, scope, label in placed:
        if e.name in RUNTIME_MARKERS:
            continue
        us = e.self_device_time_total if device else e.self_cpu_time_total
        if not us:
            continue
        if label is None and scope is not None:
            label = seq_part.get(_node_seq(scope))
        totals[label if label in totals else "other"] += us
    total = sum(totals.values())
    return {
        "time": "device" if device else "cpu",
        "steps": steps,
        "total_ms_per_step": total / 1e3 / max(steps, 1),
        "parts_ms_per_step": {p: v / 1e3 / max(steps, 1) for p, v in totals.items()},
        "parts_share": {p: (v / total if total else 0.0) for p, v in totals.items()},
    }


def _is_node(e) -> bool:
    return e.name.startswith("autograd::engine::evaluate_function")


def _label(scope) -> str | None:
    if scope is not None and scope.name.startswith(LABEL):
        return scope.name[len(LABEL):]
    return None


def _scoped(events):
    """(event, innermost enclosing scope or the event itself if it is one, inside backward?) for
    every host-side event, thread by thread in time order."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    by_thread = defaultdict(list)
    for e in events:
        if e.device_type == DeviceType.CPU:
            by_thread[e.thread].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
        stack: list = []
        for e in evs:
            while stack and stack[-1].time_range.end <= e.time_range.start:
                stack.pop()
            is_scope = e.name.startswith(LABEL) or _is_node(e)
            if is_scope:
                stack.append(e)
            yield e, (stack[-1] if stack else None), any(_is_node(s) for s in stack)


def _node_seq(node) -> int:
    """The sequence number of a backward node's event (its child named after the node
    carries it when the wrapper event does not)."""
    seq = getattr(node, "sequence_nr", -1)
    if seq is not None and seq >= 0:
        return seq
    for child in node.cpu_children:
        s = getattr(child, "sequence_nr", -1)
        if s is not None and s >= 0:
            return s
    return -1


def format_breakdown(b: dict) -> str:
    lines = [f"{'part':<24} {'ms/step':>9} {'share':>7}   ({b['time']} time, {b['steps']} steps)"]
    for part, ms in sorted(b["parts_ms_per_step"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{part:<24} {ms:9.2f} {100 * b['parts_share'][part]:6.1f}%")
    lines.append(f"{'total':<24} {b['total_ms_per_step']:9.2f}")
    return "\n".join(lines)


__all__ = ["StepProfiler", "summarize", "format_breakdown", "PARTS"]
