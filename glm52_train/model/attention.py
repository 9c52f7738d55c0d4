"""MLA self-attention wired to DSA core attention.

Megatron-Core's `MLASelfAttention` owns the latent projections, norms and RoPE; this subclass
keeps them and replaces `forward`: MLA runs in MQA form on the latent, as DeepSeek-V3.2 trains
it. The key/value up-projection is absorbed into the query (q_nope . W_UK) and the output
(o . W_UV), so every head attends to the same 576-channel keys [c_kv (512), k_rope (64)] whose
first 512 channels are the values. The DSA core attention (dsa.py) gets those plus what the
indexer needs (the layer input, the compressed query, the RoPE frequencies) and the top-k of
the previous full layer, and returns its own top-k, which the layer passes on (IndexShare).

The dense path (`dsa.mode: dense`, the warm-up's main attention, and sparse training wherever
top-k covers every visible key: `DSACoreAttention.dense_plan`) runs MLA per head instead,
through SDPA (kernels/dense.py): no absorption into the query, the up-projection of the keys
and values applied by the core attention after the latent is gathered across CP ranks, and the
output already per head.

Departure from Megatron-Core: on the absorbed path its per-head keys and values (`get_query_key_value_tensors`)
are never formed; `tests/test_model.py` checks the absorbed form against them. Selective
recomputation of `mla_up_proj` (Megatron-Core's `recompute_up_proj`) is honoured the way
Megatron-Core does it, on our absorbed form: the up-projection, RoPE and absorption run under
an output-discarding checkpoint from the normalised latents, their outputs (the absorbed query
and the shared latent key/value) are freed once the core attention has saved them, and are
rebuilt when the attention output's gradient arrives.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings import apply_rotary_pos_emb
from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class GLMSelfAttention(MLASelfAttention):
    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        # The local replicated Linear (see spec.py) keeps torch's default init; give it the
        # model's, from the generator every tensor-parallel rank shares, so replicas agree.
        if config.perform_initialization:
            for linear in (getattr(self, "linear_q_down_proj", None), self.linear_kv_down_proj):
                if isinstance(linear, ReplicatedLinear):
                    config.init_method(linear.weight.data)

    def rope_frequencies(self, hidden_states, packed_seq_params=None):
        """The frequencies MLA applies to its rope channels, for the indexer to apply to its own."""
        seq_len = self.rotary_pos_emb.get_rotary_seq_len(
            None, None, hidden_states, self.config, packed_seq_params
        )
        if self.config.rope_type == "rope":
            return self.rotary_pos_emb(seq_len, packed_seq=False), 1.0
        return self.rotary_pos_emb(seq_len, packed_seq=False)

    def rope_table(self, layout):
        """RoPE frequencies (and YaRN mscale) at each local token's position."""
        table = self.rotary_pos_emb(int(layout.rope_pos.max()) + 1, packed_seq=True)
        table, mscale = table if isinstance(table, tuple) else (table, 1.0)
        return table.index_select(0, layout.rope_pos.to(table.device)), mscale

    def latent_qkv(self, hidden_states, layout=None, per_head: bool = False):
        """The absorbed form: q [s, b, n, kv_lora + rope], kv [s, b, kv_lora + rope] (shared
        by the heads; its first kv_lora channels are the values), the normalised compressed
        query, and W_UV [n, v_head_dim, kv_lora] for the output. Sequence-parallel inputs are
        gathered (their backward reduce-scatters). With `per_head` (the dense path), q is
        per head instead, [s, b, n, qk_nope + rope] (RoPE applied, no absorption), and the
        last value is the whole kv up-projection [n, qk_nope + v_head_dim, kv_lora], which
        the core attention applies to the (CP-gathered) latent keys."""
        cfg = self.config
        n = self.num_attention_heads_per_partition
        q_compressed, _ = self.linear_q_down_proj(hidden_states)
        q_compressed = self.q_layernorm(q_compressed)
        kv, _ = self.linear_kv_down_proj(hidden_states)
        c_kv, k_rope = torch.split(kv, [cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
        c_kv = self.kv_layernorm(c_kv)
        tp = self.pg_collection.tp
        if cfg.sequence_parallel and tp.size() > 1:
            c_kv = gather_from_sequence_parallel_region(c_kv, group=tp)
            k_rope = gather_from_sequence_parallel_region(k_rope, group=tp)
        if layout is not None:
            freqs, mscale = self.rope_table(layout)
        else:
            freqs, mscale = self.rope_frequencies(hidden_states)
            freqs = freqs[: q_compressed.shape[0] * (tp.size() if cfg.sequence_parallel else 1)]

        def project(q_compressed, c_kv, k_rope):
            q, _ = self.linear_q_up_proj(q_compressed)
            q = q.view(*q.shape[:-1], n, self.q_head_dim)
            q_nope, q_rope = torch.split(q, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
            q_rope = apply_rotary_pos_emb(q_rope, freqs, config=cfg, mscale=mscale)
            k_rot = apply_rotary_pos_emb(k_rope.unsqueeze(2), freqs, config=cfg, mscale=mscale).squeeze(2)
            if not per_head:  # absorbed: q_nope into the latent through kv_up's key half
                w = self.linear_kv_up_proj.weight.view(n, cfg.qk_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
                q_nope = torch.einsum("sbhd,hdc->sbhc", q_nope, w[:, : cfg.qk_head_dim])
            return torch.cat([q_nope, q_rope], dim=-1), torch.cat([c_kv, k_rot], dim=-1)

        if self.recompute_up_proj and self.training and torch.is_grad_enabled():
            self.qkv_up_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=cfg.fp8 or getattr(cfg, "fp4", None))
            query, key_value = self.qkv_up_checkpoint.checkpoint(project, q_compressed, c_kv, k_rope)
        else:
            query, key_value = project(q_compressed, c_kv, k_rope)
        w = self.linear_kv_up_proj.weight.view(n, cfg.qk_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return query, key_value, q_compressed, (w if per_head else w[:, cfg.qk_head_dim :]), freqs, mscale

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        topk_indices=None,
        packed_seq_params=None,
        **unused,
    ):
        """hidden_states: [s, b, hidden]. Returns (output, bias, top-k indices)."""
        layout = getattr(packed_seq_params, "token_layout", None)
        tp = self.pg_collection.tp
        local = hidden_states.shape[0] * (tp.size() if self.config.sequence_parallel else 1)
        runs = self.core_attention.dense_plan(local, layout)  # None: the sparse (absorbed) path
        query, key_value, q_compressed, w, freqs, mscale = self.latent_qkv(hidden_states, layout, runs is not None)
        out_latent, topk_indices = self.core_attention(
            query, key_value, x=hidden_states, qr=q_compressed, freqs=freqs, mscale=mscale,
            topk_indices=topk_indices, layout=layout, dense_runs=runs, kv_up=w if runs is not None else None,
        )
        if self.qkv_up_checkpoint is not None:  # mla_up_proj: free query / key_value until backward
            self.qkv_up_checkpoint.discard_output_and_register_recompute(out_latent)
            self.qkv_up_checkpoint = None
        # the dense path returns per-head values; the sparse one latent values: up-project (W_UV)
        out = out_latent if runs is not None else torch.einsum("sbhc,hdc->sbhd", out_latent, w)
        output, bias = self.linear_proj(out.reshape(*out.shape[:2], -1))
        return output, bias, topk_indices
