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
  group's at a time, in backward;
- logits: fp32 logits saved by the loss for the main head and each MTP step, for the
  micro-batches in flight on the chunk with "L", plus one transient gradient of them;
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
    reason: str = ""
    stage_layers: list = field(default_factory=list)
    pp_rank: int = 0
    in_flight: list = field(default_factory=list)  # micro-batches per chunk at the peak
    recompute: str = "full"
    optimizer_name: str = "adamw"
    ranks: list = field(default_factory=list, repr=False)  # every pipeline rank's estimate, rank order

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


def _chunk_saved_bytes(m: ModelConfig, items: list, tp: int, sp: bool, tokens: float, recompute: str,
                       modules, micro_batch: int, act_bytes: int = BF16) -> tuple[float, float, float, float]:
    """(saved bytes, of which DSA, of which logits, the largest layer's working set) of one
    micro-batch through one chunk; `act_bytes` is the activation dtype's size."""
    act = dsa = logits = largest = 0.0
    seq = tp if sp else 1
    first_layer = True
    for item in items:
        if item == "E" or item == "L":
            continue
        layer = None if item == "m" else item
        a, d = layer_saved_bytes(m, layer, tp, sp, act_bytes, modules if recompute == "selective" else (),
                                 micro_batch)
        largest = max(largest, a * tokens)
        if recompute == "full":
            # Megatron-Core's uniform recompute (one layer per unit) keeps each layer's input and
            # the IndexShare top-k passed along with it: one int32 tensor per full-indexer layer,
            # which the shared layers after it hold by reference (and one arriving from the
            # previous stage when the chunk starts on a shared layer). Measured on an H100 for
            # 8 full-width layers (bench/stage_memory.py, docs/benchmarks.md).
            act += act_bytes * m.hidden_size / seq * tokens
            if layer is None or m.layer_index_pattern[layer] == "F" or first_layer:
                act += 4 * m.index_topk * tokens
        else:
            act += a * tokens
            dsa += d * tokens
        first_layer = False
    if "L" in items:
        steps = 1 + (m.mtp_steps if m.mtp_layers else 0)
        logits = FP32 * m.vocab_size / tp * steps * tokens  # fp32 logits the loss keeps
        act += logits + BF16 * m.hidden_size / seq * steps * tokens  # and the output layer's input
    return act, dsa, logits, largest


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
    dsa_deterministic: bool = False,
) -> Estimate:
    """Memory per GPU of the busiest pipeline rank (see the module docstring)."""
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
        muon = adam = expert = 0.0
        mtp_weights = 0
        saved = []
        largest = 0.0
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
            chunk = _chunk_saved_bytes(m, items, tp, layout.sp, tokens, recompute, recompute_modules, micro_batch)
            saved.append(chunk)
            largest = max(largest, chunk[3])
        expert /= ep * etp
        dense = muon + adam
        weights = BF16 * (dense + expert)
        grads = FP32 * (dense + expert)
        optim = (muon_bytes * muon + 12 * adam) / (dp * cp) + muon_bytes * expert / expert_dp
        peak, at_peak = -1.0, ()
        for live in schedule_in_flight(pp, vpp, rank, microbatches):
            total_live = sum(n * c[0] for n, c in zip(live, saved))
            if total_live > peak:
                peak, at_peak = total_live, live
        logits = sum(n * c[2] for n, c in zip(at_peak, saved))
        dsa = sum(n * c[1] for n, c in zip(at_peak, saved))
        if dsa_deterministic and any(item not in ("E", "L") for items in rank_chunks for item in items):
            dsa += inverted_selection_bytes(m, tokens)
        activations = peak - logits - dsa
        if recompute == "full":
            activations += largest  # one layer rebuilt at a time in backward
        if any("L" in items for items in rank_chunks):
            logits += max(c[2] for c in saved)  # the logits' gradient, one micro-batch at a time
        parts = weights + grads + optim + activations + dsa + logits
        slack = (FRAGMENTATION - 1) * parts
        total = parts + slack + FIXED_OVERHEAD
        est = Estimate(layout, weights, grads, optim, activations, dsa, logits, slack, FIXED_OVERHEAD, total,
                       total <= gpu_mem_gb * GiB,
                       stage_layers=[sum(isinstance(i, int) for i in items) for items in rank_chunks],
                       pp_rank=rank, in_flight=list(at_peak), recompute=recompute, optimizer_name=optimizer)
        all_ranks.append(est)
        if worst is None or est.total > worst.total:
            worst = est
    worst.ranks = all_ranks
    if not worst.fits:
        worst.reason = (f"needs {worst.total / GiB:,.1f} GiB per GPU on its busiest stage, more than "
                        f"the {gpu_mem_gb:g} GiB available")
    return worst


def check_layout(m: ModelConfig, layout: Layout, gpus: int, seq_len: int, **stages) -> str | None:
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


def relays_topk(m: ModelConfig, layout: Layout) -> bool:
    """Whether some pipeline chunk begins with an IndexShare "S" layer, so the top-k indices
    must travel with the activations (see model/topk_relay.py)."""
    chunks = pipeline_chunks(m, layout)
    starts = []
    for v in range(len(chunks[0])):
        for r in range(len(chunks)):
            layers = [i for i in chunks[r][v] if isinstance(i, int)]
            if layers:
                starts.append(layers[0])
    return needs_topk_relay(m.layer_index_pattern, starts)


def _score(est: Estimate, m: ModelConfig, gpus: int) -> float:
    """Lower is better: communication and pipeline-bubble cost, then memory headroom."""
    lay = est.layout
    bubble = (lay.pp - 1) / (lay.pp * lay.vpp * 8)  # assuming >= 8 microbatches per stage
    tp_cost = 0.06 * math.log2(lay.tp)
    cp_cost = 0.05 * math.log2(lay.cp)
    ep_cost = 0.02 * math.log2(lay.ep)
    relay = 0.03 if relays_topk(m, lay) else 0.0  # stage boundaries that carry top-k indices
    return bubble + tp_cost + cp_cost + ep_cost + relay + 0.01 * est.total / GiB / 80


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
) -> tuple[list[Estimate], list[Estimate]]:
    """(fitting layouts best first, a sample of refused ones with reasons)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}.")
    fitting: list[Estimate] = []
    refused: list[Estimate] = []
    experts = m.num_experts if m.num_moe_layers else 1
    for tp, pp, cp in itertools.product((1, 2, 4, 8), _divisors(gpus), (1, 2, 4, 8, 16, 32, 64, 128)):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        microbatches = None
        if global_batch is not None:
            if global_batch % (micro_batch * dp):
                continue
            microbatches = global_batch // (micro_batch * dp)
        for ep in [e for e in _divisors(experts) if e <= 64]:
            for vpp in (1, 2, 4):
                layout = Layout(tp=tp, pp=pp, vpp=vpp if pp > 1 else 1, ep=ep, cp=cp, dp=dp, sp=tp > 1)
                if vpp > 1 and pp == 1:
                    continue
                if check_layout(m, layout, gpus, seq_len):
                    continue
                est = estimate(m, layout, seq_len, gpu_mem_gb, micro_batch, microbatches, recompute,
                               recompute_modules, optimizer)
                (fitting if est.fits else refused).append(est)
    fitting.sort(key=lambda e: _score(e, m, gpus))
    refused.sort(key=lambda e: e.total)
    return fitting[:limit], refused[:3]


COLUMNS = ("weights", "gradients", "optimizer", "activations", "dsa_buffers", "logits", "slack", "fixed")
_HEADINGS = ("weights", "grads", "optim", "act", "dsa", "logits", "slack", "fixed")


def format_header() -> str:
    return f"{'layout':32s} " + " ".join(f"{h:>8s}" for h in _HEADINGS) + f"  {'= total':>9s} GiB"


def format_estimate(est: Estimate, label: str | None = None) -> str:
    """One row: the columns of `format_header`, which add up to the total (GiB, 0.1 rounding),
    under `label` (default: the layout)."""
    cells = " ".join(f"{getattr(est, c) / GiB:8.1f}" for c in COLUMNS)
    return f"{label or est.layout.describe():32s} {cells}  = {est.total / GiB:7.1f}"


def format_ranks(est: Estimate) -> list[str]:
    """One row per pipeline rank of `est`'s layout: its layers and micro-batches in flight."""
    rows = []
    for r in est.ranks:
        label = f"  rank {r.pp_rank} ({'+'.join(map(str, r.stage_layers))} layers, {'+'.join(map(str, r.in_flight))} mb)"
        rows.append(format_estimate(r, label))
    return rows + ["  (mb: micro-batches in flight per chunk at the rank's peak)"]
