"""What a logged step reports beyond its loss. ExpertLoad: the experts' load per MoE layer."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter


class ExpertLoad:
    """Each router's token counts of the last step, for per-layer load logging. They are read
    in the model config's finalize_model_grads_func (`around`, installed by
    setup.build_optimizer), before Megatron-Core's expert-bias update there consumes them."""

    def __init__(self, chunks) -> None:
        self.routers = [(n, m) for c in chunks for n, m in c.named_modules() if isinstance(m, TopKRouter)]
        self.last: torch.Tensor | None = None

    def around(self, finalize_model_grads):
        """`finalize_model_grads` that first records the routers' token counts."""

        def finalize(*args, **kwargs):
            self.snapshot()
            return finalize_model_grads(*args, **kwargs)

        return finalize

    def snapshot(self) -> None:
        counts = [r.local_tokens_per_expert for _, r in self.routers if r.local_tokens_per_expert is not None]
        if counts:
            self.last = torch.stack([c.detach().clone().float() for c in counts])

    def metrics(self) -> tuple[dict, dict]:
        if self.last is None:
            return {}, {}
        load = self.last.clone()
        torch.distributed.all_reduce(load, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        share = load / load.sum(dim=1, keepdim=True).clamp_min(1)
        imbalance = (share.max(dim=1).values * share.shape[1])  # max / mean per layer
        per_layer = {}
        for (name, _), row, imb in zip(self.routers, share, imbalance):
            label = name.replace(".mlp.router", "").replace("module.", "")
            per_layer[f"expert_load/{label}/max_over_mean"] = imb.item()
            per_layer[f"expert_load/{label}/min_share"] = row.min().item()
        return {"expert_load_max_over_mean": imbalance.mean().item()}, per_layer
