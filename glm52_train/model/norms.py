"""RMSNorm as the HF reference computes it, usable under sequence parallelism.

Megatron-Core's local norm (`WrappedTorchNorm`) refuses sequence parallelism outright, and
`torch.nn.RMSNorm` multiplies before casting back to the input dtype. This module normalises in
fp32, casts back, then scales, exactly as `GlmMoeDsaRMSNorm` does, and marks its weight
`sequence_parallel` so Megatron-Core all-reduces its gradient across tensor-parallel ranks when
the activations it saw were sequence-sharded.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LatentRMSNorm(RMSNorm):
    """The q_a / kv_a norm of MLA. The HF reference builds these with its RMSNorm default
    (1e-6), not `rms_norm_eps`; Megatron-Core passes `layernorm_epsilon` to every norm, so the
    latent epsilon comes from `config.latent_layernorm_epsilon` instead of the argument."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        super().__init__(config, hidden_size, eps=config.latent_layernorm_epsilon)


def latent_norm_for(norm_cls):
    """A latent-epsilon version of another norm class (Transformer Engine's `TENorm`)."""

    class _LatentNorm:
        def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
            return norm_cls(config=config, hidden_size=hidden_size,
                            eps=config.latent_layernorm_epsilon, **kwargs)

    _LatentNorm.__name__ = f"Latent{getattr(norm_cls, '__name__', 'Norm')}"
    return _LatentNorm
