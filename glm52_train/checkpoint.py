"""Checkpoints: Megatron-Core distributed checkpoints, saved atomically, found again safely.

Layout of a checkpoint folder `CKPT`:

    CKPT/latest                 name of the newest complete checkpoint (moved last)
    CKPT/iter_0000100/          one complete checkpoint: a Megatron-Core dist-checkpoint holding
                                the model (and optimizer, scheduler, RNG states when training),
                                plus glm52.json (resolved configs, iteration, data position and a
                                manifest of every file with its size and XXH3-64 checksum)
    CKPT/iter_0000200.incomplete/  a save in progress; never read (removed by the next run)

A save writes into `iter_N.incomplete`; every file's checksum is computed by the process that
writes it, as it writes it (checksums.py). When every rank's files are written, rank 0 writes
glm52.json with the manifest, renames the folder to `iter_N`, then replaces `latest`. An
interrupted save therefore never touches the previous checkpoint, and `latest` only ever names a
complete one. With `async_queue` (checkpoint.async_save) the files are written by a forked
process while training goes on, and the commit runs when that write is done on every rank.

Loading checks sizes against the manifest first, then each process checks the checksum of every
file it reads while reading it; a damaged checkpoint is `CheckpointDamaged`, one sentence naming
the file and the iteration. `load_newest` applies the no-silent-fallback rule: the newest
checkpoint or a sentence (`on_damaged="stop"`), or the newest good one with a warning saying
which and why (`"fallback"`). Loaded weights must be finite, and a model that does not match
the checkpoint is named tensor by tensor before anything is read.

Sharded tensors carry global names and offsets, so a checkpoint saved under one parallel layout
loads under another (Megatron-Core reshards on load).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from glm52_train import checksums

META_NAME = "glm52.json"
LATEST_NAME = "latest"
INCOMPLETE = ".incomplete"
SELF_CHECKSUM = "meta_checksum"


try:  # torch's distributed-checkpoint error derives from BaseException
    from torch.distributed.checkpoint.api import CheckpointException as _DCPError
except ImportError:  # pragma: no cover
    _DCPError = Exception


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, or a save that failed; the message says which and why."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files differ from what was written (missing, resized or changed)."""


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


def _manifest(folder: Path) -> dict[str, dict]:
    """Every file of a written checkpoint with its size and checksum: the data files' from the
    digests their writers left, the rest (common.pt, .metadata, metadata.json, written by this
    process, rank 0) hashed here."""
    digest_dir = folder / checksums.DIGESTS
    written = checksums.rank_digests(digest_dir)
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == META_NAME or digest_dir in p.parents:
            continue
        rel = str(p.relative_to(folder))
        if rel in written:
            digest, size = written[rel]
            if p.stat().st_size != size:
                raise CheckpointError(f"{p} has {p.stat().st_size} bytes after its writer wrote {size}.")
        elif p.suffix == ".distcp":
            raise CheckpointError(f"{p} was written without a checksum (its writer did not finish).")
        else:
            digest, size = checksums.file_digest(p)
        files[rel] = {"size": size, checksums.ALGORITHM: digest}
    return files


def _meta_text(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != SELF_CHECKSUM}
    canonical = json.dumps(body, sort_keys=True, default=str)
    return json.dumps(dict(body, **{SELF_CHECKSUM: checksums.text_digest(canonical)}), indent=2, default=str) + "\n"


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


def _broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    *,
    meta: dict[str, Any],
    extra_sharded_state: dict | None = None,
    keep_last: int | None = None,
    async_queue=None,
    on_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Save model chunks (and `extra_sharded_state`: optimizer, scheduler, RNG) as checkpoint
    `iteration`, atomically. Every rank calls this. Returns the final folder.

    With `async_queue` (Megatron-Core's AsyncCallsQueue) the files are written by a forked process
    and the commit (manifest, rename, `latest`, `keep_last`, then `on_commit(folder)`) runs when the
    queue finalizes the request on every rank; the folder returned is not there yet. A failed
    save raises CheckpointError (the disk-full sentence when the disk is full) on every rank and
    leaves the previous checkpoint as `latest`."""
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
    strategy = checksums.digesting_save_strategy(staging / checksums.DIGESTS, forked=async_queue is not None)
    commit = partial(_commit, ckpt_dir, final, staging, meta, iteration, keep_last, on_commit)
    try:
        request = dist_checkpointing.save(state, str(staging), sharded_strategy=strategy,
                                          async_sharded_save=async_queue is not None)
        if async_queue is None:
            commit()
    except (Exception, _DCPError) as e:  # noqa: BLE001 - every failure of a save becomes one sentence
        raise _save_failed(e, ckpt_dir, staging, iteration, strategy.planned_bytes) from e
    if async_queue is not None:
        finalize_fns = list(request.finalize_fns)

        def finalize_and_commit():
            try:
                for fn in finalize_fns:
                    fn()
                commit()
            except (Exception, _DCPError) as e:  # noqa: BLE001
                raise _save_failed(e, ckpt_dir, staging, iteration, strategy.planned_bytes) from e

        async_queue.schedule_async_request(request._replace(finalize_fns=[finalize_and_commit]))
    return final


def _commit(ckpt_dir: Path, final: Path, staging: Path, meta: dict, iteration: int, keep_last: int | None,
            on_commit: Callable[[Path], None] | None) -> None:
    """After every rank's files are written: rank 0 records the manifest, renames, moves `latest`."""
    _barrier()
    error = None
    if _rank() == 0:
        try:
            record = dict(meta, iteration=iteration, saved_at=time.time(), checksum=checksums.ALGORITHM,
                          files=_manifest(staging))
            shutil.rmtree(staging / checksums.DIGESTS, ignore_errors=True)
            _write_atomic(staging / META_NAME, _meta_text(record))
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
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
    error = _broadcast(error)
    if error is not None:
        raise error
    if on_commit is not None:
        on_commit(final)


_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "a file size limit (ulimit -f) was reached"}


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _save_failed(error: BaseException, ckpt_dir: Path, staging: Path, iteration: int, planned_bytes: int) -> CheckpointError:
    """Every rank: one sentence for a failed save (rank 0 holds the gathered write errors); the
    partial folder is removed, `latest` still names the last good checkpoint."""
    needed = torch.tensor([planned_bytes], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(needed)
    message = None
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        text = " ".join(str(error).split())
        found = re.search(r"\[Errno (\d+)\] ([^:\]'\"]+)", text)
        code = error.errno if isinstance(error, OSError) and error.errno else int(found.group(1)) if found else None
        pointer = ckpt_dir / LATEST_NAME
        last = pointer.read_text().strip() if pointer.is_file() else None
        kept = f"the last good checkpoint, {last}, is kept" if last else "there is no earlier checkpoint"
        if code in _NO_ROOM:
            reason = os.strerror(code)
            free = shutil.disk_usage(ckpt_dir).free
            message = (f"{_NO_ROOM[code]}: saving checkpoint iteration {iteration} in {ckpt_dir} failed ({reason}); "
                       f"it needs about {_size(needed.item())} and {_size(free)} are free there. "
                       f"The partial save was removed and {kept}.")
        else:
            message = (f"saving checkpoint iteration {iteration} in {ckpt_dir} failed "
                       f"({type(error).__name__}: {text[:300]}); {kept}.")
    message = _broadcast(message)
    _barrier()
    return CheckpointError(message)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only (a change to shared files), its result on every rank after a barrier."""
    result = fn() if _rank() == 0 else None
    result = _broadcast(result)
    _barrier()
    return result


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = Path(path) / META_NAME
    if not meta_file.is_file():
        raise CheckpointDamaged(f"{path} is not a complete glm52 checkpoint (no {META_NAME}).")
    try:
        record = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {META_NAME} is not readable ({e}).") from None
    if SELF_CHECKSUM in record:
        body = {k: v for k, v in record.items() if k != SELF_CHECKSUM}
        if checksums.text_digest(json.dumps(body, sort_keys=True, default=str)) != record[SELF_CHECKSUM]:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {META_NAME} does not match its checksum.")
    return record


def _name(path: Path, meta: dict | None = None) -> str:
    it = (meta or {}).get("iteration")
    return f"checkpoint {path}" + (f" (iteration {it})" if it is not None else "")


def _recorded(info) -> tuple[int, str | None]:
    """(size, checksum) of a manifest entry (older checkpoints recorded the size alone)."""
    if isinstance(info, dict):
        return info["size"], info.get(checksums.ALGORITHM)
    return info, None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint's files against its manifest (presence and size; the checksums are
    checked as the files are read). Returns its metadata or raises CheckpointDamaged."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointDamaged(f"checkpoint {path} does not exist.")
    meta = read_meta(path)
    for rel, info in meta.get("files", {}).items():
        size = _recorded(info)[0]
        f = path / rel
        if not f.is_file():
            raise CheckpointDamaged(f"{_name(path, meta)} is damaged: {rel} is missing.")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointDamaged(f"{_name(path, meta)} is damaged: {rel} has {actual} bytes, {size} were written.")
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


def candidates(path_or_root: str | os.PathLike) -> list[Path]:
    """A checkpoint folder itself, or a root's checkpoints newest first (the one `latest` names
    first: a newer folder without `latest` moved to it is from a save whose commit was cut off)."""
    p = Path(path_or_root)
    if (p / META_NAME).is_file() or (p.name.startswith("iter_") and not (p / LATEST_NAME).exists()):
        return [p]
    found = list(reversed(complete_checkpoints(p)))
    pointer = p / LATEST_NAME
    if pointer.is_file():
        named = p / pointer.read_text().strip()
        found = [named] + [c for c in found if c != named]
    return found


def find_latest_good(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose files are all present with their written sizes (no content
    check: loading does that)."""
    for candidate in candidates(ckpt_dir):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError:
            continue
    return None


def resolve(path_or_root: str | os.PathLike) -> Path:
    """A checkpoint folder given either itself or a root holding `latest` (its newest)."""
    found = candidates(path_or_root)
    if not found:
        raise CheckpointError(f"no complete checkpoint found under {path_or_root}.")
    return found[0]


def load_newest(path_or_root: str | os.PathLike, load: Callable[[Path], Any], on_damaged: str = "stop",
                warn: Callable[[str], None] = print) -> tuple[Path, Any]:
    """`load(folder)` on the newest checkpoint of a root (or on a given folder). When it is
    damaged: stop with its sentence (`on_damaged="stop"`), or warn, naming it and why, and try
    the next older one (`"fallback"`). Every rank calls this and sees the same outcome."""
    found = candidates(path_or_root)
    if not found:
        raise CheckpointError(f"no complete checkpoint found under {path_or_root}.")
    for i, folder in enumerate(found):
        try:
            return folder, load(folder)
        except CheckpointDamaged as e:
            older = found[i + 1:]
            if on_damaged != "fallback":
                hint = (f" An older checkpoint exists ({older[0].name}): pass it explicitly, or allow falling back "
                        f"to the newest good one (checkpoint.on_damaged=fallback, export-hf --on-damaged fallback)."
                        if older else "")
                raise CheckpointDamaged(f"{e}{hint}") from None
            if not older:
                raise CheckpointDamaged(f"{e} No older checkpoint is left to fall back to.") from None
            warn(f"WARNING: {e} Falling back to the previous checkpoint, {older[0]} (on_damaged=fallback).")
    raise AssertionError("unreachable")


def clean_leftovers(ckpt_dir: str | os.PathLike) -> list[str]:
    """Rank 0 removes what interrupted saves left (`iter_N.incomplete`, `iter_N.old`, temporary
    `latest` files); returns their names for the run to report. Every rank calls this."""
    root = Path(ckpt_dir)
    removed = []
    if _rank() == 0 and root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith("iter_") and (p.name.endswith(INCOMPLETE) or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif p.name.startswith(LATEST_NAME + ".tmp"):
                p.unlink(missing_ok=True)
    removed = _broadcast(removed)
    _barrier()
    return removed


def _check_small_files(path: Path, meta: dict) -> dict[str, str]:
    """The recorded checksums; the files every process reads outside the tensor reader
    (metadata.json, common.pt, .metadata; a few KB) are checked here."""
    expected = {}
    for rel, info in meta.get("files", {}).items():
        digest = _recorded(info)[1]
        if digest is None:
            continue
        expected[rel] = digest
        if not rel.endswith(".distcp"):
            found = checksums.file_digest(path / rel)[0]
            if found != digest:
                raise CheckpointDamaged(f"{_name(path, meta)} is damaged: "
                                        f"{checksums.ChecksumMismatch(rel, digest, found)}.")
    return expected


def _check_shapes(path: Path, meta: dict, state: dict) -> None:
    """A model that does not match the checkpoint: the first differing tensor, both shapes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for key in sorted(k for k in state if k.startswith("model")):
        for t in nested_values(state[key]):
            if not isinstance(t, ShardedTensor) or t.allow_shape_mismatch:
                continue
            if t.key not in saved:
                raise CheckpointError(f"{_name(path, meta)} does not match the model: it has no tensor {t.key} "
                                      f"(the model's is {list(t.global_shape)}).")
            have = tuple(saved[t.key].global_shape)
            if have != tuple(t.global_shape):
                raise CheckpointError(f"{_name(path, meta)} does not match the model: {t.key} is {list(have)} in "
                                      f"the checkpoint and {list(t.global_shape)} in the model.")


def load_sharded(path: Path, state: dict, meta: dict | None = None) -> dict:
    """Megatron-Core's dist-checkpoint load of the `state` templates, each file this process reads
    checked against its checksum while it is read; failures as one sentence."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = meta if meta is not None else verify_checkpoint(path)
    expected = _check_small_files(path, meta)
    _check_shapes(path, meta, state)
    try:
        return dist_checkpointing.load(state, str(path), sharded_strategy=checksums.verifying_load_strategy(expected))
    except (Exception, _DCPError) as e:  # noqa: BLE001 - the dist-ckpt backends raise many types
        mismatch = checksums.find_mismatch(e)
        if mismatch is not None:
            raise CheckpointDamaged(f"{_name(path, meta)} is damaged: {mismatch}.") from None
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{_name(path, meta)} cannot be loaded: {type(e).__name__}: {detail}") from e


def _check_finite(path: Path, meta: dict, chunks: list) -> None:
    """Refuse non-finite loaded weights, naming the first such tensor (on any rank)."""
    bad = None
    for chunk in chunks:
        for name, t in chunk.state_dict().items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = (name, int((~torch.isfinite(t)).sum()), t.numel())
                break
        if bad:
            break
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, bad)
        bad = next((b for b in everyone if b), None)
    if bad:
        name, count, total = bad
        raise CheckpointError(f"{_name(path, meta)} holds non-finite weights: {name} has {count} of {total} values "
                              f"NaN or infinite; refusing to start from it (pick an earlier checkpoint).")


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
    loaded = load_sharded(path, state, meta)
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    chunks = [unwrap(c) for c in model_chunks]
    for key, chunk in zip(keys, chunks):
        tensors = loaded.pop(key)
        own = {k for k in chunk.state_dict() if not k.endswith("_extra_state")}
        got = {k for k in tensors if not k.endswith("_extra_state")}
        if strict and own != got:
            raise CheckpointError(
                f"{_name(path, meta)} does not match the model: missing {sorted(own - got)[:3]}, "
                f"unexpected {sorted(got - own)[:3]}."
            )
        chunk.load_state_dict(tensors, strict=False)
    from glm52_train.model.fp8 import invalidate_fp8_weights

    invalidate_fp8_weights(chunks)  # quantised copies of the weights before the load
    _check_finite(path, meta, chunks)
    return meta, loaded
