"""Workarounds for Megatron-Core 0.16.1: running without CUDA or Transformer Engine, and the
correctness bugs that the parallel-layout equivalence tests exposed.

Megatron-Core assumes a GPU and, in a few places, Transformer Engine. On the CPU machines used
for development, tests and CI neither exists. Each item below names the upstream behaviour it
works around; `apply()` installs all of them once, and only where they are needed, so that the
same model classes run unchanged on GPU (where nothing here is touched).

Items (each covered by `tests/test_compat.py`):

1. ``torch.cuda.current_device()`` is called for tensor placement in many modules (router,
   experts, layers, mappings, MTP and DSA loss trackers). Without CUDA it raises. We make it
   return the CPU device, which every one of those call sites accepts as a ``device=`` argument.
2. ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` are used by the all-to-all token
   dispatcher to overlap device-to-host copies. On the CPU there is one stream; we supply a
   host stand-in whose waits and events are no-ops.
3. The RNG tracker (``tensor_parallel.random``) stores and swaps CUDA generator states. Without
   CUDA we keep the tracked states as CPU generator states, so ``fork()`` still gives each
   parallel region its own reproducible stream.
4. ``moe_utils.te_general_gemm`` is only defined when TE imports; the router's gating GEMM then
   raises NameError. We define it as ``None`` so the router takes its ``torch.mm`` branch.
5. ``multi_latent_attention.HAVE_TE`` is True even without TE, because
   ``extensions.transformer_engine`` imports with a MagicMock ``te``; ``TELinear`` is then a mock
   subclass. We set ``HAVE_TE`` to the truth so MLA never takes a TE-only branch.
6. The optimizers, gradient clipping, grad buffers and schedules build tensors with a literal
   ``device='cuda'`` (``torch.tensor``/``zeros``/``empty``/``ones``/``full``) and call
   ``.cuda()``. On a machine without CUDA these factories place such tensors on the CPU, and
   ``Tensor.cuda`` is the identity.
9. Without TE or Apex, Megatron-Core's optimizer is ``torch.optim.AdamW``, whose per-parameter
   state (including ``step``) appears only after the first update; the distributed optimizer's
   ``state_dict()`` asserts one common ``step`` across parameters, so a freshly built optimizer
   cannot describe the state it is about to load. `init_adam_state()` creates that state the
   way AdamW would (zero moments, step 0) before a checkpoint is loaded into it.
10. Same cause, loading side: `DistributedOptimizer._set_main_param_and_optimizer_states` copies
   every key of the live per-parameter state, which for torch AdamW includes the scalar
   ``step``; the reshardable checkpoint formats store ``step`` once in the param groups (it is
   restored from there just before) and not per parameter, so the copy raised KeyError. Keys
   the checkpoint does not hold per parameter are left as restored. That restore also gives
   every parameter the *same* ``step`` tensor, which AdamW then increments once per parameter
   per update (a resumed run drifts from one that never stopped); `untie_adam_steps()` gives
   each parameter its own copy after a load.
11. Without TE or Apex the gradient norm (for clipping and reporting) comes from
   `local_multi_tensor_l2_norm`, which takes each tensor's norm in fp32; on the CPU that lost
   ~4e-4 relative on a large gradient, and differently for each way the tensor was sharded, so
   one run reported different norms under different parallel layouts. We accumulate squares in
   fp64 (the result is the same function, computed exactly enough to compare layouts).
12. The all-to-all token dispatcher moves its split sizes to the host with
   `maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only CUDA tensors; on the CPU
   the sizes stayed tensors and `all_to_all_single` rejected them (expert parallelism failed).
   Host tensors are converted as the function's contract says.
13. Expert tensor parallelism with expert parallelism gathers and reduce-scatters *uneven* token
   counts (`all_gather` / `reduce_scatter` on lists of different sizes). NCCL accepts that;
   gloo rejects uneven all-gathers and has no list reduce-scatter. On gloo process groups the
   uneven all-gather pads every piece to the largest and trims, and the uneven reduce-scatter
   all-reduces the whole tensor and keeps this rank's piece (more traffic, same result).
14. (Everywhere, not a platform gap.) With `calculate_per_token_loss` the routers scale their
   load-balancing losses by the number of local tokens, which the final gradient scaling
   divides out again. Two counts are wrong: (a) the sequence and batch aux losses are split
   over the tensor/context-parallel group (each rank holds a part of the same sequences, whose
   parts sum to the loss), so under TP+SP or CP the count must be the group's tokens (local x
   group size), not the local ones; (b) the sequence aux loss counts the rows of its routing
   map reshaped to [seq, batch x experts], i.e. one micro-batch's sequence length, not its
   seq x batch tokens, so its gradient came out divided by the micro-batch size. With both
   fixed, TP/CP runs and runs with any micro-batch size equal one process.
8. The optimizers classify parameters by ``param.type() == 'torch.cuda.FloatTensor'`` (and the
   Half/BFloat16 names) and raise TypeError for anything else. On a machine without CUDA, where
   no tensor can be a CUDA tensor, ``Tensor.type()`` (called with no argument) reports floating
   CPU tensors under the CUDA type names.
7. The ``torch_dist`` checkpoint writer (``FileSystemWriterAsync``) starts a spawn-context
   ``Manager`` process and forks one writer process per file at every save. Forking a process
   that runs gloo, tqdm or pytest threads deadlocked here (the forked writer never reported
   back). We write the same files, in the same format, from the saving process itself. This one
   applies on GPU machines too: a save that can hang costs more than the parallel file writes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - TE fails to import in many ways without a GPU
        return False
    return True


class _HostEvent:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _HostStream:
    """Stand-in for ``torch.cuda.Stream`` on a machine whose only stream is the host thread."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return event if event is not None else _HostEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _HostStream)

    def __hash__(self) -> int:
        return 0


_HOST_STREAM = _HostStream()


def _patch_cuda_device_and_streams() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _HostStream
    torch.cuda.Event = lambda *a, **k: _HostEvent()
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.default_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, stream: None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


# Megatron-Core modules that build tensors with a literal device='cuda' (item 6).
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
)
_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange")


class _HostTorch(types.ModuleType):
    """`torch` as those modules see it: the same module, except that tensor factories asked for
    device='cuda' build on the CPU. Scoped to them: replacing torch's own functions globally
    broke torch's device context (transformers' loading under torch.distributed)."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in _FACTORIES:
            return value

        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
                kwargs.pop("pin_memory", None)
            return value(*args, **kwargs)

        return factory


def _patch_cuda_tensor_factories() -> None:
    host_torch = _HostTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = host_torch

    cpu_type = torch.Tensor.type
    cuda_names = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                  "torch.HalfTensor": "torch.cuda.HalfTensor",
                  "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = cpu_type(self)
            return cuda_names.get(name, name)
        return cpu_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_host_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move


def _patch_uneven_collectives_on_gloo() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def is_gloo(group) -> bool:
        return torch.distributed.get_backend(group) == "gloo"

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not is_gloo(group):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)], dim=0)

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not is_gloo(group):
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        rank = group.rank()
        start = sum(input_split_sizes[:rank])
        return total[start : start + input_split_sizes[rank]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class HostRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """`CudaRNGStatesTracker` whose tracked states are CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker = HostRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # The default (data-parallel) generator is the CPU one here: seed it as CUDA's would be.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, HostRNGStatesTracker
    ):
        mrandom.initialize_rng_tracker(force_reset=True)


def _patch_te_symbols() -> None:
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False


def _patch_checkpoint_writer() -> None:
    import queue

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

    filesystem_async._get_write_results_queue = lambda: queue.Queue()
    filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_process)


def init_adam_state(optimizer) -> None:
    """Item 9: give every parameter of a fresh torch AdamW its state (no-op once it has one)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def _patch_grad_norm() -> None:
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
        clip_grads.l2_norm_impl = l2_norm_fp64


def _patch_optimizer_state_loading() -> None:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        live = {"param": main_param, **self.optimizer.state[main_param]}
        for key, dst in live.items():
            if key in tensors:
                dst.copy_(tensors[key])

    cls._set_main_param_and_optimizer_states = set_states


def untie_adam_steps(optimizer) -> None:
    """Item 10: one `step` tensor per parameter after DistributedOptimizer.load_state_dict."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.AdamW):
            continue
        for state in torch_opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _patch_aux_loss_token_count() -> None:
    from megatron.core.transformer.moe.router import TopKRouter as Router

    if getattr(Router, "_glm52_token_count_fixed", False):
        return
    original = Router.attach_and_log_load_balancing_loss

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

    Router.attach_and_log_load_balancing_loss = attach
    Router._glm52_token_count_fixed = True


def apply() -> None:
    """Install every workaround needed on this machine; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    if not cuda_available():
        _patch_cuda_device_and_streams()
        _patch_cuda_tensor_factories()
        _patch_rng_tracker()
        _patch_host_split_sizes()
        _patch_uneven_collectives_on_gloo()
    if not transformer_engine_available():
        _patch_te_symbols()
        _patch_optimizer_state_loading()
        _patch_grad_norm()
    _patch_checkpoint_writer()
    _patch_aux_loss_token_count()
    _APPLIED = True


@functools.cache
def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
