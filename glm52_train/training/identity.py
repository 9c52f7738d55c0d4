"""Which run a checkpoint belongs to, and whether its schedule is this config's.

A resume continues one run: the same model, data and parallel-independent training settings. The
checkpoint's metadata (`glm52.json`) holds the resolved run config it was saved by (`run`) and,
since issue 22, the learning-rate schedule its scheduler ran (`schedule`); these functions
compare them with the config of the run that would resume it.

- Identity (`identity`): every model field, `data.tokenizer/blend/split/seq_length/packed`,
  `train.seed/global_batch_size` and `optimizer.name`. The parallel layout (tp/pp/vpp/ep/cp and
  the stage split) is not part of it, nor is `train.micro_batch_size`: the global batch, split
  into other micro-batches over other data-parallel ranks, is the same samples and the same
  update (checkpoints reshard on load; tests/test_parallel.py resumes TP2xPP2 under EP2xDP4 with
  micro-batch 1). Neither are precision / FP8, recomputation or loss coefficients, which a run
  may change as it goes (an FP8 checkpoint resumes without FP8).
- Schedule (`schedule_of`, `schedule_changes`): peak and minimum learning rate, warm-up,
  decay length and style (and WSD's final decay). Megatron-LM checks the same five values on
  load unless `--override-opt_param-scheduler` (take the new ones) or
  `--use-checkpoint-opt_param-scheduler` (keep the saved ones); here a difference is refused
  unless `train.override_schedule: true`, which continues from the checkpoint's step on the new
  schedule. There is no "keep the checkpoint's" switch: giving the checkpoint's values is that.

A checkpoint saved before `run` was recorded has no identity to compare: it is resumed, saying so.
One saved before `schedule` was recorded gets its schedule from its `run` (`schedule_of`, the
formula setup.build_optimizer used then and uses now).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

IDENTITY_FIELDS = {
    "data": ("tokenizer", "blend", "split", "seq_length", "packed"),
    "train": ("seed", "global_batch_size"),
    "optimizer": ("name",),
}


def _path(value) -> str:
    return os.path.normpath(os.path.abspath(str(value)))


def _plain(value):
    """As JSON would give it back (tuples as lists), so a saved and a current value compare."""
    return json.loads(json.dumps(value, default=str))


def identity(run: dict) -> dict[str, Any]:
    """The fields that make a run itself, by dotted name, from a run config's `to_dict()` (or a
    checkpoint's `run` record): paths made absolute, so `data/x` and `./data/x` are one dataset."""
    out = {f"model.{k}": _plain(v) for k, v in (run.get("model") or {}).items() if k != "name"}
    for section, keys in IDENTITY_FIELDS.items():
        values = run.get(section) or {}
        for key in keys:
            if key not in values:
                continue  # a record from before the field existed
            value = values[key]
            if key == "tokenizer":
                value = _path(value)
            elif key == "blend":
                value = [[_path(s["path"]), float(s.get("weight", 1.0))] for s in value]
            out[f"{section}.{key}"] = _plain(value)
    return out


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and value and isinstance(value[0], list):  # a blend
        value = ", ".join(f"{p} x{w:g}" for p, w in value)
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def identity_differences(saved_run: dict, run: dict) -> list[str]:
    """'field (checkpoint value -> this run's)' for each identity field that differs."""
    before, now = identity(saved_run), identity(run)
    return [f"{k} ({_show(before[k])} -> {_show(now[k])})" for k in sorted(before) if k in now and before[k] != now[k]]


# ---- schedule ---------------------------------------------------------------------------------

SCHEDULE_KEYS = ("lr", "min_lr", "warmup_iters", "decay_iters", "schedule", "wsd_decay_iters")


def schedule_of(run: dict) -> dict[str, Any]:
    """The learning-rate schedule a run config gives (`to_dict()` form, or a checkpoint's `run`):
    what setup.build_optimizer builds, and what a checkpoint records as `schedule`."""
    o, t = run["optimizer"], run["train"]
    decay = o.get("decay_iters") or t["iters"]
    wsd = (o.get("wsd_decay_iters") or max(1, decay // 10)) if o["schedule"] == "wsd" else None
    # warmup_iters null: optimizer.warmup_fraction of the decay length (RunConfig.warmup_length)
    warmup = o["warmup_iters"] if o.get("warmup_iters") is not None else int(o.get("warmup_fraction", 0.1) * decay)
    return {"lr": o["lr"], "min_lr": o["min_lr"], "warmup_iters": warmup, "decay_iters": decay,
            "schedule": o["schedule"], "wsd_decay_iters": wsd}


def make_scheduler(optimizer, schedule: dict, weight_decay: float):
    """Megatron-Core's OptimizerParamScheduler running `schedule` (constant weight decay). It keeps
    its own values when a checkpoint's scheduler state is loaded (override_opt_param_scheduler):
    the resume checks below have compared them first."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    wsd = schedule["schedule"] == "wsd"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=schedule["lr"], min_lr=schedule["min_lr"],
        lr_warmup_steps=schedule["warmup_iters"], lr_decay_steps=schedule["decay_iters"],
        lr_decay_style="WSD" if wsd else schedule["schedule"], start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=schedule["decay_iters"], wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True, wsd_decay_steps=schedule["wsd_decay_iters"],
        lr_wsd_decay_style="linear" if wsd else None)


class _NoParams:
    param_groups: list = []


def lr_at(schedule: dict, step: int) -> float:
    """The learning rate `schedule` gives at `step` (Megatron-Core's formula; the lr metrics.jsonl
    logs at that step)."""
    probe = make_scheduler(_NoParams(), schedule, 0.0)
    probe.num_steps = step
    return probe.get_lr({})


def schedule_changes(saved: dict, now: dict, decay_iters_given: bool) -> list[str]:
    """'field (checkpoint value -> this run's)' for each schedule value that differs, named by the
    config key that sets it (the decay length is train.iters unless optimizer.decay_iters is set)."""
    names = {"lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "warmup_iters": "optimizer.warmup_iters",
             "decay_iters": "optimizer.decay_iters" if decay_iters_given else "train.iters",
             "schedule": "optimizer.schedule", "wsd_decay_iters": "optimizer.wsd_decay_iters"}
    return [f"{names[k]} ({_show(saved[k])} -> {_show(now[k])})" for k in SCHEDULE_KEYS
            if k in saved and saved[k] != now[k]]


# ---- earlier runs in the same folders ---------------------------------------------------------

RUN_FILES = ("metrics.jsonl", "config.json", "wandb_run_id", "wandb-files", "tensorboard", "profile")


def set_aside(folder: Path, names) -> Path | None:
    """Move the entries `names` (those present; a callable picks them from the folder's entries)
    of `folder` into a new sibling `FOLDER.old-N` (the first free N); returns it, or None when
    nothing was there. Nothing is deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    entries = [p for p in sorted(folder.iterdir()) if (names(p) if callable(names) else p.name in names)]
    if not entries:
        return None
    n = 1
    while (target := folder.with_name(f"{folder.name}.old-{n}")).exists():
        n += 1
    target.mkdir(parents=True)
    for p in entries:
        shutil.move(str(p), str(target / p.name))
    return target
