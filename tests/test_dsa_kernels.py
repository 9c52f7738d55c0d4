"""DSA kernels (glm52_train/kernels) against float64 references on fresh random inputs.

- CPU: the references agree with the per-head DSA math (`tests/dsa_per_head.py`), and the Triton kernels
  run in Triton's interpreter at tiny sizes (every code path: S not a multiple of the block,
  k > visible keys, packed documents, ties, candidate overflow).
- GPU (`-m gpu`): the compiled kernels at realistic sizes (64 heads x 576/512, indexer 32 x 128,
  top-2048).
Outputs are poisoned (NaN, or -2 for indices) before every kernel run; errors are relative
Frobenius norms ||x - ref|| / ||ref|| against float64.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch

from glm52_train.kernels import api, reference
from glm52_train.kernels.cases import DSACase
from tests import dsa_per_head as per_head

BF16_TOL = 1e-2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = "GLM52_DSA_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(x).any(), "NaN in kernel output"
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def _mod(name: str):
    return importlib.import_module(f"glm52_train.kernels.{name}")


def _poison(monkeypatch):
    monkeypatch.setattr(_mod("common"), "POISON_OUTPUTS", True)


def _packed_positions(sk: int, sq: int, n_docs: int, gen: torch.Generator, device="cpu"):
    """Document ids and in-document positions of `sk` packed keys; queries are the last `sq`."""
    cuts = sorted((torch.randperm(sk - 1, generator=gen)[: n_docs - 1] + 1).tolist())
    k_doc = torch.zeros(sk, dtype=torch.long)
    for c in cuts:
        k_doc[c:] += 1
    starts = torch.tensor([0] + cuts)
    k_pos = torch.arange(sk) - starts[k_doc]
    k_doc, k_pos = k_doc.to(device), k_pos.to(device)
    return k_pos[sk - sq:], k_pos, k_doc[sk - sq:], k_doc


def _check_topk(out, scores, allowed, topk):
    """out [b, sq, topk] int; scores [b, sq, sk] float64; allowed [b or 1, sq, sk] bool."""
    b, sq, sk = scores.shape
    allowed = allowed.expand(b, sq, sk)
    assert out.shape == (b, sq, topk)
    assert (out >= -1).all() and (out < sk).all(), "unwritten or out-of-range index"
    n_vis = allowed.sum(-1)
    want = n_vis.clamp(max=topk)
    valid = out >= 0
    assert torch.equal(valid.sum(-1), want), "wrong number of selected keys"
    slot = torch.arange(topk, device=out.device)
    assert torch.equal(valid, slot < want.unsqueeze(-1)), "-1 padding must come last"
    sel = torch.zeros(b, sq, sk + 1, dtype=torch.int32, device=out.device)
    sel.scatter_add_(-1, torch.where(valid, out, sk).long(), torch.ones_like(out, dtype=torch.int32))
    sel = sel[..., :sk]
    assert sel.max() <= 1, "duplicate index in a row"
    sel = sel.bool()
    assert not (sel & ~allowed).any(), "selected an invisible key"
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    sel_min = torch.where(sel, scores, inf).amin(-1)
    unsel_max = torch.where(allowed & ~sel, scores, -inf).amax(-1)
    # ties allowed within bf16 rounding of the row's score scale
    tol = 2.0**-9 * scores.abs().amax(-1) + 1e-12
    bad = sel_min < unsel_max - tol
    assert not bad.any(), f"{int(bad.sum())} rows select a key scored below an unselected one"


def _random_selection(b, sq, sk, topk, allowed, gen, device):
    """Random visible subsets (-1 padded, shuffled): [b, sq, topk] int32."""
    r = torch.rand(b, sq, sk, generator=gen).to(device).masked_fill(~allowed, -1.0)
    vals, idx = r.topk(min(topk, sk), dim=-1)
    idx = idx.masked_fill(vals < 0, -1)
    if topk > sk:
        idx = torch.cat([idx, idx.new_full((b, sq, topk - sk), -1)], dim=-1)
    perm = torch.rand(b, sq, topk, generator=gen).to(device).argsort(-1)
    return idx.gather(-1, perm).int()


# ----------------------------------------------------------------------------------------------
# References against the model's DSA math
# ----------------------------------------------------------------------------------------------

def test_references_match_per_head_dsa_math():
    g = torch.Generator().manual_seed(0)
    sq = sk = 11
    b, n, dv, dr, ih, idim, topk = 2, 3, 8, 4, 4, 6, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, kv = r(sq, b, n, dv + dr), r(sk, b, dv + dr)
    iq, ik, iw = r(sq, b, ih, idim), r(sk, b, idim), r(sq, b, ih)
    scale = 0.3
    causal = reference.allowed_keys(torch.arange(sq), torch.arange(sk)).unsqueeze(0)
    scores = reference.index_scores(iq, ik, iw)
    assert torch.allclose(reference.index_scores(iq, ik, iw), scores)
    idx = reference.indexer_topk(iq, ik, iw, topk)
    assert torch.equal(idx, reference.select_topk(scores, causal, topk))
    assert torch.equal(api.indexer_topk(iq, ik, iw, topk).long(), idx)

    # MQA on the latent == per-head attention with the latent broadcast to every head.
    k_heads = kv.unsqueeze(2).expand(sk, b, n, dv + dr)
    v_heads = kv[..., :dv].unsqueeze(2).expand(sk, b, n, dv)
    allowed = causal & reference.selection_mask(idx, sk)
    out, lse = reference.sparse_mla(q, kv, idx, scale, dv)
    want = per_head.masked_attention(q, k_heads, v_heads, allowed, scale).view(sq, b, n, dv)
    assert torch.allclose(out, want)
    s = torch.einsum("sbnd,tbd->bnst", q, kv) * scale
    assert torch.allclose(lse, torch.logsumexp(s.masked_fill(~allowed.unsqueeze(1), float("-inf")), -1))

    assert torch.equal(api.sparse_mla(q, kv, idx, scale, dv), out)  # CPU -> the reference
    for sparse in (False, True):
        mask = allowed if sparse else causal.expand(b, sq, sk)
        target = per_head.head_summed_attention(q, k_heads, mask, scale)
        want = per_head.indexer_kl_loss(scores, target, mask)
        got = reference.indexer_kl_loss(iq, ik, iw, q, kv, idx if sparse else None, scale, dv)
        assert torch.allclose(got, want)
        assert torch.equal(api.indexer_kl_loss(iq, ik, iw, q, kv, idx if sparse else None, scale, dv), got)
        lse = api.mla_lse(q, kv, idx if sparse else None, scale)
        s_masked = torch.einsum("sbnd,tbd->bnst", q, kv).mul(scale).masked_fill(~mask.unsqueeze(1), float("-inf"))
        assert torch.allclose(lse, torch.logsumexp(s_masked, -1))


def test_visible_ranges_match_mask():
    indexer = _mod("indexer")
    g = torch.Generator().manual_seed(1)
    sk, sq = 30, 17
    cases = [dict(), dict(q_pos=torch.arange(sq) * 2 - 3, k_pos=torch.arange(sk))]
    qp, kp, qd, kd = _packed_positions(sk, sq, 4, g)
    cases.append(dict(q_pos=qp, k_pos=kp, q_doc=qd, k_doc=kd))
    for c in cases:
        lo, hi = indexer.visible_ranges(sq, sk, "cpu", **c)
        j = torch.arange(sk)
        got = (j >= lo[:, None].long()) & (j < hi[:, None].long())
        assert torch.equal(got, reference.visible(sq, sk, "cpu", **c))
    with pytest.raises(ValueError):
        indexer.visible_ranges(sq, sk, "cpu", q_pos=qp, k_pos=kp.flip(0), q_doc=qd, k_doc=kd)


def test_kl_from_probs_reference_matches_the_kl_loss():
    """The reference of the KL with a given target equals the KL loss computing it from q, kv."""
    g = torch.Generator().manual_seed(8)
    sq, sk, b, n, d, ih, idim, topk = 7, 12, 2, 3, 10, 4, 6, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, kv, iq, ik, iw = r(sq, b, n, d), r(sk, b, d), r(sq, b, ih, idim), r(sk, b, idim), r(sq, b, ih)
    idx = reference.indexer_topk(iq, ik, iw, topk)
    keys = reference._gather_kv(kv, idx)
    s = torch.einsum("sbnd,bskd->bsnk", q, keys).masked_fill(~(idx >= 0).unsqueeze(2), float("-inf"))
    head_probs = torch.softmax(s * 0.3, -1).nan_to_num(0.0).sum(2)  # [b, sq, topk]
    got = reference.indexer_kl_from_probs(iq, ik, iw, idx, head_probs, n)
    assert torch.allclose(got, reference.indexer_kl_loss(iq, ik, iw, q, kv, idx, 0.3, d))


def test_sparse_mla_indexer_kl_sums_the_heads_of_every_rank():
    """The indexer KL from the attention's backward (reference path, float64), with the heads
    split over two simulated tensor-parallel ranks: the second rank's `reduce_probs` adds the
    first's head sums, and its KL, indexer gradients (times `loss_weight`) and dq/dkv equal the
    one-process forward path's (`sparse_mla` + `indexer_kl_loss` over all heads)."""
    g = torch.Generator().manual_seed(21)
    sq, sk, b, n, dv, dr, ih, idim, topk = 7, 11, 2, 4, 8, 4, 3, 5, 6
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, kv, iq, ik, iw = r(sq, b, n, dv + dr), r(sk, b, dv + dr), r(sq, b, ih, idim), r(sk, b, idim), r(sq, b, ih)
    idx = reference.indexer_topk(iq, ik, iw, topk, q_pos=torch.arange(sq) + sk - sq)
    idx[1, -1, 3:] = -1  # a query with fewer keys
    dout, scale, weight = r(sq, b, n, dv), 0.3, 2.5
    leaves = [t.clone().requires_grad_() for t in (q, kv, iq, ik, iw)]
    out = reference.sparse_mla(leaves[0], leaves[1], idx, scale, dv)[0]
    want_kl = reference.indexer_kl_loss(*leaves[2:], q, kv, idx, scale, dv)
    torch.autograd.backward([out, want_kl * weight], [dout, None])
    half, first_rank_probs, kls = n // 2, [], []
    grads = []
    for rank, (heads, reduce) in enumerate([(slice(0, half), lambda p: first_rank_probs.append(p.clone()) or p),
                                            (slice(half, n), lambda p: p + first_rank_probs[0])]):
        mine = [q[:, :, heads].clone().requires_grad_(), kv.clone().requires_grad_()] + \
            [t.clone().requires_grad_() for t in (iq, ik, iw)]
        got = api.sparse_mla_indexer_kl(*mine[:2], idx, *mine[2:], scale, dv, num_heads=n, reduce_probs=reduce,
                                        loss_weight=lambda: weight, on_loss=kls.append, impl="reference")
        assert not kls[rank:]  # the KL comes in backward
        assert torch.allclose(got, out[:, :, heads])
        got.backward(dout[:, :, heads])
        grads.append([t.grad for t in mine])
    assert len(kls) == 2 and abs(kls[1].item() - want_kl.item()) < 1e-12
    assert torch.allclose(torch.cat([grads[0][0], grads[1][0]], 2), leaves[0].grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grads[0][1] + grads[1][1], leaves[1].grad, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads[1][2:], leaves[2:]):
        assert torch.allclose(got, want.grad, rtol=1e-10, atol=1e-12)


def test_invert_selection_lists_each_keys_queries():
    """The key-major view of a selection: per block of 16 keys, the queries that chose any of
    them (ascending, once each) and which keys; together exactly the selected pairs."""
    sm = _mod("sparse_mla")
    g = torch.Generator().manual_seed(4)
    for sq, sk, topk in ((1, 1, 3), (13, 45, 7), (29, 17, 20)):
        allowed = torch.ones(2, sq, sk, dtype=torch.bool)
        idx = _random_selection(2, sq, sk, topk, allowed, g, "cpu")
        idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
        idx[0, :, 0] = torch.where((idx[0] == 3).any(-1), idx[0, :, 0], 3)  # key 3 chosen by all
        inv = sm.invert_selection(idx, sk)
        assert inv.nbytes == 4 * (2 * inv.queries.numel() + inv.offsets.numel())
        assert inv.nbytes <= 8 * idx.numel() + 4 * inv.offsets.numel()  # what `glm52 plan` keeps for it
        got = set()
        for group in range(2 * inv.n_blocks):
            sample, blk = divmod(group, inv.n_blocks)
            lo, hi = int(inv.offsets[group]), int(inv.offsets[group + 1])
            queries = inv.queries[lo:hi]
            assert (queries[1:] > queries[:-1]).all()
            for i, mask in zip(queries.tolist(), inv.masks[lo:hi].tolist()):
                assert mask != 0
                got |= {(sample, i, blk * 16 + t) for t in range(16) if mask >> t & 1}
        want = {(s_, i, j) for s_ in range(2) for i in range(sq) for j in idx[s_, i].tolist() if j >= 0}
        assert got == want
    with pytest.raises(ValueError, match="key block"):
        sm.invert_selection(idx, sk, block=8)


# ----------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (tiny sizes; every code path)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def interpreter_run(tmp_path_factory):
    """Outcomes of `TestInterpreter` run once in a fresh process with TRITON_INTERPRET=1:
    Triton picks interpret-or-compile when it is first imported, which other test modules
    (transformers, megatron) may already have done in this one."""
    xml = tmp_path_factory.mktemp("triton_interpreter") / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{CHILD_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", f"{os.path.abspath(__file__)}::TestInterpreter", "-q",
           f"--junitxml={xml}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = {}
    if xml.exists():
        for case in ElementTree.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    message = (el.get("message") or "") + "\n" + (el.text or "")
                    break
            results[case.get("name")] = (outcome, message)
    return results, (proc.stdout + proc.stderr)[-6000:]


def _delegated(request) -> bool:
    """In the parent process: report this test's outcome from the interpreter subprocess."""
    if IN_CHILD:
        api.enable_interpreter()
        return False
    results, log = request.getfixturevalue("interpreter_run")
    outcome, message = results.get(request.node.name, ("failed", f"no result in the interpreter run:\n{log}"))
    if outcome == "failed":
        pytest.fail(message, pytrace=False)
    if outcome == "skipped":
        pytest.skip(message)
    return True


class TestInterpreter:
    """Run in a subprocess (see `interpreter_run`); each test starts with `_delegated`."""

    SMALL_SCORE = dict(BQ=4, BK=16, SPLIT=2)

    @pytest.mark.parametrize(
        "sq,sk,b,topk,case",
        [(36, 36, 2, 8, "causal"), (21, 50, 1, 64, "k>visible"), (40, 40, 1, 9, "docs"),
         (30, 30, 1, 6, "ties"), (40, 40, 1, 5, "overflow")],
    )
    def test_indexer_topk(self, request, monkeypatch, sq, sk, b, topk, case):
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(sq * 7 + topk)
        heads, dim = (32, 16) if case == "docs" else (4, 16)
        q = torch.randn(sq, b, heads, dim, generator=g).bfloat16()
        k = torch.randn(sk, b, dim, generator=g).bfloat16()
        w = torch.randn(sq, b, heads, generator=g)
        pos = {}
        if case == "docs":
            qp, kp, qd, kd = _packed_positions(sk, sq, 3, g)
            pos = dict(q_pos=qp, k_pos=kp, q_doc=qd, k_doc=kd)
        if case == "ties":  # index scores of exactly 0 for half the queries
            w[::2] = 0.0
        if case == "overflow":  # identical keys tie (more candidates than cand_cap)
            k[1::2] = k[:1]
            k[2::4] = k[2:3]
        indexer = _mod("indexer")
        lo, hi = indexer.visible_ranges(sq, sk, "cpu", **pos)
        budget = 4 * b * (sk + 16 + 16) * 8 * 3  # a few small chunks
        cfg = dict(BQ=2, BK=16, SPLIT=1) if case == "docs" else self.SMALL_SCORE
        out = indexer.indexer_topk_triton(q, k, w, topk, lo, hi, budget_bytes=budget,
                                          cand_cap=16 if case in ("ties", "overflow") else 4096,
                                          score_cfg=cfg, select_cfg=dict(BLOCK=32))
        scores = reference.index_scores(q.double(), k.double(), w.double())
        allowed = reference.visible(sq, sk, "cpu", **pos).unsqueeze(0)
        _check_topk(out, scores, allowed, topk)

    def test_index_scores_both_layouts(self, request, monkeypatch):
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(5)
        sq, sk, b, heads, dim = 13, 29, 2, 32, 16
        q = torch.randn(sq, b, heads, dim, generator=g).bfloat16()
        k = torch.randn(sk, b, dim, generator=g).bfloat16()
        w = torch.randn(sq, b, heads, generator=g)
        indexer = _mod("indexer")
        lo, hi = indexer.visible_ranges(sq, sk, "cpu")
        ref = reference.index_scores(q.double(), k.double(), w.double())
        vis = reference.visible(sq, sk, "cpu").expand(b, sq, sk)
        for keys_as_m in (False, True):
            buf = torch.full((b, 16, 32), float("nan"))
            indexer._index_score_kernel[(4, 1, b)](
                q, k, w, lo, hi, buf, sq, sk, 0, sq,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                w.stride(0), w.stride(1), w.stride(2), buf.stride(0), buf.stride(1),
                H=heads, D=dim, BQ=4, BK=16, SPLIT=2, L=16, KEYS_AS_M=keys_as_m)
            got = buf[:, :sq, :sk]
            assert not got[vis].isnan().any()
            assert _rel(got[vis], ref[vis]) < 1e-5

    @pytest.mark.parametrize(
        "sq,sk,b,n,dv,dr,topk,bk,fused",
        [(9, 20, 2, 16, 32, 16, 12, 16, False),   # topk not a multiple of BK; -1 entries
         (7, 7, 1, 16, 32, 16, 24, 16, True),     # k > visible keys, fused backward
         (3, 5, 1, 64, 512, 64, 16, 16, False)],  # the real head count and dims
    )
    def test_sparse_mla(self, request, monkeypatch, sq, sk, b, n, dv, dr, topk, bk, fused):
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(sq + topk)
        # q as a strided view (heads padded), as a fused projection's output would be
        q = torch.randn(sq, b, n + 2, dv + dr, generator=g).bfloat16()[:, :, :n].requires_grad_()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16().requires_grad_()
        allowed = reference.visible(sq, sk, "cpu").unsqueeze(0).expand(b, sq, sk)
        idx = _random_selection(b, sq, sk, topk, allowed, g, "cpu")
        scale = (dv + dr) ** -0.5
        out, lse = api.sparse_mla(q, kv, idx, scale, dv, impl="triton", return_lse=True,
                                  fwd_cfg=dict(BK=bk), bwd_cfg=dict(BK=bk, fused=fused))
        dout = torch.randn(out.shape, generator=g).bfloat16()
        out.backward(dout)
        qd, kvd = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
        ref_out, ref_lse = reference.sparse_mla(qd, kvd, idx, scale, dv)
        ref_out.backward(dout.double())
        assert _rel(out, ref_out) < BF16_TOL
        assert _rel(lse, ref_lse) < 1e-5
        assert _rel(q.grad, qd.grad) < BF16_TOL
        assert _rel(kv.grad, kvd.grad) < BF16_TOL

    def test_sparse_mla_query_without_keys(self, request, monkeypatch):
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(3)
        q = torch.randn(4, 1, 16, 48, generator=g).bfloat16().requires_grad_()
        kv = torch.randn(6, 1, 48, generator=g).bfloat16().requires_grad_()
        idx = torch.tensor([[[0, 1, -1, -1], [-1, -1, -1, -1], [2, -1, 4, 5], [-1, 3, -1, -1]]], dtype=torch.int32)
        out, lse = api.sparse_mla(q, kv, idx, 0.2, 32, impl="triton", return_lse=True,
                                  fwd_cfg=dict(BK=16), bwd_cfg=dict(BK=16))
        out.float().sum().backward()
        assert (out[1] == 0).all() and torch.isinf(lse[:, :, 1]).all()
        assert not torch.isnan(q.grad).any() and not torch.isnan(kv.grad).any()
        assert (q.grad[1] == 0).all()

    @pytest.mark.parametrize("case", ["odd", "cp", "docs"])
    def test_sparse_mla_key_major_backward(self, request, monkeypatch, case):
        """The atomics-free backward (dkv key-major over the inverted selection) against float64,
        and bitwise-equal gradients from two backward passes."""
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(11 + len(case))
        b, n, dv, dr, topk = 2, 16, 32, 16, 12
        spec = {"odd": DSACase(seq=37, queries=9), "cp": DSACase(seq=24, cp=(1, 3)),
                "docs": DSACase(seq=30, docs=3)}[case]
        vis = spec.visibility(g, "cpu")
        sq, sk = spec.num_queries, spec.seq
        q_pos = vis.get("q_pos", spec.query_indices())
        allowed = reference.visible(sq, sk, "cpu", q_pos, vis.get("k_pos"), vis.get("q_doc"), vis.get("k_doc"))
        idx = _random_selection(b, sq, sk, topk, allowed.unsqueeze(0).expand(b, sq, sk), g, "cpu")
        if case == "odd":  # key 0 is chosen by every query; the last 3 slots are empty
            idx = torch.where(idx == 0, idx[..., :1].expand_as(idx), idx)
            idx[..., 0] = 0
            idx[..., -3:] = -1
        q = torch.randn(sq, b, n, dv + dr, generator=g).bfloat16().requires_grad_()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16().requires_grad_()
        dout = torch.randn(sq, b, n, dv, generator=g).bfloat16()
        scale = (dv + dr) ** -0.5
        grads = []
        for _ in range(2):
            q.grad = kv.grad = None
            out = api.sparse_mla(q, kv, idx, scale, dv, impl="triton", fwd_cfg=dict(BK=16),
                                 bwd_cfg=dict(BK=16, atomic=False))
            out.backward(dout)
            grads.append((q.grad.clone(), kv.grad.clone()))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        inverse = api.inverted_selection(idx, sk)
        assert api.inverted_selection(idx, sk) is inverse  # built once per indices tensor
        assert int(inverse.offsets[-1]) == inverse.queries.numel() <= int((idx >= 0).sum())
        qd, kvd = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
        ref_out, _ = reference.sparse_mla(qd, kvd, idx, scale, dv)
        ref_out.backward(dout.double())
        assert _rel(grads[0][0], qd.grad) < BF16_TOL
        assert _rel(grads[0][1], kvd.grad) < BF16_TOL
        unchosen = ~reference.selection_mask(idx.long(), sk).any(1)  # [b, sk]
        assert (grads[0][1].permute(1, 0, 2)[unchosen] == 0).all()

    @pytest.mark.parametrize("heads", [8, 32, 64])
    def test_head_counts(self, request, monkeypatch, heads):
        """Every per-rank head count (TP1..TP8 of 64; 16 is covered above): forward, both
        backwards and the KL loss. Fewer than 16 heads run padded to 16 rows."""
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(heads)
        sq, sk, b, dv, dr, topk, ih, idim = 5, 19, 1, 32, 16, 8, 4, 16
        q = torch.randn(sq, b, heads, dv + dr, generator=g).bfloat16().requires_grad_()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16().requires_grad_()
        allowed = reference.visible(sq, sk, "cpu").unsqueeze(0).expand(b, sq, sk)
        idx = _random_selection(b, sq, sk, topk, allowed, g, "cpu")
        scale = (dv + dr) ** -0.5
        dout = torch.randn(sq, b, heads, dv, generator=g).bfloat16()
        qd, kvd = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
        ref_out, ref_lse = reference.sparse_mla(qd, kvd, idx, scale, dv)
        ref_out.backward(dout.double())
        for atomic in (True, False):
            q.grad = kv.grad = None
            out, lse = api.sparse_mla(q, kv, idx, scale, dv, impl="triton", return_lse=True,
                                      fwd_cfg=dict(BK=16), bwd_cfg=dict(BK=16, atomic=atomic))
            out.backward(dout)
            assert _rel(out, ref_out) < BF16_TOL and _rel(lse, ref_lse) < 1e-5
            assert _rel(q.grad, qd.grad) < BF16_TOL, f"dq, atomic={atomic}"
            assert _rel(kv.grad, kvd.grad) < BF16_TOL, f"dkv, atomic={atomic}"
        iq = torch.randn(sq, b, ih, idim, generator=g).bfloat16().requires_grad_()
        ik = torch.randn(sk, b, idim, generator=g).bfloat16().requires_grad_()
        iw = (0.3 * torch.randn(sq, b, ih, generator=g)).requires_grad_()
        loss = api.indexer_kl_loss(iq, ik, iw, q.detach(), kv.detach(), idx, scale, dv, impl="triton")
        ref = reference.indexer_kl_loss(iq.double(), ik.double(), iw.double(), q.double(), kv.double(),
                                        idx, scale, dv)
        assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())

    @pytest.mark.parametrize("heads", [8, 16])
    def test_indexer_kl_from_dq_pass_probabilities(self, request, monkeypatch, heads):
        """The KL without a second kv gather: the dq pass sums the attention probabilities over
        heads per top-k slot, the KL kernel reads them; against the float64 loss from q, kv."""
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(heads + 1)
        sq, sk, b, dv, dr, ih, idim, topk = 9, 14, 2, 32, 16, 4, 16, 6
        q = torch.randn(sq, b, heads, dv + dr, generator=g).bfloat16()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16()
        iq = torch.randn(sq, b, ih, idim, generator=g).bfloat16().requires_grad_()
        ik = torch.randn(sk, b, idim, generator=g).bfloat16().requires_grad_()
        iw = (0.3 * torch.randn(sq, b, ih, generator=g)).requires_grad_()
        idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), topk, impl="reference").int()
        idx[0, -1, 2:] = -1  # a query with fewer keys
        sm = _mod("sparse_mla")
        scale = (dv + dr) ** -0.5
        out, lse = sm.sparse_mla_fwd(q, kv, idx, scale, dv, dict(BK=16))
        probs = torch.full(idx.shape, float("nan"))
        sm.sparse_mla_bwd(q, kv, idx, out, lse, torch.randn(out.shape, generator=g).bfloat16(), scale, dv,
                          dict(BK=16), head_probs=probs)
        loss = api.indexer_kl_from_probs(iq, ik, iw, idx, probs, heads, impl="triton")
        loss.backward()
        iqd, ikd, iwd = (t.detach().double().requires_grad_() for t in (iq, ik, iw))
        ref = reference.indexer_kl_loss(iqd, ikd, iwd, q.double(), kv.double(), idx, scale, dv)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
        assert _rel(iq.grad, iqd.grad) < BF16_TOL and _rel(ik.grad, ikd.grad) < BF16_TOL
        assert _rel(iw.grad, iwd.grad) < 1e-4

    @pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "key-major"])
    def test_sparse_mla_indexer_kl(self, request, monkeypatch, atomic):
        """The attention whose backward computes the indexer KL from the dq pass's head
        probabilities (`api.sparse_mla_indexer_kl`, what `dsa.indexer_loss: dq_pass` runs):
        out, dq, dkv, the logged KL and the indexer gradients (times the loss weight) against
        float64 `sparse_mla` + `indexer_kl_loss`."""
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(5 + atomic)
        sq, sk, b, n, dv, dr, ih, idim, topk = 9, 14, 2, 16, 32, 16, 4, 16, 6
        q = torch.randn(sq, b, n, dv + dr, generator=g).bfloat16().requires_grad_()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16().requires_grad_()
        iq = torch.randn(sq, b, ih, idim, generator=g).bfloat16().requires_grad_()
        ik = torch.randn(sk, b, idim, generator=g).bfloat16().requires_grad_()
        iw = (0.3 * torch.randn(sq, b, ih, generator=g)).requires_grad_()
        idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), topk, impl="reference").int()
        idx[0, -1, 2:] = -1  # a query with fewer keys
        scale, weight, kls = (dv + dr) ** -0.5, 3.0, []
        dout = torch.randn(sq, b, n, dv, generator=g).bfloat16()
        out = api.sparse_mla_indexer_kl(q, kv, idx, iq, ik, iw, scale, dv, loss_weight=lambda: weight,
                                        on_loss=kls.append, impl="triton", bwd_cfg=dict(atomic=atomic))
        out.backward(dout)
        leaves = [t.detach().double().requires_grad_() for t in (q, kv, iq, ik, iw)]
        ref_out = reference.sparse_mla(leaves[0], leaves[1], idx, scale, dv)[0]
        ref_kl = reference.indexer_kl_loss(*leaves[2:], q.double(), kv.double(), idx, scale, dv)
        torch.autograd.backward([ref_out, ref_kl * weight], [dout.double(), None])
        assert len(kls) == 1 and abs(kls[0].item() - ref_kl.item()) <= 1e-4 * abs(ref_kl.item())
        assert _rel(out, ref_out) < BF16_TOL
        for name, got, want in zip(("q", "kv", "iq", "ik"), (q, kv, iq, ik), leaves):
            assert _rel(got.grad, want.grad) < BF16_TOL, name
        assert _rel(iw.grad, leaves[4].grad) < 1e-4

    @pytest.mark.parametrize("mode", ["sparse", "sparse+lse", "dense", "dense+docs"])
    def test_indexer_kl_loss(self, request, monkeypatch, mode):
        if _delegated(request):
            return
        _poison(monkeypatch)
        g = torch.Generator().manual_seed(len(mode))
        sq, sk, b, n, dv, dr, ih, idim = 9, 14, 2, 16, 32, 16, 4, 16
        pos = {}
        if "docs" in mode:
            qp, kp, qd, kd = _packed_positions(sk, sq, 3, g)
            pos = dict(q_pos=qp, k_pos=kp, q_doc=qd, k_doc=kd)
        q = torch.randn(sq, b, n, dv + dr, generator=g).bfloat16()
        kv = torch.randn(sk, b, dv + dr, generator=g).bfloat16()
        iq = torch.randn(sq, b, ih, idim, generator=g).bfloat16().requires_grad_()
        ik = torch.randn(sk, b, idim, generator=g).bfloat16().requires_grad_()
        iw = (0.3 * torch.randn(sq, b, ih, generator=g)).requires_grad_()
        idx = None
        if "sparse" in mode:
            idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), 6, **pos, impl="reference")
        scale = (dv + dr) ** -0.5
        lse = None
        if "lse" in mode:
            lse = api.mla_lse(q, kv, idx, scale, **pos, v_dim=dv, impl="triton")
        loss = api.indexer_kl_loss(iq, ik, iw, q, kv, idx, scale, dv, **pos, lse=lse, impl="triton")
        loss.backward()
        iqd, ikd, iwd = (t.detach().double().requires_grad_() for t in (iq, ik, iw))
        ref = reference.indexer_kl_loss(iqd, ikd, iwd, q.double(), kv.double(), idx, scale, dv, **pos)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
        assert _rel(iq.grad, iqd.grad) < BF16_TOL
        assert _rel(ik.grad, ikd.grad) < BF16_TOL
        assert _rel(iw.grad, iwd.grad) < 1e-4
        ref_lse = reference.mla_lse(q.double(), kv.double(), idx, scale, **pos)
        assert _rel(api.mla_lse(q, kv, idx, scale, **pos, v_dim=dv, impl="triton"), ref_lse) < 1e-5


# ----------------------------------------------------------------------------------------------
# Compiled kernels on the GPU, realistic sizes
# ----------------------------------------------------------------------------------------------

DSA_GPU_CASES = [  # `--dsa-case SPEC` replaces these (see glm52_train/kernels/cases.py)
    DSACase(seq=4133),                    # a length that is a multiple of no block size
    DSACase(seq=5000, queries=1500),      # queries at the end of a longer key range
    DSACase(seq=777),                     # top-k (2048) above every query's visible keys
    DSACase(seq=3000, docs=5),            # packed documents
    DSACase(seq=4096, cp=(1, 4)),         # context-parallel rank 1 of 4 (all-gathered keys)
    DSACase(seq=6144, cp=(2, 3), docs=4),  # CP with packed documents
]


def _case_inputs(case: DSACase, dev: str):
    g = torch.Generator().manual_seed(case.seq + case.topk + case.docs)
    vis = case.visibility(g, dev)
    sq, sk = case.num_queries, case.seq
    q_pos = vis.get("q_pos", case.query_indices(dev))
    k_pos = vis.get("k_pos", torch.arange(sk, device=dev))
    full = dict(q_pos=q_pos, k_pos=k_pos, q_doc=vis.get("q_doc"), k_doc=vis.get("k_doc"))
    return g, vis, full, sq, sk


def _rows(full: dict, rows: slice) -> dict:
    """The visibility keywords for a slice of the queries."""
    out = dict(full)
    out["q_pos"] = full["q_pos"][rows]
    if full["q_doc"] is not None:
        out["q_doc"] = full["q_doc"][rows]
    return out


def _chunked_index_scores(q, k, w, chunk=256):
    return torch.cat([reference.index_scores(q[i:i + chunk].double(), k.double(), w[i:i + chunk].double())
                      for i in range(0, q.shape[0], chunk)], dim=1)


@pytest.mark.gpu
def test_gpu_indexer_topk(monkeypatch, dsa_case):
    _poison(monkeypatch)
    dev = "cuda"
    g, vis, full, sq, sk = _case_inputs(dsa_case, dev)
    ih, topk = dsa_case.index_heads, dsa_case.topk
    q = torch.randn(sq, 1, ih, 128, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(sk, 1, 128, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(sq, 1, ih, generator=g) * ih**-0.5 * 128**-0.5).to(dev)
    out = api.indexer_topk(q, k, w, topk, **vis, budget_bytes=64 << 20)
    torch.cuda.synchronize()
    scores = _chunked_index_scores(q, k, w)
    allowed = reference.visible(sq, sk, dev, **full).unsqueeze(0)
    _check_topk(out, scores, allowed, topk)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", [dict(fused=False), dict(fused=True), dict(atomic=False)],
                         ids=["split-bwd", "fused-bwd", "no-atomics-bwd"])
def test_gpu_sparse_mla(monkeypatch, dsa_case, bwd):
    _poison(monkeypatch)
    dev = "cuda"
    g, vis, full, sq, sk = _case_inputs(dsa_case, dev)
    b, n, dv, dr, topk = 1, dsa_case.heads, 512, 64, dsa_case.topk
    q = torch.randn(sq, b, n, dv + dr, generator=g).to(dev, torch.bfloat16).requires_grad_()
    kv = torch.randn(sk, b, dv + dr, generator=g).to(dev, torch.bfloat16).requires_grad_()
    allowed = reference.visible(sq, sk, dev, **full).unsqueeze(0).expand(b, sq, sk)
    idx = _random_selection(b, sq, sk, topk, allowed, g, dev)
    scale = (dv + dr) ** -0.5
    out, lse = api.sparse_mla(q, kv, idx, scale, dv, return_lse=True, bwd_cfg=bwd)
    dout = torch.randn(out.shape, generator=g).to(dev, torch.bfloat16)
    out.backward(dout, retain_graph=True)
    if bwd.get("atomic", True) is False:  # deterministic: a second backward, bitwise equal
        first = (q.grad.clone(), kv.grad.clone())
        q.grad = kv.grad = None
        out.backward(dout)
        assert torch.equal(first[0], q.grad) and torch.equal(first[1], kv.grad)
    kvd = kv.detach().double().requires_grad_()
    num = {k: 0.0 for k in ("out", "lse", "dq")}
    den = dict(num)
    for i in range(0, sq, 96):
        qd = q[i:i + 96].detach().double().requires_grad_()
        ro, rl = reference.sparse_mla(qd, kvd, idx[:, i:i + 96], scale, dv)
        ro.backward(dout[i:i + 96].double())
        pairs = (("out", out[i:i + 96], ro), ("lse", lse[:, :, i:i + 96], rl), ("dq", q.grad[i:i + 96], qd.grad))
        for key, x, r in pairs:
            assert not torch.isnan(x).any(), key
            finite = torch.isfinite(r)
            assert torch.equal(finite, torch.isfinite(x)), f"{key}: -inf where the reference has none (or back)"
            num[key] += float((x.double() - r.double())[finite].norm() ** 2)
            den[key] += float(r.double()[finite].norm() ** 2)
    for key in num:
        assert (num[key] / den[key]) ** 0.5 < (1e-5 if key == "lse" else BF16_TOL), key
    assert _rel(kv.grad, kvd.grad) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_gpu_indexer_kl_loss(monkeypatch, dsa_case, mode):
    _poison(monkeypatch)
    dev = "cuda"
    g, vis, full, sq, sk = _case_inputs(dsa_case, dev)
    b, n, dv, dr, ih = 1, dsa_case.heads, 512, 64, dsa_case.index_heads
    q = torch.randn(sq, b, n, dv + dr, generator=g).to(dev, torch.bfloat16)
    kv = torch.randn(sk, b, dv + dr, generator=g).to(dev, torch.bfloat16)
    iq = torch.randn(sq, b, ih, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    ik = torch.randn(sk, b, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    iw = (torch.randn(sq, b, ih, generator=g) * 0.02).to(dev).requires_grad_()
    idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), dsa_case.topk, **vis) if mode == "sparse" else None
    scale = (dv + dr) ** -0.5
    loss = api.indexer_kl_loss(iq, ik, iw, q, kv, idx, scale, dv, **vis)
    loss.backward()
    lse = api.mla_lse(q, kv, idx, scale, **vis)
    # the float64 reference, 128 queries at a time: the loss is a mean over queries
    iqd, ikd, iwd = (t.detach().double().requires_grad_() for t in (iq, ik, iw))
    ref, lse_err, lse_den = 0.0, 0.0, 0.0
    for i in range(0, sq, 128):
        rows = slice(i, min(i + 128, sq))
        part_idx = idx[:, rows] if idx is not None else None
        part = reference.indexer_kl_loss(iqd[rows], ikd, iwd[rows], q[rows].double(), kv.double(), part_idx,
                                         scale, dv, **_rows(full, rows))
        (part * (rows.stop - rows.start) / sq).backward()
        ref += part.item() * (rows.stop - rows.start) / sq
        ref_lse = reference.mla_lse(q[rows].double(), kv.double(), part_idx, scale, **_rows(full, rows))
        finite = torch.isfinite(ref_lse)
        lse_err += float((lse[:, :, rows].double() - ref_lse)[finite].norm() ** 2)
        lse_den += float(ref_lse[finite].norm() ** 2)
    assert abs(loss.item() - ref) <= 1e-4 * abs(ref) + 1e-6
    assert _rel(iq.grad, iqd.grad) < BF16_TOL
    assert _rel(ik.grad, ikd.grad) < BF16_TOL
    assert _rel(iw.grad, iwd.grad) < 1e-3
    assert (lse_err / lse_den) ** 0.5 < 1e-5


@pytest.mark.gpu
def test_gpu_indexer_kl_from_dq_pass_probabilities(monkeypatch, dsa_case):
    """The KL without a second kv gather at full size: the dq pass's head probabilities, then
    `indexer_kl_from_probs`, against the float64 KL loss from q and kv."""
    _poison(monkeypatch)
    dev = "cuda"
    g, vis, full, sq, sk = _case_inputs(dsa_case, dev)
    b, n, dv, dr, ih = 1, dsa_case.heads, 512, 64, dsa_case.index_heads
    q = torch.randn(sq, b, n, dv + dr, generator=g).to(dev, torch.bfloat16)
    kv = torch.randn(sk, b, dv + dr, generator=g).to(dev, torch.bfloat16)
    iq = torch.randn(sq, b, ih, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    ik = torch.randn(sk, b, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    iw = (torch.randn(sq, b, ih, generator=g) * 0.02).to(dev).requires_grad_()
    idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), dsa_case.topk, **vis)
    scale = (dv + dr) ** -0.5
    sm = _mod("sparse_mla")
    out, lse = sm.sparse_mla_fwd(q, kv, idx, scale, dv)
    probs = torch.full(idx.shape, float("nan"), device=dev)
    sm.sparse_mla_bwd(q, kv, idx, out, lse, torch.randn_like(out), scale, dv, head_probs=probs)
    loss = api.indexer_kl_from_probs(iq, ik, iw, idx, probs, n)
    loss.backward()
    iqd, ikd, iwd = (t.detach().double().requires_grad_() for t in (iq, ik, iw))
    ref = 0.0
    for i in range(0, sq, 128):
        rows = slice(i, min(i + 128, sq))
        part = reference.indexer_kl_loss(iqd[rows], ikd, iwd[rows], q[rows].double(), kv.double(), idx[:, rows],
                                         scale, dv, **_rows(full, rows))
        (part * (rows.stop - rows.start) / sq).backward()
        ref += part.item() * (rows.stop - rows.start) / sq
    assert abs(loss.item() - ref) <= 1e-4 * abs(ref) + 1e-6
    assert _rel(iq.grad, iqd.grad) < BF16_TOL
    assert _rel(ik.grad, ikd.grad) < BF16_TOL
    assert _rel(iw.grad, iwd.grad) < 1e-3


@pytest.mark.gpu
def test_gpu_sparse_mla_indexer_kl(monkeypatch, dsa_case):
    """`api.sparse_mla_indexer_kl` (what `dsa.indexer_loss: dq_pass` runs) at full size: out, dq
    and dkv as `sparse_mla`'s (checked against float64 by test_gpu_sparse_mla), and the KL and
    the indexer gradients (times the loss weight) against the float64 KL loss from q and kv."""
    _poison(monkeypatch)
    dev = "cuda"
    g, vis, full, sq, sk = _case_inputs(dsa_case, dev)
    b, n, dv, dr, ih = 1, dsa_case.heads, 512, 64, dsa_case.index_heads
    q = torch.randn(sq, b, n, dv + dr, generator=g).to(dev, torch.bfloat16).requires_grad_()
    kv = torch.randn(sk, b, dv + dr, generator=g).to(dev, torch.bfloat16).requires_grad_()
    iq = torch.randn(sq, b, ih, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    ik = torch.randn(sk, b, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
    iw = (torch.randn(sq, b, ih, generator=g) * 0.02).to(dev).requires_grad_()
    idx = api.indexer_topk(iq.detach(), ik.detach(), iw.detach(), dsa_case.topk, **vis)
    scale, weight, kls = (dv + dr) ** -0.5, 2.0, []
    dout = torch.randn(sq, b, n, dv, generator=g).to(dev, torch.bfloat16)
    out = api.sparse_mla_indexer_kl(q, kv, idx, iq, ik, iw, scale, dv, loss_weight=lambda: weight, on_loss=kls.append)
    out.backward(dout)
    qs, kvs = q.detach().requires_grad_(), kv.detach().requires_grad_()
    want = api.sparse_mla(qs, kvs, idx, scale, dv)
    want.backward(dout)
    assert torch.equal(out, want)  # the same forward kernel
    assert _rel(q.grad, qs.grad) < 1e-3 and _rel(kv.grad, kvs.grad) < 1e-3  # dkv: atomics in another order
    iqd, ikd, iwd = (t.detach().double().requires_grad_() for t in (iq, ik, iw))
    ref = 0.0
    for i in range(0, sq, 128):
        rows = slice(i, min(i + 128, sq))
        part = reference.indexer_kl_loss(iqd[rows], ikd, iwd[rows], q[rows].detach().double(), kv.detach().double(),
                                         idx[:, rows], scale, dv, **_rows(full, rows))
        (part * (weight * (rows.stop - rows.start) / sq)).backward()
        ref += part.item() * (rows.stop - rows.start) / sq
    assert len(kls) == 1 and abs(kls[0].item() - ref) <= 1e-4 * abs(ref) + 1e-6
    assert _rel(iq.grad, iqd.grad) < BF16_TOL
    assert _rel(ik.grad, ikd.grad) < BF16_TOL
    assert _rel(iw.grad, iwd.grad) < 1e-3
