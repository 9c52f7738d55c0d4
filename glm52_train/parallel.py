"""Process groups and seeds: the one place that initialises torch.distributed and
Megatron-Core's parallel state from a run's parallel layout."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch

from glm52_train import compat


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Install the compatibility items (`compat.apply`: every process comes through here before
    it builds anything), then join the process group torchrun describes (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), or make a one-process group when run directly. NCCL on GPUs, gloo on CPUs."""
    compat.apply()
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    else:
        store = tempfile.NamedTemporaryFile(prefix="glm52-pg-", delete=False).name
        torch.distributed.init_process_group(
            backend=backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout
        )


def initialize(layout=None, seed: int = 1234, timeout_minutes: float = 30.0) -> None:
    """Process group + Megatron-Core model-parallel groups (the run config's `parallel`
    section; one process's defaults when None) + the parallel RNG tracker. A collective
    waiting longer than `timeout_minutes` fails (in every group)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from glm52_train.layout import virtual_stages
    from glm52_train.run_config import ParallelConfig

    p = layout or ParallelConfig()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1:
            # Initialised again in one process (tests, library calls): Megatron-Core's
            # destroy_model_parallel only forgets its groups, and every gloo group keeps its own
            # polling threads alive; a fresh world frees them (a test session had gathered
            # 2,700 such threads, one core's worth of CPU).
            torch.distributed.destroy_process_group()
    init_distributed(timeout_minutes)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=virtual_stages(p),
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
