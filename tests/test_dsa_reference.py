"""The pure-PyTorch DSA functions against explicit per-query loops in float64."""

import math

import pytest
import torch

from glm52_train.kernels import reference
from tests import dsa_per_head as per_head


def _inputs(seed, s=13, b=2, heads=3, d=8, ih=4, idim=6, dv=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        q=r(s, b, heads, d), k=r(s, b, heads, d), v=r(s, b, heads, dv),
        iq=r(s, b, ih, idim), ik=r(s, b, idim), iw=r(s, b, ih),
    )


def test_index_scores_match_loop():
    x = _inputs(0)
    scores = reference.index_scores(x["iq"], x["ik"], x["iw"]).double()
    s, b = x["iq"].shape[:2]
    for bi in range(b):
        for i in range(s):
            for j in range(s):
                want = sum(x["iw"][i, bi, h] * max(0.0, float(x["iq"][i, bi, h] @ x["ik"][j, bi]))
                           for h in range(x["iq"].shape[2]))
                assert math.isclose(scores[bi, i, j].item(), want, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("topk", [1, 4, 13, 20])
def test_topk_selection_and_sparse_attention_match_loop(topk):
    x = _inputs(topk)
    s, b, n, _ = x["q"].shape
    pos = torch.arange(s)
    causal = reference.allowed_keys(pos, pos)
    scores = reference.index_scores(x["iq"], x["ik"], x["iw"])
    idx = reference.select_topk(scores, causal.unsqueeze(0), topk)
    assert idx.shape == (b, s, topk)
    allowed = causal.unsqueeze(0) & reference.selection_mask(idx, s)
    scale = 0.3
    out = per_head.masked_attention(x["q"], x["k"], x["v"], allowed, scale)
    for bi in range(b):
        for i in range(s):
            chosen = sorted(j for j in idx[bi, i].tolist() if j >= 0)
            visible = list(range(i + 1))
            expect = sorted(visible, key=lambda j: -scores[bi, i, j].item())[: min(topk, i + 1)]
            assert chosen == sorted(expect)
            assert (idx[bi, i] == -1).sum().item() == max(0, topk - (i + 1))
            for h in range(n):
                logits = torch.stack([x["q"][i, bi, h] @ x["k"][j, bi, h] * scale for j in chosen])
                p = torch.softmax(logits, 0)
                want = sum(p[t] * x["v"][j, bi, h] for t, j in enumerate(chosen))
                got = out[i, bi].view(n, -1)[h]
                assert torch.allclose(got, want, atol=1e-10)


def test_documents_are_kept_apart():
    pos = torch.tensor([0, 1, 2, 0, 1])
    doc = torch.tensor([0, 0, 0, 1, 1])
    allowed = reference.allowed_keys(pos, pos, doc, doc)
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_matches_formula(sparse):
    x = _inputs(7)
    s = x["q"].shape[0]
    pos = torch.arange(s)
    causal = reference.allowed_keys(pos, pos).unsqueeze(0)
    scores = reference.index_scores(x["iq"], x["ik"], x["iw"]).double()
    idx = reference.select_topk(scores, causal, 4)
    allowed = causal & reference.selection_mask(idx, s) if sparse else causal
    allowed = allowed.expand(scores.shape[0], s, s)
    target = per_head.head_summed_attention(x["q"], x["k"], allowed, 0.5)
    loss = per_head.indexer_kl_loss(scores, target, allowed)
    total, count = 0.0, 0
    for bi in range(scores.shape[0]):
        for i in range(s):
            keys = [j for j in range(s) if allowed[bi, i, j]]
            att = torch.zeros(len(keys), dtype=torch.float64)
            for h in range(x["q"].shape[2]):
                logits = torch.stack([x["q"][i, bi, h] @ x["k"][j, bi, h] * 0.5 for j in keys])
                att += torch.softmax(logits, 0)
            p = att / att.sum()
            q = torch.softmax(torch.stack([scores[bi, i, j] for j in keys]), 0)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    assert math.isclose(loss.item(), total / count, rel_tol=1e-6)
    assert loss.item() >= 0


def test_sparse_attention_gradients_are_bitwise_reproducible():
    """The CPU training path must give the same bits every run (resume is checked exactly):
    the latent keys' gradient sums repeated selections in a fixed order."""
    g = torch.Generator().manual_seed(0)
    sq, b, n, d, topk = 64, 4, 4, 48, 16
    q, kv = torch.randn(sq, b, n, d, generator=g), torch.randn(sq, b, d, generator=g)
    causal = reference.allowed_keys(torch.arange(sq), torch.arange(sq)).unsqueeze(0)
    idx = reference.select_topk(torch.randn(b, sq, sq, generator=g), causal, topk)
    grads = []
    for _ in range(10):
        kv_ = kv.clone().requires_grad_()
        out, _ = reference.sparse_mla(q, kv_, idx, 0.3, 32)
        out.sum().backward()
        grads.append(kv_.grad)
    assert all(torch.equal(x, grads[0]) for x in grads)
