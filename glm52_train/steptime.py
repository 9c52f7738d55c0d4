"""`glm52 plan`'s step-time model: how long one training step of a layout takes.

Per pipeline chunk and micro-batch, every op's FLOPs or bytes at a rate table
(`configs/rates/*.yaml`: achieved fractions of the vendor peaks in `configs/rates/devices.yaml`,
each number with its source, guesses marked as guesses):

- GEMMs (attention projections, indexer projections, dense MLP, shared and routed experts,
  router, output head for the main and each MTP step): 2 x parameters x tokens forward, twice
  that backward, at the stack's cuBLAS efficiency for the GEMM's row count (routed experts:
  rows per local expert for Megatron-Core's SequentialMLP, all routed rows for a grouped GEMM);
- DSA: the indexer's scoring, the sparse attention forward and backward and the indexer's KL
  loss, FLOPs under `bench/dsa.py`'s convention (each query attends to min(top-k, visible)
  keys; full "F" layers score every visible key) at the measured TFLOP/s for the sequence;
  shared "S" layers run attention only;
- memory-bound work (norms, RoPE, SwiGLU, residuals, permutes, the loss's fp32 logits): the
  bytes each layer saves for backward (`plan.layer_saved_bytes`) times the stack's passes, at
  its achieved copy bandwidth;
- recomputation: full recomputation repeats every layer's forward (its GEMMs, attention, memory
  work, all-to-all and TP collectives) in backward; selective repeats its modules' GEMMs;
- expert all-to-all: dispatch and combine of each routed copy (bf16 hidden) per MoE layer,
  forward and backward (and again under recomputation), split into the part that stays inside
  the NVLink domain and the part that crosses the network, each at its bandwidth (DeepEP sends
  a token once per destination node over RDMA);
- TP/SP: all-gather and reduce-scatter of the layer's activations around attention and MLP;
  CP: all-gather of the latent keys and index keys forward, reduce-scatter of their gradients;
- pipeline: `plan.schedule_order` (Megatron-Core's 1F1B / interleaved order) replayed with
  these per-chunk times, each forward waiting for the previous stage's forward of the same
  micro-batch (and each backward for the next stage's backward) plus the activation send (and
  the IndexShare top-k where a stage begins on a shared layer); the bubble is the busiest
  rank's idle time;
- data parallel: the gradient reduce-scatter and parameter all-gather of the distributed
  optimizer over the rank's (expert-)data-parallel groups, exposed unless the stack overlaps
  them (then only what exceeds the last micro-batch's backward);
- optimizer: the bytes of its step over the rank's parameter shard.

Rank placement is Megatron-Core's default order (TP fastest, then CP, then DP, PP slowest; the
expert groups ETP, EP, expert-DP): a group stays inside an NVLink domain when its span does.
Not modelled: host overhead and kernel launches (so a host-bound run is predicted too fast; see
docs/benchmarks.md), load imbalance among experts (routing is taken as uniform), Muon's
Newton-Schulz GEMMs, compute/communication overlap inside a layer. The DSA kernels' rate with
fewer heads per rank under TP is the rate table's `head_factor` (this stack's: predicted from
docs/kernels.md §3c, unmeasured).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glm52_train.config import ConfigError, ModelConfig
from glm52_train.layout import Layout, pipeline_chunks
from glm52_train.plan import BF16, FP32, _layer_params, layer_saved_bytes, relays_topk, schedule_order

RATES_DIR = Path(__file__).resolve().parent.parent / "configs" / "rates"
DEFAULT_RATES = RATES_DIR / "glm52_train.yaml"
GPU_TYPES = ("h100", "h200", "b200", "gb200")
FLOP_FORMULA = ("glm52 info's train_flops_per_token (glm52_train/model/info.py): 3 x (2 x active parameters + "
                "sparse attention over min(top-k, visible) keys) + the indexer's forward scoring + 3 x its KL loss + "
                "3 x the MTP step; 0.936x Megatron-Bridge's count at 2K and 0.908x at 4K (its card's TFLOP/s over "
                "tokens/s: 286.0 and 304.0 GFLOP per token)")
BREAKDOWN = ("compute", "recompute", "bubble", "ep_comm", "tp_comm", "cp_comm", "dp_comm", "optimizer")


@dataclass
class StepTime:
    step_time_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    breakdown: dict  # seconds per step on the critical pipeline rank; adds up to step_time_s
    gpu_type: str
    stack: str
    critical_rank: int = 0
    flop_formula: str = FLOP_FORMULA
    chunk_times: list = field(default_factory=list)  # [rank][chunk] = (forward s, backward s) per micro-batch

    def to_dict(self, chunks: bool = True) -> dict:
        """Plain values; without `chunks`, less the per-chunk times."""
        d = asdict(self)
        if not chunks:
            del d["chunk_times"]
        return d


def load_rates(path: str | Path | None = None) -> dict:
    """A rate table (`--rates FILE`; default: this stack's), checked for the keys the model reads."""
    import yaml

    path = Path(path) if path else DEFAULT_RATES
    if not path.is_file():
        raise ConfigError(f"--rates {path}: no such file (the committed tables are in {RATES_DIR}).")
    try:
        rates = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--rates {path} is not valid YAML: {' '.join(str(e).split())}.") from None
    need = {"gemm": ("rows", "efficiency"), "experts": ("kind",),
            "attention": ("seq", "indexer_tflops", "sparse_fwd_tflops", "sparse_bwd_tflops", "indexer_kl_tflops"),
            "memory": ("copy_efficiency", "passes"), "expert_dispatch": ("kind",),
            "collectives": ("nvlink_efficiency", "network_efficiency"), "data_parallel": ("overlap",),
            "optimizer": ("bytes_per_param",)}
    if not isinstance(rates, dict):
        raise ConfigError(f"--rates {path} must be a mapping of sections ({', '.join(need)}).")
    for section, keys in need.items():
        missing = [k for k in keys if k not in (rates.get(section) or {})]
        if missing:
            raise ConfigError(f"--rates {path}: section {section!r} lacks {', '.join(missing)}.")
    rates.setdefault("stack", path.stem)
    rates.setdefault("measured_on", "h100")
    return rates


@functools.lru_cache(maxsize=1)
def load_devices() -> dict:
    """The vendor peaks per --gpu-type (configs/rates/devices.yaml); read once, not to be modified."""
    import yaml

    return yaml.safe_load((RATES_DIR / "devices.yaml").read_text())


def _interp(xs, ys, x: float) -> float:
    """Piecewise-linear in log(x), flat beyond the ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (math.log(x) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def attended_keys(seq_len: int, topk: int) -> tuple[float, float]:
    """Mean (visible keys, attended keys) per query over a causal sequence (as model/info.py)."""
    from glm52_train.model.info import attention_keys_per_query

    return attention_keys_per_query(seq_len, topk)


class _Rates:
    """The rate table resolved on one device: seconds for FLOPs or bytes of each kind."""

    def __init__(self, rates: dict, gpu_type: str):
        devices = load_devices()
        if gpu_type not in devices:
            raise ConfigError(f"--gpu-type must be one of {', '.join(devices)}, got {gpu_type!r}.")
        self.r, self.gpu_type, self.dev = rates, gpu_type, devices[gpu_type]
        self.kl_from_probs = False  # dsa.indexer_loss=dq_pass (step_time sets it)
        base = devices.get(rates["measured_on"], self.dev)
        self.peak = self.dev["bf16_tflops"] * 1e12
        self.base_peak = base["bf16_tflops"] * 1e12
        self.hbm = self.dev["hbm_tb_s"] * 1e12 * rates["memory"]["copy_efficiency"]
        self.domain = self.dev["nvlink_domain"]
        kind = rates["expert_dispatch"]["kind"]
        self.dispatch = kind.get(gpu_type, "alltoall") if isinstance(kind, dict) else kind

    def gemm(self, flops: float, rows: float) -> float:
        g = self.r["gemm"]
        return flops / (self.peak * _interp(g["rows"], g["efficiency"], max(rows, 1.0)))

    def attention(self, kind: str, flops: float, seq: int, heads: float | None = None) -> float:
        """Seconds of a DSA kernel; `heads` per rank scales the rate by the table's `head_factor`
        (its rates are at 64 heads; absent: the same rate at every head count)."""
        a = self.r["attention"]
        tflops = _interp(a["seq"], a[f"{kind}_tflops"], seq) * 1e12
        if heads is not None and "heads_per_rank" in a:
            tflops *= _interp(a["heads_per_rank"], a["head_factor"], heads)
        return flops / (tflops * self.peak / self.base_peak)  # the same fraction of this device's peak

    def memory(self, nbytes: float) -> float:
        return nbytes / self.hbm

    def link(self, nbytes: float, inside_domain: bool, what: str = "collectives") -> float:
        c = self.r["collectives"]
        if inside_domain:
            return nbytes / (self.dev["nvlink_gb_s"] * 1e9 * c["nvlink_efficiency"])
        return nbytes / (self.dev["network_gb_s"] * 1e9 * c["network_efficiency"])

    def all_to_all(self, intra_bytes: float, inter_bytes: float) -> float:
        d = self.r["expert_dispatch"]
        if self.dispatch == "deepep":
            nvl, net = d["nvlink_gb_s"] * 1e9, d["network_gb_s"] * 1e9
            return max(intra_bytes / nvl, inter_bytes / net)
        nvl = self.dev["nvlink_gb_s"] * 1e9 * d.get("nvlink_efficiency", d.get("alltoall_nvlink_efficiency", 0.6))
        net = self.dev["network_gb_s"] * 1e9 * d.get("network_efficiency", d.get("alltoall_network_efficiency", 0.8))
        return max(intra_bytes / nvl, inter_bytes / net)


def _ring(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather or reduce-scatter of `nbytes` over n ranks."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def _layer_cost(m: ModelConfig, layer, lay: Layout, seq_len: int, tokens: float, R: _Rates,
                micro_batch: int) -> dict:
    """Seconds of one layer (`layer=None`: an MTP step) for one micro-batch on one rank:
    {"fwd": compute forward, "bwd": compute backward, "ep": all-to-all per forward pass,
    "tp": TP collectives per pass, "cp": CP collectives per pass, "mla_up_proj" / "mlp" /
    "shared_experts" / "moe": forward seconds of what selective recomputation rebuilds}."""
    tp, cp = lay.tp, lay.cp
    h = m.hidden_size
    moe = m.num_moe_layers > 0 if layer is None else m.is_moe_layer(layer)
    full = layer is None or m.layer_index_pattern[layer] == "F"
    p = _layer_params(m, layer, tp)
    n = m.num_heads / tp
    up = (m.q_lora_rank * m.num_heads * m.qk_head_dim + m.kv_lora_rank * m.num_heads * (m.qk_nope_dim + m.v_head_dim)) / tp
    cost = {"fwd": 0.0, "bwd": 0.0, "ep": 0.0, "tp": 0.0, "cp": 0.0}
    # GEMMs: the non-expert matrices (attention, indexer, shared experts or dense MLP, router, eh_proj)
    dense_matrices = p["muon"] + (m.num_experts * h if moe else 0)
    shared = m.num_shared_experts * 3 * h * m.moe_ffn_size / tp if moe else 0.0
    mlp = 0.0 if moe else 3 * h * m.dense_ffn_size / tp
    attn_gemm = R.gemm(2 * (dense_matrices - shared - mlp) * tokens, tokens)
    cost["mla_up_proj"] = R.gemm(2 * up * tokens, tokens)
    cost["shared_experts"] = R.gemm(2 * shared * tokens, tokens)
    cost["mlp"] = R.gemm(2 * mlp * tokens, tokens)
    routed = 0.0
    if moe:
        copies = tokens / tp * m.moe_topk  # routed copies each rank computes (uniform routing)
        # ETP splits each expert's FFN over ETP ranks that all-gather their tokens: the same FLOPs
        # per rank, ETP x the rows per GEMM
        per_expert = copies * lay.etp * lay.ep / m.num_experts
        rows = per_expert if R.r["experts"]["kind"] == "sequential" else copies * lay.etp
        routed = R.gemm(2 * 3 * h * m.moe_ffn_size * copies, rows)
        # dispatch + combine of each copy, bf16 hidden; the EP group spans ETP x EP consecutive ranks
        sent = copies * h * BF16
        span = lay.ep * lay.etp
        local = min(span, R.domain) / span
        if R.dispatch == "deepep" and span > R.domain:
            nodes = span / R.domain
            remote_nodes = (nodes - 1) * (1 - (1 - 1 / nodes) ** m.moe_topk)  # distinct remote nodes per token
            inter = tokens / tp * h * BF16 * remote_nodes
        else:
            inter = sent * (1 - local)
        intra = sent * (local - 1 / lay.ep)
        cost["ep"] = 2 * R.all_to_all(max(intra, 0.0), inter)
        cost["moe"] = routed + cost["shared_experts"] + cost["ep"]
    gemm_fwd = attn_gemm + cost["shared_experts"] + cost["mlp"] + routed
    # DSA
    visible, attended = attended_keys(seq_len, m.index_topk)
    pairs = tokens * attended
    att_fwd = R.attention("sparse_fwd", 2 * n * (m.kv_lora_rank + m.qk_rope_dim + m.kv_lora_rank) * pairs, seq_len, n)
    att_bwd = R.attention("sparse_bwd", 2.5 * 2 * n * (m.kv_lora_rank + m.qk_rope_dim + m.kv_lora_rank) * pairs,
                          seq_len, n)
    if full:
        att_fwd += R.attention("indexer", 2 * m.index_heads * m.index_head_dim * tokens * visible, seq_len)
        # the KL's target averages every head's attention: by default TP ranks gather all heads'
        # queries (DSACoreAttention._all_heads) and each recomputes it for num_heads; from the dq
        # pass's head probabilities (dsa.indexer_loss=dq_pass) only the indexer's work is left,
        # taken at the same rate (unmeasured), and the sums' all-reduce under TP
        target = 0 if R.kl_from_probs else 2 * m.num_heads * (m.kv_lora_rank + m.qk_rope_dim)
        att_bwd += R.attention("indexer_kl", (target + 4 * 2 * m.index_heads * m.index_head_dim) * pairs, seq_len)
        if R.kl_from_probs and tp > 1:  # once, in backward (reduce-scatter + all-gather)
            att_bwd += R.link(2 * _ring(tokens * m.index_topk * FP32, tp), tp <= R.domain)
    # memory-bound work over what the layer saves for backward
    saved, _ = layer_saved_bytes(m, layer, tp, lay.sp, BF16, (), micro_batch)
    mem = R.memory(R.r["memory"]["passes"] * saved * tokens) / 2
    cost["fwd"] = gemm_fwd + att_fwd + mem
    cost["bwd"] = 2 * gemm_fwd + att_bwd + mem
    if tp > 1:  # all-gather + reduce-scatter around attention and around the MLP, per pass
        cost["tp"] = 4 * R.link(_ring(tokens * h * BF16, tp), tp <= R.domain)
    if cp > 1:  # latent keys (c_kv | k_rope) and index keys of the whole sequence
        keys = tokens * cp * (m.kv_lora_rank + m.qk_rope_dim + (m.index_head_dim if full else 0)) * BF16
        cost["cp"] = R.link(_ring(keys, cp), tp * cp <= R.domain)
    return cost


def _chunk_times(m: ModelConfig, items: list, lay: Layout, seq_len: int, micro_batch: int, recompute: str,
                 modules, R: _Rates) -> dict:
    """Seconds per micro-batch through one chunk, by part, forward and backward."""
    tokens = micro_batch * seq_len / lay.cp
    t = {k: 0.0 for k in ("fwd", "bwd", "recompute", "ep", "tp", "cp")}
    for item in items:
        if item == "E":
            t["fwd"] += R.memory(2 * tokens * m.hidden_size * BF16)
            t["bwd"] += R.memory(2 * tokens * m.hidden_size * (BF16 + FP32))
            continue
        if item == "L":
            steps = 1 + (m.mtp_steps if m.mtp_layers else 0)
            head = R.gemm(2 * m.hidden_size * m.vocab_size / lay.tp * tokens, tokens) * steps
            logits = R.memory(R.r["memory"]["passes"] * FP32 * m.vocab_size / lay.tp * tokens) * steps / 2
            t["fwd"] += head + logits
            t["bwd"] += 2 * head + logits
            if lay.tp > 1:
                t["tp"] += 2 * steps * R.link(_ring(tokens * m.hidden_size * BF16, lay.tp), lay.tp <= R.domain)
            continue
        c = _layer_cost(m, None if item == "m" else item, lay, seq_len, tokens, R, micro_batch)
        t["fwd"] += c["fwd"]
        t["bwd"] += c["bwd"]
        passes = 3 if recompute == "full" else 2
        t["ep"] += c["ep"] * passes
        t["tp"] += c["tp"] * passes
        t["cp"] += c["cp"] * 2  # forward all-gather, backward reduce-scatter (the keys are saved under recompute)
        if recompute == "full":
            t["recompute"] += c["fwd"] + c["cp"]
        elif recompute == "selective":
            t["recompute"] += sum(c.get(mod, 0.0) for mod in modules)
    return t


def replay_pipeline(pp: int, vpp: int, microbatches: int, fwd, bwd, send: float) -> tuple[float, list[float]]:
    """(makespan, busy seconds per rank) of Megatron-Core's schedule (`schedule_order`) with
    fwd[rank][chunk] / bwd[rank][chunk] seconds per micro-batch: a forward of virtual stage
    s = chunk x PP + rank waits for stage s - 1's forward of the same micro-batch, a backward
    for stage s + 1's backward, each plus `send` seconds of point-to-point transfer."""
    orders = [schedule_order(pp, vpp, r, microbatches) for r in range(pp)]
    pos = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    done_f: dict = {}
    done_b: dict = {}
    count_f = [[0] * vpp for _ in range(pp)]
    count_b = [[0] * vpp for _ in range(pp)]
    last = pp * vpp - 1
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, chunk = orders[r][pos[r]]
                stage = chunk * pp + r
                if kind == "F":
                    mb = count_f[r][chunk]
                    dep = 0.0 if stage == 0 else done_f.get((stage - 1, mb))
                    if dep is None:
                        break
                    start = max(clock[r], dep + (send if stage else 0.0))
                    clock[r] = start + fwd[r][chunk]
                    busy[r] += fwd[r][chunk]
                    done_f[(stage, mb)] = clock[r]
                    count_f[r][chunk] += 1
                else:
                    mb = count_b[r][chunk]
                    if stage == last:
                        dep = done_f.get((stage, mb))
                        gap = 0.0
                    else:
                        dep = done_b.get((stage + 1, mb))
                        gap = send
                    if dep is None:
                        break
                    start = max(clock[r], dep + gap)
                    clock[r] = start + bwd[r][chunk]
                    busy[r] += bwd[r][chunk]
                    done_b[(stage, mb)] = clock[r]
                    count_b[r][chunk] += 1
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("the pipeline schedule replay deadlocked")  # not reachable for Megatron's orders
    return max(clock), busy


def step_time(m: ModelConfig, layout: Layout, seq_len: int, micro_batch: int = 1, num_microbatches: int | None = None,
              recompute: str = "full", recompute_modules=(), gpu_type: str = "h100", rates: dict | None = None,
              first_stage_layers: int | None = None, last_stage_layers: int | None = None,
              grad_dtype: str = "fp32", optimizer: str = "adamw", dsa_indexer_loss: str = "forward") -> StepTime:
    """Seconds per training step of `layout` (see the module docstring). `dsa_indexer_loss`
    (`dsa.indexer_loss`): "dq_pass" counts the sparse KL's indexer work only, its target coming
    from the attention's dq pass (an all-reduce of 4 * topk bytes per query under TP)."""
    from glm52_train.model.info import model_info
    from glm52_train.plan import default_microbatches

    rates = rates or load_rates()
    R = _Rates(rates, gpu_type)
    R.kl_from_probs = dsa_indexer_loss == "dq_pass"
    lay = layout
    chunks = pipeline_chunks(m, lay, first_stage_layers, last_stage_layers)
    pp, vpp = lay.pp, len(chunks[0])
    microbatches = num_microbatches or default_microbatches(pp, vpp)
    per = [[_chunk_times(m, items, lay, seq_len, micro_batch, recompute, recompute_modules, R) for items in rank]
           for rank in chunks]
    grad_bytes = BF16 if grad_dtype == "bf16" else FP32
    expert_dp = max(1, lay.dp * lay.cp * lay.tp // (lay.ep * lay.etp))
    dp_group = lay.dp * lay.cp
    params = [_rank_params(m, rank, lay) for rank in chunks]  # (dense, expert) per GPU
    for r, (dense, expert) in enumerate(params):
        # without fused weight-gradient accumulation, each micro-batch's gradients are added into
        # the main-gradient buffer: counted with the backward's compute
        accumulate = R.memory(rates["optimizer"].get("accumulate_bytes_per_param", 0) * (dense + expert))
        for c in per[r]:
            c["bwd"] += accumulate / len(per[r])
    fwd = [[c["fwd"] + _fwd_comm(c, recompute) for c in rank] for rank in per]
    bwd = [[c["bwd"] + c["recompute"] + _bwd_comm(c, recompute) for c in rank] for rank in per]
    tokens = micro_batch * seq_len / lay.cp
    stage_ranks = lay.tp * lay.cp * lay.dp
    sent = tokens * m.hidden_size * BF16 / (lay.tp if lay.sp else 1)
    if pp > 1 and relays_topk(m, lay, first_stage_layers, last_stage_layers):
        sent += tokens * m.index_topk * 4  # the top-k indices travel with the activations (int32 rows)
    send = R.link(sent, stage_ranks * pp <= R.domain) if pp > 1 else 0.0
    makespan, busy = replay_pipeline(pp, vpp, microbatches, fwd, bwd, send)
    # data-parallel gradient reduce-scatter and parameter all-gather, and the optimizer, per rank
    dp_time, opt_time = [], []
    for r, (dense, expert) in enumerate(params):
        # DP ranks are strided by TP x CP; they share an NVLink domain only when all of them fit in one
        # distributed optimizer: reduce-scatter the gradients, all-gather the bf16 parameters; Muon
        # (no distributed optimizer here, training/setup.py) all-reduces the gradients instead
        gather = grad_bytes if optimizer == "muon" else BF16
        dense_t = R.link(_ring(dense * grad_bytes, dp_group) + _ring(dense * gather, dp_group),
                         lay.tp * dp_group <= R.domain)
        expert_t = R.link(_ring(expert * grad_bytes, expert_dp) + _ring(expert * gather, expert_dp),
                          lay.ep * lay.etp * expert_dp <= R.domain)
        comm = dense_t + expert_t
        if rates["data_parallel"]["overlap"]:
            comm = max(0.0, comm - sum(bwd[r]))  # hidden behind the last micro-batch's backward
        dp_time.append(comm)
        shard = dense / dp_group + expert / expert_dp
        opt_time.append(R.memory(rates["optimizer"]["bytes_per_param"] * shard + grad_bytes * (dense + expert)))
    # the busiest rank sets the bubble (the others wait on it); the rank whose data-parallel sync
    # and optimizer step take longest ends the step
    crit = max(range(pp), key=lambda r: busy[r])
    last = max(range(pp), key=lambda r: dp_time[r] + opt_time[r])
    step = makespan + dp_time[last] + opt_time[last]
    mb = microbatches
    c = per[crit]
    compute = mb * sum(x["fwd"] + x["bwd"] for x in c)
    recomp = mb * sum(x["recompute"] for x in c)
    ep = mb * sum(x["ep"] for x in c)
    tpc = mb * sum(x["tp"] for x in c)
    cpc = mb * sum(x["cp"] for x in c)
    breakdown = {"compute": compute, "recompute": recomp, "bubble": makespan - busy[crit], "ep_comm": ep,
                 "tp_comm": tpc, "cp_comm": cpc, "dp_comm": dp_time[last], "optimizer": opt_time[last]}
    gpus = lay.gpus
    step_tokens = microbatches * micro_batch * seq_len * lay.dp
    flops = model_info(m, seq_len).train_flops_per_token * step_tokens
    tflops = flops / step / gpus / 1e12
    return StepTime(step, step_tokens / step / gpus, tflops, tflops * 1e12 / R.peak, breakdown, gpu_type,
                    rates["stack"], crit, [[(f, b) for f, b in zip(fr, br)] for fr, br in zip(fwd, bwd)])


def _rank_params(m: ModelConfig, rank_chunks: list, lay: Layout) -> tuple[float, float]:
    """(non-expert, expert) parameters one GPU of a pipeline rank holds (as plan.estimate counts)."""
    dense = expert = 0.0
    mtp_seen = 0
    for items in rank_chunks:
        for item in items:
            if item == "E":
                dense += m.vocab_size * m.hidden_size / lay.tp
            elif item == "L":
                dense += 0 if m.tie_embeddings else m.vocab_size * m.hidden_size / lay.tp
            elif item == "m" and mtp_seen >= m.mtp_layers:
                continue  # MTP steps beyond the distinct MTP layers reuse their weights
            else:
                mtp_seen += item == "m"
                p = _layer_params(m, None if item == "m" else item, lay.tp)
                dense += p["muon"] + p["adam"]
                expert += p["expert"] / (lay.ep * lay.etp)
    return dense, expert


def _fwd_comm(c: dict, recompute: str) -> float:
    """The forward pass's share of a chunk's exposed communication (one of its passes)."""
    passes = 3 if recompute == "full" else 2
    return (c["ep"] + c["tp"]) / passes + c["cp"] / 2


def _bwd_comm(c: dict, recompute: str) -> float:
    passes = 3 if recompute == "full" else 2
    return (c["ep"] + c["tp"]) * (passes - 1) / passes + c["cp"] / 2
