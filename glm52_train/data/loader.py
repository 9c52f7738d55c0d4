"""Training and validation data: Megatron-Core GPTDatasets blended by weight, read in a
deterministic order from a sample offset (the data position saved in every checkpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from glm52_train.config import ConfigError, ModelConfig
from glm52_train.data.prepare import read_dataset_meta
from glm52_train.data.tokenizer import Tokenizer
from glm52_train.run_config import RunConfig


def check_data(cfg: RunConfig, model: ModelConfig, tokenizer: Tokenizer) -> list[dict]:
    """Every dataset of the blend exists, is intact and was tokenized by this tokenizer, whose
    vocabulary fits the model's."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model {model.name!r} only "
            f"{model.vocab_size} embeddings."
        )
    metas = []
    for source in cfg.data.blend:
        meta = read_dataset_meta(source.path)
        if meta["tokenizer_sha256"] != tokenizer.sha256:
            raise ConfigError(
                f"dataset {source.path} was tokenized with {meta['tokenizer']} "
                f"(sha256 {meta['tokenizer_sha256'][:12]}), not with {tokenizer.path} "
                f"(sha256 {tokenizer.sha256[:12]}); re-run glm52 prepare-data."
            )
        largest = max(meta["max_token_id"], meta["max_token_id_in_bin"])
        if largest >= model.vocab_size:
            raise ConfigError(
                f"dataset {source.path} holds token id {largest} in its .bin, beyond model "
                f"{model.name!r}'s {model.vocab_size} embeddings (ids 0-{model.vocab_size - 1})."
            )
        metas.append(meta)
    return metas


def split_bounds(split: str, documents: int) -> list[tuple[int, int]]:
    """Documents [first, last) of a dataset of `documents` that Megatron-Core's train, validation
    and test splits get under `split`, with its own rounding (BlendedMegatronDatasetBuilder)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [(0, 0) if m is None else (int(round(m[0] * documents)), int(round(m[1] * documents))) for m in matrix]


def split_documents(split: str, documents: int) -> list[int]:
    """How many documents the train, validation and test splits get (split_bounds)."""
    return [last - first for first, last in split_bounds(split, documents)]


def read_documents(prefix: str) -> int:
    """The document count of a prepared dataset, from its sidecar (which check_data checked)."""
    return json.loads(Path(prefix + ".json").read_text())["documents"]


def check_splits(cfg: RunConfig, documents: dict[str, int]) -> str | None:
    """Refuse a data.split that leaves a dataset of the blend no training documents; return the
    sentence saying validation is skipped when it leaves one no validation documents, else None.

    Megatron-Core does not refuse an empty split: asked for samples from it, GPTDataset's
    `_get_num_epochs` adds empty epochs forever (a hang at full CPU), hence this check before any
    dataset is built."""
    import re

    split = cfg.data.split
    shares = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not 1 <= len(shares) <= 3 or sum(shares) <= 0 or not shares[0] > 0:
        raise ConfigError(f"data.split {split!r} must be up to three shares (train, validation, test), "
                          f"the training share above 0, e.g. \"98,2,0\".")
    empty_valid = []
    for path, count in documents.items():
        train, valid, _ = split_documents(split, count)
        if train == 0:
            raise ConfigError(f"data.split {split!r} leaves dataset {path} ({count} document"
                              f"{'s' if count != 1 else ''}) no training documents.")
        if valid == 0:
            empty_valid.append(f"{path} ({count} document{'s' if count != 1 else ''})")
    if not empty_valid or len(shares) < 2 or shares[1] == 0:
        return None
    return (f"validation skipped: data.split {split!r} leaves no validation documents in "
            f"{', '.join(empty_valid)}; a larger validation share (e.g. data.split=90,10,0) gives some.")


def dataset_config(cfg: RunConfig, tokenizer: Tokenizer):
    """Megatron-Core's GPTDatasetConfig of a run's data (the blend, split, seed and sequence)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    paths = [s.path for s in cfg.data.blend]
    weights = [s.weight for s in cfg.data.blend] if len(paths) > 1 else None
    cache = cfg.data.cache_dir or str(Path(paths[0]).parent / "megatron-index-cache")
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.data.seq_length,
        blend=(paths, weights),
        split=cfg.data.split,
        tokenizer=tokenizer,
        reset_position_ids=cfg.data.packed,
        reset_attention_mask=cfg.data.packed,
        eod_mask_loss=cfg.data.packed,
        create_attention_mask=False,
        path_to_cache=cache,
        mmap_bin_files=True,
    )


def build_datasets(cfg: RunConfig, tokenizer: Tokenizer, train_samples: int, valid_samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = dataset_config(cfg, tokenizer)
    # Only the splits the run reads are built: never the test split, and no validation split
    # where one of the datasets has no validation documents (check_splits; Megatron-Core would
    # hang building it). The train split's documents stay those of data.split either way.
    documents = {s.path: read_documents(s.path) for s in cfg.data.blend}
    skip_valid = valid_samples == 0 or check_splits(cfg, documents) is not None
    config.split_matrix = [config.split_matrix[0], None if skip_valid else config.split_matrix[1], None]
    sizes = [train_samples, 0 if skip_valid else valid_samples, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None:
        raise ConfigError(f"data.split {cfg.data.split!r} leaves no training documents.")
    return train, valid


class PretrainingSampler:
    """Global batches of consecutive sample indices from `consumed`, this data-parallel rank's
    micro-batch slice of each (Megatron's order, so a layout change keeps the global order)."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self):
        step = self.mbs * self.dp_size
        start = self.dp_rank * self.mbs
        for base in range(self.consumed, self.total - step + 1, step):
            yield list(range(base + start, base + start + self.mbs))


def dataloader(dataset, consumed: int, micro_batch_size: int, num_workers: int = 0):
    sampler = PretrainingSampler(
        len(dataset),
        consumed,
        micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available()
    )


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


def to_batch(sample: dict, device) -> Batch:
    return Batch(
        tokens=sample["tokens"].to(device, non_blocking=True),
        labels=sample["labels"].to(device, non_blocking=True),
        loss_mask=sample["loss_mask"].to(device, non_blocking=True).float(),
        position_ids=sample["position_ids"].to(device, non_blocking=True),
    )
