"""Multi-token prediction with weights shared across prediction depths.

GLM-5 trains its single MTP layer over three prediction steps with shared weights. Megatron-Core
0.16.1 builds one distinct layer per step (`mtp_num_layers`). `SharedMTPBlock` keeps
`mtp_num_layers` as the number of *steps* (so the loss bookkeeping in `GPTModel` is unchanged)
and applies its `len(self.layers)` distinct layers cyclically: step i runs layer i mod L.

Under context parallelism or packed documents the MTP layers' attention needs the sample's
`TokenLayout` like the decoder's. Megatron-Core reads any `packed_seq_params` as THD
sequence boundaries when it rolls tokens, which ours (sbhd, a layout) are not; so the block
takes the layout as an argument (`token_layout`, given by `GLM52Model._postprocess`), hands
it to each layer's attention in `packed_seq_params`, and `GLMMTPLayer` rolls the tokens
without it (plain rolls, across context-parallel ranks, as for an unpacked sample).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionLayer,
    get_mtp_layer_offset,
)

from glm52_train.model.sequence import GLMSequenceParams


class GLMMTPLayer(MultiTokenPredictionLayer):
    def _get_embeddings(self, input_ids, position_ids, embedding, hidden_states, packed_seq_params=None):
        if isinstance(packed_seq_params, GLMSequenceParams):
            packed_seq_params = None  # a token layout for attention, not THD boundaries
        return super()._get_embeddings(input_ids, position_ids, embedding, hidden_states, packed_seq_params)


class SharedMTPBlock(MultiTokenPredictionBlock):
    def forward(
        self,
        input_ids,
        position_ids,
        hidden_states,
        attention_mask,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        attention_bias=None,
        inference_params=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        extra_block_kwargs=None,
        embedding=None,
        token_layout=None,
    ):
        if token_layout is not None:
            packed_seq_params = GLMSequenceParams(qkv_format="sbhd", token_layout=token_layout)
        offset = get_mtp_layer_offset(self.config, self.vp_stage)
        outputs = list(torch.chunk(hidden_states, 1 + offset, dim=0))
        hidden_states = outputs[offset]
        for step in range(self.config.mtp_num_layers):
            layer = self.layers[step % len(self.layers)]
            hidden_states, input_ids, position_ids = layer(
                input_ids=input_ids,
                position_ids=position_ids,
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                inference_params=inference_params,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
                embedding=embedding,
                **(extra_block_kwargs or {}),
            )
            outputs.append(hidden_states)
        return torch.cat(outputs, dim=0)
