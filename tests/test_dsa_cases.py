"""DSA problem shapes given on the command line (GPU kernel checks, bench/dsa.py)."""

from __future__ import annotations

import pytest
import torch

from glm52_train.kernels import reference
from glm52_train.kernels.cases import DSACase


def test_parse_and_name():
    c = DSACase.parse("seq=8192, cp=1/4, docs=3, heads=32, topk=1024")
    assert (c.seq, c.cp, c.docs, c.heads, c.topk, c.index_heads) == (8192, (1, 4), 3, 32, 1024, 32)
    assert DSACase.parse(c.name) == c
    assert c.num_queries == 2048
    assert DSACase.parse("seq=100,queries=30").query_indices().tolist() == list(range(70, 100))


@pytest.mark.parametrize("text", ["heads=64", "seq=100,cp=2/2", "seq=100,cp=1/3", "seq=10,queries=11",
                                  "seq=64,cp=1/4,queries=3", "seq=10,bogus=1", "seq=10,docs=0"])
def test_bad_cases_are_refused(text):
    with pytest.raises(ValueError):
        DSACase.parse(text)


def test_visibility_matches_the_models_token_layout():
    """A CP rank's queries see exactly what `TokenLayout` gives that rank in the model: keys
    up to their own index in the sample, within their document."""
    case = DSACase(seq=48, cp=(1, 3), docs=3)
    vis = case.visibility(torch.Generator().manual_seed(0), "cpu")
    got = reference.visible(case.num_queries, case.seq, "cpu", **vis)
    q_idx, k_doc = case.query_indices(), vis["k_doc"]
    want = (torch.arange(48)[None, :] <= q_idx[:, None]) & (k_doc[None, :] == k_doc[q_idx][:, None])
    assert torch.equal(got, want)
    assert q_idx.tolist() == list(range(8, 16)) + list(range(32, 40))
    assert DSACase(seq=10).visibility(torch.Generator(), "cpu") == {}
