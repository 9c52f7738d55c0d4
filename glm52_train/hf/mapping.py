"""Megatron <-> Hugging Face names for GLM-5.2, as one declarative table used both ways.

Each entry names a Megatron-Core parameter (the unsharded, tensor-parallel-1 view of
`GPTModel.state_dict()`), the HF tensor(s) it corresponds to in a `glm_moe_dsa` checkpoint
as released (per-expert tensors; transformers fuses them on load), and a transform: a small
object that turns the HF tensors into the Megatron one (`from_hf`) and back (`to_hf`), so that
import and export share one description of each layout. Placeholders: `{layer}` a decoder
layer, `{expert}` a routed expert (each expert is its own row, so no transform stacks experts).

`when` restricts an entry to some layers: dense FFN or MoE layers, and layers that own an
indexer (IndexShare "shared" layers carry no indexer weights, as in the released checkpoint).
The MTP layer reuses the layer table under its own prefixes, plus `MTP_TABLE`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from glm52_train.config import ConfigError, ModelConfig

DENSE, MOE, INDEXER, ALWAYS = "dense", "moe", "indexer", "always"


class Transform(ABC):
    """How the `hf_count` HF tensors of one row hold the numbers of its Megatron tensor (TP1
    view), in both directions: `to_hf(from_hf(parts))` gives `parts` back and
    `from_hf(to_hf(tensor))` gives `tensor` back."""

    @property
    @abstractmethod
    def hf_count(self) -> int: ...

    @abstractmethod
    def from_hf(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor made from the row's HF tensors, in the row's order."""

    @abstractmethod
    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The row's HF tensors, in the row's order, made from the Megatron tensor."""


@dataclass(frozen=True)
class Copy(Transform):
    """One HF tensor, the same numbers in the same layout under another name."""

    @property
    def hf_count(self) -> int:
        return 1

    def from_hf(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        (tensor,) = parts
        return tensor

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tensor,)


@dataclass(frozen=True)
class Fuse(Transform):
    """`parts` HF tensors of equal size, concatenated along `dim` in the row's order, make the
    Megatron tensor; export cuts it back into `parts` equal pieces. Used for the SwiGLU gate and
    up projections -> `linear_fc1` (gate first, as Megatron-Core's gated MLP splits it)."""

    parts: int = 2
    dim: int = 0

    def __post_init__(self):
        assert self.parts >= 2, "a fuse of one tensor is a Copy"

    @property
    def hf_count(self) -> int:
        return self.parts

    def from_hf(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert len(parts) == self.parts
        return torch.cat(list(parts), dim=self.dim)

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = tensor.shape[self.dim]
        if size % self.parts:
            raise ConfigError(
                f"a tensor of size {size} along dim {self.dim} cannot be cut in {self.parts} equal parts."
            )
        return tuple(tensor.split(size // self.parts, dim=self.dim))


COPY = Copy()


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: tuple[str, ...]
    transform: Transform = COPY
    when: str = ALWAYS

    def __post_init__(self):
        assert len(self.hf) == self.transform.hf_count, (self.megatron, self.hf, self.transform)


def _copy(megatron: str, hf: str, when: str = ALWAYS) -> Entry:
    return Entry(megatron, (hf,), COPY, when)


def _fuse(megatron: str, hf: list[str], when: str = ALWAYS) -> Entry:
    return Entry(megatron, tuple(hf), Fuse(parts=len(hf), dim=0), when)


MODEL_TABLE = [
    _copy("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    _copy("decoder.final_layernorm.weight", "model.norm.weight"),
    _copy("output_layer.weight", "lm_head.weight"),
]

# Suffixes under a layer prefix: Megatron "decoder.layers.{layer}." / HF "model.layers.{layer}."
LAYER_TABLE = [
    _copy("input_layernorm.weight", "input_layernorm.weight"),
    _copy("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
    _copy("self_attention.q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    _copy("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
    _copy("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    _copy("self_attention.kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    _copy("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
    _copy("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    _copy("self_attention.core_attention.indexer.wq_b.weight", "self_attn.indexer.wq_b.weight", INDEXER),
    _copy("self_attention.core_attention.indexer.wk.weight", "self_attn.indexer.wk.weight", INDEXER),
    _copy("self_attention.core_attention.indexer.k_norm.weight", "self_attn.indexer.k_norm.weight", INDEXER),
    _copy("self_attention.core_attention.indexer.k_norm.bias", "self_attn.indexer.k_norm.bias", INDEXER),
    _copy("self_attention.core_attention.indexer.weights_proj.weight",
          "self_attn.indexer.weights_proj.weight", INDEXER),
    _copy("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    _fuse("mlp.linear_fc1.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], DENSE),
    _copy("mlp.linear_fc2.weight", "mlp.down_proj.weight", DENSE),
    _copy("mlp.router.weight", "mlp.gate.weight", MOE),
    _copy("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", MOE),
    _fuse("mlp.experts.local_experts.{expert}.linear_fc1.weight",
          ["mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"], MOE),
    _copy("mlp.experts.local_experts.{expert}.linear_fc2.weight", "mlp.experts.{expert}.down_proj.weight", MOE),
    _fuse("mlp.shared_experts.linear_fc1.weight",
          ["mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"], MOE),
    _copy("mlp.shared_experts.linear_fc2.weight", "mlp.shared_experts.down_proj.weight", MOE),
]

# Suffixes under an MTP prefix: Megatron "mtp.layers.{m}." / HF "model.layers.{num_layers + m}."
MTP_TABLE = [
    _copy("enorm.weight", "enorm.weight"),
    _copy("hnorm.weight", "hnorm.weight"),
    _copy("eh_proj.weight", "eh_proj.weight"),
    _copy("final_layernorm.weight", "shared_head.norm.weight"),
]
# Written on export for DeepSeek-V3-style MTP loaders (copies of the shared embedding and head);
# ignored on import.
MTP_SHARED_COPIES = [
    ("embedding.word_embeddings.weight", "embed_tokens.weight"),
    ("output_layer.weight", "shared_head.head.weight"),
]


@dataclass(frozen=True)
class Pair:
    """One resolved row: a Megatron name, the HF name(s) that hold the same numbers, and the
    transform between them."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform

    def from_hf(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The Megatron tensor (TP1 view), read from HF with `get(name)`."""
        return self.transform.from_hf([get(h) for h in self.hf])

    def to_hf(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for each HF tensor made from the Megatron tensor."""
        return list(zip(self.hf, self.transform.to_hf(tensor), strict=True))


def _layer_kind(model: ModelConfig, layer: int, is_mtp: bool) -> set[str]:
    moe = (model.num_moe_layers > 0) if is_mtp else model.is_moe_layer(layer)
    indexer = is_mtp or model.layer_index_pattern[layer] == "F"
    kinds = {ALWAYS, MOE if moe else DENSE}
    if indexer:
        kinds.add(INDEXER)
    return kinds


def _expand(entry: Entry, mprefix: str, hprefix: str, num_experts: int) -> Iterator[Pair]:
    experts = range(num_experts) if "{expert}" in entry.megatron else [None]
    for e in experts:
        fmt: Callable[[str], str] = (lambda s: s) if e is None else (lambda s, e=e: s.replace("{expert}", str(e)))
        yield Pair(mprefix + fmt(entry.megatron), tuple(hprefix + fmt(h) for h in entry.hf), entry.transform)


def resolved_pairs(model: ModelConfig) -> list[Pair]:
    """Every (Megatron, HF) pair of `model`, in a stable order."""
    pairs = [Pair(e.megatron, e.hf, e.transform) for e in MODEL_TABLE]
    if model.tie_embeddings:
        pairs = [p for p in pairs if p.megatron != "output_layer.weight"]
    blocks = [(f"decoder.layers.{i}.", f"model.layers.{i}.", i, False) for i in range(model.num_layers)]
    blocks += [
        (f"mtp.layers.{m}.transformer_layer.", f"model.layers.{model.num_layers + m}.", m, True)
        for m in range(model.mtp_layers)
    ]
    for mprefix, hprefix, layer, is_mtp in blocks:
        kinds = _layer_kind(model, layer, is_mtp)
        for entry in LAYER_TABLE:
            if entry.when in kinds:
                pairs.extend(_expand(entry, mprefix, hprefix, model.num_experts))
    for m in range(model.mtp_layers):
        for entry in MTP_TABLE:
            pairs.extend(_expand(entry, f"mtp.layers.{m}.", f"model.layers.{model.num_layers + m}.", 0))
    return pairs


def mtp_copy_names(model: ModelConfig) -> list[tuple[str, str]]:
    return [
        (mname, f"model.layers.{model.num_layers + m}.{hsuffix}")
        for m in range(model.mtp_layers)
        for mname, hsuffix in MTP_SHARED_COPIES
        if not (model.tie_embeddings and mname == "output_layer.weight")
    ]


# ---- tensors -----------------------------------------------------------------------------------

def to_hf(
    model: ModelConfig, megatron_state: dict[str, torch.Tensor], partial: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for a Megatron state dict (TP1 view): the full one, or with
    `partial` a part of it (the HF tensors made from that part)."""
    for pair in resolved_pairs(model):
        if partial and pair.megatron not in megatron_state:
            continue
        yield from pair.to_hf(megatron_state[pair.megatron])
    for mname, hname in mtp_copy_names(model):
        if not partial or mname in megatron_state:
            yield hname, megatron_state[mname]


def check_hf_names(model: ModelConfig, available: set[str]) -> list[Pair]:
    """The pairs of `model`, after checking that the HF checkpoint's tensor names (`available`)
    are exactly the ones it needs. Raises ConfigError naming missing or unexpected tensors."""
    pairs = resolved_pairs(model)
    wanted = {h for p in pairs for h in p.hf}
    missing = sorted(wanted - available)
    if missing:
        raise ConfigError(
            f"the HF checkpoint lacks {len(missing)} tensor(s) this config needs, e.g. "
            f"{', '.join(missing[:3])}."
        )
    ignorable = {h for _, h in mtp_copy_names(model)}
    unexpected = sorted(available - wanted - ignorable)
    if unexpected:
        raise ConfigError(
            f"the HF checkpoint has {len(unexpected)} tensor(s) this config does not use, e.g. "
            f"{', '.join(unexpected[:3])} (does config.json match the weights?)."
        )
    return pairs
