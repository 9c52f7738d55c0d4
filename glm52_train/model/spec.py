"""Module specs for GLM-5.2: the one place that chooses which implementation each piece uses.

`glm52_layer_spec(config, moe=..., use_te=...)` returns the ModuleSpec of one decoder layer.
With Transformer Engine (`use_te=True`) linears and norms are TE's (FP8 follows
`config.fp8`, the `train.fp8: te-*` recipes); without it they are Megatron-Core's local layers,
and with `config.fp8_blockwise` (`train.fp8: blockwise`) the column/row-parallel linears and
the experts' linears are the project's blockwise FP8 linears (`fp8.py`; the rest stays in the
run's precision, see there why). Attention core is always the
project's DSA core attention, running the kernels of the `DSABackend` named by
`config.dsa_backend` (`torch` references, `triton` kernels, or `auto`: Triton on CUDA tensors);
`config.dsa_deterministic` selects the sparse attention backward without atomics.

Column/row parallelism is decided here and nowhere else:
- q/kv down projections: replicated on every tensor-parallel rank (TE's duplicated `TELinear`,
  or the local `Linear`). Megatron-Core also accepts a column-parallel down projection, but then
  the shared RoPE key's gradient keeps only the local heads' part on the rank that owns those
  columns (its all-gather along the hidden dimension splits the gradient without reducing it):
  training under TP would silently differ from TP=1. The replicated form gathers that key along
  the sequence instead, whose backward sums over ranks;
- q/kv up projections: column-parallel over heads; output projection: row-parallel;
- dense MLP and experts: column-parallel fc1 (gate|up), row-parallel fc2;
- the DSA indexer: replicated (see `dsa.LightningIndexer`).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear

from glm52_train.kernels.backend import DSABackend
from glm52_train.model.attention import GLMSelfAttention
from glm52_train.model.dsa import DSACoreAttention
from glm52_train.model.fp8 import (
    FP8ColumnParallelLinear,
    FP8MoELayer,
    FP8RowParallelLinear,
    FP8SequentialMLP,
)
from glm52_train.model.layer import GLMTransformerLayer
from glm52_train.model.mtp import GLMMTPLayer
from glm52_train.model.norms import LatentRMSNorm, RMSNorm, latent_norm_for


def _backend(use_te: bool, fp8_blockwise: bool = False) -> dict:
    """The classes each role uses, for Transformer Engine or for Megatron-Core's local layers
    (column/row-parallel and expert linears in blockwise FP8 with `fp8_blockwise`)."""
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear,
            TEColumnParallelLinear,
            TELinear,
            TENorm,
            TERowParallelGroupedLinear,
            TERowParallelLinear,
        )
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        return dict(
            down_proj=TELinear,
            column=TEColumnParallelLinear,
            row=TERowParallelLinear,
            norm=TENorm,
            latent_norm=latent_norm_for(TENorm),
            moe_layer=MoELayer,
            experts=ModuleSpec(
                module=TEGroupedMLP,
                submodules=MLPSubmodules(
                    linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear
                ),
            ),
        )
    column, row = (FP8ColumnParallelLinear, FP8RowParallelLinear) if fp8_blockwise else (
        ColumnParallelLinear, RowParallelLinear)
    return dict(
        down_proj=ReplicatedLinear,
        column=column,
        row=row,
        norm=RMSNorm,
        latent_norm=LatentRMSNorm,
        moe_layer=FP8MoELayer if fp8_blockwise else MoELayer,
        experts=ModuleSpec(
            module=FP8SequentialMLP if fp8_blockwise else SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
        ),
    )


def glm52_layer_spec(config, *, moe: bool, use_te: bool) -> ModuleSpec:
    """ModuleSpec of one GLM-5.2 decoder layer (dense FFN or MoE with a shared expert)."""
    b = _backend(use_te, config.fp8_blockwise)
    attention = ModuleSpec(
        module=GLMSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=b["column"],
            linear_q_down_proj=b["down_proj"],
            linear_q_up_proj=b["column"],
            linear_kv_down_proj=b["down_proj"],
            linear_kv_up_proj=b["column"],
            core_attention=ModuleSpec(
                module=DSACoreAttention,
                params={"backend": DSABackend(config.dsa_backend, config.dsa_deterministic)},
            ),
            linear_proj=b["row"],
            q_layernorm=b["latent_norm"],
            kv_layernorm=b["latent_norm"],
        ),
    )
    if moe:
        mlp = ModuleSpec(
            module=b["moe_layer"],
            submodules=MoESubmodules(
                experts=b["experts"],
                shared_experts=ModuleSpec(
                    module=SharedExpertMLP,
                    submodules=MLPSubmodules(linear_fc1=b["column"], linear_fc2=b["row"]),
                ),
            ),
        )
    else:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=b["column"], linear_fc2=b["row"]))
    return ModuleSpec(
        module=GLMTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=b["norm"],
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=b["norm"],
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def glm52_block_spec(config, *, use_te: bool, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """The decoder layers this pipeline stage (and virtual stage) builds."""
    moe_flags = config.moe_layer_freq
    specs = [glm52_layer_spec(config, moe=bool(flag), use_te=use_te) for flag in moe_flags]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset : offset + count], layer_norm=_backend(use_te, config.fp8_blockwise)["norm"]
    )


def glm52_mtp_block_spec(config, *, use_te: bool) -> MultiTokenPredictionBlockSubmodules | None:
    """The MTP block: `config.mtp_distinct_layers` MoE layers with their embedding/hidden norms
    and projection (DeepSeek-V3 layout)."""
    if not config.mtp_num_layers:
        return None
    b = _backend(use_te, config.fp8_blockwise)
    layer = ModuleSpec(
        module=GLMMTPLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=b["norm"],
            hnorm=b["norm"],
            eh_proj=b["column"],
            transformer_layer=glm52_layer_spec(config, moe=config.num_moe_experts is not None, use_te=use_te),
            layer_norm=b["norm"],
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * config.mtp_distinct_layers)


__all__ = ["glm52_layer_spec", "glm52_block_spec", "glm52_mtp_block_spec"]
