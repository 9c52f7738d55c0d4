"""What a training checkpoint holds beyond the model, and how a run finds where to start.

A training checkpoint = model + distributed-optimizer state (Megatron-Core's
`fully_reshardable` format: gathered per parameter on data-parallel rank 0 when saving, so any
other parallel layout can load it) + LR schedule + per-rank RNG states + iteration and consumed
samples (the data position) + the resolved run config and the LR schedule it ran (which a resume
compares with its own: identity.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from glm52_train import checkpoint, compat
from glm52_train.checkpoint import CheckpointError
from glm52_train.training.identity import schedule_of

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict | None) -> ShardedObject:
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _sub_optimizers(optimizer) -> dict:
    """The distributed optimizers by role, "dense" or "expert".

    Megatron-Core chains a second optimizer for expert parameters only when EP > 1, and a
    pipeline stage without MoE layers has none; ChainedOptimizer's checkpoint keys carry the
    chain position ("chained_1.") and its per-optimizer hyperparameters are saved from rank 0
    only. Keying by role, with parameter-named state tensors, makes the checkpoint independent
    of the layout: any EP, PP or TP loads it."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    roles = {}
    for sub in subs:
        groups = sub.optimizer.param_groups if sub.optimizer is not None else []
        if not groups or not any(len(g["params"]) for g in groups):
            continue
        role = "expert" if groups[0].get("is_expert_parallel", False) else "dense"
        roles[role] = sub
    return roles


def _optimizer_sharded_state(optimizer, model_sd, is_loading: bool) -> dict:
    if hasattr(optimizer, "load_from"):  # Muon: one optimizer, parameter-named state tensors
        return {"muon": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)}
    return {
        role: sub.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
        for role, sub in _sub_optimizers(optimizer).items()
    }


def _load_optimizer(optimizer, loaded: dict, step: float) -> None:
    """Load per-parameter state from the checkpoint; take each optimizer's hyperparameters from
    itself (the schedule resets lr and weight decay every step) with the saved update count."""
    if hasattr(optimizer, "load_from"):
        optimizer.load_from(loaded["muon"], step)
        return
    for role, sub in _sub_optimizers(optimizer).items():
        state = loaded[role]
        own = sub.state_dict()
        for group in own["optimizer"]["param_groups"]:
            group["step"] = step
        state["optimizer"] = own["optimizer"]
        state["param_state_sharding_type"] = OPTIMIZER_SHARDING["distrib_optim_sharding_type"]
        sub.load_state_dict(state)


def _optimizer_step(optimizer) -> float:
    if hasattr(optimizer, "update_count"):
        return float(optimizer.update_count())
    for sub in _sub_optimizers(optimizer).values():
        for state in sub.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
    return 0.0


def save_training_checkpoint(ckpt_dir, state: TrainState, chunks, optimizer, scheduler, run_config: dict, keep_last=None,
                             async_queue=None, on_commit=None):
    model_sd = checkpoint.model_sharded_state(chunks)
    extra = {
        "optimizer": _optimizer_sharded_state(optimizer, model_sd, is_loading=False),
        "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": _rng_sharded(_rng_state()),
    }
    step = torch.tensor([_optimizer_step(optimizer)], device=compat.default_device())
    torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
    meta = {
        "kind": "training",
        "model": run_config["model"],
        "run": run_config,
        "consumed_samples": state.consumed_samples,
        "skipped_steps": state.skipped_steps,
        "optimizer_step": step.item(),
        "layout": _layout(),
        "schedule": schedule_of(run_config),  # what a resume compares its own schedule with (identity.py)
    }
    return checkpoint.save_checkpoint(ckpt_dir, state.iteration, chunks, meta=meta, extra_sharded_state=extra,
                                      keep_last=keep_last, async_queue=async_queue, on_commit=on_commit)


def load_training_checkpoint(path: Path, chunks, optimizer, scheduler) -> TrainState:
    meta = checkpoint.read_meta(path)
    if meta.get("kind") != "training":
        raise CheckpointError(
            f"{path} holds weights only ({meta.get('kind')}); start from it with checkpoint.init_from."
        )
    model_sd = checkpoint.model_sharded_state(chunks)
    same_layout = meta.get("layout") == _layout()
    extra = {"optimizer": _optimizer_sharded_state(optimizer, model_sd, is_loading=True)}
    if same_layout:
        extra["rng_state"] = _rng_sharded(None)
    meta, loaded = checkpoint.load_checkpoint(path, chunks, extra_sharded_state=extra)
    _load_optimizer(optimizer, loaded["optimizer"], meta["optimizer_step"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    return TrainState(meta["iteration"], meta["consumed_samples"], meta.get("skipped_steps", 0))


def load_weights(path: Path, chunks, optimizer) -> None:
    """Weights only (checkpoint.init_from): the optimizer starts fresh from them."""
    checkpoint.load_checkpoint(path, chunks)
    optimizer.reload_model_params()
