"""The dense per-head attention (kernels/dense.py): its runs of queries, and SDPA over them,
against a masked softmax over the [sq, sk] visibility, for plain, packed and context-parallel
layouts (every rank of CP2 and CP4), in float64."""

from __future__ import annotations

import pytest
import torch

from glm52_train.kernels import reference
from glm52_train.kernels.cases import cp_token_indices
from glm52_train.kernels.dense import dense_attention, dense_runs, max_visible

S = 48
DOCS = torch.tensor([0] * 7 + [1] * 20 + [2] * 1 + [3] * 20)  # one single-token document


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_runs_attend_exactly_the_visible_keys(cp, packed):
    g = torch.Generator().manual_seed(cp)
    for rank in range(cp):
        q_pos = cp_token_indices(S, cp, rank, "cpu")
        k_doc = DOCS if packed else None
        q_doc = DOCS[q_pos] if packed else None
        runs = dense_runs(len(q_pos), S, "cpu", q_pos, torch.arange(S), q_doc, k_doc)
        q = torch.randn(len(q_pos), 2, 3, 12, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(S, 2, 3, 12, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(S, 2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
        out = dense_attention(q, k, v, 0.3, runs)
        allowed = reference.visible(len(q_pos), S, "cpu", q_pos, torch.arange(S), q_doc, k_doc)
        s = torch.einsum("sbnd,tbnd->bnst", q, k) * 0.3
        want = torch.einsum("bnst,tbnd->sbnd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad((y * y).sum(), (q, k, v)) for y in (out, want)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # a run is consecutive queries of one document; the longest visible set is a document's
        assert sum(q1 - q0 for q0, q1, _, _ in runs) == len(q_pos)
        assert max_visible(runs) == int(allowed.sum(-1).max())


def test_keys_out_of_sample_order_are_refused():
    with pytest.raises(ValueError, match="sample order"):
        dense_runs(4, 4, "cpu", torch.arange(4), torch.tensor([1, 0, 2, 3]))
