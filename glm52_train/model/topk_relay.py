"""IndexShare across pipeline stages: the top-k indices ride along with the activations.

A pipeline stage that begins with a shared (S) layer needs the top-k indices of the previous
full layer, which ran on the previous stage. Megatron-Core's schedules send one tensor of shape
[seq, micro_batch, hidden] between stages, in the pipeline dtype. The relay appends the indices
to that tensor as extra rows along the sequence dimension: the int32 indices [b, s, k] are
reinterpreted bit for bit as the pipeline dtype (no rounding: the bytes travel unchanged), padded
to whole rows of `hidden` elements, and split off again by the receiving stage. The schedules
only need the longer sequence length (`relay_rows`), which `train_step` passes to them.

Cost: k int32 per token, i.e. for GLM-5.2 (k = 2048, hidden 6144, bf16) 2/3 more bytes per
stage boundary. Layouts whose stages all begin with a full layer carry nothing extra;
`glm52 plan` prefers them.

Under sequence parallelism each tensor-parallel rank sends 1/tp of the rows; the receiver
all-gathers them (every rank holds the same indices).
"""

from __future__ import annotations

import math

import torch

from glm52_train.config import needs_topk_relay


def stage_start_layers(config) -> list[int]:
    """Global index of the first decoder layer of every pipeline chunk (all ranks, all
    virtual stages), skipping empty chunks."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    starts = []
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size or 1
    layout = config.pipeline_model_parallel_layout
    for vp_stage in range(vpp):
        for pp_rank in range(pp):
            v = vp_stage if vpp > 1 else None
            if layout is not None:
                # Megatron-Core 0.16.1's two helpers ignore `pp_rank` under a layout string
                # (they answer for the calling rank); the layout object itself takes it.
                count = layout.get_num_layers_to_build(vp_stage=v, pp_rank=pp_rank)
                offset = layout.get_layer_offset(vp_stage=v, pp_rank=pp_rank)
            else:
                count = get_num_layers_to_build(config, vp_stage=v, pp_rank=pp_rank)
                offset = get_transformer_layer_offset(config, vp_stage=v, pp_rank=pp_rank)
            if count > 0:
                starts.append(offset)
    return starts


def relay_needed(config) -> bool:
    """True when some pipeline chunk other than the first begins with a shared layer, in
    sparse training (the dense and warm-up modes select no top-k)."""
    if config.pipeline_model_parallel_size == 1 or getattr(config, "dsa_mode", "sparse") != "sparse":
        return False
    return needs_topk_relay(config.dsa_index_pattern, stage_start_layers(config))


def _elements_per_index(dtype: torch.dtype) -> int:
    return 4 // torch.empty((), dtype=dtype).element_size()


def relay_rows(config, seq_length: int) -> int:
    """Extra sequence rows (global, before sequence-parallel splitting) that carry the top-k
    indices of `seq_length` local queries; 0 when no stage needs them."""
    if not relay_needed(config):
        return 0
    per_query = config.dsa_index_topk * _elements_per_index(config.pipeline_dtype)
    rows = math.ceil(seq_length * per_query / config.hidden_size)
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return math.ceil(rows / tp) * tp


def encode(topk: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, s, k] int indices -> [rows, b, hidden] tensor of `dtype` holding the same bits."""
    b = topk.shape[0]
    words = topk.to(torch.int32).reshape(b, -1).view(dtype)  # [b, s*k*n]
    out = torch.zeros(b, rows * hidden, dtype=dtype, device=topk.device)
    out[:, : words.shape[1]] = words
    return out.view(b, rows, hidden).transpose(0, 1).contiguous()


def decode(bits: torch.Tensor, seq_length: int, topk: int) -> torch.Tensor:
    """Inverse of `encode`: [rows, b, hidden] -> [b, s, k] int64 indices."""
    rows, b, hidden = bits.shape
    n = _elements_per_index(bits.dtype)
    flat = bits.detach().transpose(0, 1).reshape(b, rows * hidden)[:, : seq_length * topk * n]
    return flat.contiguous().view(torch.int32).view(b, seq_length, topk).long()
