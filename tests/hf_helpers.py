"""Random tiny `glm_moe_dsa` models from transformers, written as HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def hf_config(**overrides):
    from transformers import GlmMoeDsaConfig

    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, index_topk=8, index_head_dim=16,
        index_n_heads=8, first_k_dense_replace=1, max_position_embeddings=512,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    if "num_key_value_heads" not in overrides and "num_attention_heads" in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    base.update(overrides)
    return GlmMoeDsaConfig(**base)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Weights large enough that logits are O(1): random matrices, norms near 1, random
    router correction biases (zero at init in transformers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def make_hf_model(config, seed: int = 0):
    from transformers import GlmMoeDsaForCausalLM

    torch.manual_seed(seed)
    model = GlmMoeDsaForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def mtp_tensors(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a DeepSeek-V3-style MTP layer at index num_hidden_layers (transformers does not
    model it; the released GLM-5 checkpoint carries it)."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    n = config.num_hidden_layers
    fields = {k: v for k, v in config.to_dict().items() if k not in ("layer_types",)}
    one_layer = GlmMoeDsaConfig(**{**fields, "num_hidden_layers": n + 1,
                                   "indexer_types": list(config.indexer_types) + ["full"],
                                   "mlp_layer_types": list(config.mlp_layer_types) + ["sparse"]})
    donor = GlmMoeDsaForCausalLM(one_layer)
    randomize_(donor, seed + 1)
    sd = donor.state_dict()
    prefix = f"model.layers.{n}."
    out = {k: v.clone() for k, v in sd.items() if k.startswith(prefix)}
    # transformers fuses experts in memory; the checkpoint format has them per expert
    for key in [k for k in out if k.endswith("mlp.experts.gate_up_proj")]:
        fused = out.pop(key)
        for e in range(fused.shape[0]):
            gate, up = fused[e].chunk(2, dim=0)
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.clone()
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.clone()
    for key in [k for k in out if k.endswith("mlp.experts.down_proj")]:
        fused = out.pop(key)
        for e in range(fused.shape[0]):
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = fused[e].clone()
    g = torch.Generator().manual_seed(seed + 2)
    h = config.hidden_size
    out[prefix + "enorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    out[prefix + "hnorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    out[prefix + "eh_proj.weight"] = 0.08 * torch.randn(h, 2 * h, generator=g)
    out[prefix + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return out


def save_hf_folder(model, folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """save_pretrained in float32, plus `extra` tensors in their own shard (MTP)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if extra:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_nextn_predict_layers"] = 1
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / "mtp.safetensors"))
        index_file = folder / "model.safetensors.index.json"
        if index_file.exists():
            index = json.loads(index_file.read_text())
        else:
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
        index["weight_map"].update({k: "mtp.safetensors" for k in extra})
        index_file.write_text(json.dumps(index, indent=2))
    return folder
