"""What a logged step reports beyond its loss: throughput over the steps since the last log
(tokens/s, model TFLOP/s per GPU, MFU), the DSA indexer's KL, the MTP loss, the experts' load and
peak GPU memory. `Metrics.log` hands one dict to the RunLogger (metrics.jsonl, W&B, TensorBoard,
the console) and per-layer detail to W&B only."""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter

from glm52_train.model.dsa import DSALossTracker
from glm52_train.model.info import model_info
from glm52_train.training.logs import peak_tflops


class ExpertLoad:
    """Each router's token counts of the last step, for per-layer load logging. They are read
    in the model config's finalize_model_grads_func (`around`, installed by
    setup.build_optimizer), before Megatron-Core's expert-bias update there consumes them."""

    def __init__(self, chunks) -> None:
        self.routers = [(n, m) for c in chunks for n, m in c.named_modules() if isinstance(m, TopKRouter)]
        self.last: torch.Tensor | None = None

    def around(self, finalize_model_grads):
        """`finalize_model_grads` that first records the routers' token counts."""

        def finalize(*args, **kwargs):
            self.snapshot()
            return finalize_model_grads(*args, **kwargs)

        return finalize

    def snapshot(self) -> None:
        counts = [r.local_tokens_per_expert for _, r in self.routers if r.local_tokens_per_expert is not None]
        if counts:
            self.last = torch.stack([c.detach().clone().float() for c in counts])

    def metrics(self) -> tuple[dict, dict]:
        if self.last is None:
            return {}, {}
        load = self.last.clone()
        torch.distributed.all_reduce(load, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        share = load / load.sum(dim=1, keepdim=True).clamp_min(1)
        imbalance = (share.max(dim=1).values * share.shape[1])  # max / mean per layer
        per_layer = {}
        for (name, _), row, imb in zip(self.routers, share, imbalance):
            label = name.replace(".mlp.router", "").replace("module.", "")
            per_layer[f"expert_load/{label}/max_over_mean"] = imb.item()
            per_layer[f"expert_load/{label}/min_share"] = row.min().item()
        return {"expert_load_max_over_mean": imbalance.mean().item()}, per_layer


class Metrics:
    """Collects a logged step's metrics over a window: the steps since the last log."""

    def __init__(self, cfg, parts, logger) -> None:
        self.cfg, self.parts, self.logger = cfg, parts, logger
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        self.flops_per_token = model_info(parts.model_cfg, cfg.data.seq_length, cfg.dsa.mode).train_flops_per_token
        self.peak = peak_tflops()
        self.window_start, self.window_steps = time.time(), 0

    def step_done(self) -> None:
        self.window_steps += 1

    def collect(self, state, result, val_loss: float | None = None) -> tuple[dict, dict]:
        """The logged metrics (metrics.jsonl, W&B and the console) and the per-layer ones (W&B)."""
        optimizer, scheduler = self.parts.optimizer, self.parts.scheduler
        elapsed = max(time.time() - self.window_start, 1e-9)
        tokens = self.window_steps * self.tokens_per_step
        tflops = self.flops_per_token * tokens / elapsed / torch.distributed.get_world_size() / 1e12
        indexer = DSALossTracker.pop()
        load, load_detail = self.parts.expert_load.metrics()
        metrics = {} if val_loss is None else {"val_loss": val_loss}
        metrics.update(
            loss=result.loss,
            lr=scheduler.get_lr(optimizer.param_groups[0]),
            grad_norm=result.grad_norm,
            consumed_samples=state.consumed_samples,
            tokens_per_s=tokens / elapsed,
            tflops_per_gpu=tflops,
            mfu=tflops / self.peak if self.peak else None,
            skipped_steps=state.skipped_steps,
            indexer_kl=(sum(indexer.values()) / len(indexer)) if indexer else None,
            mtp_loss=mtp_loss(self.parts.num_microbatches * self.window_steps),
            **peak_memory(),
            **load,
            **(optimizer.update_rms() if hasattr(optimizer, "update_rms") else {}),
        )
        detail = {f"indexer_kl/layer{k}": v for k, v in indexer.items()}
        detail.update(load_detail)
        return metrics, detail

    def log(self, state, result, val_loss: float | None = None) -> None:
        """Log the window's metrics at `state.iteration` and start the next window."""
        self.logger.log(state.iteration, self.cfg.train.iters, *self.collect(state, result, val_loss))
        self.window_start, self.window_steps = time.time(), 0


def peak_memory() -> dict:
    """Peak GPU memory since the start, in GiB: what the allocator reserved from the device
    (what `glm52 plan` estimates) and what tensors held."""
    if not torch.cuda.is_available():
        return {}
    return dict(peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30)


def mtp_loss(microbatches: int) -> float | None:
    """Mean MTP loss per prediction step over the microbatches since the last log."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return None
    values = tracker["values"].clone()
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return (values.mean() / max(microbatches, 1)).item()
