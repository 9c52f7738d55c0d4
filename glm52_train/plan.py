"""`glm52 plan`: choose a parallel layout and estimate the memory it needs per GPU.

    glm52 plan --model glm52-744b --gpus 256 --gpu-mem 80 --seq-len 32768
    glm52 plan --model glm52-744b --gpus 352 --seq-len 2048 --global-batch 1024 --pp 11 --ep 32 \\
        --layout 'Etttttt|(tttttttt|)*8,tttt|ttttmL' --recompute selective --recompute-modules mla_up_proj
    glm52 plan --config configs/FILE.yaml --gpus 64

The estimate is per GPU of the most loaded pipeline rank, in bytes, for BF16 training with
Megatron-Core's distributed optimizer:

- weights (bf16) and gradients (fp32) of the rank's chunks: attention and dense MLPs split by
  TP, experts by EP x ETP, replicated pieces (norms, latent down projections, the indexer,
  routers) whole; the embedding where the layout puts "E", output head where it puts "L",
  the MTP layer where it puts "m";
- optimizer state over the data-parallel replicas of each parameter: AdamW keeps an fp32 master
  copy and two moments (12 bytes per parameter); Muon (`--optimizer muon`) keeps the master
  copy and one momentum buffer (8 bytes) for the 2-D matrices of attention (MLA projections,
  the indexer's query and key projections), dense MLP, shared and routed experts and the MTP
  projection, and AdamW's 12 bytes for embeddings, output head, norms, routers and the
  indexer's head-weight projection (the split of `training/muon.py`);
- activations: what one micro-batch saves for backward in each chunk, per layer kind
  (`layer_saved_bytes`: the tensors our layers hand to autograd, counted tensor by tensor and
  checked against a real run of `tiny` with saved-tensor hooks in tests/test_plan.py), times
  the micro-batches each chunk has in flight at the schedule's worst moment
  (`schedule_in_flight`, which replays Megatron-Core's 1F1B or interleaved order); with full
  recomputation each layer keeps its input (and the top-k it passes on) and one layer's
  working set is rebuilt at a time; selective recomputation drops what its modules rebuild;
- dsa: the part of those activations that DSA adds (top-k indices, log-sum-exp, the indexer's
  gradients, computed in the forward pass by the fused KL kernel); under `dsa.deterministic`
  also one inverted selection and its build (`inverted_selection_bytes`): one IndexShare
  group's at a time, in backward; under `dsa.indexer_loss: dq_pass` also the dq pass's head
  probabilities (`head_probs_bytes`): one layer's at a time, in backward (the indexer's inputs,
  saved for its KL there, take the place of the forward-computed gradients: counted as those);
- logits: fp32 logits saved by the loss for the main head and each MTP step, for the
  micro-batches in flight on the chunk with "L", plus one transient gradient of them;
- fp8 weights (`train.fp8: blockwise`, counted in "weights" and shown as `fp8_weights` in
  --json): the FP8 linears' weights quantised once per step (glm52_train/model/fp8.py), 1 byte
  per element plus an fp32 scale per 128x128 tile, held from a step's first forward to its
  optimizer step;
- slack: 10% of the above for allocator fragmentation; fixed: 2.5 GiB of CUDA context, NCCL
  and workspace buffers. Both constants were set once against a measured run of `proxy-h100`
  (docs/benchmarks.md) and are not tuned to any other point.

DSA is assumed to run on the memory-linear kernels (no S x S buffer), MoE on Megatron-Core's
local SequentialMLP experts (no Transformer Engine), as this stack runs on its GPU machine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

from glm52_train.config import ConfigError, ModelConfig, needs_topk_relay
from glm52_train.layout import Layout, layout_problems, pipeline_chunks, recompute_problem

GiB = 1024**3
MiB = 1024**2
BF16, FP32 = 2, 4
FIXED_OVERHEAD = 2.5 * GiB  # CUDA context, NCCL buffers, workspace
FRAGMENTATION = 1.10
OPTIMIZERS = ("adamw", "muon")
GRAD_DTYPES = ("fp32", "bf16")


@dataclass
class Estimate:
    layout: Layout
    weights: float
    gradients: float
    optimizer: float
    activations: float
    dsa_buffers: float
    logits: float
    slack: float
    fixed: float
    total: float
    fits: bool
    grad_copy: float = 0.0  # the step's fp32 copies of bf16 gradient shards beyond the activation peak
    reason: str = ""
    stage_layers: list = field(default_factory=list)
    pp_rank: int = 0
    in_flight: list = field(default_factory=list)  # micro-batches per chunk at the peak
    recompute: str = "full"
    optimizer_name: str = "adamw"
    grad_dtype: str = "fp32"
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    time: dict | None = None  # steptime.StepTime.to_dict() when a step time was predicted
    fp8_weights: float = 0.0  # of `weights`: the FP8 linears' quantised weights (train.fp8=blockwise)
    ranks: list = field(default_factory=list, repr=False)  # every pipeline rank's estimate, rank order

    def stage_note(self) -> str:
        """ ", first stage N layers, last stage M" for an uneven split, else "". """
        parts = [f"{w} stage {n} layers" for w, n in (("first", self.first_stage_layers),
                                                       ("last", self.last_stage_layers)) if n is not None]
        return f" ({', '.join(parts)})" if parts else ""

    def to_dict(self, ranks: bool = False) -> dict:
        """The estimate as plain values; with `ranks`, every pipeline rank's too (under "ranks")."""
        d = asdict(replace(self, ranks=[]))  # (the ranks list holds this estimate too)
        del d["ranks"]
        if ranks:
            d["ranks"] = [{k: v for k, v in r.to_dict().items() if k != "layout"} for r in self.ranks]
        return d


# ---- parameters -----------------------------------------------------------------------------

def _layer_params(m: ModelConfig, layer: int | None, tp: int) -> dict[str, float]:
    """Per-GPU parameters of one decoder layer (`layer=None`: the MTP layer) before DP/EP
    sharding: {"muon": non-expert 2-D matrices, "adam": the AdamW groups, "expert": routed
    experts (before EP x ETP)}."""
    moe = m.num_moe_layers > 0 if layer is None else m.is_moe_layer(layer)
    indexer = layer is None or m.layer_index_pattern[layer] == "F"
    h, n = m.hidden_size, m.num_heads
    muon = (h * m.q_lora_rank + h * (m.kv_lora_rank + m.qk_rope_dim)  # replicated down projections
            + (m.q_lora_rank * n * m.qk_head_dim + m.kv_lora_rank * n * (m.qk_nope_dim + m.v_head_dim)
               + n * m.v_head_dim * h) / tp)
    adam = m.q_lora_rank + m.kv_lora_rank + 2 * h  # latent norms, input and pre-MLP norms
    if indexer:
        muon += m.q_lora_rank * m.index_heads * m.index_head_dim + h * m.index_head_dim
        adam += 2 * m.index_head_dim + h * m.index_heads  # key LayerNorm, head-weight projection
    expert = 0.0
    if moe:
        mlp = 3 * h * m.moe_ffn_size
        adam += m.num_experts * h  # router (its expert bias is a buffer)
        muon += m.num_shared_experts * mlp / tp
        expert = m.num_experts * mlp
    else:
        muon += 3 * h * m.dense_ffn_size / tp
    if layer is None:
        muon += 2 * h * h / tp  # eh_proj
        adam += 3 * h  # enorm, hnorm, final norm
    return {"muon": muon, "adam": adam, "expert": expert}


def _fp8_linear_params(m: ModelConfig, layer: int | None, tp: int) -> tuple[float, float]:
    """(non-expert, routed-expert before EP x ETP) weight elements of one layer's FP8 linears:
    `_layer_params`' 2-D matrices less what stays in bf16 (the replicated q/kv down projections
    and the indexer's projections; fp8.py's module docstring)."""
    p = _layer_params(m, layer, tp)
    h = m.hidden_size
    bf16 = h * m.q_lora_rank + h * (m.kv_lora_rank + m.qk_rope_dim)
    if layer is None or m.layer_index_pattern[layer] == "F":
        bf16 += m.q_lora_rank * m.index_heads * m.index_head_dim + h * m.index_head_dim
    return p["muon"] - bf16, p["expert"]


FP8_WEIGHT_BYTES = 1 + FP32 / 128**2  # e4m3 data and one fp32 scale per 128x128 tile


# ---- activations ----------------------------------------------------------------------------

def layer_saved_bytes(m: ModelConfig, layer: int | None, tp: int = 1, sp: bool = False, act: int = BF16,
                      recompute_modules=(), micro_batch: int = 1) -> tuple[float, float]:
    """(bytes, of which DSA) one token of one decoder layer (`layer=None`: the MTP layer, which
    runs its own indexer) saves for backward, tensor by tensor as our layers save them; `act`
    is the activation dtype's size (fp32 pieces stay 4 bytes). Sequence-parallel tensors are
    divided by TP, per-head ones by TP; the rope tables are per position (divided by the
    micro-batch). `recompute_modules` removes what selective recomputation rebuilds."""
    moe = m.num_moe_layers > 0 if layer is None else m.is_moe_layer(layer)
    full = layer is None or m.layer_index_pattern[layer] == "F"
    h, n, ql, kvl, rope = m.hidden_size, m.num_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_rope_dim
    mods = set(recompute_modules)
    seq = tp if sp else 1
    f32 = FP32
    # input norm (input, rstd, output) and the replicated down projections' flattened input
    a = (2 * h * act + f32 + h * act) / seq
    # q and kv latents: q_a norm (input, rstd, output), kv_a norm (the down projection's
    # [c_kv | k_rope] output, rstd, normalised c_kv); RoPE tables (4 per attention)
    a += (2 * ql + (kvl + rope) + kvl) * act + 2 * f32 + 4 * rope * f32 / micro_batch
    a += ql * act  # q_up's input (under mla_up_proj: the checkpoint's saved input)
    if "mla_up_proj" not in mods:
        # q_up's per-head output (q_nope | q_rope), and the absorbed query and the shared
        # latent key/value the sparse attention saves (freed and rebuilt under mla_up_proj)
        a += n * m.qk_head_dim * act / tp + n * (kvl + rope) * act / tp + (kvl + rope) * act
    a += n * kvl * act / tp + n * m.v_head_dim * act / tp  # attention output on the latent, W_UV output
    dsa = f32 * n / tp  # log-sum-exp per head
    if full:
        dsa += 4 * m.index_topk  # int32 top-k (shared layers reuse the full layer's tensor)
        dsa += 4 * rope * f32 / micro_batch + (m.index_head_dim * act + 2 * f32)  # indexer rope, key norm
        dsa += m.index_heads * m.index_head_dim * act + m.index_head_dim * act + m.index_heads * f32  # KL grads
    # pre-MLP norm (input, rstd, output)
    a += (2 * h * act + f32) / seq
    if moe:
        k, e, ffn = m.moe_topk, m.num_experts, m.moe_ffn_size
        if "shared_experts" not in mods and "moe" not in mods:
            a += m.num_shared_experts * (h / seq + 5 * ffn / tp) * act  # fc1 input, gate|up, SwiGLU parts, fc2 input
        if "moe" not in mods:
            a += f32 * (2 * e + 2 + k) + 8 * 2 * k  # router logits/scores, top-k values and indices
            a += e * (1 + f32) + 8 * k  # dispatch: routing map, probabilities, sorted indices
            a += k * (h * act + 6 * ffn * act + f32)  # per routed copy: input, fc1 out, SwiGLU parts, fc2 input, prob
        else:
            a += 0.0  # the MoE layer's input is the pre-MLP norm output, counted above
    elif "mlp" not in mods:
        a += (h / seq + 5 * m.dense_ffn_size / tp) * act
    if layer is None:
        # MTP: embedding and hidden norms (input, rstd, output each), eh_proj's input, final norm
        a += (2 * (2 * h * act + f32) + 2 * h * act + (2 * h * act + f32)) / seq
    return a + dsa, dsa


# The atomics-free sparse attention backward (`dsa.deterministic`) reads the top-k key-major:
# 8 bytes per selected (key block, query) pair kept while an IndexShare group runs backward, and
# about 30 bytes per top-k slot while it is built (kernels/sparse_mla.py, invert_selection).
INVERSE_BYTES_PER_SLOT = 8 + 30


def inverted_selection_bytes(m: ModelConfig, tokens: float) -> float:
    """Peak bytes of the deterministic backward's inverted selection for `tokens` local
    queries: at most every top-k slot a distinct pair, plus the build's transients."""
    return INVERSE_BYTES_PER_SLOT * m.index_topk * tokens


# `dsa.indexer_loss: dq_pass`: the sparse attention's dq pass writes one fp32 per top-k slot
# (the attention probabilities summed over heads), kept until the indexer KL reads it.
HEAD_PROBS_BYTES_PER_SLOT = 4


def head_probs_bytes(m: ModelConfig, tokens: float) -> float:
    """Bytes of the dq pass's head probabilities for `tokens` local queries (one layer's, in
    backward; kernels/api.py, sparse_mla_indexer_kl)."""
    return HEAD_PROBS_BYTES_PER_SLOT * m.index_topk * tokens


def _chunk_saved_bytes(m: ModelConfig, items: list, tp: int, sp: bool, tokens: float, recompute: str,
                       modules, micro_batch: int, act_bytes: int = BF16) -> tuple[float, float, float, float]:
    """(saved bytes, of which DSA, of which logits, the largest layer's working set, of which
    DSA under full recomputation) of one micro-batch through one chunk; `act_bytes` is the
    activation dtype's size."""
    act = dsa = logits = largest = largest_dsa = 0.0
    seq = tp if sp else 1
    first_layer = True
    for item in items:
        if item == "E" or item == "L":
            continue
        layer = None if item == "m" else item
        a, d = layer_saved_bytes(m, layer, tp, sp, act_bytes, modules if recompute == "selective" else (),
                                 micro_batch)
        if a * tokens > largest:
            largest, largest_dsa = a * tokens, d * tokens
        if recompute == "full":
            # Megatron-Core's uniform recompute (one layer per unit) keeps each layer's input and
            # the IndexShare top-k passed along with it: one int32 tensor per full-indexer layer,
            # which the shared layers after it hold by reference (and one arriving from the
            # previous stage when the chunk starts on a shared layer). Measured on an H100 for
            # 8 full-width layers (bench/stage_memory.py, docs/benchmarks.md).
            act += act_bytes * m.hidden_size / seq * tokens
            if layer is None or m.layer_index_pattern[layer] == "F" or first_layer:
                act += 4 * m.index_topk * tokens  # the top-k is DSA's
                dsa += 4 * m.index_topk * tokens
        else:
            act += a * tokens
            dsa += d * tokens
        first_layer = False
    if "L" in items:
        steps = 1 + (m.mtp_steps if m.mtp_layers else 0)
        logits = FP32 * m.vocab_size / tp * steps * tokens  # fp32 logits the loss keeps
        act += logits + BF16 * m.hidden_size / seq * steps * tokens  # and the output layer's input
    return act, dsa, logits, largest, largest_dsa


def schedule_order(pp: int, vpp: int, rank: int, num_microbatches: int) -> list[tuple[str, int]]:
    """The (F or B, model chunk) steps pipeline rank `rank` runs in one training step, in
    Megatron-Core 0.16.1's order (megatron/core/pipeline_parallel/schedules.py):
    - 1F1B (`forward_backward_pipelining_without_interleaving`, vpp = 1): pp - rank - 1 warm-up
      forwards, capped at the micro-batch count (lines 2093-2097), then one forward and one
      backward per remaining micro-batch (the steady loop, lines 2191-2255), then the
      cool-down backwards;
    - interleaved (`forward_backward_pipelining_with_interleaving`): (pp - rank - 1) x 2 +
      (vpp - 1) x group warm-up forwards, capped at micro-batches x vpp (`get_pp_rank_microbatches`,
      lines 773-788; the group is `microbatch_group_size_per_vp_stage`, default PP), forward k
      on chunk `get_schedule_table(...)`[k] (lines 798-825) and backward k on the mirrored
      chunk (`get_model_chunk_id`, lines 1079-1084), steady state forward k + warm-up then
      backward k (lines 1565-1567)."""
    if pp == 1:
        return [s for _ in range(num_microbatches) for s in (("F", 0), ("B", 0))]
    total = num_microbatches * vpp
    if vpp == 1:
        warmup = pp - rank - 1
        chunk_of = [0] * total
    else:
        warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
        chunk_of = []
        for start in range(0, num_microbatches, pp):
            end = num_microbatches if start + pp >= num_microbatches else start + pp
            chunk_of += [c for c in range(vpp) for _ in range(start, end)]
    warmup = min(warmup, total)
    steps = [("F", chunk_of[k]) for k in range(warmup)]
    for k in range(total - warmup):
        steps += [("F", chunk_of[k + warmup]), ("B", vpp - 1 - chunk_of[k])]
    steps += [("B", vpp - 1 - chunk_of[k]) for k in range(total - warmup, total)]
    return steps


def schedule_in_flight(pp: int, vpp: int, rank: int, num_microbatches: int) -> list[tuple[int, ...]]:
    """Micro-batches whose activations each chunk holds, after every forward of the step."""
    live, out = [0] * vpp, []
    for kind, chunk in schedule_order(pp, vpp, rank, num_microbatches):
        live[chunk] += 1 if kind == "F" else -1
        if kind == "F":
            out.append(tuple(live))
    return out


def default_microbatches(pp: int, vpp: int) -> int:
    """Micro-batches per step assumed when none is given: enough to reach the steady state."""
    return max(1, 4 * pp)


def estimate(
    m: ModelConfig,
    layout: Layout,
    seq_len: int,
    gpu_mem_gb: float,
    micro_batch: int = 1,
    num_microbatches: int | None = None,
    recompute: str | bool = "full",
    recompute_modules=(),
    optimizer: str = "adamw",
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    grad_dtype: str = "fp32",
    dsa_deterministic: bool = False,
    fp8: bool = False,
    dsa_indexer_loss: str = "forward",
) -> Estimate:
    """Memory per GPU of the busiest pipeline rank (see the module docstring)."""
    if grad_dtype not in GRAD_DTYPES:
        raise ConfigError(f"the gradient dtype must be one of {', '.join(GRAD_DTYPES)}, got {grad_dtype!r}.")
    if isinstance(recompute, bool):
        recompute = "full" if recompute else "none"
    why = recompute_problem(recompute, recompute_modules)
    if why:
        raise ConfigError(why)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"the optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}.")
    tp, pp, ep, etp, cp, dp, vpp = layout.tp, layout.pp, layout.ep, layout.etp, layout.cp, layout.dp, layout.vpp
    chunks = pipeline_chunks(m, layout, first_stage_layers, last_stage_layers)
    vpp = len(chunks[0])
    tokens = micro_batch * seq_len / cp
    microbatches = num_microbatches or default_microbatches(pp, vpp)
    expert_dp = max(1, dp * cp * tp // (ep * etp))
    muon_bytes = 8 if optimizer == "muon" else 12
    worst: Estimate | None = None
    all_ranks: list[Estimate] = []
    for rank, rank_chunks in enumerate(chunks):
        muon = adam = expert = fp8_dense = fp8_expert = 0.0
        mtp_weights = 0
        saved = []
        largest = rebuilt_dsa = 0.0
        for items in rank_chunks:
            for item in items:
                if item == "E":
                    adam += m.vocab_size * m.hidden_size / tp
                elif item == "L":
                    adam += (0 if m.tie_embeddings else m.vocab_size * m.hidden_size / tp) + m.hidden_size
                elif item == "m" and mtp_weights >= m.mtp_layers:
                    continue  # MTP steps beyond the distinct MTP layers reuse their weights
                else:
                    mtp_weights += item == "m"
                    p = _layer_params(m, None if item == "m" else item, tp)
                    muon, adam, expert = muon + p["muon"], adam + p["adam"], expert + p["expert"]
                    if fp8:
                        d, e = _fp8_linear_params(m, None if item == "m" else item, tp)
                        fp8_dense, fp8_expert = fp8_dense + d, fp8_expert + e
            chunk = _chunk_saved_bytes(m, items, tp, layout.sp, tokens, recompute, recompute_modules, micro_batch)
            saved.append(chunk)
            if chunk[3] > largest:
                largest, rebuilt_dsa = chunk[3], chunk[4]
        expert /= ep * etp
        dense = muon + adam
        fp8_weights = FP8_WEIGHT_BYTES * (fp8_dense + fp8_expert / (ep * etp))
        weights = BF16 * (dense + expert) + fp8_weights
        grads = (BF16 if grad_dtype == "bf16" else FP32) * (dense + expert)
        optim = (muon_bytes * muon + 12 * adam) / (dp * cp) + muon_bytes * expert / expert_dp
        # bf16 gradients: the distributed optimizer's step works on fp32 copies of its gradient
        # shard, made after the last backward has freed the activations
        grad_shard_fp32 = FP32 * ((muon + adam) / (dp * cp) + expert / expert_dp) if grad_dtype == "bf16" else 0.0
        peak, at_peak = -1.0, ()
        for live in schedule_in_flight(pp, vpp, rank, microbatches):
            total_live = sum(n * c[0] for n, c in zip(live, saved))
            if total_live > peak:
                peak, at_peak = total_live, live
        logits = sum(n * c[2] for n, c in zip(at_peak, saved))
        dsa = sum(n * c[1] for n, c in zip(at_peak, saved))
        activations = peak - logits - dsa
        has_layers = any(item not in ("E", "L") for items in rank_chunks for item in items)
        if dsa_deterministic and has_layers:
            dsa += inverted_selection_bytes(m, tokens)  # not saved for backward: on top of the peak
        if dsa_indexer_loss == "dq_pass" and has_layers:
            dsa += head_probs_bytes(m, tokens)  # likewise, one layer's in backward
        if recompute == "full":
            activations += largest - rebuilt_dsa  # one layer rebuilt at a time in backward
            dsa += rebuilt_dsa
        if any("L" in items for items in rank_chunks):
            logits += max(c[2] for c in saved)  # the logits' gradient, one micro-batch at a time
        grad_copy = max(0.0, grad_shard_fp32 - (activations + dsa + logits))  # a maximum, not a sum
        parts = weights + grads + optim + activations + dsa + logits + grad_copy
        slack = (FRAGMENTATION - 1) * parts
        total = parts + slack + FIXED_OVERHEAD
        est = Estimate(layout, weights, grads, optim, activations, dsa, logits, slack, FIXED_OVERHEAD, total,
                       total <= gpu_mem_gb * GiB, grad_copy=grad_copy, grad_dtype=grad_dtype,
                       first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers,
                       stage_layers=[sum(isinstance(i, int) for i in items) for items in rank_chunks],
                       pp_rank=rank, in_flight=list(at_peak), recompute=recompute, optimizer_name=optimizer,
                       fp8_weights=fp8_weights)
        all_ranks.append(est)
        if worst is None or est.total > worst.total:
            worst = est
    worst.ranks = all_ranks
    if not worst.fits:
        worst.reason = (f"needs {worst.total / GiB:,.1f} GiB per GPU on its busiest stage, more than "
                        f"the {gpu_mem_gb:g} GiB available")
    return worst


def check_layout(m: ModelConfig, layout: Layout, gpus: int, seq_len: int, **stages) -> str | None:
    """(`stages`: first_stage_layers, last_stage_layers, microbatches, as layout_problems takes.)"""
    """Why `layout` cannot run `m` on `gpus` GPUs (one sentence), or None: the run config's
    rules (`layout_problems`) plus the planner's own (the layout uses every GPU; TP stays
    inside one 8-GPU node)."""
    if layout.gpus != gpus:
        return f"TP x PP x CP x DP = {layout.gpus}, not the {gpus} GPUs."
    problems = layout_problems(m, layout, seq_len, **stages)
    if problems:
        return problems[0]
    if layout.tp > 8:
        return f"TP{layout.tp} spans more than one 8-GPU node."
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def relays_topk(m: ModelConfig, layout: Layout, first_stage_layers: int | None = None,
                last_stage_layers: int | None = None) -> bool:
    """Whether some pipeline chunk begins with an IndexShare "S" layer, so the top-k indices
    must travel with the activations (see model/topk_relay.py)."""
    chunks = pipeline_chunks(m, layout, first_stage_layers, last_stage_layers)
    starts = []
    for v in range(len(chunks[0])):
        for r in range(len(chunks)):
            layers = [i for i in chunks[r][v] if isinstance(i, int)]
            if layers:
                starts.append(layers[0])
    return needs_topk_relay(m.layer_index_pattern, starts)


def stage_splits(m: ModelConfig, pp: int, vpp: int) -> list[tuple[int | None, int | None]]:
    """The pipeline splits the search tries for PP x VPP: the even one when the layers divide,
    else the uneven (first, last) stage layer counts closest to even (Megatron-Core's rule: the
    middle stages split evenly), the busier end stage last-but-one (the loss sits on the last)."""
    layers = m.num_layers
    if pp == 1:
        return [(None, None)]
    from glm52_train.layout import _stage_problems

    if not _stage_problems(layers, pp, vpp, None, None):
        return [(None, None)]
    best = []
    base = layers // pp
    for first in range(max(vpp, base - 2 * vpp), base + 2 * vpp + 1):
        for last in range(max(vpp, base - 2 * vpp), base + 2 * vpp + 1):
            if _stage_problems(layers, pp, vpp, first, last):
                continue
            middle = (layers - first - last) // (pp - 2) if pp > 2 else 0
            busiest = max(first, last, middle)
            best.append((busiest, last, abs(first - middle), first))
    best.sort()
    return [(f, l) for _, l, _, f in best[:1]]


def plan(
    m: ModelConfig,
    gpus: int,
    gpu_mem_gb: float,
    seq_len: int,
    micro_batch: int = 1,
    recompute: str | bool = "full",
    limit: int = 5,
    recompute_modules=(),
    optimizer: str = "adamw",
    global_batch: int | None = None,
    rank_by: str = "speed",
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    timing: dict | None = None,
) -> tuple[list[Estimate], list[Estimate]]:
    """(fitting layouts best first, a sample of refused ones with reasons). "Best" is the
    highest predicted tokens/s per GPU (`rank_by="speed"`, the step-time model of
    glm52_train/steptime.py with `timing`'s gpu_type, rates, grad_dtype) or the least memory
    per GPU (`rank_by="memory"`). Uneven pipeline stages are searched where the layers do not
    split evenly (`stage_splits`), unless the first / last stage's layers are given."""
    from glm52_train.steptime import step_time

    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}.")
    if rank_by not in ("speed", "memory"):
        raise ConfigError(f"--rank-by must be speed or memory, got {rank_by!r}.")
    timing = dict(timing or {})
    grad_dtype = timing.get("grad_dtype", "fp32")
    fitting: list[Estimate] = []
    refused: list[Estimate] = []
    experts = m.num_experts if m.num_moe_layers else 1
    given_stages = first_stage_layers is not None or last_stage_layers is not None
    for tp, pp, cp in itertools.product((1, 2, 4, 8), _divisors(gpus), (1, 2, 4, 8, 16, 32, 64, 128)):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        microbatches = None
        if global_batch is not None:
            if global_batch % (micro_batch * dp):
                continue
            microbatches = global_batch // (micro_batch * dp)
        for vpp in (1, 2, 4):
            if vpp > 1 and pp == 1:
                continue
            splits = [(first_stage_layers, last_stage_layers)] if given_stages and pp > 1 else stage_splits(m, pp, vpp)
            for ep in [e for e in _divisors(experts) if e <= 64]:
                for first, last in splits:
                    layout = Layout(tp=tp, pp=pp, vpp=vpp, ep=ep, cp=cp, dp=dp, sp=tp > 1)
                    stages = dict(first_stage_layers=first, last_stage_layers=last)
                    if check_layout(m, layout, gpus, seq_len, microbatches=microbatches, **stages):
                        continue
                    est = estimate(m, layout, seq_len, gpu_mem_gb, micro_batch, microbatches, recompute,
                                   recompute_modules, optimizer, grad_dtype=grad_dtype, **stages)
                    if est.fits and rank_by == "speed":
                        est.time = step_time(m, layout, seq_len, micro_batch, microbatches, est.recompute,
                                             recompute_modules, **timing, **stages).to_dict(chunks=False)
                    (fitting if est.fits else refused).append(est)
    if rank_by == "speed":
        fitting.sort(key=lambda e: (-e.time["tokens_per_s_per_gpu"], e.total))
    else:
        fitting.sort(key=lambda e: e.total)
    refused.sort(key=lambda e: e.total)
    best = fitting[:limit]
    if rank_by == "memory":
        for est in best:  # the step time of the ones shown
            est.time = step_time(m, est.layout, seq_len, micro_batch, global_batch // (micro_batch * est.layout.dp) if global_batch else None, est.recompute,
                                 recompute_modules, **timing, first_stage_layers=est.first_stage_layers,
                                 last_stage_layers=est.last_stage_layers).to_dict(chunks=False)
    return best, refused[:3]


COLUMNS = ("weights", "gradients", "optimizer", "activations", "dsa_buffers", "logits", "grad_copy", "slack", "fixed")
_HEADINGS = ("weights", "grads", "optim", "act", "dsa", "logits", "gcopy", "slack", "fixed")


_TIME_HEADINGS = f"  {'step s':>7s} {'tok/s/GPU':>9s} {'MFU':>5s}"


def format_header(timed: bool = False) -> str:
    return (f"{'layout':44s} " + " ".join(f"{h:>6s}" for h in _HEADINGS) + f"  {'= total':>7s} GiB"
            + (_TIME_HEADINGS if timed else ""))


def format_estimate(est: Estimate, label: str | None = None, timed: bool = False) -> str:
    """One row: the columns of `format_header`, which add up to the total (GiB, 0.1 rounding),
    under `label` (default: the layout, with an uneven split's stage layers); `timed` adds the
    predicted step time, tokens/s per GPU and MFU."""
    cells = " ".join(f"{getattr(est, c) / GiB:6.1f}" for c in COLUMNS)
    ends = [f"{w} {n}" for w, n in (("first", est.first_stage_layers), ("last", est.last_stage_layers))
            if n is not None]
    name = label or " ".join([est.layout.describe()] + ([", ".join(ends)] if ends else []))
    row = f"{name:44s} {cells}  = {est.total / GiB:7.1f}"
    if timed and est.time:
        t = est.time
        row += f"      {t['step_time_s']:7.2f} {t['tokens_per_s_per_gpu']:9.1f} {100 * t['mfu']:4.1f}%"
    return row


def format_ranks(est: Estimate) -> list[str]:
    """One row per pipeline rank of `est`'s layout: its layers and micro-batches in flight."""
    rows = []
    for r in est.ranks:
        label = f"  rank {r.pp_rank} ({'+'.join(map(str, r.stage_layers))} layers, {'+'.join(map(str, r.in_flight))} mb)"
        rows.append(format_estimate(r, label))
    return rows + ["  (mb: micro-batches in flight per chunk at the rank's peak)"]
