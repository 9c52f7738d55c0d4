"""MLA self-attention wired to DSA core attention.

Megatron-Core's `MLASelfAttention` computes the latent projections, RoPE and the per-head
query/key/value; this subclass keeps all of that and changes one method, `forward`, to hand the
DSA core attention what it needs beyond q/k/v: the layer input, the compressed query (the
indexer's input), the RoPE frequencies, and the top-k indices of the previous full layer. It
returns those indices alongside the output so the layer can pass them on (IndexShare).
"""

from __future__ import annotations

from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
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

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        topk_indices=None,
        packed_seq_params=None,
        **unused,
    ):
        """hidden_states: [s, b, hidden]. Returns (output, bias, top-k indices)."""
        query, key, value, q_compressed, _ = self.get_query_key_value_tensors(
            hidden_states, None, None, packed_seq_params
        )
        freqs, mscale = self.rope_frequencies(hidden_states, packed_seq_params)
        core_out, topk_indices = self.core_attention(
            query,
            key,
            value,
            attention_mask,
            x=hidden_states,
            qr=q_compressed,
            freqs=freqs,
            mscale=mscale,
            topk_indices=topk_indices,
            packed_seq_params=packed_seq_params,
        )
        output, bias = self.linear_proj(core_out)
        return output, bias, topk_indices
