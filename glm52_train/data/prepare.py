"""`glm52 prepare-data`: raw text -> Megatron-Core indexed dataset (.bin/.idx).

Reads local json/jsonl, parquet or text files with Hugging Face `datasets` (offline), tokenizes
with a local `tokenizers` tokenizer in worker processes (progress bar from `datasets`), appends
the end-of-document token to every document and writes `PREFIX.bin`, `PREFIX.idx` and
`PREFIX.json` (the tokenizer's hash and vocabulary size, document and token counts, the largest
token id) which training checks before it reads a single token.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import numpy as np

from glm52_train.config import ConfigError
from glm52_train.data.tokenizer import Tokenizer

_TOKENIZERS: dict[tuple, Tokenizer] = {}


def _cached_tokenizer(path: str, eod_token: str | None) -> Tokenizer:
    """One tokenizer per worker process (the map function runs in several)."""
    key = (path, eod_token, os.getpid())
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer(path, eod_token=eod_token)
    return _TOKENIZERS[key]


BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def expand_inputs(inputs: list[str]) -> dict[str, list[str]]:
    """Files by `datasets` builder name; directories and globs are expanded."""
    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS)
        elif any(ch in item for ch in "*?["):
            files += sorted(glob.glob(item, recursive=True))
        elif p.is_file():
            files.append(str(p))
        else:
            raise ConfigError(f"input {item} does not exist.")
    if not files:
        raise ConfigError(f"no .json, .jsonl, .parquet or .txt files found in {', '.join(inputs)}.")
    by_builder: dict[str, list[str]] = {}
    for f in files:
        suffix = Path(f).suffix
        if suffix not in BUILDERS:
            raise ConfigError(f"{f}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .txt).")
        by_builder.setdefault(BUILDERS[suffix], []).append(f)
    return by_builder


def _load(builder: str, files: list[str], text_key: str, cache_dir: str | None):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for bad files
        raise ConfigError(f"cannot read {builder} files {files[:2]}: {type(e).__name__}: {e}".strip()) from None
    if text_key not in ds.column_names:
        raise ConfigError(
            f"{files[0]} has no {text_key!r} field (fields: {', '.join(ds.column_names)}); "
            "pass --text-key."
        )
    return ds


def _skip_bad_rows(ds, builder: str, files: list[str], text_key: str, max_share: float):
    """Drop the rows whose `text_key` is missing, null or not a string. Returns the dataset and
    None, or (count, the sentence reporting them); raises ConfigError past `max_share`."""
    if builder == "text":  # the text builder makes every row a string
        return ds, None

    def flag(batch):
        return {"_glm52_bad": [not isinstance(t, str) for t in batch[text_key]]}

    flagged = ds.map(flag, batched=True, batch_size=1024, desc="checking rows")
    bad_rows = np.flatnonzero(flagged.data.column("_glm52_bad").to_numpy(zero_copy_only=False))
    if len(bad_rows) == 0:
        return ds, None
    where = files[0] if len(files) == 1 else f"{len(files)} {builder} files ({files[0]}, ...; rows counted across them in order)"
    first = ", ".join(str(r + 1) for r in bad_rows[:5]) + (", ..." if len(bad_rows) > 5 else "")
    sentence = (f"{len(bad_rows):,} of {len(ds):,} rows of {where} without a string {text_key!r} "
                f"(rows {first})")
    if len(bad_rows) > max_share * len(ds):
        raise ConfigError(f"{sentence}: more than --max-bad-share {max_share:g} of the rows; fix the "
                          f"input, pass the right --text-key, or raise --max-bad-share.")
    keep = flagged.filter(lambda b: [not x for x in b["_glm52_bad"]], batched=True, batch_size=1024,
                          desc="skipping bad rows")
    return keep.remove_columns("_glm52_bad"), (len(bad_rows), sentence)


OUTPUT_SUFFIXES = (".bin", ".idx", ".json")


def refuse_existing(output_prefix: str, default: bool = False) -> None:
    """A dataset already at `output_prefix` is never replaced unless asked (--overwrite)."""
    found = [suffix for suffix in OUTPUT_SUFFIXES if Path(f"{output_prefix}{suffix}").exists()]
    if found:
        which = " (the default --output-prefix)" if default else ""
        raise ConfigError(f"{output_prefix}{which} already holds a dataset ({output_prefix}{', '.join(found)}); "
                          f"pass --overwrite to replace it, or give another --output-prefix.")


def prepare_data(
    inputs: list[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    text_key: str = "text",
    workers: int | None = None,
    cache_dir: str | None = None,
    eod_token: str | None = None,
    min_tokens: int = 0,
    max_bad_share: float = 0.01,
    overwrite: bool = False,
) -> dict:
    """Tokenize `inputs` into the indexed dataset `output_prefix`.{bin,idx,json}. Documents
    shorter than `min_tokens` tokens are left out (for long-document mixtures). Rows without a
    text under `text_key`, or with a text that is not a string, are skipped and reported
    (`skipped_rows`, `skipped_rows_notes` in the result); more than `max_bad_share` of a
    file type's rows refuses the input. Nothing but the finished files is left behind; an
    existing dataset at `output_prefix` is refused unless `overwrite`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if not overwrite:
        refuse_existing(output_prefix)

    start = time.time()
    tokenizer = Tokenizer(tokenizer_path, eod_token=eod_token)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    cache_dir = cache_dir or str(Path(output_prefix).parent / "hf-datasets-cache")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_tmp, idx_tmp = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
    sources = expand_inputs(inputs)
    tok_path, eod = str(tokenizer.path), tokenizer.eod
    documents = tokens = dropped = skipped = 0
    notes: list[str] = []
    max_id = -1

    def encode(batch):
        local = _cached_tokenizer(tok_path, eod_token)
        return {"ids": [ids + [eod] for ids in local.tokenize_batch(batch[text_key])]}

    try:
        builder = IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
        for builder_name, files in sources.items():
            ds = _load(builder_name, files, text_key, cache_dir)
            ds, bad = _skip_bad_rows(ds, builder_name, files, text_key, max_bad_share)
            if bad:
                skipped += bad[0]
                notes.append(bad[1])
            ds = ds.filter(lambda b: [bool(t) for t in b[text_key]], batched=True, desc="dropping empty")
            ds = ds.map(
                encode, batched=True, batch_size=64, num_proc=workers if len(ds) > workers else None,
                remove_columns=ds.column_names, desc=f"tokenizing {builder_name} ({len(files)} files)",
            )
            for batch in ds.iter(batch_size=1024):
                for ids in batch["ids"]:
                    if len(ids) < min_tokens:
                        dropped += 1
                        continue
                    arr = np.asarray(ids, dtype=np.int64)
                    builder.add_document(arr.astype(dtype), [len(arr)])
                    documents += 1
                    tokens += len(arr)
                    max_id = max(max_id, int(arr.max()))
        if documents == 0:
            raise ConfigError(
                f"no {text_key!r} documents of at least {max(min_tokens, 1)} tokens in {', '.join(inputs)}."
            )
        builder.finalize(str(idx_tmp))
        bin_tmp.replace(f"{prefix}.bin")
        idx_tmp.replace(f"{prefix}.idx")
    finally:  # a failure (or Ctrl-C) leaves no half-written files
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
    meta = {
        "tokenizer": str(tokenizer.path),
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "documents": documents,
        "tokens": tokens,
        "dropped_short_documents": dropped,
        "skipped_rows": skipped,
        "skipped_rows_notes": notes,
        "min_tokens": min_tokens,
        "max_token_id": max_id,
        "dtype": np.dtype(dtype).name,
        "sources": [f for fs in sources.values() for f in fs][:100],
        "seconds": round(time.time() - start, 2),
    }
    Path(f"{prefix}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_dataset_meta(prefix: str) -> dict:
    """The sidecar of a prepared dataset, after checking that .bin and .idx agree with it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx", ".json"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(f"dataset {prefix}: {prefix}{suffix} is missing (run glm52 prepare-data).")
    try:
        meta = json.loads(Path(prefix + ".json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"dataset {prefix}: {prefix}.json is damaged ({e}).") from None
    try:
        # Megatron-Core's IndexedDataset.__del__ deletes attributes that a failed __init__ never
        # set, printing "Exception ignored in ... AttributeError" after our sentence: preset them.
        index = IndexedDataset.__new__(IndexedDataset)
        index.index = index.bin_reader = None
        index.__init__(prefix, mmap=True)
        lengths = index.sequence_lengths
        itemsize = index.index.dtype_size
        dtype = index.index.dtype
        n_docs = len(index.document_indices) - 1
    except Exception as e:  # noqa: BLE001 - IndexedDataset asserts on bad headers
        raise ConfigError(f"dataset {prefix}: {prefix}.idx is truncated or corrupt ({type(e).__name__}: {e}).") from None
    expected_bytes = int(np.asarray(lengths, dtype=np.int64).sum()) * itemsize
    actual_bytes = Path(prefix + ".bin").stat().st_size
    if actual_bytes != expected_bytes:
        raise ConfigError(
            f"dataset {prefix}: {prefix}.bin has {actual_bytes} bytes but its index describes "
            f"{expected_bytes}; the files are truncated or from different runs."
        )
    if n_docs != meta.get("documents") or int(np.asarray(lengths).sum()) != meta.get("tokens"):
        raise ConfigError(f"dataset {prefix}: .idx and .json disagree on the document or token count.")
    # The ids themselves, not the sidecar's word for them: one vectorized pass over the map.
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r") if actual_bytes else np.zeros(1, dtype)
    meta["max_token_id_in_bin"] = int(tokens.max())
    return meta
