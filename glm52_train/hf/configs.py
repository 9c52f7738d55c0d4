"""ModelConfig <-> HF `glm_moe_dsa` config.json."""

from __future__ import annotations

from typing import Any

from glm52_train.config import ConfigError, ModelConfig, index_share_pattern


def to_hf_config(model: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """The config.json of `model` as transformers' `GlmMoeDsaConfig` reads it."""
    model.validate()
    pattern = model.layer_index_pattern
    rope: dict[str, Any] = {"rope_theta": float(model.rope_theta), "rope_type": "default"}
    if model.rope_scaling:
        rope = {**{k: v for k, v in model.rope_scaling.items() if k != "type"},
                "rope_theta": float(model.rope_theta)}
        rope.setdefault("rope_type", model.rope_scaling.get("type", "yarn"))
    return {
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.dense_ffn_size,
        "moe_intermediate_size": model.moe_ffn_size,
        "num_hidden_layers": model.num_layers,
        "first_k_dense_replace": model.num_dense_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_heads,
        "q_lora_rank": model.q_lora_rank,
        "kv_lora_rank": model.kv_lora_rank,
        "qk_nope_head_dim": model.qk_nope_dim,
        "qk_rope_head_dim": model.qk_rope_dim,
        "v_head_dim": model.v_head_dim,
        "n_routed_experts": model.num_experts,
        "num_experts_per_tok": model.moe_topk,
        "n_shared_experts": model.num_shared_experts,
        "routed_scaling_factor": model.routed_scaling_factor,
        "n_group": model.moe_groups,
        "topk_group": model.moe_topk_groups,
        "norm_topk_prob": True,
        "index_n_heads": model.index_heads,
        "index_head_dim": model.index_head_dim,
        "index_topk": model.index_topk,
        "indexer_types": ["full" if c == "F" else "shared" for c in pattern],
        "num_nextn_predict_layers": model.mtp_layers,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "initializer_range": model.init_std,
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def from_hf_config(cfg: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A ModelConfig from a `glm_moe_dsa` config.json (as a dict). Unsupported variants (no
    query low-rank projection, non-SiLU activations, attention biases, non-prefix dense layers)
    raise ConfigError."""
    if cfg.get("model_type") not in (None, "glm_moe_dsa"):
        raise ConfigError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'glm_moe_dsa'.")
    n = int(cfg.get("num_hidden_layers", 78))
    first_dense = int(cfg.get("first_k_dense_replace", 3))
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is not None:
        first_dense = mlp_types.count("dense")
        if mlp_types != ["dense"] * first_dense + ["sparse"] * (n - first_dense):
            raise ConfigError("mlp_layer_types must be dense layers followed by MoE layers.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (GLM-5.2 uses silu).")
    if cfg.get("attention_bias", False) or cfg.get("mlp_bias", False):
        raise ConfigError("attention or MLP biases are not part of GLM-5.2 and are not supported.")
    if not cfg.get("norm_topk_prob", True):
        raise ConfigError("norm_topk_prob=false is not supported (GLM-5.2 renormalises top-k).")
    if cfg.get("q_lora_rank") is None:
        raise ConfigError("q_lora_rank is null; GLM-5.2's indexer needs the compressed query.")
    heads = int(cfg.get("num_attention_heads", 64))
    if int(cfg.get("num_key_value_heads", heads)) != heads:
        raise ConfigError("num_key_value_heads must equal num_attention_heads for MLA.")

    if cfg.get("indexer_types"):
        types = cfg["indexer_types"]
        pattern = "".join({"full": "F", "shared": "S"}[t] for t in types)
    elif cfg.get("index_topk_pattern"):
        pattern = cfg["index_topk_pattern"]
    else:
        pattern = index_share_pattern(n, int(cfg.get("index_topk_freq", 1)),
                                      int(cfg.get("index_skip_topk_offset", 2)))

    rope = dict(cfg.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

    return ModelConfig(
        name=name,
        vocab_size=int(cfg.get("vocab_size", 154880)),
        hidden_size=int(cfg.get("hidden_size", 6144)),
        num_layers=n,
        num_dense_layers=first_dense,
        dense_ffn_size=int(cfg.get("intermediate_size", 12288)),
        num_heads=heads,
        q_lora_rank=int(cfg["q_lora_rank"]),
        kv_lora_rank=int(cfg.get("kv_lora_rank", 512)),
        qk_nope_dim=int(cfg.get("qk_nope_head_dim", 192)),
        qk_rope_dim=int(cfg.get("qk_rope_head_dim", 64)),
        v_head_dim=int(cfg.get("v_head_dim", 256)),
        index_heads=int(cfg.get("index_n_heads", 32)),
        index_head_dim=int(cfg.get("index_head_dim", 128)),
        index_topk=int(cfg.get("index_topk", 2048)),
        index_pattern=pattern,
        num_experts=int(cfg.get("n_routed_experts", 256)),
        moe_topk=int(cfg.get("num_experts_per_tok", 8)),
        moe_ffn_size=int(cfg.get("moe_intermediate_size", 2048)),
        num_shared_experts=int(cfg.get("n_shared_experts", 1)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)),
        moe_groups=int(cfg.get("n_group", 1)),
        moe_topk_groups=int(cfg.get("topk_group", 1)),
        mtp_layers=int(cfg.get("num_nextn_predict_layers", 0) or 0),
        mtp_steps=int(cfg.get("num_nextn_predict_layers", 0) or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 202752)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    ).validate()
