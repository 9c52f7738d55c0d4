"""DeepSeek Sparse Attention as Megatron-Core core attention, with IndexShare.

`DSACoreAttention` replaces MLA's core attention. A *full* layer owns a lightning indexer: it
scores every earlier key, keeps the top-k per query and attends only to those. A *shared* layer
(IndexShare, GLM-5.2) owns no indexer and attends to the top-k handed to it by the previous full
layer; the indices travel between layers in Megatron-Core's per-layer `context` slot (see
`layer.py`), which also carries them through activation recomputation.

Training modes (`config.dsa_mode`), GLM-5's stages in order:
- ``dense``: GLM-5's pre-DSA pretraining: dense causal attention, no indexer work at all (no
  scores, top-k or KL); the indexer weights stay in the model and its checkpoints, unused.
- ``warmup``: main attention stays dense; the indexer learns from the KL over all visible keys
  (the dense warm-up stage). Freezing everything but the indexer is the optimizer's job
  (`train.freeze` in the run config).
- ``sparse``: attention over the selected keys; the indexer learns from the KL divergence to the
  head-summed main attention on the selected set; the indexer's inputs are detached, so its loss
  does not reach the rest of the model (DeepSeek-V3.2, sparse training stage). Where every
  query sees at most top-k keys (sequence, or every packed document, at most top-k long), top-k
  would select them all: the layer then takes the dense path exactly (no top-k selection; the KL
  over all visible keys, which is the sparse KL there).

Where the sparse KL is computed (`config.dsa_indexer_loss`, run config `dsa.indexer_loss`):
- ``forward`` (the default): in the forward, by a kernel that gathers every selected kv row a
  second time to recompute the head-averaged attention probabilities (under tensor
  parallelism after all-gathering every head's query);
- ``dq_pass``: in the attention's backward (`DSABackend.sparse_mla_indexer_kl`): the dq pass
  writes the probabilities summed over this rank's heads per top-k slot (4 * topk bytes per
  query, kept until the KL), an all-reduce over tensor parallelism sums the heads, and the KL
  and the indexer's gradients come from them, weighted exactly as ``forward``'s; the value is
  logged from the backward (once per micro-batch, recomputation included). Predicted ~30% of
  the forward KL's time (docs/kernels.md, section 4), unmeasured on a GPU, hence not the
  default.

Sparse attention runs in MLA's absorbed form (MQA on the 576-channel latent, see attention.py),
on the kernels of a `DSABackend` (the PyTorch references or the Triton kernels), chosen in the
layer spec (spec.py); dense attention runs per head through SDPA (kernels/dense.py). Where
the local tokens sit in the sample (context parallelism, packed documents) comes in as a
`TokenLayout`; None means one plain causal sequence.

Departures from the HF reference: the reference computes the indexer under `no_grad` (it is an
inference implementation); here it is trained. The attention result is identical: the HF model
masks with causal & top-k, which is what attending over the selected keys computes
(`tests/test_hf_parity.py`).
"""

from __future__ import annotations

import torch
from torch.autograd.profiler import record_function
from megatron.core.models.common.embeddings import apply_rotary_pos_emb
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

from glm52_train.kernels import dense
from glm52_train.kernels.backend import DSABackend


class DSALossScaler(torch.autograd.Function):
    """Attaches an auxiliary loss to an activation: identity forward; in backward the loss
    receives gradient `scale` (the main loss's scale: 1, or the fp16 loss scale), so it is
    optimised with the LM loss without appearing in it. Like the LM loss, the attached value is a
    sum over this rank's tokens; the gradients are divided by the global token count once."""

    scale: torch.Tensor = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss) * DSALossScaler.scale.to(loss.device)

    @staticmethod
    def set_loss_scale(scale) -> None:
        DSALossScaler.scale = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(())


class DSALossTracker:
    """Per-layer indexer KL values accumulated over the microbatches of one step, for logging."""

    values: dict[int, list[torch.Tensor]] = {}

    @classmethod
    def add(cls, layer_number: int, loss: torch.Tensor) -> None:
        cls.values.setdefault(layer_number, []).append(loss.detach())

    @classmethod
    def pop(cls) -> dict[int, float]:
        """Mean per layer over the accumulated microbatches; clears the tracker."""
        out = {layer: float(torch.stack(v).mean()) for layer, v in cls.values.items() if v}
        cls.values = {}
        return out


class LightningIndexer(MegatronModule):
    """The DSA indexer: 32 small heads scoring (query, key) pairs with ReLU and per-query head
    weights. Its projections are replicated on every tensor-parallel rank (they are small), so
    its inputs are gathered when activations are sequence-parallel."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        h, d = config.dsa_index_heads, config.dsa_index_head_dim
        self.n_heads, self.head_dim, self.rope_dim = h, d, config.qk_pos_emb_head_dim
        self.wq_b = torch.nn.Linear(config.q_lora_rank, h * d, bias=False, dtype=config.params_dtype)
        self.wk = torch.nn.Linear(config.hidden_size, d, bias=False, dtype=config.params_dtype)
        self.k_norm = torch.nn.LayerNorm(d, eps=config.dsa_index_norm_epsilon, dtype=config.params_dtype)
        self.weights_proj = torch.nn.Linear(config.hidden_size, h, bias=False, dtype=config.params_dtype)
        if config.perform_initialization:
            for linear in (self.wq_b, self.wk, self.weights_proj):
                config.init_method(linear.weight)

    def _rope(self, t: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
        # The indexer rotates its *first* rope_dim channels (the main attention its last ones),
        # with the interleaved convention; apply_rotary_pos_emb rotates t[..., :freqs.shape[-1]].
        return apply_rotary_pos_emb(t, freqs, config=self.config, mscale=mscale)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0):
        """x: [s, b, hidden]; qr: [s, b, q_lora_rank] (after q_a_layernorm); freqs: [s, 1, 1, rope].
        Returns q [s, b, H, D], k [s, b, D] and head weights w [s, b, H] (scaled by
        H^-1/2 * D^-1/2, the ReLU commuting with the positive scale)."""
        s, b, _ = x.shape
        q = self.wq_b(qr).view(s, b, self.n_heads, self.head_dim)
        q = self._rope(q, freqs, mscale)
        k = self.k_norm(self.wk(x)).view(s, b, 1, self.head_dim)
        k = self._rope(k, freqs, mscale).view(s, b, self.head_dim)
        w = self.weights_proj(x).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q, k, w


class DSACoreAttention(MegatronModule):
    """Core attention of a GLM-5.2 layer: lightning indexer (full layers), top-k selection,
    sparse attention on the latent, and the indexer's KL loss. Built by MLA with the usual
    core-attention arguments plus `backend` (from the spec); `forward` takes the absorbed
    query, the shared latent keys, the layer input `x`, the compressed query `qr`, the RoPE
    frequencies, the token layout and, on shared layers, the previous full layer's top-k."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: DSABackend | None = None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.backend = backend or DSABackend("auto")
        # (Attention.__init__ builds a core attention without k_channels before MLA rebuilds it.)
        if softmax_scale is None:
            softmax_scale = (k_channels or config.qk_head_dim + config.qk_pos_emb_head_dim) ** -0.5
        self.softmax_scale = softmax_scale
        self.pg_collection = pg_collection
        pattern = config.dsa_index_pattern
        # Layers past the decoder (the MTP layers) always run their own indexer.
        self.is_full = layer_number > len(pattern) or pattern[layer_number - 1] == "F"
        self.indexer = LightningIndexer(config) if self.is_full else None
        self.num_indexer_layers = max(1, pattern.count("F"))

    @property
    def tp_group(self):
        return getattr(self.pg_collection, "tp", None) if self.pg_collection is not None else None

    def _gather_sequence(self, t: torch.Tensor) -> torch.Tensor:
        tp = self.tp_group
        if self.config.sequence_parallel and tp is not None and tp.size() > 1:
            return gather_from_sequence_parallel_region(t, group=tp)
        return t

    def _indexer_inputs(self, x, qr, freqs, mscale):
        xi = self._gather_sequence(x.detach())
        qri = self._gather_sequence(qr.detach())
        return self.indexer(xi, qri, freqs, mscale)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor,
        *,
        x: torch.Tensor,
        qr: torch.Tensor,
        freqs: torch.Tensor,
        mscale: float = 1.0,
        topk_indices: torch.Tensor | None = None,
        layout=None,
        dense_runs=None,
        kv_up: torch.Tensor | None = None,
    ):
        """query [s, b, n, d] with the up-projection absorbed; key_value [s, b, d] shared by the
        heads, its first kv_lora_rank channels the values; `layout` (sequence.TokenLayout)
        places the local tokens in the sample under context parallelism or packing (None: one
        causal sequence). Keys from other CP ranks are gathered (latent and indexer keys only).
        Returns the latent output [s, b, n, kv_lora_rank] and the top-k indices (into the whole
        sample).

        With `dense_runs` (from `dense_plan`) it takes the dense path instead: `query` is per
        head [s, b, n, qk_nope + rope], `kv_up` the kv up-projection [n, qk_nope + v_head_dim,
        kv_lora], and the output per head [s, b, n, v_head_dim]; no top-k (None returned)."""
        if dense_runs is not None:
            return self._dense_forward(query, key_value, kv_up, dense_runs, x, qr, freqs, mscale, layout)
        v_dim = self.config.kv_lora_rank
        visible = layout.visibility() if layout is not None else {}
        gather = layout.gather if layout is not None else (lambda t: t)
        kv_all = gather(key_value)
        want_loss = (
            self.indexer is not None and self.training and torch.is_grad_enabled()
            and self.config.dsa_loss_coeff > 0
        )
        iq = ik = iw = None
        if self.indexer is not None:
            with torch.set_grad_enabled(want_loss):
                iq, ik, iw = self._indexer_inputs(x, qr, freqs, mscale)
                ik = gather(ik)
            topk_indices = self.backend.indexer_topk(
                iq.detach(), ik.detach(), iw.detach(), self.config.dsa_index_topk, **visible
            )
        elif topk_indices is None:
            raise RuntimeError(
                f"layer {self.layer_number} shares the top-k of an earlier layer (IndexShare) but "
                "received none: the previous full layer must run before it."
            )
        if want_loss and self.config.dsa_indexer_loss == "dq_pass":
            weight = self.config.dsa_loss_coeff / self.num_indexer_layers * query.shape[0] * query.shape[1]
            out = self.backend.sparse_mla_indexer_kl(
                query, kv_all, topk_indices, iq, ik, iw, self.softmax_scale, v_dim,
                num_heads=self.config.num_attention_heads, reduce_probs=self._sum_over_heads,
                loss_weight=lambda: DSALossScaler.scale * weight,
                on_loss=lambda kl: DSALossTracker.add(self.layer_number, kl),
            )
            return out, topk_indices
        out, lse = self.backend.sparse_mla(query, kv_all, topk_indices, self.softmax_scale, v_dim)
        if want_loss:
            q_all, lse_all = self._all_heads(query.detach(), lse)
            loss = self.backend.indexer_kl_loss(
                iq, ik, iw, q_all, kv_all.detach(), topk_indices, self.softmax_scale, v_dim,
                lse=lse_all, **visible,
            )
            DSALossTracker.add(self.layer_number, loss)
            tokens = query.shape[0] * query.shape[1]
            out = DSALossScaler.apply(out, loss * (self.config.dsa_loss_coeff / self.num_indexer_layers * tokens))
        return out, topk_indices

    def dense_plan(self, sq: int, layout):
        """The dense runs (kernels/dense.py) of this layer's `sq` local queries when it takes the
        dense path, else None: always in `dense` and `warmup` modes; in `sparse` mode exactly
        where every query sees at most top-k keys, which top-k would all select. The runs are
        computed once per layout (one host synchronisation) and shared by the layers."""
        mode, topk = self.config.dsa_mode, self.config.dsa_index_topk
        if layout is None:
            return [(0, sq, 0, sq)] if mode != "sparse" or sq <= topk else None
        cache = layout.__dict__.setdefault("_dense_plan", {})
        if mode == "sparse" and "covered" not in cache:
            # decided on the whole sample, so that every CP rank takes the same path (the two
            # run different collectives): its longest document, or its length unpacked
            longest = layout.total if layout.k_doc is None else int(torch.bincount(layout.k_doc).max())
            cache["covered"] = longest <= topk
        if mode == "sparse" and not cache["covered"]:
            return None
        if "runs" not in cache:
            cache["runs"] = dense.dense_runs(sq, layout.total, layout.q_idx.device, **layout.visibility())
        return cache["runs"]

    def _dense_forward(self, query, key_value, kv_up, runs, x, qr, freqs, mscale, layout):
        cfg = self.config
        gather = layout.gather if layout is not None else (lambda t: t)
        kv_all = gather(key_value)  # the latent [S, b, kv_lora + rope]: cheap to gather
        with record_function("glm52::dense attention"):  # its key / value up-projection included
            c_kv, k_rot = torch.split(kv_all, [cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim], dim=-1)
            kv = torch.einsum("tbc,hdc->tbhd", c_kv, kv_up)
            k_nope, v = torch.split(kv, [cfg.qk_head_dim, cfg.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rot.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
            out = self.backend.dense_attention(query, k, v, self.softmax_scale, runs)
        want_loss = (
            cfg.dsa_mode != "dense" and self.indexer is not None and self.training
            and torch.is_grad_enabled() and cfg.dsa_loss_coeff > 0
        )
        if want_loss:  # the KL over every visible key, on the absorbed form the KL kernels take
            iq, ik, iw = self._indexer_inputs(x, qr, freqs, mscale)
            ik = gather(ik)
            with torch.no_grad():
                q_nope, q_rope = torch.split(query, [cfg.qk_head_dim, cfg.qk_pos_emb_head_dim], dim=-1)
                q_latent = torch.einsum("sbhd,hdc->sbhc", q_nope, kv_up[:, : cfg.qk_head_dim])
                q_all, _ = self._all_heads(torch.cat([q_latent, q_rope], dim=-1), None)
            visible = layout.visibility() if layout is not None else {}
            loss = self.backend.indexer_kl_loss(
                iq, ik, iw, q_all, kv_all.detach(), None, self.softmax_scale, cfg.kv_lora_rank, **visible,
            )
            DSALossTracker.add(self.layer_number, loss)
            tokens = query.shape[0] * query.shape[1]
            out = DSALossScaler.apply(out, loss * (cfg.dsa_loss_coeff / self.num_indexer_layers * tokens))
        return out, None

    def _sum_over_heads(self, head_probs: torch.Tensor) -> torch.Tensor:
        """The dq pass's per-slot sums of this rank's heads -> the sums over all heads: an
        all-reduce over tensor parallelism (4 * topk bytes per query, where `_all_heads` gathers
        every head's 576-channel query)."""
        tp = self.tp_group
        if tp is not None and tp.size() > 1:
            torch.distributed.all_reduce(head_probs, group=tp)
        return head_probs

    def _all_heads(self, query: torch.Tensor, lse: torch.Tensor | None):
        """The indexer's target averages the attention of *all* heads: gather the heads that
        tensor parallelism split (no gradient flows through the target)."""
        tp = self.tp_group
        if tp is None or tp.size() == 1:
            return query, lse
        parts = [torch.empty_like(query) for _ in range(tp.size())]
        torch.distributed.all_gather(parts, query.contiguous(), group=tp)
        query = torch.cat(parts, dim=2)
        if lse is not None:
            lparts = [torch.empty_like(lse) for _ in range(tp.size())]
            torch.distributed.all_gather(lparts, lse.contiguous(), group=tp)
            lse = torch.cat(lparts, dim=1)
        return query, lse
