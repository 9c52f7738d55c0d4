"""Content checksums of checkpoint files: computed by the process that writes each file, while it
writes it, and checked by the process that reads it, while it reads it.

The checksum is XXH3-64 (the `xxhash` package; ~12 GB/s on one core, far above what a disk
writes or reads). Writing: the Megatron-Core `torch_dist` save strategy is used as it is, except
for the function that writes each rank's files (`write_with_digests`), which hashes every byte it
hands to the file and leaves `DIGESTS/<file>` (digest and size) beside the data; the commit in
checkpoint.py moves those into the manifest. The same function runs in the training process
(synchronous save) or in the forked writer of an asynchronous save.

Reading: `VerifyingLoad` is Megatron-Core's `torch_dist` load strategy with a reader that, once
the load plan says which files this process reads, hashes exactly those files on a thread while
torch reads the tensors out of them; a mismatch fails the load on every rank (torch's
distributed load gathers read errors) as `ChecksumMismatch`, naming the file.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_64"
DIGESTS = ".glm52-digests"  # inside a checkpoint being written; merged into the manifest at commit
_CHUNK = 8 << 20


class ChecksumMismatch(RuntimeError):
    """A file whose content differs from the checksum recorded when it was written."""

    def __init__(self, file: str, recorded: str, found: str) -> None:
        super().__init__(f"{file} does not match its checksum ({ALGORITHM} {recorded} written, {found} read)")
        self.file, self.recorded, self.found = file, recorded, found

    def __reduce__(self):  # crosses process boundaries in torch's gathered read errors
        return ChecksumMismatch, (self.file, self.recorded, self.found)


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(XXH3-64 hex digest, size) of a file, read in 8 MiB blocks."""
    h, size = xxhash.xxh3_64(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def text_digest(text: str) -> str:
    return xxhash.xxh3_64(text.encode()).hexdigest()


class _HashingStream:
    """A binary file opened for writing that hashes every byte written through it."""

    def __init__(self, f) -> None:
        self._f, self.hash, self.size = f, xxhash.xxh3_64(), 0
        self.error: OSError | None = None  # torch.save reports a failed write without its errno

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        try:
            return self._f.write(view)
        except OSError as e:
            self.error = e
            raise

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


# ---- writing ---------------------------------------------------------------------------------

def _die_with(parent_pid: int) -> None:
    """In a forked writer: end when the training process ends (kill -9 included), so no orphan
    keeps writing into a folder the next run cleans."""
    if os.getpid() == parent_pid:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _fault_pause() -> None:
    """Fault injection for tests: GLM52_FAULT_PAUSE_IN_SAVE=SECONDS holds a save after its files
    are written and before it is committed (in the writer of an asynchronous save, so training
    goes on meanwhile); GLM52_FAULT_MARK names a file created when the pause starts."""
    pause = os.environ.get("GLM52_FAULT_PAUSE_IN_SAVE")
    if pause:
        Path(os.environ.get("GLM52_FAULT_MARK", "/dev/null")).write_text("in save\n")
        time.sleep(float(pause))


def _write_bucket(bucket) -> tuple[list, str, str, int]:
    from torch.distributed.checkpoint.filesystem import SerializationFormat, _StorageWriterTransforms, _write_item

    file_name, storage_key, (bytes_data, tensor_data) = bucket
    transforms = _StorageWriterTransforms()
    results = []
    with open(file_name, "wb") as f:
        stream = _HashingStream(f)
        try:
            for item, data in bytes_data:
                results.append(_write_item(transforms, stream, data, item, storage_key, SerializationFormat.TORCH_SAVE))
            for item, tensor in tensor_data:
                results.append(_write_item(transforms, stream, tensor, item, storage_key, SerializationFormat.TORCH_SAVE))
            f.flush()
            os.fsync(f.fileno())
        except Exception as e:
            if stream.error is not None and stream.error is not e:
                raise stream.error from e
            raise
    return results, os.path.basename(file_name), stream.hash.hexdigest(), stream.size


def write_with_digests(digest_dir: str, parent_pid: int, rank: int, write_buckets: list, results_queue) -> None:
    """Megatron-Core's per-rank write function (same arguments and results protocol as
    `FileSystemWriterAsync.write_preloaded_data_multiproc`), hashing what it writes. One thread per
    file; the results (or the first error) go to `results_queue`."""
    _die_with(parent_pid)
    try:
        with ThreadPoolExecutor(max(1, len(write_buckets))) as pool:
            written = list(pool.map(_write_bucket, write_buckets))
        os.makedirs(digest_dir, exist_ok=True)
        results = {}
        for i, (items, name, digest, size) in enumerate(written):
            Path(digest_dir, name).write_text(f"{digest} {size}\n")
            results[i] = items
        _fault_pause()
    except Exception as e:  # noqa: BLE001 - reported through the queue, as Megatron-Core's writer does
        results = e
    results_queue.put(results)


class _FileQueue:
    """The two queue methods Megatron-Core's writer protocol uses, through one pickle file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def put(self, obj) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "wb") as f:
            pickle.dump(obj, f)
        os.replace(self.path + ".tmp", self.path)

    def get_nowait(self):
        try:
            with open(self.path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            raise queue.Empty from None


def _save_strategy_class():
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_finalize
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class DigestingSave(TorchDistSaveShardedStrategy):
        """Megatron-Core's torch_dist save with `write_with_digests` as the write function.
        `planned_bytes`: what this rank writes (for the disk-full sentence)."""

        def __init__(self, digest_dir: str, forked: bool) -> None:
            super().__init__("torch_dist", 1)
            self.digest_dir, self.forked, self.planned_bytes = digest_dir, forked, 0

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            if self.forked and writer.write_buckets:
                # the results come back from the forked writer through a file (the in-process queue
                # of compat item 7 would stay in the child; a pipe fills up and deadlocks the
                # writer's exit while the parent waits for that exit before reading)
                writer.results_queue = _FileQueue(os.path.join(self.digest_dir, f".results-{os.getpid()}.pkl"))
            _, preload_fn, save_args = writer.get_save_function_and_args()
            buckets = writer.write_buckets or []
            self.planned_bytes = sum(t.numel() * t.element_size() for _, _, (_, ts) in buckets for _, t in ts)
            self.planned_bytes += sum(d.getbuffer().nbytes for _, _, (bs, _) in buckets for _, d in bs)
            save_fn = partial(write_with_digests, self.digest_dir, os.getpid()) if buckets else None

            def finalize_fn():
                save_state_dict_async_finalize(*save_state_dict_ret)

            return AsyncRequest(save_fn, save_args, [finalize_fn], preload_fn=preload_fn)

    return DigestingSave


def digesting_save_strategy(digest_dir: str | os.PathLike, forked: bool = False):
    """`forked`: the write function runs in a forked process (an asynchronous save)."""
    return _save_strategy_class()(str(digest_dir), forked)


# ---- reading ---------------------------------------------------------------------------------

def _load_strategy_class():
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed import checkpoint as dcp

    class VerifyingReader(CachedMetadataFileSystemReader):
        """Hashes the files the load plan reads, on a thread, while torch reads them."""

        def __init__(self, path, expected: dict[str, str]) -> None:
            super().__init__(path)
            self.expected = expected

        def read_data(self, plan, planner):
            files = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            files = [f for f in files if f in self.expected]
            with ThreadPoolExecutor(1) as pool:
                checks: list[tuple[str, Future]] = [(f, pool.submit(file_digest, Path(self.path) / f)) for f in files]
                try:
                    result = super().read_data(plan, planner)
                    error = None
                except Exception as e:  # noqa: BLE001 - a damaged file may also fail to unpickle
                    result, error = None, e
                for f, fut in checks:
                    found = fut.result()[0]
                    if found != self.expected[f]:
                        raise ChecksumMismatch(f, self.expected[f], found)
            if error is not None:
                raise error
            return result

    class VerifyingLoad(mcore_torch.TorchDistLoadShardedStrategy):
        """Megatron-Core's torch_dist load (the same steps as its `load`) with VerifyingReader."""

        def __init__(self, expected: dict[str, str]) -> None:
            super().__init__()
            self.expected = expected

        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
            original = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict)
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            reader = VerifyingReader(checkpoint_dir, self.expected)
            dcp.load_state_dict(pyt_state_dict, reader, planner=mcore_torch.MCoreLoadPlanner(
                shapes_validation_sharded_tensors=flexible, allow_shape_mismatch_sharded_tensors=mismatch_ok))
            self.cached_global_metadata = reader.read_metadata()
            state = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            state = mcore_torch._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
            mcore_torch._restore_dict_types(state, original)
            return state

    return VerifyingLoad


def verifying_load_strategy(expected: dict[str, str]):
    """`expected`: {file name relative to the checkpoint: recorded digest}."""
    return _load_strategy_class()(expected)


def find_mismatch(error: BaseException) -> ChecksumMismatch | None:
    """The ChecksumMismatch inside an error raised by a distributed load, if any (torch gathers
    every rank's read error into a CheckpointException)."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ChecksumMismatch):
            return e
        for wrapped in (getattr(e, "failures", None) or {}).values():  # rank -> (exception, stack)
            todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo.extend([e.__cause__, e.__context__])
    return None


def rank_digests(digest_dir: Path) -> dict[str, tuple[str, int]]:
    """The digests the writers left: {file name: (digest, size)}."""
    found = {}
    if digest_dir.is_dir():
        for p in digest_dir.iterdir():
            if p.name.startswith("."):  # a writer's results, not a digest
                continue
            digest, size = p.read_text().split()
            found[p.name] = (digest, int(size))
    return found

