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
    dtype: str = "float32"  # of the written tensors
    saved_dtype: str = "float32"  # of the checkpoint's model tensors
    tokenizer: Path | None = None  # the tokenizer whose files were written, if any
    tokenizer_note: str | None = None  # why none was written


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def saved_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The dtype of each model tensor of a checkpoint, by its sharded key, from its metadata."""
    from megatron.core import dist_checkpointing

    return {key: t.dtype for key, t in dist_checkpointing.load_tensors_metadata(str(path)).items()
            if getattr(t, "dtype", None) is not None}


def export_hf(ckpt_dir: str, out_dir: str, dtype: str | None = None, max_shard_gb: float = 5.0,
              on_damaged: str = "stop", warn=print, tokenizer: str | None = None) -> Exported:
    """Checkpoint -> HF `glm_moe_dsa` folder (config.json, safetensors shards, index, and the
    tokenizer's files).

    Like `import_hf`: the model is built on the meta device and each process (one, or every
    process under torchrun, `out_dir` on a filesystem they share) loads, converts and writes
    only its share of the tensors; process 0 names the files and writes the index. Each process
    checks the checksums of the files it reads; a damaged newest checkpoint of a root stops the
    export, or with `on_damaged="fallback"` the newest good one is exported after a warning.
    Shards of an earlier export in `out_dir` are replaced, never left beside the new ones.

    The tensors are read in the dtype they were saved in and written in it (fp32 training
    weights stay fp32) unless `dtype` (bf16, fp16, fp32) asks for another; the router's
    correction bias stays fp32 either way, as transformers keeps it. The tokenizer (`tokenizer`,
    or the run's `data.tokenizer`) is written as tokenizer.json, tokenizer_config.json and
    special_tokens_map.json for transformers' AutoTokenizer, and config.json's end-of-text and
    padding ids are its own; a weights-only checkpoint records no tokenizer, so none is written
    unless one is given."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def load(path: Path):
        meta = checkpoint.verify_checkpoint(path)
        model_config = model_config_of_checkpoint(path)
        dtypes = saved_dtypes(path)
        request = {}
        for name, entry in _my_entries(model_config).items():
            if not isinstance(entry, ShardedObject):  # the layers' empty extra states are not read
                saved = dtypes.get(entry.key, entry.data.dtype)
                entry.data = torch.empty(entry.data.shape, dtype=saved)
                request[name] = entry
        return meta, model_config, dtypes, checkpoint.load_sharded(path, {"model": request}, meta)["model"]

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32.")
    path, (meta, model_config, dtypes, loaded) = checkpoint.load_newest(ckpt_dir, load, on_damaged, warn)
    saved = _main_dtype(loaded)
    torch_dtype = DTYPES[dtype] if dtype else saved
    tok, note = _tokenizer_of(meta, tokenizer)
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
        if tok is not None:
            write_tokenizer(out, tok, model_config)
    box = [stale]
    torch.distributed.broadcast_object_list(box, src=0)
    return Exported(out, path, int(meta["iteration"]), box[0], _dtype_name(torch_dtype), _dtype_name(saved),
                    tok.path if tok is not None else None, note)


def _main_dtype(loaded: dict) -> torch.dtype:
    """The dtype holding most of the loaded model's values (this process's share; the same
    answer on every process of a checkpoint saved in one dtype)."""
    count: dict[torch.dtype, int] = {}
    for t in loaded.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    mine = max(count, key=count.get) if count else torch.float32
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, (sum(count.values()), mine))
    return max(everyone, key=lambda x: x[0])[1]


def _tokenizer_of(meta: dict, given: str | None):
    """The tokenizer to export and, when there is none, why (one sentence)."""
    from glm52_train.data.tokenizer import Tokenizer

    if given:
        return Tokenizer(given), None
    path = meta.get("run", {}).get("data", {}).get("tokenizer")
    if not path:
        return None, ("this weights-only checkpoint records no tokenizer, so no tokenizer files were written "
                      "(give --tokenizer PATH).")
    try:
        return Tokenizer(path), None
    except ConfigError as e:
        return None, f"the run's tokenizer cannot be read ({e}) so no tokenizer files were written (give --tokenizer PATH)."


def write_tokenizer(out: Path, tok, model_config: ModelConfig) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers'
    PreTrainedTokenizerFast reads them, and the tokenizer's end-of-text / padding ids in
    config.json (transformers' generate stops at eos_token_id)."""
    import shutil

    shutil.copyfile(tok.path, out / "tokenizer.json")
    eos = tok.hf.id_to_token(tok.eod)
    pad = tok.hf.id_to_token(tok.pad) if tok.pad >= 0 else None
    special = {"eos_token": eos, **({"pad_token": pad} if pad else {})}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None, "unk_token": None,
              "model_max_length": model_config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    cfg_file = out / "config.json"
    hf_config = json.loads(cfg_file.read_text())
    # the tokenizer has no beginning-of-text token (documents are separated by end-of-text)
    hf_config.update(bos_token_id=None, eos_token_id=tok.eod, pad_token_id=tok.pad if pad else None)
    cfg_file.write_text(json.dumps(hf_config, indent=2) + "\n")


@dataclass
class VerifyResult:
    max_abs_diff: float
    logit_scale: float
    relative: float
    tolerance: float
    tokens: int
    indexer_queries: int = 0  # (query, indexer layer) pairs with more visible keys than top-k
    tied_queries: int = 0  # of those, where the sides picked differently among keys tied at the edge
    selection_mismatches: int = 0  # where they picked differently for any other reason
    mtp_tensors: int = 0  # the folder's MTP-layer tensors, which transformers does not load

    @property
    def ok(self) -> bool:
        return math.isfinite(self.relative) and self.relative <= self.tolerance and self.selection_mismatches == 0

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def our_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None).float()


def load_reference(hf_dir: str, num_layers: int):
    """transformers' model of `hf_dir`, and how many MTP-layer tensors it left unloaded. Its raw
    load report (which lists the MTP layer's tensors as UNEXPECTED: transformers does not run
    MTP layers) is replaced by that count; any other missing or unexpected key is an error."""
    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        ref, info = GlmMoeDsaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                         output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    mtp_prefix = f"model.layers.{num_layers}."
    mtp = [k for k in info["unexpected_keys"] if k.startswith(mtp_prefix) or k.startswith(f"layers.{num_layers}.")]
    other = sorted(set(info["unexpected_keys"]) - set(mtp))
    if info["missing_keys"] or other:
        what = sorted(info["missing_keys"])[:3] if info["missing_keys"] else other[:3]
        raise ConfigError(f"transformers loads {hf_dir} with {len(info['missing_keys'])} missing and "
                          f"{len(other)} unexpected key(s) besides the MTP layer's, e.g. {', '.join(what)}.")
    ref.eval()
    return ref, len(mtp)


class _SelectionCheck:
    """Compares the two implementations' DSA top-k selections layer by layer and, where they differ
    only among keys whose indexer scores tie at the top-k edge (exact ties are common: the ReLU
    zeroes every head for many keys, and `torch.topk` orders ties arbitrarily), gives transformers
    our selection for those queries, so the logits are compared under one selection. A difference
    not explained by a tie is counted and left in place: it is a real disagreement."""

    def __init__(self, model, num_layers: int) -> None:
        from glm52_train.model.dsa import DSACoreAttention

        self.num_layers = num_layers
        self.ours: dict[int, torch.Tensor] = {}  # layer number (1-based) -> [b, sq, topk]
        self.scores: dict[int, torch.Tensor] = {}  # layer number -> [b, sq, sk] indexer scores
        self.queries = self.tied = self.mismatched = 0
        self.handles = []
        for module in model.modules():
            if isinstance(module, DSACoreAttention) and module.indexer is not None and module.layer_number <= num_layers:
                self.handles.append(module.register_forward_hook(self._record_ours))
                self.handles.append(module.indexer.register_forward_hook(self._record_scores(module.layer_number)))

    def _record_ours(self, module, args, output) -> None:
        self.ours[module.layer_number] = output[1].detach().long()

    def _record_scores(self, layer_number: int):
        from glm52_train.kernels import reference

        def hook(module, args, output):
            q, k, w = output
            self.scores[layer_number] = reference.index_scores(q.detach(), k.detach(), w.detach())

        return hook

    def watch(self, ref) -> None:
        for i, layer in enumerate(ref.model.layers):
            if getattr(layer.self_attn, "indexer", None) is not None:
                self.handles.append(layer.self_attn.indexer.register_forward_hook(self._reconcile(i + 1)))

    def _reconcile(self, layer_number: int):
        def hook(module, args, output):
            ours, scores = self.ours[layer_number], self.scores[layer_number].double()
            b, sq, sk = scores.shape
            causal = torch.ones(sq, sk, dtype=torch.bool).tril()
            mine = torch.zeros(b, sq, sk, dtype=torch.bool).scatter(-1, ours.clamp_min(0), True) & causal
            theirs = torch.zeros(b, sq, sk, dtype=torch.bool).scatter(-1, output.long(), True) & causal
            topk = ours.shape[-1]
            contested = causal.sum(-1) > topk  # queries that see more keys than they select: [sq]
            self.queries += int(contested.sum()) * b
            differ = (mine != theirs).any(-1) & contested  # [b, sq]
            if not differ.any():
                return None
            masked = scores.masked_fill(~causal, float("-inf"))
            edge = masked.topk(topk, dim=-1).values[..., -1:]  # the k-th highest score per query
            tol = 1e-5 * masked.masked_fill(~causal, 0).abs().amax(-1, keepdim=True) + 1e-30
            at_edge = (masked - edge).abs() <= tol
            # a tie explains a difference when every key picked by one side only scores at the edge
            tie = ((mine != theirs) <= at_edge).all(-1) & differ
            self.tied += int(tie.sum())
            self.mismatched += int((differ & ~tie).sum())
            fixed = output.clone()
            fixed[tie] = ours[tie][..., : output.shape[-1]].to(output.dtype)
            return fixed

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def verify_hf(hf_dir: str, seq_len: int = 64, batch: int = 2, tolerance: float = 1e-4, seed: int = 0) -> VerifyResult:
    """Load `hf_dir` into both implementations, run the same random tokens, compare logits.
    The difference is reported relative to the largest reference logit (the logit scale).
    Where the DSA indexer's scores tie at the top-k edge the two may select different keys, both
    correctly; transformers then gets our selection for those queries (see _SelectionCheck)."""
    ckpt = HFCheckpoint(hf_dir)
    model_config = ckpt.model_config
    model = _single_process_model(model_config)
    load_hf_weights(model, model_config, ckpt)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(seq_len, model_config.max_position_embeddings)
    input_ids = torch.randint(0, model_config.vocab_size, (batch, seq_len), generator=generator)
    check = _SelectionCheck(model, model_config.num_layers)
    try:
        ours = our_logits(model, input_ids)
        ref, mtp_tensors = load_reference(hf_dir, model_config.num_layers)
        check.watch(ref)
        with torch.no_grad():
            ref_logits = ref(input_ids).logits.float()
    finally:
        check.remove()
    if ours.shape != ref_logits.shape:
        raise ConfigError(f"logit shapes differ: ours {tuple(ours.shape)}, transformers {tuple(ref_logits.shape)}.")
    diff = (ours - ref_logits).abs().max().item()
    scale = max(ref_logits.abs().max().item(), 1e-12)
    return VerifyResult(diff, scale, diff / scale, tolerance, batch * seq_len, check.queries, check.tied,
                        check.mismatched, mtp_tensors)


def describe(result: VerifyResult) -> str:
    verdict = "PASS" if result.ok else "FAIL"
    lines = [
        f"{verdict}: max |logit difference| {result.max_abs_diff:.3e} over {result.tokens} tokens; "
        f"logit scale {result.logit_scale:.3e}; relative {result.relative:.3e} "
        f"(tolerance {result.tolerance:.1e})"
    ]
    if result.selection_mismatches:
        lines.append(f"top-k: the two sides selected different keys for {result.selection_mismatches} of "
                     f"{result.indexer_queries} (query, indexer layer) pairs without a tie at the top-k edge: "
                     "the indexers disagree.")
    if result.tied_queries:
        lines.append(f"top-k: for {result.tied_queries} of {result.indexer_queries} (query, indexer layer) pairs "
                     "the indexer scores tie at the top-k edge and the two sides kept different keys among the "
                     "tied ones (both correct); transformers was given our selection there, so the logits "
                     "compare under one selection.")
    elif result.indexer_queries and not result.selection_mismatches:
        lines.append(f"top-k: both sides selected the same keys for all {result.indexer_queries} (query, indexer "
                     "layer) pairs that choose.")
    if result.mtp_tensors:
        lines.append(f"MTP: transformers does not run MTP layers, so it leaves this folder's {result.mtp_tensors} "
                     "MTP-layer tensors unloaded; they are ours alone and not compared.")
    return "\n".join(lines)


def dump(result: VerifyResult) -> str:
    return json.dumps(result.to_dict())
