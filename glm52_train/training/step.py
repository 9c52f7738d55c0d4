"""One training step and one evaluation, delegated to Megatron-Core's forward-backward schedule.

The loss is the LM cross-entropy (mean over unmasked tokens) as reported; the MTP losses
(Megatron-Core's MTPLossAutoScaler), the DSA indexer KL (`DSALossScaler`) and the MoE
sequence-wise balance loss (`MoEAuxLossAutoScaler`) are attached to activations and receive
their gradient in the same backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from glm52_train import compat
from glm52_train.data.loader import Batch, to_batch
from glm52_train.model.dsa import DSALossScaler
from glm52_train.model.fp8 import invalidate_fp8_weights


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = to_batch(next(data_iterator), compat.default_device())
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = Batch(**get_batch_on_this_cp_rank(vars(batch)))
    output = model(
        batch.tokens, batch.position_ids, None, labels=batch.labels, loss_mask=batch.loss_mask
    )
    return output, partial(loss_func, batch.loss_mask)


def _reduce_lm_loss(reports: list[dict]) -> float:
    """Token-weighted mean LM loss over microbatches and data-parallel ranks (NaN if none here)."""
    device = compat.default_device()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].to(device=device, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # every rank learns the value from the last pipeline stage
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(total, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp_min(1)).item()


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool


def _grads_finite(chunks) -> torch.Tensor:
    flag = torch.zeros(1, device=compat.default_device())
    for chunk in chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not torch.isfinite(buffer.grad_data).all():
                flag += 1
    return flag


def schedule_seq_length(cfg, chunks) -> int:
    """The sequence length the pipeline schedule sizes its stage-to-stage tensors with: the
    data's, plus the rows that carry IndexShare's top-k across stages (see topk_relay)."""
    from glm52_train.checkpoint import unwrap
    from glm52_train.model import topk_relay

    model = unwrap(chunks[0])
    local = cfg.data.seq_length // model.config.context_parallel_size
    return cfg.data.seq_length + topk_relay.relay_rows(model.config, local) * model.config.context_parallel_size


def train_step(cfg, iterator, chunks, optimizer, scheduler, num_microbatches: int) -> StepResult:
    """One optimizer step. `iterator` is one data iterator, or one per model chunk (virtual
    pipeline stages each read the same microbatches)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    DSALossScaler.set_loss_scale(1.0)  # per-token losses: the global token count divides once
    reports = _run_schedule(cfg, iterator, chunks, num_microbatches, forward_only=False)
    loss = _reduce_lm_loss(reports)
    # A non-finite loss or gradient anywhere skips the update everywhere.
    bad = _grads_finite(chunks)
    if not torch.isfinite(torch.tensor(loss)):
        bad += 1
    torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        optimizer.zero_grad()
        return StepResult(loss, None, True)
    updated, grad_norm, _ = optimizer.step()
    invalidate_fp8_weights(chunks)  # the FP8 linears' quantised weights are the old step's
    if updated:
        scheduler.step(increment=1)
    return StepResult(loss, grad_norm, not updated)


def _run_schedule(cfg, iterator, chunks, num_microbatches: int, forward_only: bool) -> list:
    """One global batch through Megatron-Core's forward-backward schedule: its per-micro-batch reports."""
    seq_length = schedule_seq_length(cfg, chunks)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=cfg.train.micro_batch_size, decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def evaluate(cfg, iterator, chunks, num_microbatches: int, iters: int) -> float:
    for chunk in chunks:
        chunk.eval()
    reports = []
    with torch.no_grad():
        for _ in range(iters):
            reports += _run_schedule(cfg, iterator, chunks, num_microbatches, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _reduce_lm_loss(reports)
