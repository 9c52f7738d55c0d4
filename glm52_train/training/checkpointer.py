"""Where a run starts and when it saves: the `checkpoint` section of the run config.

A run resumes from `checkpoint.resume` ("auto": the newest good checkpoint in `checkpoint.dir`)
or, without one, starts at step 0 on `checkpoint.init_from`'s weights; it saves every
`checkpoint.interval` steps, at its last step and when it stops early, keeping the newest
`checkpoint.keep_last`. `checkpoint.enable: false` neither resumes nor saves. What a checkpoint
holds is state.py's business.
"""

from __future__ import annotations

from pathlib import Path

from glm52_train.training.state import (
    TrainState,
    load_training_checkpoint,
    load_weights,
    resume_path,
    save_training_checkpoint,
)


class Checkpointer:
    def __init__(self, cfg, parts, logger) -> None:
        c = cfg.checkpoint
        self.dir = Path(c.dir or f"checkpoints/{cfg.name}")
        self.enable, self.interval, self.keep_last = c.enable, c.interval, c.keep_last
        self.cfg, self.parts, self.logger = cfg, parts, logger
        self.run_config = cfg.to_dict()

    def resume(self) -> TrainState:
        """The state to start from: a training checkpoint's, or step 0 (on `init_from`'s weights)."""
        p = self.parts
        start = resume_path(self.cfg, self.dir) if self.enable else None
        if start is not None:
            state = load_training_checkpoint(start, p.chunks, p.optimizer, p.scheduler)
            self.logger.message(f"resumed from {start} at step {state.iteration}")
        else:
            state = TrainState()
            if self.cfg.checkpoint.init_from:
                from glm52_train import checkpoint

                load_weights(checkpoint.resolve(self.cfg.checkpoint.init_from), p.chunks, p.optimizer)
        if state.iteration >= self.cfg.train.iters:
            self.logger.message(f"nothing to do: the checkpoint is at step {state.iteration} and "
                                f"train.iters is {self.cfg.train.iters} (raise train.iters to continue).")
        return state

    def maybe_save(self, state: TrainState, last: bool, stop: bool) -> None:
        """After a step: save every `interval` steps, at the run's last step, and before it stops."""
        periodic = self.interval and state.iteration % self.interval == 0
        if self.enable and (periodic or last or stop):
            p = self.parts
            save_training_checkpoint(self.dir, state, p.chunks, p.optimizer, p.scheduler, self.run_config, self.keep_last)
            self.logger.message(f"saved checkpoint {self.dir}/iter_{state.iteration:07d}")
