"""Where a run starts and when it saves: the `checkpoint` section of the run config.

A run resumes from `checkpoint.resume` ("auto": the newest checkpoint in `checkpoint.dir`) or,
without one, starts at step 0 on `checkpoint.init_from`'s weights; when that checkpoint is damaged
it stops with one sentence, or with `checkpoint.on_damaged: fallback` loads the newest good one
after a warning naming the damaged one and why. What interrupted saves left behind is reported
and removed first. The run saves every `checkpoint.interval` steps, at its last step and when it
stops early, keeping the newest `checkpoint.keep_last`.

`checkpoint.async_save: true` writes each checkpoint in a forked process (Megatron-Core's
asynchronous `torch_dist` save) while training goes on: the step pays for planning and the fork;
the commit (manifest, rename, `latest`) happens at a later step, once every rank's writer is done.
At most one save is in flight (the next one waits for it), and the last save of a run (its end,
a signal, a stop) is waited for before the run returns. `checkpoint.enable: false` neither
resumes nor saves. What a checkpoint holds is state.py's business.

A run resumes only its own checkpoints (identity.py): with `resume: auto`, a checkpoint saved by
another run configuration (model, data, seed, global batch, optimizer) is refused in one sentence
naming the fields that differ; `--resume PATH` resumes it anyway, saying so. A schedule that
differs from the checkpoint's (train.iters, lr, min_lr, warm-up, decay) is refused the same way
unless `train.override_schedule: true`, which says where the new schedule continues. A run that
would start over in a folder holding checkpoints (`--resume none`) is refused before anything is
built, unless `--overwrite` (checkpoint.overwrite), which moves the earlier checkpoints aside to
`DIR.old-N` (the run folder's files likewise: logs.py); nothing is deleted.
"""

from __future__ import annotations

import time
from pathlib import Path

from glm52_train import checkpoint
from glm52_train.config import ConfigError
from glm52_train.training.identity import identity_differences, lr_at, schedule_changes, schedule_of, set_aside
from glm52_train.training.state import TrainState, load_training_checkpoint, load_weights, save_training_checkpoint


def _starts_over(c) -> bool:
    return c.resume in (None, "none")


def check_start(cfg) -> None:
    """Before anything is built: a run told to start over (`--resume none`) in a folder that holds
    checkpoints is refused, unless `--overwrite` lets it move them aside; a resume is refused when
    its newest checkpoint is another run's or on another schedule (resume_verdict)."""
    c = cfg.checkpoint
    if not c.enable:
        return
    if not _starts_over(c):  # the checks of the resume, on the newest checkpoint, before minutes of building
        found = checkpoint.candidates(cfg.checkpoint_dir() if c.resume == "auto" else c.resume)
        try:
            meta = checkpoint.read_meta(found[0]) if found else None
        except checkpoint.CheckpointError:
            meta = None  # damaged: the resume says so (or falls back)
        if meta is not None:
            resume_verdict(cfg, found[0], meta)
        return
    if c.overwrite:
        return
    found = checkpoint.complete_checkpoints(cfg.checkpoint_dir())
    if found:
        where = cfg.checkpoint_dir()
        raise ConfigError(
            f"{where} holds the checkpoints of an earlier run (newest {found[-1].name}) and --resume none would "
            f"start another run over them: give this run a folder of its own (logging.name=NAME or "
            f"checkpoint.dir=DIR), resume it (--resume auto), or pass --overwrite to move the earlier run aside "
            f"(to {where}.old-N).")


def resume_verdict(cfg, folder: Path, meta: dict) -> list[str]:
    """The lines a resume of `folder` (its metadata `meta`) by this run prints; ConfigError, one
    sentence naming the fields, when it must not resume it: another run configuration's under
    `resume: auto`, or another schedule without `train.override_schedule`."""
    if meta.get("kind") != "training":
        return []  # weights only: load_training_checkpoint says so
    lines = []
    run = cfg.to_dict()
    if "run" not in meta:
        lines.append(f"note: {folder} records no run configuration (saved by an older glm52): resuming it without "
                     "checking that it is this run's")
    elif differs := "; ".join(identity_differences(meta["run"], run)):
        if cfg.checkpoint.resume == "auto":
            raise ConfigError(
                f"{folder} was saved by another run configuration ({differs}), so it is not resumed: give this run a "
                f"folder of its own (logging.name=NAME or checkpoint.dir=DIR), resume that checkpoint explicitly "
                f"(--resume {folder}), or start over here (--resume none --overwrite).")
        lines.append(f"resuming {folder} as asked (--resume), though another run configuration saved it ({differs})")
    saved = meta.get("schedule") or (schedule_of(meta["run"]) if "run" in meta else None)
    if saved is None:
        return lines
    now, step = schedule_of(run), meta["iteration"]
    saved_decay = (meta.get("run") or {}).get("optimizer", {}).get("decay_iters")
    changes = ", ".join(schedule_changes(saved, now, cfg.optimizer.decay_iters is not None or saved_decay is not None))
    if changes:
        old, new = lr_at(saved, step + 1), lr_at(now, step + 1)
        if not cfg.train.override_schedule:
            raise ConfigError(
                f"{folder} (step {step}) was trained on another learning-rate schedule ({changes}): resuming it would "
                f"take the learning rate at step {step + 1} from {old:.3g} to {new:.3g}; give the checkpoint's "
                f"values, or set train.override_schedule=true to continue from step {step} on the new schedule.")
        lines.append(f"train.override_schedule: continuing from step {step} on the new schedule ({changes}); "
                     f"lr {new:.3g} at step {step + 1} (the checkpoint's schedule gave {old:.3g})")
    return lines


def _checkpoint_entry(p: Path) -> bool:
    return p.name.startswith("iter_") or p.name.startswith(checkpoint.LATEST_NAME)


class Checkpointer:
    def __init__(self, cfg, parts, logger) -> None:
        c = cfg.checkpoint
        self.dir = cfg.checkpoint_dir()
        self.enable, self.interval, self.keep_last = c.enable, c.interval, c.keep_last
        self.cfg, self.parts, self.logger = cfg, parts, logger
        self.run_config = cfg.to_dict()
        self.queue = None
        if c.enable and c.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # A forked writer per save (persistent=False): the fork is a copy-on-write snapshot of
            # the state, which training then changes freely (see README, "Checkpoints").
            self.queue = AsyncCallsQueue(persistent=False)
        self._started: dict[int, float] = {}

    def resume(self) -> TrainState:
        """The state to start from: a training checkpoint's, or step 0 (on `init_from`'s weights)."""
        p, c = self.parts, self.cfg.checkpoint
        if self.enable:
            for name in checkpoint.clean_leftovers(self.dir):
                self.logger.message(f"removed {self.dir / name}: left by a save that never finished")
            if c.overwrite:
                moved = checkpoint.on_rank0(lambda: set_aside(self.dir, _checkpoint_entry))
                if moved:
                    self.logger.message(f"--overwrite: moved the earlier run's checkpoints from {self.dir} to {moved}")
        state = None
        if self.enable and not _starts_over(c):
            root = self.dir if c.resume == "auto" else c.resume
            if c.resume != "auto" or checkpoint.candidates(root):
                start, state = checkpoint.load_newest(root, self._load, c.on_damaged, self.logger.message)
                self.logger.message(f"resumed from {start} at step {state.iteration}")
        if state is None:
            state = TrainState()
            if c.init_from:
                start, _ = checkpoint.load_newest(c.init_from, lambda f: load_weights(f, p.chunks, p.optimizer),
                                                  c.on_damaged, self.logger.message)
                self.logger.message(f"initialised the weights from {start}")
        if state.iteration >= self.cfg.train.iters:
            self.logger.message(f"nothing to do: the checkpoint is at step {state.iteration} and "
                                f"train.iters is {self.cfg.train.iters} (to continue, raise train.iters with "
                                "train.override_schedule=true).")
        return state

    def _load(self, folder: Path) -> TrainState:
        """A training checkpoint, once its metadata shows it is this run's, on this run's schedule."""
        meta = checkpoint.read_meta(folder)
        for line in resume_verdict(self.cfg, folder, meta):
            self.logger.message(line)
        p = self.parts
        return load_training_checkpoint(folder, p.chunks, p.optimizer, p.scheduler)

    def maybe_save(self, state: TrainState, last: bool, stop: bool) -> None:
        """After a step: commit a finished asynchronous save; save every `interval` steps, at the
        run's last step and before it stops (then waiting for the write)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)
        periodic = self.interval and state.iteration % self.interval == 0
        if self.enable and (periodic or last or stop):
            p = self.parts
            if self.queue is None:
                save_training_checkpoint(self.dir, state, p.chunks, p.optimizer, p.scheduler, self.run_config,
                                         self.keep_last)
                self.logger.message(f"saved checkpoint {self.dir}/iter_{state.iteration:07d}")
            else:
                self.queue.maybe_finalize_async_calls(blocking=True)  # at most one in flight
                self._started[state.iteration] = time.perf_counter()
                save_training_checkpoint(self.dir, state, p.chunks, p.optimizer, p.scheduler, self.run_config,
                                         self.keep_last, async_queue=self.queue, on_commit=self._committed)
                if last or stop:
                    self.finish()

    def _committed(self, folder: Path) -> None:
        iteration = int(folder.name[5:])
        took = time.perf_counter() - self._started.pop(iteration, time.perf_counter())
        self.logger.message(f"saved checkpoint {folder} (written in the background in {took:.1f} s)")

    def finish(self) -> None:
        """Wait for (and commit) the save in flight, if any. Every rank calls this."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
