"""The compatibility items that only show with two processes, checked in one rank of two
(started by tests/test_compat.py with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set).

For each item, the check runs first with the item taken out (`compat.removed`), then with it;
each outcome is written to OUT/rank<R>.json as {"error": ..., "value": ...}. Every check fails
the same way on both ranks, so that neither waits for the other in a collective."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def outcome(check) -> dict:
    try:
        return {"error": None, "value": check()}
    except Exception as e:  # noqa: BLE001 - the point is to record how Megatron-Core fails
        return {"error": f"{type(e).__name__}: {e}"[:300], "value": None}


def without_and_with(name: str, check) -> dict:
    from glm52_train import compat

    with compat.removed(name):
        without = outcome(check)
    return {"without": without, "with": outcome(check)}


def host_split_sizes(model_cfg, rank: int) -> dict:
    """Expert parallelism over 2 ranks: the all-to-all dispatcher delivers every routed token."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from glm52_train import parallel
    from glm52_train.model.build import transformer_config
    from glm52_train.run_config import load_run_config

    run = load_run_config(None, ["parallel.ep=2"])
    parallel.initialize(run.parallel, seed=1234, timeout_minutes=2)
    config = transformer_config(model_cfg, run)
    experts, local = config.num_moe_experts, config.num_moe_experts // 2
    dispatcher = MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                            get_default_pg_collection())
    gen = torch.Generator().manual_seed(rank)
    tokens, k = 6 + rank, config.moe_router_topk
    hidden = torch.randn(tokens, config.hidden_size, generator=gen)
    chosen = torch.rand(tokens, experts, generator=gen).topk(k, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)
    probs = routing_map.float() / k
    per_expert = routing_map.sum(0)
    torch.distributed.all_reduce(per_expert)
    expected = per_expert[rank * local : (rank + 1) * local].sum().item()

    def dispatch():
        permuted, permuted_probs = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
        received, received_probs = dispatcher.token_dispatch(permuted, permuted_probs)
        _, tokens_per_expert, _ = dispatcher.dispatch_postprocess(received, received_probs)
        return int(tokens_per_expert.sum()) == expected

    return without_and_with("host_split_sizes", dispatch)


def uneven_gloo_collectives(rank: int) -> dict:
    """Megatron-Core's uneven all-gather (item 13) and reduce-scatter (gloo does that one itself)
    over a gloo group of 2."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    group = parallel_state.get_expert_model_parallel_group()
    sizes = [2, 3]
    piece = torch.full((sizes[rank], 4), float(rank + 1))
    whole = torch.arange(20.0).reshape(5, 4) * (rank + 1)

    def gather():
        gathered = mappings._gather_along_first_dim(piece, group, output_split_sizes=sizes)
        return torch.equal(gathered, torch.cat([torch.full((2, 4), 1.0), torch.full((3, 4), 2.0)]))

    def reduce_scatter():
        scattered = mappings._reduce_scatter_along_first_dim(whole, group, input_split_sizes=sizes)
        start = sum(sizes[:rank])
        return torch.equal(scattered, 3 * torch.arange(20.0).reshape(5, 4)[start : start + sizes[rank]])

    return {"uneven_gloo_all_gather": without_and_with("uneven_gloo_all_gather", gather),
            "uneven_reduce_scatter": outcome(reduce_scatter)}


def aux_loss_over_tensor_parallel(model_cfg, rank: int) -> dict:
    """The router's gradient from the sequence aux loss, its tokens split over TP=2 with sequence
    parallelism and summed over the group, over the gradient from all the tokens in one process
    (1.0 when the group's token count is used; 0.5 with the local one)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from glm52_train import compat, parallel
    from glm52_train.model.build import transformer_config
    from glm52_train.run_config import load_run_config

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, model_cfg.hidden_size, generator=gen)
    weight = None

    def router_grad(tp: int) -> torch.Tensor:
        nonlocal weight
        run = load_run_config(None, [f"parallel.tp={tp}", f"parallel.sp={tp > 1}", "moe.aux_loss_coeff=1e-2"])
        parallel.initialize(run.parallel, seed=1234, timeout_minutes=2)
        router = TopKRouter(transformer_config(model_cfg, run), get_default_pg_collection())
        if weight is None:
            weight = router.weight.detach().clone()
        router.weight.data.copy_(weight)
        probs, _ = router(x.chunk(tp)[rank % tp])
        (probs * 0).sum().backward()
        grad = router.weight.grad.clone()
        if tp > 1:
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad

    def ratio() -> float:
        one = router_grad(1)
        split = router_grad(2)
        return float((split * one).sum() / (one * one).sum())

    with compat.removed("aux_loss_token_count"):
        without = outcome(ratio)
    return {"without": without, "with": outcome(ratio)}


def main(out: str) -> int:
    from glm52_train import parallel
    from glm52_train.config import get_model_config

    rank = int(os.environ["RANK"])
    model_cfg = get_model_config("tiny")
    results = {"host_split_sizes": host_split_sizes(model_cfg, rank),
               **uneven_gloo_collectives(rank),
               "aux_loss_token_count": aux_loss_over_tensor_parallel(model_cfg, rank)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
