"""A run's parallel layout and the rules it must satisfy, in one place.

`Layout` holds the degrees (TP, PP, VPP, EP, ETP, CP, DP, sequence parallelism);
`layout_problems` lists, one sentence each, why a layout cannot run a model at a sequence
length. `RunConfig.validate` (what `glm52 pretrain` checks before building anything) and
`glm52 plan` (which searches layouts) both call it, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm52_train.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        parts += [f"EP{self.ep}"]
        if self.etp > 1:
            parts.append(f"ETP{self.etp}")
        parts += [f"CP{self.cp}", f"DP{self.dp}"]
        return " ".join(parts)


def layout_problems(model: ModelConfig, layout: Layout, seq_len: int, *, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None, microbatches: int | None = None) -> list[str]:
    """Why `layout` cannot train `model` on `seq_len`-token samples: one sentence per problem
    (empty when it can). `first_stage_layers` / `last_stage_layers` give an uneven pipeline
    split (Megatron-Core's rules); `microbatches` per step, when known, is checked against the
    interleaved schedule's need."""
    lay, m = layout, model
    out: list[str] = []
    for name in ("tp", "pp", "vpp", "ep", "etp", "cp", "dp"):
        if getattr(lay, name) < 1:
            out.append(f"{name.upper()} must be at least 1, got {getattr(lay, name)}.")
    if out:
        return out
    if m.num_heads % lay.tp:
        out.append(f"TP{lay.tp} does not divide the {m.num_heads} attention heads.")
    if m.num_moe_layers:
        if m.num_experts % lay.ep:
            out.append(f"EP{lay.ep} does not divide the {m.num_experts} experts.")
        stage_ranks = lay.tp * lay.cp * lay.dp
        if stage_ranks % (lay.ep * lay.etp):
            out.append(f"EP x ETP = {lay.ep} x {lay.etp} does not divide the {stage_ranks} ranks of a pipeline stage.")
        if lay.tp > 1 and not lay.sp:
            out.append("TP > 1 with MoE layers needs sequence parallelism (Megatron-Core requires it).")
    if lay.sp and lay.tp == 1:
        out.append("sequence parallelism needs TP > 1.")
    if lay.vpp > 1 and lay.pp == 1:
        out.append("virtual pipeline stages need PP > 1.")
    out += _stage_problems(m.num_layers, lay.pp, lay.vpp, first_stage_layers, last_stage_layers)
    if microbatches is not None and lay.vpp > 1 and microbatches < lay.pp:
        out.append(f"the interleaved schedule (VPP{lay.vpp}) needs at least PP = {lay.pp} microbatches per step, "
                   f"got {microbatches}.")
    if lay.cp > 1 and seq_len % (2 * lay.cp):
        out.append(f"the sequence length {seq_len} is not divisible by 2 x CP = {2 * lay.cp}.")
    if lay.sp and lay.tp > 1 and seq_len % lay.tp:
        out.append(f"the sequence length {seq_len} is not divisible by TP{lay.tp} under sequence parallelism.")
    if seq_len > m.max_position_embeddings:
        out.append(f"the sequence length {seq_len} exceeds the model's {m.max_position_embeddings} positions.")
    return out


def _stage_problems(layers: int, pp: int, vpp: int, first: int | None, last: int | None) -> list[str]:
    """Megatron-Core's rules for splitting `layers` decoder layers over PP x VPP chunks."""
    if first is None and last is None:
        if layers < pp * vpp:
            return [f"{layers} layers cannot fill PP x VPP = {pp * vpp} pipeline chunks."]
        if layers % (pp * vpp):
            return [f"{layers} layers do not split evenly into PP x VPP = {pp * vpp} chunks; give the first "
                    "and/or last stage its own layer count (parallel.first_stage_layers / last_stage_layers)."]
        return []
    out = []
    middle_layers, middle_stages = layers, pp
    for where, n in (("first", first), ("last", last)):
        if n is None:
            continue
        if n < 1:
            out.append(f"the {where} pipeline stage needs at least one layer, got {n}.")
        elif n % vpp:
            out.append(f"the {where} stage's {n} layers do not split into VPP = {vpp} chunks.")
        middle_layers -= n
        middle_stages -= 1
    if out:
        return out
    if middle_stages < 0 or bool(middle_layers) != bool(middle_stages) or middle_layers < 0:
        return [f"{layers} layers leave {middle_layers} for {max(middle_stages, 0)} middle pipeline stages."]
    if middle_stages and middle_layers % (middle_stages * vpp):
        return [f"the {middle_layers} middle layers do not split evenly over {middle_stages} stages x VPP {vpp}."]
    return []


__all__ = ["Layout", "layout_problems"]
