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
"""

from __future__ import annotations

import time
from pathlib import Path

from glm52_train import checkpoint
from glm52_train.training.state import TrainState, load_training_checkpoint, load_weights, save_training_checkpoint


class Checkpointer:
    def __init__(self, cfg, parts, logger) -> None:
        c = cfg.checkpoint
        self.dir = Path(c.dir or f"checkpoints/{cfg.name}")
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
        state = None
        if self.enable and c.resume not in (None, "none"):
            root = self.dir if c.resume == "auto" else c.resume
            if c.resume != "auto" or checkpoint.candidates(root):
                start, state = checkpoint.load_newest(
                    root, lambda f: load_training_checkpoint(f, p.chunks, p.optimizer, p.scheduler),
                    c.on_damaged, self.logger.message)
                self.logger.message(f"resumed from {start} at step {state.iteration}")
        if state is None:
            state = TrainState()
            if c.init_from:
                start, _ = checkpoint.load_newest(c.init_from, lambda f: load_weights(f, p.chunks, p.optimizer),
                                                  c.on_damaged, self.logger.message)
                self.logger.message(f"initialised the weights from {start}")
        if state.iteration >= self.cfg.train.iters:
            self.logger.message(f"nothing to do: the checkpoint is at step {state.iteration} and "
                                f"train.iters is {self.cfg.train.iters} (raise train.iters to continue).")
        return state

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
