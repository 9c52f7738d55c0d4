"""Reading and writing HF `glm_moe_dsa` folders, and moving weights between them and a model.

A folder holds config.json plus safetensors: one `model.safetensors`, or shards with a
`model.safetensors.index.json` weight map. Tensors are read lazily, one at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm52_train.config import ConfigError, ModelConfig
from glm52_train.hf import mapping
from glm52_train.hf.configs import from_hf_config, to_hf_config

INDEX_NAME = "model.safetensors.index.json"


class HFCheckpoint:
    """A HF folder opened for lazy reading: `names`, `get(name)`, `config`, `model_config`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{self.path} has no config.json; is it a Hugging Face model folder?")
        try:
            self.config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON ({e}).") from None
        self.model_config = from_hf_config(self.config, name=self.path.name)
        self._file_of: dict[str, Path] = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self._file_of = {k: self.path / v for k, v in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.path} holds no .safetensors files.")
            for f in files:
                for name in self._open(f).keys():
                    self._file_of[name] = f

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise ConfigError(f"{file} is listed in {INDEX_NAME} but does not exist.")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ConfigError(f"{file} is not a readable safetensors file ({e}).") from None
        return self._handles[file]

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"tensor {name} in {self._file_of[name]} cannot be read ({e}).") from None


def write_shards(
    out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype, max_shard_bytes: int,
    stem: str,
) -> list[tuple[str, list[str], int]]:
    """Write `tensors` as `{stem}-N.safetensors` files of at most `max_shard_bytes`, one file in
    memory at a time. Returns (file name, tensor names, bytes) per file."""
    written = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        fname = f"{stem}-{len(written):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        written.append((fname, sorted(shard), size))
        shard, size = {}, 0

    for name, tensor in tensors:
        # The router's correction bias stays fp32, as transformers keeps it (and as trained).
        t = tensor.detach().to("cpu")
        t = t.float() if name.endswith("e_score_correction_bias") else t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous().clone()
        size += nbytes
    if shard:
        flush()
    return written


def finish_hf_folder(out_dir: Path, model: ModelConfig, files: list[tuple[str, list[str], int]], dtype: torch.dtype) -> list[str]:
    """Rename the written files to `model-K-of-N.safetensors` (in the given order), readable like
    the folder's other files (safetensors creates them 0600), write the index and config.json, and
    remove every other `.safetensors` file of the folder (an earlier export's shards, which would
    otherwise sit beside the new ones). Returns the names removed."""
    umask = os.umask(0)
    os.umask(umask)
    weight_map, kept = {}, set()
    for k, (fname, names, _) in enumerate(files):
        final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out_dir / fname, out_dir / final)
        os.chmod(out_dir / final, 0o666 & ~umask)
        weight_map.update({n: final for n in names})
        kept.add(final)
    index = {"metadata": {"total_size": sum(f[2] for f in files)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(to_hf_config(model, dtype_name), indent=2) + "\n")
    stale = sorted(p.name for p in out_dir.glob("*.safetensors") if p.name not in kept)
    for name in stale:
        (out_dir / name).unlink()
    return stale


def megatron_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by Megatron name, without Transformer Engine's `_extra_state`."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def hf_weights(
    model_config: ModelConfig, ckpt: HFCheckpoint, targets: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The one way HF weights enter our model. For each Megatron name in `targets` (TP1 view;
    the tensors give shape and dtype and may be on the meta device), yield the tensor the table
    makes from `ckpt`, in the target's dtype. Tensors are read one row at a time.

    Raises ConfigError, before reading any tensor, if the checkpoint's names are not exactly
    the ones `model_config` needs or the table has no row for a target; and if a tensor's shape
    differs from its target's."""
    pairs = {p.megatron: p for p in mapping.check_hf_names(model_config, ckpt.names)}
    unset = sorted(set(targets) - set(pairs))
    if unset:
        raise ConfigError(f"the conversion table leaves {len(unset)} model tensor(s) unset, e.g. {unset[:3]}.")
    for name, target in targets.items():
        source = pairs[name].from_hf(ckpt.get)
        if tuple(source.shape) != tuple(target.shape):
            raise ConfigError(
                f"{name} has shape {tuple(source.shape)} in the HF checkpoint but "
                f"{tuple(target.shape)} in the model."
            )
        yield name, source.to(target.dtype)


def load_hf_weights(model: torch.nn.Module, model_config: ModelConfig, ckpt: HFCheckpoint) -> None:
    """Copy a HF checkpoint's weights into a single-process (TP=PP=EP=1) GLM-5.2 model."""
    own = megatron_state(model)
    with torch.no_grad():
        for name, source in hf_weights(model_config, ckpt, own):
            own[name].copy_(source)
