"""`glm52 plan`: choose a parallel layout and estimate the memory it needs per GPU.

    glm52 plan --model glm52-744b --gpus 256 --gpu-mem 80 --seq-len 32768
    glm52 plan --model glm52-744b --gpus 256 --seq-len 4096 --tp 4 --pp 8 --cp 8 --ep 32

The estimate is per GPU of the most loaded pipeline stage, in bytes, for BF16 training with
Megatron-Core's distributed optimizer (fp32 main gradients, fp32 master weights and Adam
moments sharded over data parallelism):

- weights (bf16) and gradients (fp32) of the stage's share: attention and dense MLPs split by
  TP, experts by EP x ETP, replicated pieces (norms, latent down projections, the indexer,
  routers) whole; the embedding on the first stage, output head and MTP layer on the last;
- optimizer state: 12 bytes per parameter over the data-parallel replicas of that parameter;
- activations: what one microbatch saves per layer (MLA, DSA indexer and top-k, MoE dispatch
  and experts; sequence-parallel pieces divided by TP, the sequence by CP), times the
  microbatches a 1F1B (or interleaved) schedule keeps in flight on the first stage; with full
  recomputation only each layer's input is kept, plus one layer's working set;
- logits: fp32 logits and their gradient for the main head and each MTP step (last stage);
- fixed: CUDA context, communication buffers and allocator slack.

DSA is assumed to run on the memory-linear kernels (no S x S buffer). The terms are a model,
calibrated against a measured run of the `proxy-h100` flavor (see docs/benchmarks.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from glm52_train.config import ConfigError, ModelConfig, needs_topk_relay
from glm52_train.layout import Layout, layout_problems
from glm52_train.model.info import _attention_params

GiB = 1024**3
BF16, FP32 = 2, 4
FIXED_OVERHEAD = 2.5 * GiB  # CUDA context, NCCL buffers, workspace
FRAGMENTATION = 1.10


@dataclass
class Estimate:
    layout: Layout
    weights: float
    gradients: float
    optimizer: float
    activations: float
    dsa_buffers: float
    logits: float
    fixed: float
    total: float
    fits: bool
    reason: str = ""
    stage_layers: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = asdict(self.layout)
        return d


def _dense_and_expert_params(m: ModelConfig, layer: int | None, tp: int) -> tuple[float, float]:
    """(per-GPU non-expert params before DP sharding, routed-expert params before EP) of one
    layer; `layer=None` is the MTP layer."""
    moe = m.num_moe_layers > 0 if layer is None else m.is_moe_layer(layer)
    indexer = layer is None or m.layer_index_pattern[layer] == "F"
    h = m.hidden_size
    full = _attention_params(m, indexer)
    replicated = (h * m.q_lora_rank + m.q_lora_rank + h * (m.kv_lora_rank + m.qk_rope_dim)
                  + m.kv_lora_rank)
    if indexer:
        replicated += (m.q_lora_rank * m.index_heads * m.index_head_dim + h * m.index_head_dim
                       + 2 * m.index_head_dim + h * m.index_heads)
    dense = replicated + (full - replicated) / tp + 2 * h
    expert = 0.0
    if moe:
        mlp = 3 * h * m.moe_ffn_size
        dense += m.num_experts * h + m.num_shared_experts * mlp / tp
        expert = m.num_experts * mlp
    else:
        dense += 3 * h * m.dense_ffn_size / tp
    if layer is None:
        dense += 2 * h * h / tp + 3 * h
    return dense, expert


def _activation_bytes_per_token(m: ModelConfig, layer: int | None, tp: int, sp: bool) -> tuple[float, float]:
    """(saved activation bytes, DSA bytes) per token for one layer without recomputation."""
    moe = m.num_moe_layers > 0 if layer is None else m.is_moe_layer(layer)
    indexer = layer is None or m.layer_index_pattern[layer] == "F"
    h, n = m.hidden_size, m.num_heads
    seq_split = tp if sp else 1
    a = 4 * h * BF16 / seq_split  # layer input, norm outputs, residual
    # MLA: latent projections (replicated), per-head q/k/v and output (split over heads)
    a += BF16 * (2 * m.q_lora_rank + 2 * (m.kv_lora_rank + m.qk_rope_dim))
    a += BF16 * n * (2 * m.qk_head_dim + 2 * m.v_head_dim) / tp
    a += BF16 * n * (m.kv_lora_rank + m.qk_rope_dim) / tp  # absorbed query on the latent
    dsa = FP32 * n / tp  # log-sum-exp per head
    dsa += 4 * m.index_topk  # int32 top-k (kept by full layers, reused by shared ones)
    if indexer:
        dsa += BF16 * (m.index_heads * m.index_head_dim + m.index_head_dim) + FP32 * m.index_heads
    if moe:
        k = m.moe_topk
        a += FP32 * m.num_experts * 2  # router logits and probabilities
        a += BF16 * k * (2 * h + 3 * m.moe_ffn_size)  # dispatched tokens, fc1, activation, fc2
        a += BF16 * m.num_shared_experts * 3 * m.moe_ffn_size / tp
    else:
        a += BF16 * 3 * m.dense_ffn_size / tp
    return a, dsa


def stage_layers(num_layers: int, pp: int) -> list[list[int]]:
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for stage in range(pp):
        count = base + (1 if stage >= pp - extra else 0)
        out.append(list(range(start, start + count)))
        start += count
    return out


def estimate(
    m: ModelConfig,
    layout: Layout,
    seq_len: int,
    gpu_mem_gb: float,
    micro_batch: int = 1,
    num_microbatches: int | None = None,
    recompute: bool = True,
) -> Estimate:
    tp, pp, ep, etp, cp, dp, vpp = layout.tp, layout.pp, layout.ep, layout.etp, layout.cp, layout.dp, layout.vpp
    stages = stage_layers(m.num_layers, pp)
    tokens = micro_batch * seq_len / cp
    in_flight = 1 if pp == 1 else pp * (1 + (pp - 1) / (pp * vpp))
    if num_microbatches is not None:
        in_flight = min(in_flight, num_microbatches)
    expert_dp = max(1, dp * cp * tp // (ep * etp))
    worst: Estimate | None = None
    for index, layers in enumerate(stages):
        first, last = index == 0, index == pp - 1
        dense = expert = 0.0
        act = dsa = largest = 0.0
        members: list = list(layers) + ([None] * m.mtp_layers if last else [])
        layer_input = BF16 * m.hidden_size / (tp if layout.sp else 1)
        for layer in members:
            d, e = _dense_and_expert_params(m, layer, tp)
            dense += d
            expert += e
            a, s = _activation_bytes_per_token(m, layer, tp, layout.sp)
            largest = max(largest, a + s)
            if recompute:
                act += layer_input  # only the layer's input is kept
            else:
                act += a
                dsa += s
        if first:
            dense += m.vocab_size * m.hidden_size / tp
        if last:
            dense += (0 if m.tie_embeddings else m.vocab_size * m.hidden_size / tp) + m.hidden_size
        expert /= ep * etp
        weights = BF16 * (dense + expert)
        grads = FP32 * (dense + expert)
        optimizer = 12 * dense / (dp * cp) + 12 * expert / expert_dp
        activations = act * tokens * in_flight
        if recompute:
            activations += largest * tokens  # one layer recomputed at a time
        dsa_buffers = dsa * tokens * in_flight
        logits = 0.0
        if last:
            steps = 1 + m.mtp_steps
            logits = 2 * FP32 * tokens * m.vocab_size / tp * steps
        total = FRAGMENTATION * (weights + grads + optimizer + activations + dsa_buffers + logits) + FIXED_OVERHEAD
        est = Estimate(layout, weights, grads, optimizer, activations, dsa_buffers, logits,
                       FIXED_OVERHEAD, total, total <= gpu_mem_gb * GiB, stage_layers=[len(layers)])
        if worst is None or est.total > worst.total:
            worst = est
    if not worst.fits:
        worst.reason = (f"needs {worst.total / GiB:,.1f} GiB per GPU on its busiest stage, more than "
                        f"the {gpu_mem_gb:g} GiB available")
    return worst


def check_layout(m: ModelConfig, layout: Layout, gpus: int, seq_len: int) -> str | None:
    """Why `layout` cannot run `m` on `gpus` GPUs (one sentence), or None: the run config's
    rules (`layout_problems`) plus the planner's own (the layout uses every GPU; TP stays
    inside one 8-GPU node)."""
    if layout.gpus != gpus:
        return f"TP x PP x CP x DP = {layout.gpus}, not the {gpus} GPUs."
    problems = layout_problems(m, layout, seq_len)
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
    chunks = stage_layers(m.num_layers, layout.pp * layout.vpp)
    return needs_topk_relay(m.layer_index_pattern, [c[0] for c in chunks if c])


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
    recompute: bool = True,
    limit: int = 5,
) -> tuple[list[Estimate], list[Estimate]]:
    """(fitting layouts best first, a sample of refused ones with reasons)."""
    fitting: list[Estimate] = []
    refused: list[Estimate] = []
    experts = m.num_experts if m.num_moe_layers else 1
    for tp, pp, cp in itertools.product((1, 2, 4, 8), _divisors(gpus), (1, 2, 4, 8, 16, 32, 64, 128)):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        for ep in [e for e in _divisors(experts) if e <= 64]:
            for vpp in (1, 2, 4):
                layout = Layout(tp=tp, pp=pp, vpp=vpp if pp > 1 else 1, ep=ep, cp=cp, dp=dp, sp=tp > 1)
                if vpp > 1 and pp == 1:
                    continue
                if check_layout(m, layout, gpus, seq_len):
                    continue
                est = estimate(m, layout, seq_len, gpu_mem_gb, micro_batch, recompute=recompute)
                (fitting if est.fits else refused).append(est)
    fitting.sort(key=lambda e: _score(e, m, gpus))
    refused.sort(key=lambda e: e.total)
    return fitting[:limit], refused[:3]


def format_estimate(est: Estimate) -> str:
    g = lambda b: f"{b / GiB:8.1f}"  # noqa: E731
    return (f"{est.layout.describe():32s} weights {g(est.weights)}  grads {g(est.gradients)}  "
            f"optim {g(est.optimizer)}  act {g(est.activations)}  dsa {g(est.dsa_buffers)}  "
            f"logits {g(est.logits)}  total {g(est.total)} GiB")
