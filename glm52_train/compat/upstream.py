"""Fixes for Megatron-Core 0.16.1 itself: code paths it offers (no Transformer Engine, torch
AdamW, the torch_dist checkpoint format, per-token loss with the routers' load-balancing losses)
that fail or compute the wrong thing. They apply on GPU machines as well, under the condition
each item names. Each `install_*` takes the `Patch` that records what it replaces."""

from __future__ import annotations

import queue

import torch

from glm52_train.compat.items import ALWAYS, NO_TE, UPSTREAM, Item


def install_router_gemm_symbol(patch) -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        patch(moe_utils, "te_general_gemm", None)


def install_mla_have_te(patch) -> None:
    from megatron.core.transformer import multi_latent_attention

    patch(multi_latent_attention, "HAVE_TE", False)


def install_in_process_checkpoint_writer(patch) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
        results: dict = {}
        local: queue.Queue = queue.Queue()
        pending: queue.Queue = queue.Queue()
        for i, bucket in enumerate(write_buckets):
            pending.put(i)
            kwargs = {"use_msc": use_msc} if use_msc else {}
            filesystem_async.FileSystemWriterAsync.write_preloaded_data(
                transform_list, i, bucket, local, pending, True, **kwargs
            )
            idx, out = local.get()
            if isinstance(out, Exception):
                global_results_queue.put(out)
                return
            results[idx] = out
        global_results_queue.put(results)

    patch(filesystem_async, "_get_write_results_queue", lambda: queue.Queue())
    patch(filesystem_async.FileSystemWriterAsync, "write_preloaded_data_multiproc", staticmethod(write_in_process))


def _torch_adamw(distributed_optimizer) -> torch.optim.AdamW | None:
    inner = getattr(distributed_optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.AdamW) else None


def install_fresh_adam_state(patch) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.state_dict

    def state_dict(self):
        adam = _torch_adamw(self)
        if adam is not None:  # the state AdamW's first update would create: zero moments, step 0
            for group in adam.param_groups:
                for p in group["params"]:
                    state = adam.state[p]
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0)
                        state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                        state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        return original(self)

    patch(DistributedOptimizer, "state_dict", state_dict)


def install_checkpoint_keys_only(patch) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        live = {"param": main_param, **self.optimizer.state[main_param]}
        for key, dst in live.items():
            if key in tensors:
                dst.copy_(tensors[key])

    patch(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)


def install_untied_adam_steps(patch) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        adam = _torch_adamw(self)
        if adam is not None:
            for state in adam.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()

    patch(DistributedOptimizer, "load_state_dict", load_state_dict)


def install_fp64_grad_norm(patch) -> None:
    from megatron.core.optimizer import clip_grads

    def l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        total = torch.zeros((), dtype=torch.float64)
        for tensors in tensor_lists:
            for t in tensors:
                total = total + t.detach().double().pow(2).sum().cpu()
        device = tensor_lists[0][0].device if tensor_lists and tensor_lists[0] else "cpu"
        return total.sqrt().to(device=device, dtype=torch.float32).reshape(1), None

    current = getattr(clip_grads, "l2_norm_impl", None)
    if current is not None and current.__name__ == "local_multi_tensor_l2_norm":
        patch(clip_grads, "l2_norm_impl", l2_norm_fp64)


def install_aux_loss_token_count(patch) -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.attach_and_log_load_balancing_loss

    def attach(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
               reduce_group_has_dp=False, valid_token_count=None):
        if self.calculate_per_token_loss:
            if valid_token_count is None or aux_loss_name == "seq_load_balancing_loss":
                if isinstance(valid_token_count, torch.Tensor):
                    raise NotImplementedError("the sequence aux loss with a padding mask is not supported")
                valid_token_count = activation.shape[0]  # this micro-batch's tokens, seq x batch
            if reduce_group is not None and reduce_group.size() > 1:
                valid_token_count = valid_token_count * reduce_group.size()
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp, valid_token_count)

    patch(TopKRouter, "attach_and_log_load_balancing_loss", attach)


ITEMS = (
    Item(4, "router_gemm_symbol", UPSTREAM, NO_TE,
         "moe_utils.te_general_gemm is defined only when TE imports, so the router's gating GEMM "
         "raised NameError (here: None, so the router takes its torch.mm branch)",
         install_router_gemm_symbol),
    Item(5, "mla_have_te", UPSTREAM, NO_TE,
         "multi_latent_attention.HAVE_TE is True without TE (the TE extension imports with a "
         "MagicMock), so building MLA ran isinstance() against a mock and raised TypeError",
         install_mla_have_te),
    Item(7, "in_process_checkpoint_writer", UPSTREAM, ALWAYS,
         "the torch_dist writer starts a spawn Manager and forks one writer per file at every "
         "save; forking a process running gloo, tqdm or pytest threads deadlocked (here: the "
         "same files written from the saving process)",
         install_in_process_checkpoint_writer),
    Item(9, "fresh_adam_state", UPSTREAM, NO_TE,
         "with torch AdamW the per-parameter state appears at the first update, and "
         "DistributedOptimizer.state_dict() asserts one common step, so a fresh optimizer could "
         "not describe the state it is about to load (here: AdamW's initial state first)",
         install_fresh_adam_state),
    Item(10, "checkpoint_keys_only", UPSTREAM, NO_TE,
         "loading a reshardable optimizer checkpoint copies every key of torch AdamW's live state, "
         "including 'step', which the checkpoint keeps in the param groups: KeyError (here: only "
         "the keys the checkpoint holds)",
         install_checkpoint_keys_only),
    Item(11, "fp64_grad_norm", UPSTREAM, NO_TE,
         "without TE or Apex the gradient norm takes each tensor's norm in fp32, which differs with "
         "how the tensor is sharded, so layouts reported different norms (here: fp64 squares)",
         install_fp64_grad_norm),
    Item(14, "aux_loss_token_count", UPSTREAM, ALWAYS,
         "with calculate_per_token_loss the routers scale their aux losses by the local token "
         "count: wrong under TP+SP/CP (the group's tokens) and for the sequence aux loss (one "
         "sequence, not seq x batch)",
         install_aux_loss_token_count),
    Item(15, "untied_adam_steps", UPSTREAM, NO_TE,
         "DistributedOptimizer.load_state_dict gives every torch AdamW parameter the same 'step' "
         "tensor, which each update then increments once per parameter (here: one copy each)",
         install_untied_adam_steps),
)
