"""Build the GLM-5.2 Megatron-Core model from a `ModelConfig`.

`transformer_config()` turns the architecture (and the run's parallel and precision choices)
into Megatron-Core's `MLATransformerConfig` subclass; `build_model()` makes the `GPTModel` of one
pipeline stage from the project's module specs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig

from glm52_train.config import ModelConfig
from glm52_train.layout import virtual_stages
from glm52_train.model import topk_relay
from glm52_train.model.mtp import SharedMTPBlock
from glm52_train.model.sequence import GLMSequenceParams, TokenLayout
from glm52_train.model.spec import glm52_block_spec, glm52_mtp_block_spec
from glm52_train.run_config import RunConfig

@dataclass
class GLMTransformerConfig(MLATransformerConfig):
    """Megatron-Core's MLA config plus what GLM-5.2 adds: DSA and IndexShare, the latent-norm
    epsilon, and MTP layers shared across prediction steps."""

    dsa_index_heads: int = 32
    dsa_index_head_dim: int = 128
    dsa_index_topk: int = 2048
    dsa_index_pattern: str = ""
    dsa_index_norm_epsilon: float = 1e-6
    dsa_mode: str = "sparse"
    dsa_loss_coeff: float = 1.0
    dsa_backend: str = "auto"
    dsa_deterministic: bool = False  # run.dsa.deterministic: the atomics-free sparse attention backward
    dsa_indexer_loss: str = "forward"  # run.dsa.indexer_loss: where the sparse layers' indexer KL is computed
    latent_layernorm_epsilon: float = 1e-6
    mtp_distinct_layers: int = 0
    packed_sequences: bool = False
    fp8_blockwise: bool = False  # train.fp8=blockwise: the project's FP8 linears (spec.py)
    fp8_dgrad: str = "fp8"  # train.fp8_dgrad: the FP8 linears' input-gradient GEMM, fp8 or bf16
    fp8_wgrad: str = "fp8"  # train.fp8_wgrad: the FP8 linears' weight-gradient GEMM, fp8 or bf16


def transformer_config(model: ModelConfig, run: RunConfig | None = None, *, cpu_init: bool = True,
                       init: bool = True) -> GLMTransformerConfig:
    """The Megatron-Core config of `model` under the run config `run` (its parallel layout,
    precision, DSA, MoE, MTP and recomputation choices; defaults when None). `cpu_init`
    initialises weights on the CPU (identical under every layout); `init=False` skips
    initialisation (weights about to be loaded)."""
    model.validate()
    run = run or RunConfig()
    p, t = run.parallel, run.train
    bf16, use_te = run.use_bf16(), run.use_transformer_engine()
    params_dtype = torch.bfloat16 if bf16 else torch.float32
    moe = model.num_moe_layers > 0
    rope = dict(rope_type="rope")
    if model.rope_scaling and model.rope_scaling.get("rope_type", model.rope_scaling.get("type")) == "yarn":
        rs = model.rope_scaling
        rope = dict(
            rope_type="yarn",
            rotary_scaling_factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)),
            mscale=float(rs.get("mscale", 1.0)),
            mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
        )
    kwargs = dict(
        # architecture
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.dense_ffn_size,
        num_attention_heads=model.num_heads,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_nope_dim,
        qk_pos_emb_head_dim=model.qk_rope_dim,
        v_head_dim=model.v_head_dim,
        kv_channels=model.qk_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        latent_layernorm_epsilon=model.latent_norm_eps,
        qk_layernorm=True,
        rotary_base=model.rope_theta,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        dsa_index_heads=model.index_heads,
        dsa_index_head_dim=model.index_head_dim,
        dsa_index_topk=model.index_topk,
        dsa_index_pattern=model.layer_index_pattern,
        dsa_mode=run.dsa.mode,
        dsa_loss_coeff=run.dsa.loss_coeff,
        dsa_backend=run.dsa.backend,
        dsa_deterministic=run.dsa.deterministic,
        dsa_indexer_loss=run.dsa.indexer_loss,
        mtp_num_layers=model.mtp_steps if model.mtp_layers else None,
        mtp_distinct_layers=model.mtp_layers,
        mtp_loss_scaling_factor=run.mtp.loss_scale,
        # Losses are sums over tokens, divided once by the global token count (all
        # microbatches, data- and context-parallel ranks): the same mean under every layout.
        calculate_per_token_loss=True,
        packed_sequences=run.data.packed,
        # parallelism
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=virtual_stages(p),
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sp,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        num_layers_in_last_pipeline_stage=p.last_stage_layers,
        pipeline_model_parallel_layout=p.layout,
        # precision and kernels
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        fp8=t.fp8.removeprefix("te-") if t.fp8 and t.fp8.startswith("te-") else None,  # TE's recipes
        fp8_blockwise=t.fp8 == "blockwise",
        fp8_dgrad=t.fp8_dgrad,
        fp8_wgrad=t.fp8_wgrad,
        use_cpu_initialization=cpu_init,
        perform_initialization=init,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **rope,
    )
    if t.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif t.recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=list(t.recompute_modules))
    if moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_layer_freq=[0] * model.num_dense_layers + [1] * model.num_moe_layers,
            moe_ffn_hidden_size=model.moe_ffn_size,
            moe_shared_expert_intermediate_size=model.moe_ffn_size * model.num_shared_experts
            if model.num_shared_experts
            else None,
            moe_router_topk=model.moe_topk,
            moe_router_score_function="sigmoid",
            moe_router_pre_softmax=False,
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=run.moe.bias_update_rate,
            moe_router_topk_scaling_factor=model.routed_scaling_factor,
            moe_router_num_groups=model.moe_groups if model.moe_groups > 1 else None,
            moe_router_group_topk=model.moe_topk_groups if model.moe_groups > 1 else None,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss" if run.moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=run.moe.aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=use_te,
            moe_permute_fusion=False,
        )
    return GLMTransformerConfig(**kwargs)


class GLM52Model(GPTModel):
    """Megatron-Core's GPTModel built from GLM-5.2 specs. Three changes: the MTP block applies
    its layers cyclically over `mtp_num_layers` prediction steps (`SharedMTPBlock`); a forward
    without labels (inference, evaluation of logits) skips the MTP heads, which Megatron-Core
    0.16.1 would otherwise run and then fail on for lack of labels; and under pipeline
    parallelism the top-k indices of IndexShare cross stage boundaries with the activations
    (`topk_relay`)."""

    def __init__(self, *args, **kwargs) -> None:
        with _builds_mtp_block(SharedMTPBlock):
            super().__init__(*args, **kwargs)
        self.relay_seq_length: int | None = None  # local queries per sample; set by the trainer
        self._incoming_topk = None

    # ---- IndexShare across pipeline stages -----------------------------------------------
    def _relay_rows(self) -> int:
        if not self.relay_seq_length:
            return 0
        return topk_relay.relay_rows(self.config, self.relay_seq_length)

    def _sp_group(self):
        if self.config.sequence_parallel and self.pg_collection.tp.size() > 1:
            return self.pg_collection.tp
        return None

    def set_input_tensor(self, input_tensor) -> None:
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        tensor = input_tensor[0]
        self._incoming_topk = None
        rows = self._relay_rows()
        if rows and tensor is not None and not self.pre_process:
            group = self._sp_group()
            local = rows // (group.size() if group else 1)
            tensor, bits = tensor[:-local], tensor[-local:]
            if group is not None:
                parts = [torch.empty_like(bits) for _ in range(group.size())]
                torch.distributed.all_gather(parts, bits.detach().contiguous(), group=group)
                bits = torch.cat(parts, dim=0)
            self._incoming_topk = topk_relay.decode(bits, self.relay_seq_length, self.config.dsa_index_topk)
        super().set_input_tensor([tensor])

    def forward(self, input_ids, position_ids, attention_mask, *args, extra_block_kwargs=None,
                packed_seq_params=None, **kwargs):
        if self._incoming_topk is not None:
            extra_block_kwargs = {**(extra_block_kwargs or {}), "context": self._incoming_topk}
        if packed_seq_params is None and position_ids is not None:
            layout = self.token_layout(position_ids)
            if layout is not None:
                packed_seq_params = GLMSequenceParams(qkv_format="sbhd", token_layout=layout)
        output = super().forward(input_ids, position_ids, attention_mask, *args,
                                 extra_block_kwargs=extra_block_kwargs,
                                 packed_seq_params=packed_seq_params, **kwargs)
        rows = self._relay_rows()
        if rows and not self.post_process:
            topk = self.decoder.layers[-1].last_topk if len(self.decoder.layers) else self._incoming_topk
            if topk is None:  # the dense shortcut selected nothing: send "no index" (-1)
                topk = torch.full((output.shape[1], self.relay_seq_length, self.config.dsa_index_topk), -1,
                                  dtype=torch.int32, device=output.device)
            bits = topk_relay.encode(topk, rows, self.config.hidden_size, output.dtype)
            group = self._sp_group()
            if group is not None:
                bits = bits.chunk(group.size(), dim=0)[group.rank()]
            output = torch.cat([output, bits], dim=0)
        return output

    def _postprocess(self, hidden_states, *args, labels=None, **kwargs):
        # Megatron-Core rolls the MTP labels with packed_seq_params read as THD boundaries; ours
        # carry a token layout (sbhd), which goes to the MTP block as its own argument instead.
        layout = getattr(kwargs.get("packed_seq_params"), "token_layout", None)
        kwargs.update(packed_seq_params=None, extra_block_kwargs={"token_layout": layout})
        if labels is None and self.post_process:
            return self._logits(hidden_states, kwargs.get("runtime_gather_output"))
        return super()._postprocess(hidden_states, *args, labels=labels, **kwargs)

    def _logits(self, hidden_states, runtime_gather_output=None):
        """Logits [b, s, vocab] without the MTP heads, which need labels (inference, evaluation
        of logits, `glm52 verify-hf`); Megatron-Core 0.16.1 would run them and fail."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()

    def token_layout(self, position_ids):
        """Where this rank's tokens sit in the sample, when context parallelism or packed
        documents make it matter (see sequence.py); None otherwise."""
        cp = self.pg_collection.cp
        packed = self.config.packed_sequences
        if (cp is None or cp.size() == 1) and not packed:
            return None
        return TokenLayout.build(
            position_ids.shape[1], position_ids.device, cp if cp.size() > 1 else None,
            position_ids if packed else None,
        )


@contextlib.contextmanager
def _builds_mtp_block(cls):
    """GPTModel constructs its MTP block by the name `MultiTokenPredictionBlock`; during our
    model's construction that name is `cls` (same parameters, same initialisation order)."""
    from megatron.core.models.gpt import gpt_model

    original = gpt_model.MultiTokenPredictionBlock
    gpt_model.MultiTokenPredictionBlock = cls
    try:
        yield
    finally:
        gpt_model.MultiTokenPredictionBlock = original


def build_model(
    model: ModelConfig,
    run: RunConfig | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: GLMTransformerConfig | None = None,
    cpu_init: bool = True,
    init: bool = True,
) -> GLM52Model:
    """The GLM-5.2 model of this pipeline stage under the run config `run` (defaults when
    None; `config` when already built from it). Megatron-Core's parallel state must be
    initialised (`glm52_train.parallel.initialize`, which installs `compat` first)."""
    run = run or RunConfig()
    config = config or transformer_config(model, run, cpu_init=cpu_init, init=init)
    use_te = run.use_transformer_engine()
    block = glm52_block_spec(config, use_te=use_te, vp_stage=vp_stage)
    mtp = glm52_mtp_block_spec(config, use_te=use_te) if post_process else None
    return GLM52Model(
        config=config,
        transformer_layer_spec=block,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
    )
