"""Which implementation the DSA core attention runs: one object, chosen in the layer spec.

    backend = dsa_backend("auto")      # Triton on CUDA tensors, the PyTorch references elsewhere
    idx = backend.indexer_topk(iq, ik, iw, topk, **visibility)
    out, lse = backend.sparse_mla(q, kv, idx, scale, v_dim)

- ``torch``: the PyTorch references (`reference.py`): any device, float64-capable; they
  materialise [b, sq, sk] or [b, sq, topk, d] tensors, so they are for CPUs, tests and small runs;
- ``triton``: the Triton kernels (`indexer.py`, `sparse_mla.py`, `indexer_loss.py`), memory
  linear in the sequence; on CPU tensors they run in Triton's interpreter (tests, tiny sizes);
- ``auto``: ``triton`` for CUDA tensors, ``torch`` otherwise.

``deterministic``: the Triton sparse attention backward computes dkv key-major without
atomics (`sparse_mla(..., bwd_cfg={"atomic": False})`); the references are deterministic on CPU.

``sparse_mla_indexer_kl`` (`dsa.indexer_loss: dq_pass`): the sparse attention whose backward
also computes the indexer KL from the dq pass's head probabilities (no second kv gather).

Dense attention (`dsa.mode: dense`, the warm-up's main attention, the sparse shortcut) runs per
head through torch's scaled_dot_product_attention on every backend (`kernels/dense.py`: cuDNN or
flash kernels on GPUs, the CPU kernels on CPUs); the warm-up's indexer KL stays on the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glm52_train.kernels import api, dense

BackendName = Literal["auto", "torch", "triton"]
_IMPL = {"auto": "auto", "torch": "reference", "triton": "triton"}


@dataclass(frozen=True)
class DSABackend:
    name: BackendName = "auto"
    deterministic: bool = False  # Triton backward without atomics (bitwise-reproducible dkv)

    def __post_init__(self) -> None:
        if self.name not in _IMPL:
            raise ValueError(f"DSA backend {self.name!r} is not one of {', '.join(_IMPL)}")

    @property
    def impl(self) -> str:
        return _IMPL[self.name]

    def indexer_topk(self, q, k, w, topk: int, **visibility):
        """[b, sq, topk] int32 indices of the highest-scoring visible keys (-1 padded)."""
        return api.indexer_topk(q, k, w, topk, **visibility, impl=self.impl)

    def sparse_mla(self, q, kv, idx, scale: float, v_dim: int):
        """(out [sq, b, n, v_dim], lse [b, n, sq] fp32, no gradient) over the selected keys."""
        bwd_cfg = {"atomic": False} if self.deterministic else None
        return api.sparse_mla(q, kv, idx, scale, v_dim, return_lse=True, impl=self.impl, bwd_cfg=bwd_cfg)

    def sparse_mla_indexer_kl(self, q, kv, idx, iq, ik, iw, scale: float, v_dim: int, **kl):
        """out [sq, b, n, v_dim] as `sparse_mla`'s, whose backward also trains the indexer from the
        dq pass's head probabilities (`api.sparse_mla_indexer_kl`: `num_heads`, `loss_weight`,
        `reduce_probs`, `on_loss`)."""
        bwd_cfg = {"atomic": False} if self.deterministic else None
        return api.sparse_mla_indexer_kl(q, kv, idx, iq, ik, iw, scale, v_dim, **kl, impl=self.impl, bwd_cfg=bwd_cfg)

    def dense_attention(self, q, k, v, scale: float, runs):
        """Per-head out [sq, b, n, dv] over every visible key (SDPA on every backend)."""
        return dense.dense_attention(q, k, v, scale, runs)

    def indexer_kl_loss(self, iq, ik, iw, q, kv, idx, scale: float, v_dim: int, lse=None, **visibility):
        """Mean KL(main attention || indexer) over queries; gradients reach iq, ik, iw only."""
        return api.indexer_kl_loss(iq, ik, iw, q, kv, idx, scale, v_dim, **visibility, lse=lse, impl=self.impl)


def dsa_backend(name: str, deterministic: bool = False) -> DSABackend:
    return DSABackend(name, deterministic)


__all__ = ["BackendName", "DSABackend", "dsa_backend"]
