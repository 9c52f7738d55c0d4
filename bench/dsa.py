"""One DSA layer on one GPU: our Triton kernels vs dense SDPA vs Megatron-Core's unfused DSA.

    python bench/dsa.py [--seqs 4096,16384,65536,131072] [--json PATH] [--quick] [--sweep SEQ]
    python bench/dsa.py --seqs 32768 --heads 16 --topk 1024 --docs 8 --cp 1/4   # any shape
    python bench/dsa.py --seqs 32768,131072 --only "sparse attn" --selection window  # shared rows
    python bench/dsa.py --cpu-smoke     # every code path at toy sizes, Triton interpreter, no GPU

`--heads` (main attention heads per tensor-parallel rank; a comma list runs each, e.g.
`64,32,16,8` for TP1..TP8, every row carrying its `heads`), `--index-heads`, `--topk`, `--docs`
(packed documents per sample) and `--cp RANK/SIZE` (time that context-parallel rank's queries
against the all-gathered keys) set the problem; `--seqs` are whole-sample lengths. Dense SDPA
runs for the plain causal case only.

Shapes are GLM-5.2's (batch 1): 64 heads; sparse MLA in MQA mode on the 576-dim latent
(512 + 64 rope, values 512); lightning indexer 32 heads x 128; top-2048. Dense attention and
Megatron-Core's unfused DSA use the non-absorbed head dims (q/k 192 + 64 = 256, v 256).

FLOP conventions (counted on the pairs actually computed, causal, no masked work):
- indexer: 2 * H_index * 128 per visible (query, key) pair;
- sparse attention: forward 2 * n * (576 + 512) per (query, selected key); backward 2.5x that,
  for the atomic backward and the one without atomics alike (the latter's key-major pass also
  computes the unselected keys of each 16-key block it visits: `key_block_fill` is the share
  of its products that count); fewer than 16 heads are counted at n, computed at 16;
- dense attention: forward 2 * n * (256 + 256) per visible pair; backward 2.5x that;
- indexer KL loss: the attention-probability recompute (2 * n * 576) plus the indexer scores
  twice and its two gradient products (4 * 2 * 32 * 128) per (query, selected key); from the
  dq pass's head probabilities, the latter alone.
Times are medians over CUDA-event-timed repeats after a warm-up; peak memory is
torch.cuda.max_memory_allocated above what the inputs already held, and in total.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N_HEADS, D_LAT, D_ROPE, IH, ID, TOPK = 64, 512, 64, 32, 128, 2048
D_QK, D_V = 256, 256  # non-absorbed MLA head dims (dense / Megatron-Core baselines)
SCALE = (192 + 64) ** -0.5


DEVICE = "cuda"
IMPL = "auto"  # api implementation: Triton on CUDA; --cpu-smoke forces the interpreter
DOCS, CP = 1, None  # packed documents per sample; (rank, size) of the timed context-parallel rank
SELECTION = "indexer"  # --selection: the kernel rows' top-k: the indexer's on random inputs, uniform or window


def smoke_sizes() -> None:
    """Toy dimensions for --cpu-smoke (the Triton interpreter is slow)."""
    global N_HEADS, D_LAT, D_ROPE, IH, ID, TOPK, D_QK, D_V, DEVICE, IMPL
    N_HEADS, D_LAT, D_ROPE, IH, ID, TOPK, D_QK, D_V = 16, 32, 16, 4, 16, 8, 32, 32
    DEVICE, IMPL = "cpu", "triton"


def cuda_time(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs after `warmup` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory(fn) -> tuple[float, float]:
    """(GiB above the memory held before, GiB total) at the peak of one fn() call."""
    if DEVICE != "cuda":
        fn()
        return 0.0, 0.0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - base) / 2**30, peak / 2**30


def reps_for(seq: int, quick: bool) -> tuple[int, int]:
    if quick:
        return 1, 2
    return (2, 5) if seq <= 16384 else (1, 3)


def case_for(seq: int):
    from glm52_train.kernels.cases import DSACase

    return DSACase(seq=seq, heads=N_HEADS, index_heads=IH, topk=TOPK, docs=DOCS, cp=CP)


def visibility(seq: int) -> dict:
    """Keyword arguments for the kernel API: the queries and keys of this problem."""
    return case_for(seq).visibility(torch.Generator().manual_seed(seq), DEVICE)


def pair_counts(seq: int, vis: dict) -> tuple[int, int]:
    """(visible (query, key) pairs, selected pairs) of the problem, counted exactly."""
    from glm52_train.kernels import indexer

    sq = case_for(seq).num_queries
    lo, hi = indexer.visible_ranges(sq, seq, DEVICE, **vis)
    n = (hi - lo).long()
    return int(n.sum()), int(n.clamp(max=TOPK).sum())


def visible_pairs(s: int) -> int:
    return s * (s + 1) // 2


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Row(dict):
    def fmt(self) -> str:
        t = self.get("ms")
        if self.get("status") != "ok":
            return f"{self['name']:<44} {self['seq']:>7} {self.get('status', '?'):>10}"
        tf = f"{self['tflops']:8.1f}" if self.get("tflops") else "       -"
        mem = f"{self['peak_extra_gib']:9.2f} {self['peak_total_gib']:9.2f}" if "peak_extra_gib" in self else " " * 19
        return f"{self['name']:<44} {self['seq']:>7} {t:10.2f} {tf} {mem}"


JSON_PATH: str | None = None
META: dict = {}
ROWS: list = []


def record(row: "Row") -> "Row":
    """Keep the row and rewrite the JSON file, so a run cut short still leaves its results."""
    ROWS.append(row)
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(dict(meta=META, rows=ROWS), f, indent=1, default=str)
    return row


ONLY: list[str] = []  # --only: run the rows of ours whose names contain one of these


def measure(name, seq, fn, flops=None, quick=False, memory=True, extra=None) -> Row | None:
    if ONLY and name.startswith("ours:") and not any(part in name for part in ONLY):
        return None
    row = Row(name=name, seq=seq, heads=N_HEADS, **(extra or {}))
    if name.startswith("ours:"):
        row["selection"] = "indexer" if "layer" in name else SELECTION
    try:
        warmup, reps = reps_for(seq, quick)
        ms = cuda_time(fn, warmup, reps)
        row.update(status="ok", ms=ms, tflops=(flops / ms / 1e9) if flops else None)
        if memory:
            extra_gib, total_gib = peak_memory(fn)
            row.update(peak_extra_gib=extra_gib, peak_total_gib=total_gib)
    except Exception as e:  # noqa: BLE001 - a failed item is reported, the benchmark goes on
        row.update(status="OOM" if is_oom(e) else "ERROR", error=f"{type(e).__name__}: {str(e)[:300]}")
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(row.fmt(), flush=True)
    return record(row)


# ---------------------------------------------------------------------------------------------
# (a) our DSA
# ---------------------------------------------------------------------------------------------

def make_inputs(seq: int, gen: torch.Generator, plain: bool = False):
    """Random q, kv and indexer inputs; `plain`: every query of one causal sequence."""
    dev = DEVICE
    sq = seq if plain else case_for(seq).num_queries
    r = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=torch.bfloat16)  # noqa: E731
    return dict(
        q=r(sq, 1, N_HEADS, D_LAT + D_ROPE), kv=r(seq, 1, D_LAT + D_ROPE),
        iq=r(sq, 1, IH, ID), ik=r(seq, 1, ID),
        iw=torch.randn(sq, 1, IH, generator=gen, device=dev) * (IH**-0.5 * ID**-0.5),
    )


def synthetic_topk(kind: str, seq: int, vis: dict, gen: torch.Generator) -> torch.Tensor:
    """[1, sq, TOPK] int32 selections of a given shape (-1 past the visible count):
    - "uniform": each query's top-k drawn uniformly among its visible keys, without replacement.
      Measured on a CPU (132 consecutive queries at 128K, the inputs of `make_inputs`), the
      indexer's own selections on random inputs are as scattered: 111K distinct rows per 132
      queries against 115K uniform, no key chosen by half of them.
    - "window": the top-k latest visible keys: neighbouring queries share all but one row, the
      most L2 reuse any selection can give (trained selections lie in between)."""
    from glm52_train.kernels import indexer

    sq = case_for(seq).num_queries
    lo, hi = indexer.visible_ranges(sq, seq, DEVICE, **vis)
    k = min(TOPK, seq)
    out = torch.full((sq, TOPK), -1, dtype=torch.int32, device=DEVICE)
    if kind == "window":
        j = hi.long()[:, None] - 1 - torch.arange(k, device=DEVICE)[None]
        out[:, :k] = torch.where(j >= lo.long()[:, None], j, -1).to(torch.int32)
        return out.unsqueeze(0)
    keys = torch.arange(seq, device=DEVICE)
    chunk = max(1, (1 << 28) // max(seq, 1))  # 1 GiB of fp32 scores at a time
    for a in range(0, sq, chunk):
        b = min(sq, a + chunk)
        score = torch.rand(b - a, seq, generator=gen, device=DEVICE)
        visible = (keys >= lo[a:b, None]) & (keys < hi[a:b, None])
        top, j = torch.where(visible, score, -1.0).topk(k, dim=-1)
        out[a:b, :k] = torch.where(top >= 0, j, -1).to(torch.int32)
    return out.unsqueeze(0)


def wave_working_set_mib(idx: torch.Tensor, sms: int) -> float:
    """Mean MiB of distinct kv rows that `sms` consecutive queries (one wave of programs, one
    query each) gather: what L2 must hold for their rows to be read from device memory once."""
    rows = idx[0]
    waves = list(range(0, max(1, rows.shape[0] - sms + 1), max(sms, rows.shape[0] // 64)))[:64]
    sizes = [torch.unique(rows[w:w + sms][rows[w:w + sms] >= 0]).numel() for w in waves]
    return statistics.mean(sizes) * (D_LAT + D_ROPE) * 2 / 2**20


def bench_ours(seq: int, quick: bool) -> list[Row]:
    from glm52_train.kernels import api, indexer_loss, sparse_mla

    gen = torch.Generator(device=DEVICE).manual_seed(seq)
    x = make_inputs(seq, gen)
    vis = visibility(seq)
    rows = []
    idx = api.indexer_topk(x["iq"], x["ik"], x["iw"], TOPK, **vis, impl=IMPL)
    if SELECTION != "indexer":  # the kernel rows below; the layer rows select with the indexer
        idx = synthetic_topk(SELECTION, seq, vis, gen)
    working_set = wave_working_set_mib(idx, META.get("sms") or 132)
    META.setdefault("wave_working_set_mib", {})[f"{seq}x{N_HEADS}"] = working_set
    print(f"# {SELECTION} selection at {seq}: {working_set:.1f} MiB of distinct kv rows per wave of "
          f"{META.get('sms') or 132} queries", flush=True)
    out, lse = sparse_mla.sparse_mla_fwd(x["q"], x["kv"], idx, SCALE, D_LAT)
    dout = torch.randn_like(out)
    n_visible, sel = pair_counts(seq, vis)
    f_idx = 2 * IH * ID * n_visible
    f_fwd = 2 * N_HEADS * (D_LAT + D_ROPE + D_LAT) * sel
    f_kl = (2 * N_HEADS * (D_LAT + D_ROPE) + 4 * 2 * IH * ID) * sel

    rows.append(measure("ours: indexer top-k", seq,
                        lambda: api.indexer_topk(x["iq"], x["ik"], x["iw"], TOPK, **vis, impl=IMPL), f_idx, quick))
    rows.append(measure("ours: sparse attn fwd", seq,
                        lambda: sparse_mla.sparse_mla_fwd(x["q"], x["kv"], idx, SCALE, D_LAT), f_fwd, quick))
    rows.append(measure("ours: sparse attn bwd", seq,
                        lambda: sparse_mla.sparse_mla_bwd(x["q"], x["kv"], idx, out, lse, dout, SCALE, D_LAT),
                        2.5 * f_fwd, quick))
    inverse = sparse_mla.invert_selection(idx, seq)
    fill = sel / max(1, inverse.block * inverse.queries.numel())
    rows.append(measure("ours: inverted selection (build)", seq, lambda: sparse_mla.invert_selection(idx, seq),
                        None, quick, extra=dict(inverse_gib=inverse.nbytes / 2**30)))
    rows.append(measure("ours: sparse attn bwd (no atomics)", seq,
                        lambda: sparse_mla.sparse_mla_bwd(x["q"], x["kv"], idx, out, lse, dout, SCALE, D_LAT,
                                                          dict(atomic=False), inverse),
                        2.5 * f_fwd, quick, extra=dict(key_block_fill=fill)))
    del out, inverse

    iq, ik, iw = (x[k].detach().requires_grad_() for k in ("iq", "ik", "iw"))

    def kl():
        loss = indexer_loss.IndexerKLLoss.apply(iq, ik, iw, x["q"], x["kv"], idx, SCALE, None, lse, D_LAT)
        loss.backward()
        iq.grad = ik.grad = iw.grad = None

    rows.append(measure("ours: indexer KL loss (sparse)", seq, kl, f_kl, quick))

    head_probs = torch.zeros(idx.shape, dtype=torch.float32, device=DEVICE)
    out, _ = sparse_mla.sparse_mla_fwd(x["q"], x["kv"], idx, SCALE, D_LAT)
    rows.append(measure("ours: sparse attn bwd (+ head probs)", seq,
                        lambda: sparse_mla.sparse_mla_bwd(x["q"], x["kv"], idx, out, lse, dout, SCALE, D_LAT,
                                                          head_probs=head_probs), 2.5 * f_fwd, quick))
    del out

    def kl_from_probs():
        loss = indexer_loss.IndexerKLFromProbs.apply(iq, ik, iw, idx, head_probs, N_HEADS)
        loss.backward()
        iq.grad = ik.grad = iw.grad = None

    rows.append(measure("ours: indexer KL loss (from dq-pass probs)", seq, kl_from_probs, 4 * 2 * IH * ID * sel, quick))
    del head_probs

    q, kv = x["q"].detach().requires_grad_(), x["kv"].detach().requires_grad_()

    def layer():
        topk = api.indexer_topk(x["iq"], x["ik"], x["iw"], TOPK, **vis, impl=IMPL)
        o, l_ = api.sparse_mla(q, kv, topk, SCALE, D_LAT, return_lse=True, impl=IMPL)
        o.backward(dout)
        loss = api.indexer_kl_loss(iq, ik, iw, q, kv, topk, SCALE, D_LAT, lse=l_, impl=IMPL)
        loss.backward()
        for t in (q, kv, iq, ik, iw):
            t.grad = None

    rows.append(measure("ours: DSA layer fwd+bwd (total)", seq, layer, f_idx + 3.5 * f_fwd + f_kl, quick))

    def layer_no_atomics():  # the inverted selection built inside, as once per layer in training
        topk = api.indexer_topk(x["iq"], x["ik"], x["iw"], TOPK, **vis, impl=IMPL)
        o, l_ = api.sparse_mla(q, kv, topk, SCALE, D_LAT, return_lse=True, impl=IMPL, bwd_cfg=dict(atomic=False))
        o.backward(dout)
        loss = api.indexer_kl_loss(iq, ik, iw, q, kv, topk, SCALE, D_LAT, lse=l_, impl=IMPL)
        loss.backward()
        for t in (q, kv, iq, ik, iw):
            t.grad = None

    rows.append(measure("ours: DSA layer fwd+bwd (no atomics)", seq, layer_no_atomics,
                        f_idx + 3.5 * f_fwd + f_kl, quick))
    del x, idx, lse, dout, q, kv, iq, ik, iw
    return rows


# ---------------------------------------------------------------------------------------------
# (b) dense causal attention through SDPA, (c) Megatron-Core's unfused DSA
# ---------------------------------------------------------------------------------------------

def bench_dense(seq: int, quick: bool) -> Row:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=DEVICE).manual_seed(seq + 1)

    def r(*s):
        return torch.randn(*s, generator=gen, device=DEVICE, dtype=torch.bfloat16).requires_grad_()

    try:
        q, k, v = r(1, N_HEADS, seq, D_QK), r(1, N_HEADS, seq, D_QK), r(1, N_HEADS, seq, D_V)
        g = torch.randn(1, N_HEADS, seq, D_V, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        return record(Row(name="dense SDPA causal fwd+bwd", seq=seq, status="OOM" if is_oom(e) else "ERROR"))
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if DEVICE != "cuda":
        backends = [SDPBackend.MATH]

    def ctx():
        try:  # prefer cuDNN (the fastest on H100 for these head dims), then flash, then efficient
            return sdpa_kernel(backends, set_priority=True)
        except TypeError:
            return sdpa_kernel(backends)

    def step():
        with ctx():
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
        o.backward(g)
        q.grad = k.grad = v.grad = None

    flops = 3.5 * 2 * N_HEADS * (D_QK + D_V) * visible_pairs(seq)
    row = measure("dense SDPA causal fwd+bwd", seq, step, flops, quick)
    del q, k, v, g
    return row


def bench_mcore(seq: int, quick: bool) -> Row:
    name = "mcore 0.16.1 unfused DSA fwd+bwd"
    try:
        from megatron.core.transformer.experimental_attention_variant import dsa as mdsa
    except Exception as e:  # noqa: BLE001
        print(f"{name:<44} {seq:>7}  unavailable ({type(e).__name__}: {e})", flush=True)
        return record(Row(name=name, seq=seq, status="unavailable"))

    class _TP:
        def size(self):
            return 1

    class _PG:
        tp = _TP()

    gen = torch.Generator(device=DEVICE).manual_seed(seq + 2)

    def r(*s, grad=False):
        t = torch.randn(*s, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        return t.requires_grad_() if grad else t

    try:
        q, k = r(seq, 1, N_HEADS, D_QK, grad=True), r(seq, 1, N_HEADS, D_QK, grad=True)
        v = r(seq, 1, N_HEADS, D_V, grad=True)
        iq, ik = r(seq, 1, IH, ID, grad=True), r(seq, 1, ID, grad=True)
        iw = (torch.randn(seq, 1, IH, generator=gen, device=DEVICE) * IH**-0.5 * ID**-0.5).requires_grad_()
        g = r(seq, 1, N_HEADS * D_V)
    except Exception as e:  # noqa: BLE001
        print(f"{name:<44} {seq:>7} {'OOM' if is_oom(e) else 'ERROR':>10}", flush=True)
        return record(Row(name=name, seq=seq, status="OOM" if is_oom(e) else "ERROR"))

    def step():
        scores = mdsa.DSAIndexer._compute_index_scores(None, iq, iw, ik)
        causal = torch.triu(torch.full((seq, seq), float("-inf"), device=DEVICE), diagonal=1)
        topk = (scores.detach() + causal).topk(min(TOPK, seq), dim=-1)[1]
        out = mdsa.unfused_dsa_fn(q, k, v, topk, SCALE)
        loss = mdsa.compute_dsa_indexer_loss(scores, topk, q.detach(), k.detach(), SCALE, 1.0, True, _PG())
        out.backward(g)
        loss.backward()
        for t in (q, k, v, iq, ik, iw):
            t.grad = None

    row = measure(name, seq, step, None, quick)
    del q, k, v, iq, ik, iw, g
    return row


# ---------------------------------------------------------------------------------------------
# Kernel-configuration sweep (one size): which block shapes win on this GPU
# ---------------------------------------------------------------------------------------------

def sweep(seq: int, quick: bool) -> list[Row]:
    from glm52_train.kernels import api, indexer, sparse_mla

    gen = torch.Generator(device=DEVICE).manual_seed(seq + 3)
    x = make_inputs(seq, gen, plain=True)  # the sweep times the plain causal case
    rows = []
    lo, hi = indexer.visible_ranges(seq, seq, DEVICE)
    f_idx = 2 * IH * ID * visible_pairs(seq)

    def topk_with(**kw):
        return indexer.indexer_topk_triton(x["iq"], x["ik"], x["iw"], TOPK, lo, hi, **kw)

    # the alternatives most likely to win, one compilation each (defaults are in the table)
    # overrides of indexer.SCORE_CFG; BQ=4 with 2 stages fits two CTAs per SM (100 KB, 126 regs)
    for c in (dict(KEYS_AS_M=False), dict(BQ=4, num_stages=2)):
        tag = ",".join(f"{k}={v}" for k, v in c.items())
        rows.append(measure(f"sweep indexer [{tag}]", seq,
                            lambda c=c: topk_with(score_cfg=c), f_idx, quick, memory=False, extra=dict(cfg=c)))
    rows.append(measure("sweep indexer [default cfg]", seq, topk_with, f_idx, quick, memory=True))
    rows.append(measure("sweep indexer [budget 4 GiB]", seq, lambda: topk_with(budget_bytes=4 << 30),
                        f_idx, quick, memory=True))
    c = dict(BLOCK=2048, num_warps=8)
    rows.append(measure("sweep indexer [select BLOCK=2048,warps=8]", seq, lambda: topk_with(select_cfg=c),
                        f_idx, quick, memory=False, extra=dict(cfg=c)))
    rows.extend(_split_indexer(x, lo, hi, seq, quick))

    idx = api.indexer_topk(x["iq"], x["ik"], x["iw"], TOPK, impl=IMPL)
    out, lse = sparse_mla.sparse_mla_fwd(x["q"], x["kv"], idx, SCALE, D_LAT)
    dout = torch.randn_like(out)
    k = min(TOPK, seq)
    f_fwd = 2 * N_HEADS * (D_LAT + D_ROPE + D_LAT) * (k * (k + 1) // 2 + (seq - k) * TOPK)
    def tag(c):
        return ",".join(f"{k}={v}" for k, v in c.items()) or "default"

    for c in (dict(), dict(BK=32, num_warps=8, num_stages=3)):
        rows.append(measure(f"sweep attn fwd [{tag(c)}]", seq,
                            lambda c=c: sparse_mla.sparse_mla_fwd(x["q"], x["kv"], idx, SCALE, D_LAT, c),
                            f_fwd, quick, memory=False, extra=dict(cfg=c)))
    for c in (dict(), dict(fused=True), dict(dq_stages=2), dict(BK=16, dkv_stages=2)):
        rows.append(measure(f"sweep attn bwd [{tag(c)}]", seq,
                            lambda c=c: sparse_mla.sparse_mla_bwd(x["q"], x["kv"], idx, out, lse, dout, SCALE,
                                                                  D_LAT, c),
                            2.5 * f_fwd, quick, memory=False, extra=dict(cfg=c)))
    return rows


def _split_indexer(x, lo, hi, seq, quick) -> list[Row]:
    """The score kernel and the selection kernel timed apart on one chunk of 8192 rows."""
    import triton

    from glm52_train.kernels import indexer

    rows = min(seq, 8192)
    q, k, w = x["iq"], x["ik"], x["iw"].float()
    sc, se = indexer.SCORE_CFG, indexer.SELECT_CFG
    sk_pad = triton.cdiv(seq, 16) * 16
    buf = torch.empty(1, rows, sk_pad, device=DEVICE)
    cand = torch.empty(1, rows, 4096, device=DEVICE, dtype=torch.int32)
    out = torch.empty(1, seq, TOPK, device=DEVICE, dtype=torch.int32)
    q0 = seq - rows  # the last rows: the longest

    def score():
        grid = (triton.cdiv(rows, sc["BQ"]), triton.cdiv(triton.cdiv(seq, sc["BK"]), sc["SPLIT"]), 1)
        indexer._index_score_kernel[grid](
            q, k, w, lo, hi, buf, seq, seq, q0, rows, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), w.stride(0), w.stride(1), w.stride(2), buf.stride(0), buf.stride(1),
            H=IH, D=ID, BQ=sc["BQ"], BK=sc["BK"], SPLIT=sc["SPLIT"], L=min(16, IH), KEYS_AS_M=sc["KEYS_AS_M"],
            num_warps=sc["num_warps"], num_stages=sc["num_stages"])

    def select():
        indexer._topk_select_kernel[(rows, 1)](
            buf, lo, hi, out, cand, q0, rows, buf.stride(0), buf.stride(1), out.stride(0), out.stride(1),
            cand.stride(0), cand.stride(1), TOPK=TOPK, CAP=4096, BLOCK=se["BLOCK"], num_warps=se["num_warps"])

    pairs = visible_pairs(seq) - visible_pairs(q0)
    score()
    return [measure(f"sweep indexer score kernel, last {rows} rows", seq, score, 2 * IH * ID * pairs, quick,
                    memory=False),
            measure(f"sweep indexer select kernel, last {rows} rows", seq, select, None, quick, memory=False)]


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global N_HEADS, IH, TOPK, DOCS, CP, SELECTION
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="4096,16384,65536,131072")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, and only the first two sizes")
    ap.add_argument("--sweep", type=int, default=0, metavar="SEQ",
                    help="also time alternative kernel configurations at this length (e.g. 32768)")
    ap.add_argument("--skip", default="", help="comma list of: ours,dense,mcore")
    ap.add_argument("--only", default="", help="comma list: only our rows whose names contain one (e.g. 'sparse attn')")
    ap.add_argument("--mcore-max-seq", type=int, default=16384,
                    help="run Megatron-Core's unfused DSA (O(S^2) memory) up to this length only")
    ap.add_argument("--heads", default=None,
                    help="main attention heads per TP rank, or a comma list (default 64; 16 under --cpu-smoke)")
    ap.add_argument("--index-heads", type=int, default=IH)
    ap.add_argument("--topk", type=int, default=TOPK)
    ap.add_argument("--docs", type=int, default=1, help="packed documents per sample")
    ap.add_argument("--cp", default=None, metavar="RANK/SIZE", help="time one context-parallel rank's queries")
    ap.add_argument("--selection", choices=("indexer", "uniform", "window"), default="indexer",
                    help="the kernel rows' top-k: the indexer's on random inputs (as scattered as uniform), "
                         "uniform among the visible keys, or the latest top-k keys (window: most L2 reuse)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="every code path at toy sizes on the CPU (Triton interpreter); timings meaningless")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
        from glm52_train.kernels import api

        api.enable_interpreter()
        smoke_sizes()
        args.seqs, args.quick, args.sweep = ("24" if args.seqs else ""), True, args.sweep and 24
        args.index_heads, args.topk = IH, TOPK
    elif not torch.cuda.is_available():
        print("bench/dsa.py needs a CUDA GPU (or --cpu-smoke)")
        return 2
    try:
        head_counts = [int(h) for h in (args.heads or str(N_HEADS)).split(",") if h]
    except ValueError:
        print(f"--heads takes head counts separated by commas, not {args.heads!r}")
        return 2
    N_HEADS, IH, TOPK, DOCS, SELECTION = head_counts[0], args.index_heads, args.topk, args.docs, args.selection
    ONLY[:] = [part for part in args.only.split(",") if part]
    if args.cp:
        rank, _, size = args.cp.partition("/")
        CP = (int(rank), int(size))
    seqs = [int(s) for s in args.seqs.split(",") if s]
    for seq in seqs:
        case_for(seq).check()
    if args.quick:
        seqs = seqs[:2]
    skip = set(filter(None, args.skip.split(",")))
    import triton

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_name, sms = props.name, props.multi_processor_count
    else:
        dev_name, sms = "cpu (Triton interpreter)", 0
    global JSON_PATH
    JSON_PATH = args.json
    meta = META
    meta.update(device=dev_name, sms=sms, torch=torch.__version__, heads=head_counts, index_heads=IH, topk=TOPK,
                docs=DOCS, cp=CP, selection=SELECTION,
                triton=triton.__version__, cuda=torch.version.cuda, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                argv=sys.argv[1:], flops_convention=__doc__.split("FLOP conventions")[1].split("Times are")[0].strip())
    print(f"# {meta['device']} ({meta['sms']} SMs), torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}")
    print(f"{'what':<44} {'seq':>7} {'ms':>10} {'TFLOP/s':>8} {'+GiB':>9} {'GiB':>9}")
    rows: list[Row] = []
    sections = []
    for heads in head_counts:
        for seq in seqs:
            if "ours" not in skip:
                sections.append(("ours", heads, seq, lambda seq=seq: bench_ours(seq, args.quick)))
            if DOCS > 1 or CP is not None:
                continue  # the baselines are plain causal attention over the whole sample
            if "dense" not in skip:
                sections.append(("dense", heads, seq, lambda seq=seq: [bench_dense(seq, args.quick)]))
            if "mcore" not in skip and seq <= args.mcore_max_seq:
                sections.append(("mcore", heads, seq, lambda seq=seq: [bench_mcore(seq, args.quick)]))
    if args.sweep:
        sections.append(("sweep", head_counts[0], args.sweep, lambda: sweep(args.sweep, args.quick)))
    for what, heads, seq, run in sections:
        N_HEADS = heads
        try:
            rows += [r for r in run() if r is not None]
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            status = "OOM" if is_oom(e) else "ERROR"
            print(f"{what + ' (section)':<44} {seq:>7} {status:>10}  {type(e).__name__}: {str(e)[:200]}", flush=True)
            record(Row(name=f"{what} (section)", seq=seq, status=status, error=f"{type(e).__name__}: {str(e)[:500]}"))
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # summary: speed-up of the DSA layer over dense attention
    print("\n# summary")
    print(f"{'seq':>7} {'DSA ms':>10} {'dense ms':>10} {'speed-up':>9} {'DSA +GiB':>9} {'dense +GiB':>10}")
    for seq in seqs:
        ok = [r for r in rows if r["seq"] == seq and r.get("status") == "ok" and r.get("heads") == head_counts[0]]
        ours = next((r for r in ok if r["name"].startswith("ours: DSA layer")), None)
        dense = next((r for r in ok if r["name"].startswith("dense")), None)
        if ours and dense:
            print(f"{seq:>7} {ours['ms']:10.1f} {dense['ms']:10.1f} {dense['ms'] / ours['ms']:8.1f}x "
                  f"{ours['peak_extra_gib']:9.2f} {dense['peak_extra_gib']:10.2f}")
    if args.json:
        record(Row(name="done", seq=0, status="done"))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
