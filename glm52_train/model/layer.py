"""The GLM-5.2 transformer layer: Megatron-Core's `TransformerLayer` with IndexShare.

`TransformerBlock` threads a per-layer `context` value from each layer to the next (it exists
for cross-attention, which a decoder-only model does not use) and saves it with the layer inputs
under activation recomputation. A GLM-5.2 layer takes the previous full layer's top-k indices
from `context` and returns its own (or the ones it reused) in its place.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer


class GLMTransformerLayer(TransformerLayer):
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        packed_seq_params=None,
        padding_mask=None,
        inference_context=None,
        **unused,
    ):
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        attn_out, attn_bias, topk_indices = self.self_attention(
            normed,
            attention_mask=attention_mask,
            topk_indices=context,
            packed_seq_params=packed_seq_params,
        )
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                (attn_out, attn_bias), residual, self.hidden_dropout
            )
        output = self._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)
        self.last_topk = topk_indices  # read by the pipeline relay after the stage's last layer
        return output, topk_indices
