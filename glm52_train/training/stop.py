"""Stop signals of a run: SIGTERM / SIGUSR1 (Slurm's warning before the time limit) and Ctrl-C.

During training they ask the loop to finish the current step, save and exit 0 (a second Ctrl-C
stops at once, without saving). Before the first step, in setup and data building, there is
nothing to save: SIGTERM and SIGUSR1 stop the run at once (`SetupStopped`, exit status 0, one
line; exit 0 so that torchrun neither restarts the processes nor reports a failure) and Ctrl-C
does (KeyboardInterrupt, exit 130). Installed first thing in `glm52 pretrain`, before torch is
imported, so no signal is lost to an import.

A Python signal handler runs only between bytecodes of the main thread: a C call that never
returns (a collective waiting for a rank, a long native loop) would hold the stop back. A
watchdog thread, woken through `signal.set_wakeup_fd` even then, ends the process after
`GRACE_S` seconds of setup without the main thread having stopped (os._exit, same line, same
status). It cannot help against a native loop that holds the GIL throughout.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

GRACE_S = 3.0  # seconds the main thread gets to stop on its own before the watchdog ends the process
_STOPS = (signal.SIGTERM, signal.SIGUSR1)


class SetupStopped(BaseException):
    """A stop signal before the first step. A BaseException, so that no `except Exception` in
    setup (ours or Megatron-Core's) takes it for an error and carries on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def sentence(self) -> str:
        return setup_stop_sentence(self.signum)


def setup_stop_sentence(signum: int) -> str:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        return "glm52 pretrain: interrupted (Ctrl-C)."
    return f"glm52 pretrain: stopped by {name} during setup, before the first step (nothing to save)."


def _exit_status(signum: int) -> int:
    return 130 if signum == signal.SIGINT else 0


class StopSignals:
    """See the module docstring. `start_training()` before the first step switches from
    stop-at-once to finish-the-step-and-save; `release()` after the last step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.training = False
        self._read_fd = self._write_fd = -1
        self._released = False
        self._previous = {sig: signal.getsignal(sig) for sig in (*_STOPS, signal.SIGINT)}
        for sig in _STOPS:
            signal.signal(sig, self._handler)
        signal.signal(signal.SIGINT, self._interrupt)
        self._arm_watchdog()

    # ---- handlers -------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if not self.training:
            raise SetupStopped(signum)
        self.received = signum

    def _interrupt(self, signum, frame) -> None:
        if not self.training or self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print("Ctrl-C: finishing this step, saving, then stopping (Ctrl-C again stops at once, without "
              "saving)", file=sys.stderr, flush=True)

    # ---- the watchdog of setup ------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # set_wakeup_fd works in the main thread only (tests may build runs elsewhere)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(self._read_fd,), name="glm52-setup-stop",
                         daemon=True).start()

    def _watch(self, fd: int) -> None:
        try:
            self._wait_for_a_stop(fd)
        finally:
            os.close(fd)

    def _wait_for_a_stop(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 16)
            except OSError:
                return
            if not data:
                return  # start_training() closed the pipe
            signums = [b for b in data if b in (*_STOPS, signal.SIGINT)]
            if not signums or self.training:
                continue
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and not self.training:
                time.sleep(0.05)
            if self.training:
                return
            print(setup_stop_sentence(signums[0]), file=sys.stderr, flush=True)
            os._exit(_exit_status(signums[0]))

    def _disarm_watchdog(self) -> None:
        if self._write_fd < 0:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._write_fd)  # the watchdog reads end-of-file and returns
        self._write_fd = -1

    # ---- phases ---------------------------------------------------------------------------------
    def start_training(self) -> None:
        self._disarm_watchdog()
        self.training = True

    def release(self) -> None:
        """After the last step: ignore further signals. At exit Python restores SIG_DFL, and a
        repeated SIGUSR1 (Slurm and the launcher both deliver one) would kill the exiting process,
        which torchrun counts as a failure and restarts. Ctrl-C stops at once again."""
        self._disarm_watchdog()
        self._released = True
        for sig in _STOPS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        """When the command ends without release() (an error, a stop in setup): the handlers
        from before, as a caller running the command in its own process (a test) had them."""
        self._disarm_watchdog()
        if not self._released:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def should_stop(self) -> bool:
        """Whether any rank received a stop signal (an all-reduce: every rank stops at the same step)."""
        import torch

        from glm52_train import compat

        flag = torch.tensor([1.0 if self.received else 0.0], device=compat.default_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
