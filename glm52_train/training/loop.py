"""`glm52 pretrain`: parse, build, run.

    glm52 pretrain --config configs/tiny.yaml [key=value ...]

The loop is `train_step` (Megatron-Core's forward-backward schedule and the optimizer) with
hooks around it: logging every `train.log_interval` steps, validation every
`train.eval_interval`, a checkpoint every `checkpoint.interval` and on SIGTERM/SIGUSR1 (then
exit 0, so a Slurm requeue resumes from it).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from megatron.core import parallel_state

from glm52_train import parallel
from glm52_train.config import ConfigError
from glm52_train.data.loader import build_datasets, check_data, dataloader
from glm52_train.data.tokenizer import Tokenizer
from glm52_train.model.dsa import DSALossTracker
from glm52_train.model.info import model_info
from glm52_train.run_config import RunConfig
from glm52_train.training import faults, setup
from glm52_train.training.logs import RunLogger, peak_tflops
from glm52_train.training.metrics import ExpertLoad
from glm52_train.training.profile import StepProfiler, format_breakdown
from glm52_train.training.state import (
    TrainState,
    load_training_checkpoint,
    load_weights,
    resume_path,
    save_training_checkpoint,
)
from glm52_train.training.step import evaluate, train_step


class StopSignals:
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask the loop to finish the
    current step, save and exit 0."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def release(self) -> None:
        """After the last step: ignore further signals. At exit Python restores SIG_DFL, and a
        repeated SIGUSR1 (Slurm and the launcher both deliver one) would kill the exiting process,
        which torchrun counts as a failure and restarts."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _device():
    from glm52_train import compat

    return compat.default_device()


def pretrain(cfg: RunConfig) -> int:
    world = parallel.world_size_from_env()
    cfg.validate(world)
    signals = StopSignals()  # from the start: a signal during setup stops after the first step
    run = setup.runtime_options(cfg)
    parallel.initialize(run, seed=cfg.train.seed, timeout_minutes=cfg.train.collective_timeout_minutes)
    model_cfg = cfg.model_config()
    tokenizer = Tokenizer(cfg.data.tokenizer)
    check_data(cfg, model_cfg, tokenizer)

    chunks, config = setup.build_model_chunks(model_cfg, run, cfg.data.seq_length)
    if cfg.train.freeze == "all_but_indexer":
        setup.freeze_all_but_indexer(chunks)
    bf16 = setup.use_bf16(cfg)
    chunks = setup.wrap_ddp(chunks, config, bf16)
    expert_load = ExpertLoad(chunks)
    optimizer, scheduler, _ = setup.build_optimizer(cfg, chunks, config, bf16, expert_load)

    name = cfg.name
    ckpt_dir = Path(cfg.checkpoint.dir or f"checkpoints/{name}")
    run_dir = Path(cfg.logging.run_dir or f"runs/{name}")
    state = TrainState()
    start = resume_path(cfg, ckpt_dir) if cfg.checkpoint.enable else None
    if start is not None:
        state = load_training_checkpoint(start, chunks, optimizer, scheduler)
    elif cfg.checkpoint.init_from:
        from glm52_train import checkpoint

        load_weights(checkpoint.resolve(cfg.checkpoint.init_from), chunks, optimizer)

    dp = parallel_state.get_data_parallel_world_size()
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    num_micro = gbs // (mbs * dp)
    evals = cfg.train.iters // cfg.train.eval_interval + 1
    train_ds, valid_ds = build_datasets(cfg, tokenizer, cfg.train.iters * gbs, evals * cfg.train.eval_iters * gbs)
    def iterators(dataset, consumed, workers=0):
        """One iterator per model chunk: each virtual pipeline stage reads every microbatch."""
        its = [iter(dataloader(dataset, consumed, mbs, workers)) for _ in chunks]
        return its[0] if len(its) == 1 else its

    train_iter = iterators(train_ds, state.consumed_samples, cfg.data.num_workers)

    config_dict = cfg.to_dict()
    rank = torch.distributed.get_rank()
    logger = RunLogger(cfg, run_dir, active=(rank == torch.distributed.get_world_size() - 1),
                       start_step=state.iteration, config_dict=config_dict)
    if start is not None:
        logger.message(f"resumed from {start} at step {state.iteration}")
    if state.iteration >= cfg.train.iters:
        logger.message(f"nothing to do: the checkpoint is at step {state.iteration} and "
                       f"train.iters is {cfg.train.iters} (raise train.iters to continue).")
    info = model_info(model_cfg, cfg.data.seq_length)
    peak = peak_tflops()
    stop_after = state.iteration + cfg.train.exit_after_iters if cfg.train.exit_after_iters else None

    def save():
        save_training_checkpoint(ckpt_dir, state, chunks, optimizer, scheduler, config_dict, cfg.checkpoint.keep_last)
        logger.message(f"saved checkpoint {ckpt_dir}/iter_{state.iteration:07d}")

    profiler = StepProfiler(cfg.logging.profile_at, cfg.logging.profile_steps, run_dir, chunks, optimizer, rank)
    faults.poison_losses(chunks)  # GLM52_FAULT_NAN_AT_STEP (tests); nothing when unset
    consecutive_skips = 0
    window_start, window_steps = time.time(), 0
    while state.iteration < cfg.train.iters:
        faults.at_step(state.iteration + 1)  # for hung-rank reports; GLM52_FAULT_* injection
        profiler.before_step(state.iteration + 1)
        result = train_step(cfg, train_iter, chunks, optimizer, scheduler, num_micro)
        breakdown = profiler.after_step(state.iteration + 1)
        if breakdown is not None:
            logger.message("profile of steps %d-%d (run_dir/profile/):\n%s" % (
                cfg.logging.profile_at, state.iteration + 1, format_breakdown(breakdown)))
        state.iteration += 1
        state.consumed_samples += gbs
        window_steps += 1
        if result.skipped:
            state.skipped_steps += 1
            consecutive_skips += 1
            logger.message(f"step {state.iteration}: non-finite loss or gradient, update skipped")
            if consecutive_skips > cfg.train.max_skipped_steps:
                if cfg.checkpoint.enable:
                    save()
                raise ConfigError(
                    f"{consecutive_skips} consecutive steps had a non-finite loss or gradient "
                    f"(last loss {result.loss}); stopping. Lower the learning rate or check the data."
                )
        else:
            consecutive_skips = 0
        last = state.iteration == cfg.train.iters
        metrics: dict = {}
        if state.iteration % cfg.train.eval_interval == 0 or last:
            valid_iter = iterators(valid_ds, 0) if valid_ds is not None else None
            if valid_iter is not None:
                metrics["val_loss"] = evaluate(cfg, valid_iter, chunks, num_micro, cfg.train.eval_iters)
        if state.iteration % cfg.train.log_interval == 0 or last or "val_loss" in metrics:
            elapsed = time.time() - window_start
            tokens = window_steps * gbs * cfg.data.seq_length
            tflops = info.train_flops_per_token * tokens / max(elapsed, 1e-9) / torch.distributed.get_world_size() / 1e12
            indexer = DSALossTracker.pop()
            load, load_detail = expert_load.metrics()
            metrics.update(
                loss=result.loss,
                lr=scheduler.get_lr(optimizer.param_groups[0]),
                grad_norm=result.grad_norm,
                consumed_samples=state.consumed_samples,
                tokens_per_s=tokens / max(elapsed, 1e-9),
                tflops_per_gpu=tflops,
                mfu=tflops / peak if peak else None,
                skipped_steps=state.skipped_steps,
                indexer_kl=(sum(indexer.values()) / len(indexer)) if indexer else None,
                mtp_loss=_mtp_loss(num_micro * window_steps),
                **_peak_memory(),
                **load,
            )
            extra = {f"indexer_kl/layer{k}": v for k, v in indexer.items()}
            extra.update(load_detail)
            logger.log(state.iteration, cfg.train.iters, metrics, extra)
            window_start, window_steps = time.time(), 0
        stop = signals.should_stop()
        periodic = cfg.checkpoint.interval and state.iteration % cfg.checkpoint.interval == 0
        if cfg.checkpoint.enable and (periodic or last or stop or (stop_after and state.iteration >= stop_after)):
            save()
        if stop:
            logger.message(f"signal {signals.received or 'from another rank'}: saved at step {state.iteration}, exiting")
            break
        if stop_after and state.iteration >= stop_after:
            break
    signals.release()
    logger.close()
    return 0


def _peak_memory() -> dict:
    """Peak GPU memory since the start, in GiB: what the allocator reserved from the device
    (what `glm52 plan` estimates) and what tensors held."""
    if not torch.cuda.is_available():
        return {}
    return dict(peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30)


def _mtp_loss(microbatches: int) -> float | None:
    """Mean MTP loss per prediction step over the microbatches since the last log."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker:
        return None
    values = tracker["values"].clone()
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return (values.mean() / max(microbatches, 1)).item()
