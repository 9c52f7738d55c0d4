"""The conversion table's transforms: each one's two directions are inverses, on random tensors
of every shape the table gives it for the tiny model (all row kinds: dense and MoE layers,
indexer, shared expert, MTP), and they lay tensors out as the model reads them."""

from __future__ import annotations

import pytest
import torch

from glm52_train.config import ConfigError, get_model_config
from glm52_train.hf import mapping
from glm52_train.hf.convert import megatron_state
from glm52_train.model.build import build_model


@pytest.fixture(scope="module")
def tiny_rows():
    """(pair, Megatron shape) for every row of the tiny model, shapes from a meta-device build."""
    from glm52_train import parallel

    model_config = get_model_config("tiny")
    parallel.initialize(seed=0)
    try:
        with torch.device("meta"):
            model = build_model(model_config, init=False)
        shapes = {name: tuple(t.shape) for name, t in megatron_state(model).items()}
    finally:
        parallel.destroy()
    pairs = mapping.resolved_pairs(model_config)
    assert {p.megatron for p in pairs} == set(shapes), "the table and the model name different tensors"
    return [(p, shapes[p.megatron]) for p in pairs]


def test_every_kind_of_row_is_covered(tiny_rows):
    transforms = {type(p.transform) for p, _ in tiny_rows}
    assert transforms == {mapping.Copy, mapping.Fuse}
    names = {p.megatron for p, _ in tiny_rows}
    for part in ("decoder.layers.0.mlp.linear_fc1", "local_experts.7.linear_fc1", "shared_experts.linear_fc1",
                 "indexer.k_norm.bias", "mtp.layers.0.eh_proj", "mtp.layers.0.transformer_layer.mlp.router"):
        assert any(part in n for n in names), part


def test_each_transform_inverts_itself_on_the_table_shapes(tiny_rows):
    g = torch.Generator().manual_seed(0)
    cases = {(p.transform, shape) for p, shape in tiny_rows}
    for transform, shape in sorted(cases, key=repr):
        # Megatron -> HF -> Megatron
        tensor = torch.randn(shape, generator=g)
        parts = transform.to_hf(tensor)
        assert len(parts) == transform.hf_count
        assert torch.equal(transform.from_hf(parts), tensor), (transform, shape)
        # HF -> Megatron -> HF, on fresh HF tensors of the HF shapes
        hf = [torch.randn(p.shape, generator=g) for p in parts]
        back = transform.from_hf(hf)
        assert tuple(back.shape) == shape, (transform, shape)
        again = transform.to_hf(back)
        assert len(again) == len(hf) and all(torch.equal(a, b) for a, b in zip(again, hf)), (transform, shape)


def test_fuse_puts_gate_first_along_the_output_dim():
    """Megatron-Core's gated MLP reads linear_fc1's output rows as [gate; up]."""
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    fused = mapping.Fuse(parts=2, dim=0).from_hf([gate, up])
    assert fused.shape == (6, 5)
    assert torch.equal(fused[:3], gate) and torch.equal(fused[3:], up)
    pieces = mapping.Fuse(parts=2, dim=0).to_hf(fused)
    assert torch.equal(pieces[0], gate) and torch.equal(pieces[1], up)
    with pytest.raises(ConfigError, match="equal parts"):
        mapping.Fuse(parts=2, dim=0).to_hf(torch.zeros(5, 2))


def test_copy_keeps_the_tensor():
    x = torch.randn(4, 3)
    assert mapping.COPY.to_hf(x) == (x,) and mapping.COPY.from_hf([x]) is x
    with pytest.raises(ValueError):
        mapping.COPY.from_hf([x, x])


def test_pairs_name_each_hf_tensor_once_and_export_inverts_import(tiny_rows):
    """Whole-state round trip through the table: HF -> Megatron (`Pair.from_hf`) -> HF
    (`mapping.to_hf`) gives every HF tensor back under its own name."""
    model_config = get_model_config("tiny")
    g = torch.Generator().manual_seed(1)
    hf_names = [h for p, _ in tiny_rows for h in p.hf]
    assert len(hf_names) == len(set(hf_names))
    hf_shapes = {}
    for pair, shape in tiny_rows:
        for name, part in pair.to_hf(torch.empty(shape, device="meta")):
            hf_shapes[name] = part.shape
    hf = {name: torch.randn(shape, generator=g) for name, shape in hf_shapes.items()}
    state = {pair.megatron: pair.from_hf(hf.__getitem__) for pair, _ in tiny_rows}
    exported = dict(mapping.to_hf(model_config, state))
    copies = dict(mapping.mtp_copy_names(model_config))
    assert set(exported) == set(hf) | set(copies.values())
    for name, tensor in hf.items():
        assert torch.equal(exported[name], tensor), name
    for mname, hname in copies.items():
        assert exported[hname] is state[mname]
