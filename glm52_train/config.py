"""The GLM-5.2 model description: one typed config, every size side by side.

`MODELS` holds the named flavors. `glm52-744b` is the published architecture; `tiny` exercises
every code path of it on a CPU (dense and MoE layers, shared expert, MTP, DSA with top-k below
the sequence length, IndexShare with shared layers); `proxy-h100` keeps every layer at full
width but is cut down in depth, experts and vocabulary so that training fits one 80 GB GPU.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot work; the message is one sentence saying why."""


def closest(word: str, choices) -> str | None:
    """The choice a misspelt `word` most likely meant, or None when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


@functools.cache
def field_help(cls) -> dict[str, str]:
    """Each field's one-line description, read from the class's source: the comment ending the
    field's line, or else the comment lines right above it. The comments are the one source of
    truth for `glm52 config keys` and `glm52 pretrain --help`."""
    source = textwrap.dedent(inspect.getsource(cls))
    trailing, alone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.line[: tok.start[1]].strip() else alone)[tok.start[0]] = text
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        lines = [trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing]
        if not lines:
            row, above = node.lineno - 1, []
            while row in alone:
                above.insert(0, alone[row])
                row -= 1
            lines = above
        out[node.target.id] = " ".join(lines)
    return out


@functools.lru_cache(maxsize=64)
def index_share_pattern(num_layers: int, topk_freq: int, skip_topk_offset: int) -> str:
    """The IndexShare layout as a string of F (runs its own indexer) and S (reuses the top-k of
    the previous F layer), following the HF reference's `index_topk_freq` /
    `index_skip_topk_offset` rule: layer i is full iff max(i - offset + 1, 0) % freq == 0."""
    freq = max(topk_freq, 1)
    return "".join(
        "F" if max(i - skip_topk_offset + 1, 0) % freq == 0 else "S" for i in range(num_layers)
    )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GLM-5.2-family model. Field names follow the paper's vocabulary; the HF
    names they map to are in `glm52_train/hf/mapping.py`. Frozen: a variant is `replace(...)`."""

    name: str = "custom"  # shown in logs and folders; a modified flavor is named FLAVOR+field=value
    vocab_size: int = 154880  # embedding rows (at least the tokenizer's vocabulary)
    hidden_size: int = 6144  # model width
    num_layers: int = 78  # decoder layers (MTP layers not counted)
    num_dense_layers: int = 3  # the first layers, with a dense MLP instead of experts
    dense_ffn_size: int = 12288  # SwiGLU width of a dense layer's MLP
    # Multi-head latent attention
    num_heads: int = 64  # attention heads
    q_lora_rank: int = 2048  # rank of the compressed query (q_a -> q_b)
    kv_lora_rank: int = 512  # rank of the compressed key-value latent (the KV cache per token)
    qk_nope_dim: int = 192  # per-head query/key channels without rotary embedding
    qk_rope_dim: int = 64  # per-head query/key channels with rotary embedding (one key shared by all heads)
    v_head_dim: int = 256  # per-head value channels
    # DeepSeek sparse attention (lightning indexer) and IndexShare
    index_heads: int = 32  # heads of the lightning indexer
    index_head_dim: int = 128  # channels per indexer head
    index_topk: int = 2048  # keys each query attends to (DSA top-k)
    index_pattern: str = ""  # IndexShare per layer: F runs an indexer, S reuses the last F's top-k (empty: freq/offset)
    index_topk_freq: int = 4  # IndexShare: after the offset, every freq-th layer runs its own indexer
    index_skip_topk_offset: int = 3  # IndexShare: the first layers that all run their own indexer
    # Mixture of experts
    num_experts: int = 256  # routed experts per MoE layer
    moe_topk: int = 8  # routed experts per token
    moe_ffn_size: int = 2048  # SwiGLU width of one expert (routed or shared)
    num_shared_experts: int = 1  # experts every token goes through, beside the routed ones
    routed_scaling_factor: float = 2.5  # scale of the routed experts' weighted sum
    moe_groups: int = 1  # expert groups for group-limited routing (1: none)
    moe_topk_groups: int = 1  # groups a token's experts may come from
    # Multi-token prediction: `mtp_layers` distinct modules trained over `mtp_steps` depths
    # (steps beyond the layer count reuse the layers' weights, as GLM-5 does with 1 layer, 3 steps).
    mtp_layers: int = 1  # distinct multi-token-prediction modules
    mtp_steps: int = 1  # extra tokens predicted (depths), reusing the MTP modules
    # Norms, positions, embeddings
    norm_eps: float = 1e-5  # RMSNorm epsilon of the layers and the final norm
    latent_norm_eps: float = 1e-6  # epsilon of the q_a / kv_a RMSNorms (the HF reference leaves them at 1e-6)
    max_position_embeddings: int = 1048576  # longest sequence the rotary embedding is set up for
    rope_theta: float = 8e6  # rotary embedding base
    rope_scaling: dict[str, Any] | None = None  # YaRN context extension, as in HF configs (null: none)
    tie_embeddings: bool = False  # the output head shares the input embedding's weights
    init_std: float = 0.02  # standard deviation of the initial weights

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def layer_index_pattern(self) -> str:
        if self.index_pattern:
            return self.index_pattern
        return index_share_pattern(self.num_layers, self.index_topk_freq, self.index_skip_topk_offset)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.num_dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def need(ok: bool, sentence: str) -> None:
            if not ok:
                raise ConfigError(f"model {self.name!r}: {sentence}")

        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                  "qk_nope_dim", "qk_rope_dim", "v_head_dim", "index_heads", "index_head_dim",
                  "index_topk"):
            need(getattr(self, f) > 0, f"{f} must be positive, got {getattr(self, f)}.")
        need(0 <= self.num_dense_layers <= self.num_layers,
             f"num_dense_layers ({self.num_dense_layers}) must lie between 0 and num_layers "
             f"({self.num_layers}).")
        need(self.qk_rope_dim % 2 == 0, f"qk_rope_dim must be even, got {self.qk_rope_dim}.")
        need(self.index_head_dim >= self.qk_rope_dim,
             f"index_head_dim ({self.index_head_dim}) must be at least qk_rope_dim "
             f"({self.qk_rope_dim}): the indexer rotates its first qk_rope_dim channels.")
        need(self.q_lora_rank > 0, "q_lora_rank must be positive: the DSA indexer reads the "
             "compressed query, so GLM-5.2 always has a query low-rank projection.")
        pattern = self.layer_index_pattern
        need(len(pattern) == self.num_layers,
             f"index_pattern has {len(pattern)} entries for {self.num_layers} layers.")
        need(set(pattern) <= {"F", "S"},
             f"index_pattern may contain only F and S, got {pattern!r}.")
        need(pattern[:1] == "F",
             "the first layer must be F: a shared (S) layer reuses the top-k of an earlier "
             "full layer and layer 0 has none.")
        if self.num_moe_layers > 0:
            need(self.num_experts > 0 and 0 < self.moe_topk <= self.num_experts,
                 f"moe_topk ({self.moe_topk}) must lie between 1 and num_experts "
                 f"({self.num_experts}).")
            need(self.moe_groups >= 1 and self.num_experts % self.moe_groups == 0,
                 f"moe_groups ({self.moe_groups}) must divide num_experts ({self.num_experts}).")
            need(1 <= self.moe_topk_groups <= self.moe_groups,
                 f"moe_topk_groups ({self.moe_topk_groups}) must lie between 1 and moe_groups "
                 f"({self.moe_groups}).")
            need(self.moe_groups == 1 or self.moe_topk == 2 * self.moe_topk_groups,
                 f"group-limited routing with moe_topk={self.moe_topk} and moe_topk_groups="
                 f"{self.moe_topk_groups} is ambiguous: the HF reference ranks groups by their top-2 "
                 "experts, Megatron-Core by their top moe_topk/moe_topk_groups; use moe_topk = 2 x "
                 "moe_topk_groups (as DeepSeek-V3 does) or a single group (as GLM-5.2 does).")
        need(self.mtp_layers >= 0 and self.mtp_steps >= self.mtp_layers,
             f"mtp_steps ({self.mtp_steps}) must be at least mtp_layers ({self.mtp_layers}).")
        need(self.mtp_layers > 0 or self.mtp_steps == 0,
             f"mtp_steps ({self.mtp_steps}) needs at least one MTP layer.")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("yarn", "default"),
                 f"rope_scaling type {kind!r} is not supported (use 'yarn').")
        return self

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model field(s): {', '.join(unknown)}.")
        return cls(**data)


GLM52_744B = ModelConfig(name="glm52-744b")

MODELS: dict[str, ModelConfig] = {
    "glm52-744b": GLM52_744B,
    # Every feature of the full model at CPU size: 1 dense + 3 MoE layers, a shared expert,
    # top-k 32 under a 256-token sequence, and IndexShare "FSFS" (a shared layer after a dense
    # full layer and after a MoE full layer), plus one MTP layer.
    "tiny": GLM52_744B.replace(
        name="tiny",
        vocab_size=8192,
        hidden_size=128,
        num_layers=4,
        num_dense_layers=1,
        dense_ffn_size=320,
        num_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_dim=32,
        qk_rope_dim=16,
        v_head_dim=32,
        index_heads=4,
        index_head_dim=32,
        index_topk=32,
        index_pattern="FSFS",
        num_experts=8,
        moe_topk=2,
        moe_ffn_size=64,
        mtp_layers=1,
        mtp_steps=1,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    # Full-width layers (hidden 6144, 64 MLA heads, full indexer) on one 80 GB GPU:
    # 1 dense + 2 MoE layers with 8 routed experts, a 32K vocabulary.
    "proxy-h100": GLM52_744B.replace(
        name="proxy-h100",
        vocab_size=32768,
        num_layers=3,
        num_dense_layers=1,
        index_pattern="FFS",
        num_experts=8,
        moe_topk=2,
        max_position_embeddings=131072,
    ),
}


def get_model_config(name: str) -> ModelConfig:
    """A copy of the named flavor (nested values too), so no caller can change the registry."""
    try:
        return copy.deepcopy(MODELS[name])
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}."
        ) from None


def needs_topk_relay(pattern: str, chunk_starts) -> bool:
    """Whether the IndexShare top-k must travel between pipeline chunks: some chunk other than
    the first begins with a shared ("S") layer, whose indices come from a layer it lacks."""
    return any(start > 0 and pattern[start] == "S" for start in chunk_starts)


__all__ = [
    "ConfigError",
    "ModelConfig",
    "MODELS",
    "GLM52_744B",
    "get_model_config",
    "closest",
    "field_help",
    "index_share_pattern",
    "needs_topk_relay",
]
