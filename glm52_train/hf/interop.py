"""The three HF commands: import a HF folder as a checkpoint, export a checkpoint as a HF
folder, and verify that our model and transformers compute the same logits from a HF folder.

The checkpoint side is layout-independent (global tensor names and offsets), so a checkpoint
trained under any layout exports the same way. Import and export also run under torchrun, each
process converting a share of the tensors (how a 744B model fits); verify runs in one process.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from glm52_train import checkpoint, parallel
from glm52_train.config import ConfigError, ModelConfig
from glm52_train.hf import mapping
from glm52_train.hf.convert import HFCheckpoint, finish_hf_folder, hf_weights, load_hf_weights, write_shards
from glm52_train.model.build import build_model


def _single_process_model(model_config: ModelConfig, seed: int = 1234):
    parallel.initialize(seed=seed)
    return build_model(model_config, init=False)


def import_hf(hf_dir: str, out_dir: str) -> Path:
    """HF folder -> checkpoint (weights only, iteration 0) that `pretrain --init-from` reads.

    The model is built on the meta device (no memory); each process converts and writes only
    its share of the tensors, balanced by size. Run directly, one process converts everything;
    under torchrun (any number of processes and nodes) the memory per process is the model's
    size divided by the number of processes. The checkpoint is the same either way."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ckpt = HFCheckpoint(hf_dir)
    state = _my_entries(ckpt.model_config)
    # tensors (on the meta device); the objects are the layers' empty extra states
    tensors = {name: entry.data for name, entry in state.items() if not isinstance(entry, ShardedObject)}
    for name, source in hf_weights(ckpt.model_config, ckpt, tensors):
        state[name].data = source
    meta = {
        "kind": "weights",
        "source": str(Path(hf_dir).resolve()),
        "model": ckpt.model_config.to_dict(),
    }
    return checkpoint.save_checkpoint(out_dir, 0, [], meta=meta, extra_sharded_state={"model": state})


def _my_entries(model_config: ModelConfig) -> dict:
    """This process's share of the model's sharded state (see `_my_share`), each entry marked as
    the one copy (replica 0; the other processes hold none). The model is built on the meta
    device, so nothing is allocated."""
    parallel.initialize()
    with torch.device("meta"):
        model = build_model(model_config, init=False)
    sharded = checkpoint.model_sharded_state([model])["model"]
    mine = {}
    for name in _my_share(sharded, torch.distributed.get_rank(), torch.distributed.get_world_size()):
        sharded[name].replica_id = 0
        mine[name] = sharded[name]
    return mine


def _my_share(sharded: dict, rank: int, world: int) -> list[str]:
    """The entries process `rank` of `world` converts: largest first to the least loaded
    process (the same answer on every process); the objects stay with process 0."""
    load = [0] * world
    owner = {}
    sizes = {name: e.data.numel() for name, e in sharded.items() if isinstance(e.data, torch.Tensor)}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner[name] = min(range(world), key=lambda r: (load[r], r))
        load[owner[name]] += sizes[name]
    return [name for name in sharded if owner.get(name, 0) == rank]


def model_config_of_checkpoint(path: Path) -> ModelConfig:
    meta = checkpoint.read_meta(path)
    if "model" not in meta:
        raise checkpoint.CheckpointError(f"{path} records no model config.")
    return ModelConfig.from_dict(meta["model"])


@dataclass
class Exported:
    out: Path
    checkpoint: Path
    iteration: int
    stale_removed: list[str]


def export_hf(ckpt_dir: str, out_dir: str, dtype: str = "bfloat16", max_shard_gb: float = 5.0,
              on_damaged: str = "stop", warn=print) -> Exported:
    """Checkpoint -> HF `glm_moe_dsa` folder (config.json, safetensors shards, index).

    Like `import_hf`: the model is built on the meta device and each process (one, or every
    process under torchrun, `out_dir` on a filesystem they share) loads, converts and writes
    only its share of the tensors; process 0 names the files and writes the index. Each process
    checks the checksums of the files it reads; a damaged newest checkpoint of a root stops the
    export, or with `on_damaged="fallback"` the newest good one is exported after a warning.
    Shards of an earlier export in `out_dir` are replaced, never left beside the new ones."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def load(path: Path):
        meta = checkpoint.verify_checkpoint(path)
        model_config = model_config_of_checkpoint(path)
        request = {}
        for name, entry in _my_entries(model_config).items():
            if not isinstance(entry, ShardedObject):  # the layers' empty extra states are not read
                entry.data = torch.empty(entry.data.shape, dtype=entry.data.dtype)
                request[name] = entry
        return meta, model_config, checkpoint.load_sharded(path, {"model": request}, meta)["model"]

    path, (meta, model_config, loaded) = checkpoint.load_newest(ckpt_dir, load, on_damaged, warn)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    out = Path(out_dir)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    files = write_shards(out, mapping.to_hf(model_config, loaded, partial=True), dtype=torch_dtype,
                         max_shard_bytes=int(max_shard_gb * 1024**3), stem=f"part-{rank:05d}")
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, files)
    stale = None
    if rank == 0:
        stale = finish_hf_folder(out, model_config, [f for part in everyone for f in part], torch_dtype)
    box = [stale]
    torch.distributed.broadcast_object_list(box, src=0)
    return Exported(out, path, int(meta["iteration"]), box[0])


@dataclass
class VerifyResult:
    max_abs_diff: float
    logit_scale: float
    relative: float
    tolerance: float
    tokens: int

    @property
    def ok(self) -> bool:
        return math.isfinite(self.relative) and self.relative <= self.tolerance

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def our_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None).float()


def reference_logits(hf_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import GlmMoeDsaForCausalLM

    ref = GlmMoeDsaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    with torch.no_grad():
        return ref(input_ids).logits.float()


def verify_hf(hf_dir: str, seq_len: int = 64, batch: int = 2, tolerance: float = 1e-4, seed: int = 0) -> VerifyResult:
    """Load `hf_dir` into both implementations, run the same random tokens, compare logits.
    The difference is reported relative to the largest reference logit (the logit scale)."""
    ckpt = HFCheckpoint(hf_dir)
    model_config = ckpt.model_config
    model = _single_process_model(model_config)
    load_hf_weights(model, model_config, ckpt)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, model_config.max_position_embeddings)
    input_ids = torch.randint(0, model_config.vocab_size, (batch, seq_len), generator=generator)
    ours = our_logits(model, input_ids)
    ref = reference_logits(hf_dir, input_ids)
    if ours.shape != ref.shape:
        raise ConfigError(f"logit shapes differ: ours {tuple(ours.shape)}, transformers {tuple(ref.shape)}.")
    diff = (ours - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    return VerifyResult(diff, scale, diff / scale, tolerance, batch * seq_len)


def describe(result: VerifyResult) -> str:
    verdict = "PASS" if result.ok else "FAIL"
    return (
        f"{verdict}: max |logit difference| {result.max_abs_diff:.3e} over {result.tokens} tokens; "
        f"logit scale {result.logit_scale:.3e}; relative {result.relative:.3e} "
        f"(tolerance {result.tolerance:.1e})"
    )


def dump(result: VerifyResult) -> str:
    return json.dumps(result.to_dict())
