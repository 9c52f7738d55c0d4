"""Where a rank's tokens sit in the sample: context parallelism and packed documents.

Context parallelism splits every sample's sequence into 2 x CP chunks and gives rank r chunks r
and 2CP-1-r (Megatron-Core's load balancing for causal attention). Packed samples hold several
documents; position ids restart at 0 at each document start (`data.packed: true`).

`TokenLayout` says, for the local tokens, their index in the sample (what causality compares),
their RoPE position (restarting per document) and their document; `gather` collects a
per-token tensor from every CP rank into sample order, differentiably (its backward
reduce-scatters), which is how DSA reaches keys on other ranks: the latent KV is 576 values per
token, so gathering it is cheap next to attention, and nothing of size S x S is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from glm52_train.kernels.cases import cp_token_indices


@dataclass
class TokenLayout:
    q_idx: torch.Tensor  # [s_local] index of each local token in the sample
    rope_pos: torch.Tensor  # [s_local] RoPE position (restarts at document starts when packed)
    q_doc: torch.Tensor | None  # [s_local] document of each local token (packed) or None
    k_doc: torch.Tensor | None  # [S] document of every token of the sample, in sample order
    total: int  # S, tokens in the whole sample
    order: torch.Tensor | None  # permutation putting CP-gathered tokens in sample order
    cp_group: object = None

    @property
    def k_idx(self) -> torch.Tensor:
        return torch.arange(self.total, device=self.q_idx.device)

    @classmethod
    def build(cls, seq_local: int, device, cp_group=None, position_ids: torch.Tensor | None = None):
        """`position_ids`: [b, s_local] local positions that restart per document (packed
        samples, micro-batch 1), or None for one document per sample."""
        cp = cp_group.size() if cp_group is not None else 1
        rank = cp_group.rank() if cp > 1 else 0
        total = seq_local * cp
        q_idx = cp_token_indices(total, cp, rank, device)
        order = None
        if cp > 1:
            gathered = torch.empty(total, dtype=torch.long, device=device)
            torch.distributed.all_gather_into_tensor(gathered, q_idx, group=cp_group)
            order = torch.argsort(gathered)
        if position_ids is None:
            return cls(q_idx, q_idx, None, None, total, order, cp_group if cp > 1 else None)
        if position_ids.shape[0] != 1:
            raise ValueError("packed documents need micro-batch size 1 (one packed sample per microbatch).")
        rope_pos = position_ids[0].to(device=device, dtype=torch.long)
        full = rope_pos
        if cp > 1:
            gathered = torch.empty(total, dtype=torch.long, device=device)
            torch.distributed.all_gather_into_tensor(gathered, rope_pos.contiguous(), group=cp_group)
            full = gathered[order]
        doc = torch.cumsum((full == 0).long(), dim=0) - 1
        doc = doc.clamp_min(0)
        return cls(q_idx, rope_pos, doc[q_idx], doc, total, order, cp_group if cp > 1 else None)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[s_local, ...] on each CP rank -> [S, ...] in sample order (identity without CP)."""
        if self.order is None:
            return t
        return gather_from_sequence_parallel_region(t, group=self.cp_group).index_select(0, self.order)

    def visibility(self) -> dict:
        """Keyword arguments for the kernels API: which keys each local query sees."""
        return dict(q_pos=self.q_idx, k_pos=self.k_idx, q_doc=self.q_doc, k_doc=self.k_doc)


@dataclass
class GLMSequenceParams(PackedSeqParams):
    """Carries a TokenLayout to the attention layers through Megatron-Core's packed_seq_params
    argument (format 'sbhd': tensors keep their usual layout)."""

    token_layout: TokenLayout | None = None
