"""Checkpoints: Megatron-Core distributed checkpoints, saved atomically, found again safely.

Layout of a checkpoint folder `CKPT`:

    CKPT/latest                 name of the newest complete checkpoint (moved last)
    CKPT/iter_0000100/          one complete checkpoint: a Megatron-Core dist-checkpoint holding
                                the model (and optimizer, scheduler, RNG states when training),
                                plus glm52.json (resolved configs, iteration, data position and a
                                manifest of every file with its size)
    CKPT/iter_0000200.incomplete/  a save in progress; never read

A save writes into `iter_N.incomplete`, writes glm52.json with the manifest, renames the folder
to `iter_N`, then replaces `latest`. An interrupted save therefore never touches the previous
checkpoint, and `latest` only ever names a complete one. Loading checks the manifest, so a
truncated or missing file is reported as one sentence instead of a stack trace.

Sharded tensors carry global names and offsets, so a checkpoint saved under one parallel layout
loads under another (Megatron-Core reshards on load).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

META_NAME = "glm52.json"
LATEST_NAME = "latest"
INCOMPLETE = ".incomplete"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def iteration_dir(ckpt_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(ckpt_dir) / f"iter_{iteration:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault_pause() -> None:
    """Fault injection for tests: GLM52_FAULT_PAUSE_IN_SAVE=SECONDS holds a save after the shards
    are written and before it is committed, so a test can kill the process mid-save."""
    pause = os.environ.get("GLM52_FAULT_PAUSE_IN_SAVE")
    if pause:
        Path(os.environ.get("GLM52_FAULT_MARK", "/dev/null")).write_text("in save\n")
        time.sleep(float(pause))


def _manifest(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META_NAME
    }


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers (checkpoints hold its names)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state(model_chunks: list) -> dict:
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    chunks = [unwrap(c) for c in model_chunks]
    metadata = ensure_metadata_has_dp_cp_group(None)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    *,
    meta: dict[str, Any],
    extra_sharded_state: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save model chunks (and `extra_sharded_state`: optimizer, scheduler, RNG) as checkpoint
    `iteration`, atomically. Every rank calls this. Returns the final folder."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    final = iteration_dir(ckpt_dir, iteration)
    staging = final.with_name(final.name + INCOMPLETE)
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    _barrier()
    state = model_sharded_state(model_chunks)
    state.update(extra_sharded_state or {})
    dist_checkpointing.save(state, str(staging))
    _fault_pause()
    _barrier()
    if _rank() == 0:
        record = dict(meta, iteration=iteration, saved_at=time.time(), files=_manifest(staging))
        _write_atomic(staging / META_NAME, json.dumps(record, indent=2, default=str) + "\n")
        _fsync_dir(staging)
        if final.exists():  # re-saving the same iteration: keep the old one until the new is in place
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
        _fsync_dir(ckpt_dir)
        _write_atomic(ckpt_dir / LATEST_NAME, final.name + "\n")
        _fsync_dir(ckpt_dir)
        if keep_last:
            for stale in complete_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = Path(path) / META_NAME
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete glm52 checkpoint (no {META_NAME}).")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is damaged ({e}).") from None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint against its manifest; returns its metadata or raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    meta = read_meta(path)
    for rel, size in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}.")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {rel} has {actual} bytes, {size} were written."
            )
    return meta


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders with metadata, oldest first (by iteration)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit() and (p / META_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_latest_good(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names if it verifies, else the newest one that does."""
    root = Path(ckpt_dir)
    candidates = list(reversed(complete_checkpoints(root)))
    pointer = root / LATEST_NAME
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError:
            continue
    return None


def resolve(path_or_root: str | os.PathLike) -> Path:
    """A checkpoint folder given either itself or a root holding `latest`."""
    p = Path(path_or_root)
    if (p / META_NAME).is_file():
        return p
    found = find_latest_good(p)
    if found is None:
        raise CheckpointError(f"no complete checkpoint found under {p}.")
    return found


def load_sharded(path: Path, state: dict) -> dict:
    """Megatron-Core's dist-checkpoint load of the `state` templates, failures as one sentence."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(path))
    except Exception as e:  # noqa: BLE001 - the dist-ckpt backends raise many types
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {detail}") from e


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: list,
    *,
    extra_sharded_state: dict | None = None,
    strict: bool = True,
) -> tuple[dict[str, Any], dict]:
    """Load model chunks (and the `extra_sharded_state` templates) from a checkpoint folder.
    Returns (metadata, loaded extra state)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    state = model_sharded_state(model_chunks)
    state.update(extra_sharded_state or {})
    loaded = load_sharded(path, state)
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for key, chunk in zip(keys, (unwrap(c) for c in model_chunks)):
        tensors = loaded.pop(key)
        own = {k for k in chunk.state_dict() if not k.endswith("_extra_state")}
        got = {k for k in tensors if not k.endswith("_extra_state")}
        if strict and own != got:
            raise CheckpointError(
                f"checkpoint {path} does not match the model: missing {sorted(own - got)[:3]}, "
                f"unexpected {sorted(got - own)[:3]}."
            )
        chunk.load_state_dict(tensors, strict=False)
    return meta, loaded
