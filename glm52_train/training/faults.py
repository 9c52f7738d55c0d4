"""Faults: naming the ranks behind a hung collective, and fault injection for the tests.

A hung collective. Every collective gives up after `train.collective_timeout_minutes`.
`name_hung_ranks()` (around `pretrain` in the command line) turns that timeout into one sentence
naming the ranks that never arrived, then exits with status 3. It needs no working process group:
each rank whose collective timed out checks in under a key of the process group's TCPStore; ranks
that have not checked in after a grace period (a quarter of the timeout, 3 s to 5 min) are the ones
that hung. The first rank to time out prints the sentence; torchrun then stops the rest (and
restarts them under `--max-restarts`). This is `torch.distributed.monitored_barrier`'s idea
without its need for a healthy gloo group after the failure. Tested with gloo. With NCCL the
timeout reaches Python only under TORCH_NCCL_BLOCKING_WAIT=1; otherwise NCCL's watchdog ends the
process first, with its own message.

Fault injection, for tests only: environment variables, all off when unset.

    GLM52_FAULT_NAN_AT_STEP=2,5-          the training loss of these steps is NaN on every rank
                                          ("4-6" a range, "5-" from step 5 on), so the loss and
                                          every gradient are non-finite and the update is skipped
    GLM52_FAULT_HANG_RANK_AT_STEP=1:3     rank 1 stops before step 3 and never returns (it sleeps;
                                          SIGTERM ends it, as torchrun's teardown sends)

    GLM52_FAULT_HANG_IN_SETUP=python      building the data never ends: a pure-Python loop (as
                                          Megatron-Core's _get_num_epochs on an empty split), or
                           =native        a native call that signals do not interrupt (a pthread
                                          mutex locked twice, the GIL released)

(`GLM52_FAULT_PAUSE_IN_SAVE`, which holds a save before its commit, lives in checksums.py, where the
writer of a synchronous or asynchronous save runs.)
The driver calls `at_step` at the start of every step and `poison_losses` once on its model
chunks; the loss function itself knows nothing of faults.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

import torch

_step = 0
_registered = False
_KEY = "glm52/faults"


# ---- fault injection ---------------------------------------------------------------------------

def _in_steps(spec: str | None, step: int) -> bool:
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not dash:
            if step == int(low):
                return True
        elif int(low) <= step and (not high or step <= int(high)):
            return True
    return False


def at_step(step: int) -> None:
    """Start of training step `step` (1-based): remember it, register this rank, inject a hang."""
    global _step
    _step = step
    _register()
    hang = os.environ.get("GLM52_FAULT_HANG_RANK_AT_STEP")
    if hang:
        rank, _, at = hang.partition(":")
        if torch.distributed.get_rank() == int(rank) and step == int(at):
            print(f"fault injection: rank {rank} hangs before step {step}", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(60)


def hang_in_setup() -> None:
    """GLM52_FAULT_HANG_IN_SETUP: never return (see the module docstring); nothing when unset."""
    how = os.environ.get("GLM52_FAULT_HANG_IN_SETUP")
    if not how:
        return
    print(f"fault injection: data building hangs ({how})", file=sys.stderr, flush=True)
    if how == "native":
        import ctypes

        mutex = ctypes.create_string_buffer(64)  # zeros: PTHREAD_MUTEX_INITIALIZER (glibc)
        libc = ctypes.CDLL(None)
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # a default mutex locked again deadlocks; signals do not end it
    count = 0
    while True:
        count += 1


def poison_losses(chunks) -> None:
    """GLM52_FAULT_NAN_AT_STEP: on the listed steps, while training (not in evaluation), the
    chunks that compute the loss return NaN times their per-token losses, through a forward
    hook. Installs nothing when the variable is unset."""
    steps = os.environ.get("GLM52_FAULT_NAN_AT_STEP")
    if not steps:
        return
    from glm52_train.checkpoint import unwrap

    def poison(module, args, output):
        if torch.is_grad_enabled() and _in_steps(steps, _step):
            return output * float("nan")
        return None

    for chunk in chunks:
        if unwrap(chunk).post_process:
            chunk.register_forward_hook(poison)


# ---- naming the ranks behind a collective timeout ----------------------------------------------

def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _attempt_key() -> str:
    # torchrun keeps its store across restarts: keys of an earlier attempt must not count.
    return f"{_KEY}/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _register() -> None:
    """Leave this rank's host and pid in the store once, for the timeout message."""
    global _registered
    if _registered or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    _registered = True
    rank = torch.distributed.get_rank()
    _store().set(f"{_attempt_key()}/where/{rank}", f"{socket.gethostname()}, pid {os.getpid()}")


def is_collective_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def report_timeout(timeout_minutes: float) -> str | None:
    """Check in as a rank whose collective timed out; wait for the other ranks that also timed
    out; return the sentence to print if this rank was the first, else None."""
    store = _store()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    key = _attempt_key()
    order = store.add(f"{key}/timed_out", 1)
    store.set(f"{key}/arrived/{rank}", str(_step))
    grace = min(max(timeout_minutes * 15.0, 3.0), 300.0)
    deadline = time.monotonic() + grace
    while store.add(f"{key}/timed_out", 0) < world and time.monotonic() < deadline:
        time.sleep(0.2)
    arrived = [r for r in range(world) if store.check([f"{key}/arrived/{r}"])]
    missing = [r for r in range(world) if r not in arrived]
    if order != 1:
        return None
    timeout = f"{timeout_minutes:g} min (train.collective_timeout_minutes)"
    if not missing:
        return (f"every rank timed out in a collective at step {_step} after {timeout}: a mismatched "
                f"collective or a network failure, not one slow rank.")
    where = []
    for r in missing[:8]:
        host = store.get(f"{key}/where/{r}").decode() if store.check([f"{key}/where/{r}"]) else "not registered"
        where.append(f"rank {r} ({host})")
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    return (f"a collective timed out after {timeout} at step {_step}: {', '.join(where)}{more} "
            f"never arrived, while rank(s) {_ranks(arrived)} waited for {'it' if len(missing) == 1 else 'them'}.")


@contextlib.contextmanager
def name_hung_ranks(timeout_minutes: float):
    """Around the training run: a collective timeout becomes one sentence and exit status 3."""
    try:
        yield
    except Exception as error:
        if not (is_collective_timeout(error) and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            raise
        try:
            sentence = report_timeout(timeout_minutes)
        except Exception:  # the store is gone too: report what this rank saw
            sentence = f"a collective timed out at step {_step} on rank {torch.distributed.get_rank()}: {error}"
        if sentence:
            print(f"glm52 pretrain: error: {sentence}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
