"""A run's parallel layout and the rules it must satisfy, in one place.

`Layout` holds the degrees (TP, PP, VPP, EP, ETP, CP, DP, sequence parallelism) and, when
given, Megatron-Core's `pipeline_model_parallel_layout` string (which stage holds the
embedding, which decoder layers, the MTP layers and the loss); `layout_problems` lists, one
sentence each, why a layout cannot run a model at a sequence length; `pipeline_chunks` says
what each pipeline chunk holds; `recompute_problem` checks a recomputation choice.
`RunConfig.validate` (what `glm52 pretrain` checks before building anything) and `glm52 plan`
(which searches layouts) both call them, so the two never disagree.

The layout string is parsed and checked by Megatron-Core's own `PipelineParallelLayerLayout`
(`E` embedding, `t` decoder layer, `m` MTP layer, `L` loss, `|` between stages, `(...)*n` and
`x*n` repeat; with VPP the string lists PP x VPP stages, virtual stage by virtual stage).
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
    pipeline: str | None = None  # Megatron-Core's pipeline_model_parallel_layout string

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


# Megatron-Core 0.16.1's selective recomputation modules (TransformerConfig.recompute_modules),
# and the ones this stack's layers honour. `core_attn` and `layernorm` are applied by
# Megatron-Core's Attention.forward / TransformerLayer._forward_attention, which our MLA and
# layer replace; `moe_act` needs grouped-GEMM experts (Transformer Engine).
MEGATRON_RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
RECOMPUTE_MODULES = ("mla_up_proj", "mlp", "moe", "shared_experts")
_UNSUPPORTED_WHY = {
    "core_attn": "the DSA kernels already keep only their inputs, output and log-sum-exp, so there is "
                 "no score matrix to recompute",
    "layernorm": "our layer calls its input norm itself (IndexShare), outside Megatron-Core's "
                 "output-discarding norm checkpoint",
    "moe_act": "Megatron-Core recomputes it only inside grouped-GEMM experts (Transformer Engine)",
}


def recompute_problem(granularity: str | None, modules) -> str | None:
    """Why a recomputation choice cannot run here (one sentence), or None. `granularity` is
    none/None, full or selective; `modules` the selective modules."""
    granularity = granularity or "none"
    modules = list(modules or [])
    if granularity not in ("none", "full", "selective"):
        return f"recompute must be none, full or selective, got {granularity!r}."
    if granularity != "selective":
        return f"recompute modules ({', '.join(modules)}) apply only to selective recomputation." if modules else None
    if not modules:
        return f"selective recomputation needs at least one module ({', '.join(RECOMPUTE_MODULES)})."
    for name in modules:
        if name not in MEGATRON_RECOMPUTE_MODULES:
            return (f"{name!r} is not one of Megatron-Core's recompute modules "
                    f"({', '.join(MEGATRON_RECOMPUTE_MODULES)}).")
        if name not in RECOMPUTE_MODULES:
            return f"recompute module {name} is not supported: {_UNSUPPORTED_WHY[name]}."
    return None


def parse_pipeline(model: ModelConfig, pipeline: str, pp: int):
    """Megatron-Core's `PipelineParallelLayerLayout` for `pipeline` on PP stages, checked
    against the model (decoder and MTP layer counts); ValueError with one sentence if not."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    mtp = model.mtp_steps if model.mtp_layers else None
    try:
        parsed = PipelineParallelLayerLayout(pipeline, pp)
        parsed.validate_layer_layout(num_layers=model.num_layers, mtp_num_layers=mtp)
    except (AssertionError, ValueError, KeyError, NotImplementedError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        if "mtp" in why.lower():
            why += f" (the model has {mtp or 0} MTP step(s): one 'm' each)"
        raise ValueError(f"the pipeline layout {pipeline!r} does not fit PP{pp} and the model's "
                         f"{model.num_layers} layers: {why}.".replace("..", ".")) from None
    return parsed


def virtual_stages(parallel) -> int | None:
    """The virtual pipeline size of a run config's `parallel` section: `vpp`, or the number of
    stages its layout string lists over PP (Megatron-Core's rule); None for one chunk per rank."""
    if parallel.vpp is not None or not parallel.layout:
        return parallel.vpp
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    stages = PipelineParallelLayerLayout.get_num_stages_from_str(parallel.layout)
    return stages // parallel.pp if stages >= 2 * parallel.pp else None


def pipeline_chunks(model: ModelConfig, layout: Layout, first_stage_layers: int | None = None,
                    last_stage_layers: int | None = None) -> list[list[list]]:
    """What each pipeline chunk holds, as chunks[pp_rank][vpp_rank] = a list of "E"
    (embedding), decoder layer indices, "m" (an MTP step) and "L" (output head and loss), in
    Megatron-Core's order: from `layout.pipeline` when given, else its default split (even, or
    with the first / last stage's own layer count), the embedding on the first chunk and the
    MTP layers and loss on the last."""
    pp, vpp = layout.pp, layout.vpp
    if layout.pipeline:
        parsed = parse_pipeline(model, layout.pipeline, pp)
        chunks = [[[] for _ in range(parsed.virtual_pipeline_model_parallel_size)] for _ in range(pp)]
        layer = 0
        for v in range(parsed.virtual_pipeline_model_parallel_size):
            for r in range(pp):
                for kind in parsed.layout[r][v]:
                    name = kind.name
                    if name == "decoder":
                        chunks[r][v].append(layer)
                        layer += 1
                    else:
                        chunks[r][v].append({"embedding": "E", "mtp": "m", "loss": "L"}[name])
        return chunks
    counts = [model.num_layers // pp] * pp
    if first_stage_layers is not None or last_stage_layers is not None:
        middle = model.num_layers - (first_stage_layers or 0) - (last_stage_layers or 0)
        stages = pp - (first_stage_layers is not None) - (last_stage_layers is not None)
        counts = [middle // stages if stages else 0] * pp
        if first_stage_layers is not None:
            counts[0] = first_stage_layers
        if last_stage_layers is not None:
            counts[-1] = last_stage_layers
    chunks = [[[] for _ in range(vpp)] for _ in range(pp)]
    layer = 0
    for v in range(vpp):
        for r in range(pp):
            for _ in range(counts[r] // vpp):
                chunks[r][v].append(layer)
                layer += 1
    chunks[0][0].insert(0, "E")
    chunks[-1][-1] += ["m"] * (model.mtp_steps if model.mtp_layers else 0) + ["L"]
    return chunks


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
    if lay.pipeline:
        if first_stage_layers is not None or last_stage_layers is not None:
            out.append("give either a pipeline layout string or the first / last stage's layer counts, not both.")
        else:
            try:
                parsed = parse_pipeline(m, lay.pipeline, lay.pp)
            except ValueError as e:
                out.append(str(e))
            else:
                if parsed.virtual_pipeline_model_parallel_size != lay.vpp:
                    v = parsed.virtual_pipeline_model_parallel_size
                    out.append(f"the pipeline layout has {lay.pp * v} stages, which is PP{lay.pp} x VPP{v}, "
                               f"not VPP{lay.vpp}.")
    else:
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


__all__ = ["Layout", "layout_problems", "pipeline_chunks", "parse_pipeline", "recompute_problem",
           "RECOMPUTE_MODULES", "MEGATRON_RECOMPUTE_MODULES"]
