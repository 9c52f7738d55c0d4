"""`glm52 pretrain`: parse, build, run.

    glm52 pretrain --config configs/tiny.yaml [key=value ...]

The loop is `train_step` (Megatron-Core's forward-backward schedule and the optimizer) with
hooks around it: validation every `train.eval_interval` steps, metrics every
`train.log_interval` (Metrics), a checkpoint every `checkpoint.interval` and on SIGTERM/SIGUSR1
(Checkpointer; then exit 0, so a Slurm requeue resumes from it). Before the first step those
signals stop the run at once (training/stop.py).
"""

from __future__ import annotations


import torch

from glm52_train import compat, parallel
from glm52_train.config import ConfigError
from glm52_train.run_config import RunConfig
from glm52_train.training import faults, setup
from glm52_train.training.checkpointer import Checkpointer, check_start
from glm52_train.training.logs import RunLogger, run_header
from glm52_train.training.metrics import Metrics
from glm52_train.training.profile import StepProfiler, format_breakdown
from glm52_train.training.stop import StopSignals
from glm52_train.training.step import evaluate, train_step


def pretrain(cfg: RunConfig, signals: StopSignals | None = None) -> int:
    """Train the run `cfg`; `signals` are the stop signals installed by the caller (the command
    line installs them before importing torch), else installed here."""
    signals = signals or StopSignals()  # before setup: a signal then stops the run at once
    cfg.validate(parallel.world_size_from_env())
    check_start(cfg)  # --resume none into a folder holding checkpoints: refused before building anything
    parts = setup.build(cfg)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logger = RunLogger(cfg, active=(rank == world - 1))
    logger.message(compat.describe())
    checkpointer = Checkpointer(cfg, parts, logger)
    logger.message(run_header(cfg, parts.model_cfg, world, _device().type, logger.run_dir,
                              checkpointer.dir if checkpointer.enable else None))
    state = checkpointer.resume()
    data = setup.Data(cfg, parts, state.consumed_samples)
    if data.note:
        logger.message(data.note)
    logger.start(state.iteration, cfg.to_dict())
    metrics = Metrics(cfg, parts, logger)
    profiler = StepProfiler(cfg.logging.profile_at, cfg.logging.profile_steps, logger.run_dir, parts.chunks,
                            parts.optimizer, rank)
    faults.poison_losses(parts.chunks)  # GLM52_FAULT_NAN_AT_STEP (tests); nothing when unset
    exit_at = state.iteration + cfg.train.exit_after_iters if cfg.train.exit_after_iters else None
    skipped_in_a_row = 0
    signals.start_training()
    while state.iteration < cfg.train.iters:
        step = state.iteration + 1
        faults.at_step(step)  # for hung-rank reports; GLM52_FAULT_HANG_RANK_AT_STEP
        profiler.before_step(step)
        result = train_step(cfg, data.train, parts.chunks, parts.optimizer, parts.scheduler, parts.num_microbatches)
        if (breakdown := profiler.after_step(step)) is not None:
            logger.message(f"profile of steps {cfg.logging.profile_at}-{step} (run_dir/profile/):\n"
                           + format_breakdown(breakdown))
        state.iteration = step
        state.consumed_samples += cfg.train.global_batch_size
        metrics.step_done()
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        if result.skipped:
            state.skipped_steps += 1
            logger.message(f"step {step}: non-finite loss or gradient, update skipped")
            if skipped_in_a_row > cfg.train.max_skipped_steps:
                checkpointer.maybe_save(state, last=False, stop=True)
                raise ConfigError(f"{skipped_in_a_row} consecutive steps had a non-finite loss or gradient "
                                  f"(last loss {result.loss}); stopping. Lower the learning rate or check the data.")
        last = step == cfg.train.iters
        val_loss = None
        if data.valid is not None and (step % cfg.train.eval_interval == 0 or last):
            val_loss = evaluate(cfg, data.validation(), parts.chunks, parts.num_microbatches, cfg.train.eval_iters)
        if step % cfg.train.log_interval == 0 or last or val_loss is not None:
            metrics.log(state, result, val_loss)
        stop = signals.should_stop()
        checkpointer.maybe_save(state, last, stop=stop or step == exit_at)
        if stop:
            logger.message(f"signal {signals.received or 'from another rank'}: saved at step {step}, exiting")
        if stop or step == exit_at:
            break
    signals.release()
    logger.close()
    return 0


def _device():
    return compat.default_device()
