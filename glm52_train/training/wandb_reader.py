"""Read an offline W&B run (`run-<id>.wandb`) back without the W&B service.

wandb 0.31 writes offline runs as a LevelDB-style log: a 7-byte file header (":W&B", magic
0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header (masked-free
CRC-32 of type+payload, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and a
`wandb_internal_pb2.Record` protobuf payload. wandb ships no reader for it; tests and tools use
this one to check what a run logged.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

BLOCK = 32768
HEADER = 7
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFormatError(ValueError):
    pass


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:HEADER] != FILE_HEADER:
        raise WandbFormatError(f"{path} does not start with the W&B log header.")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left_in_block
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        if len(payload) < length:
            raise WandbFormatError(f"{path}: record at byte {pos} is truncated.")
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise WandbFormatError(f"{path}: record at byte {pos} fails its checksum.")
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:
            raise WandbFormatError(f"{path}: unknown record type {kind} at byte {pos}.")


def iter_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def history(path: str | Path) -> list[dict]:
    """The logged history rows of one .wandb file: dicts of metric -> value (with `_step`)."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        if record.history.HasField("step"):
            row.setdefault("_step", record.history.step.num)
        rows.append(row)
    return rows


def run_history(run_dir: str | Path) -> list[dict]:
    """History rows of every offline W&B run file under `run_dir`, in step order."""
    rows = [row for f in sorted(Path(run_dir).rglob("*.wandb")) for row in history(f)]
    return sorted(rows, key=lambda r: r.get("_step", 0))


def run_config(run_dir: str | Path) -> dict:
    """The run config recorded in the (first) offline W&B run under `run_dir`."""
    for f in sorted(Path(run_dir).rglob("*.wandb")):
        for record in iter_records(f):
            if record.WhichOneof("record_type") == "run" and record.run.config.update:
                return {u.key: json.loads(u.value_json) for u in record.run.config.update}
            if record.WhichOneof("record_type") == "config":
                return {u.key: json.loads(u.value_json) for u in record.config.update}
    return {}
