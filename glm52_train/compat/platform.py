"""Platform shims: stand-ins for what a machine without CUDA lacks (the CUDA runtime, NCCL), so
that Megatron-Core 0.16.1 runs on the CPU with gloo. None of them is installed where CUDA is
present. Each `install_*` takes the `Patch` that records what it replaces."""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

from glm52_train.compat.items import NO_CUDA, PLATFORM, Item


def install_current_device(patch) -> None:
    patch(torch.cuda, "current_device", lambda: torch.device("cpu"))


class HostEvent:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class HostStream:
    """Stand-in for ``torch.cuda.Stream`` on a machine whose only stream is the host thread."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> HostEvent:
        return event if event is not None else HostEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, HostStream)

    def __hash__(self) -> int:
        return 0


_HOST_STREAM = HostStream()


def install_host_streams(patch) -> None:
    patch(torch.cuda, "Stream", HostStream)
    patch(torch.cuda, "Event", lambda *a, **k: HostEvent())
    patch(torch.cuda, "current_stream", lambda device=None: _HOST_STREAM)
    patch(torch.cuda, "default_stream", lambda device=None: _HOST_STREAM)
    patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    patch(torch.cuda, "synchronize", lambda device=None: None)
    patch(torch.Tensor, "record_stream", lambda self, stream: None)


def install_host_rng_tracker(patch) -> None:
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

    patch(mrandom, "CudaRNGStatesTracker", HostRNGStatesTracker)
    patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(mrandom, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state))
    patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    patch(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    # The default (data-parallel) generator is the CPU one here: seed it as CUDA's would be.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.)
    patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    patch(torch.cuda, "manual_seed_all", lambda seed: None)
    if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, HostRNGStatesTracker
    ):
        mrandom.initialize_rng_tracker(force_reset=True)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


# Megatron-Core modules that build tensors with a literal device='cuda'.
CUDA_LITERAL_MODULES = (
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


class HostTorch(types.ModuleType):
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


def install_cuda_tensor_factories(patch) -> None:
    host_torch = HostTorch()
    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            patch(module, "torch", host_torch)
    patch(torch.Tensor, "cuda", lambda self, *a, **k: self)


def install_cuda_type_names(patch) -> None:
    cpu_type = torch.Tensor.type
    cuda_names = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                  "torch.HalfTensor": "torch.cuda.HalfTensor",
                  "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = cpu_type(self)
            return cuda_names.get(name, name)
        return cpu_type(self, dtype, non_blocking, **kwargs)

    patch(torch.Tensor, "type", tensor_type)


def install_host_split_sizes(patch) -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    patch(moe_utils, "maybe_move_tensor_to_cpu", move)
    patch(token_dispatcher, "maybe_move_tensor_to_cpu", move)


def install_uneven_gloo_all_gather(patch) -> None:
    from megatron.core.tensor_parallel import mappings

    gather = mappings._gather_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if (output_split_sizes is None or group.size() == 1
                or torch.distributed.get_backend(group) != "gloo"):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)], dim=0)

    patch(mappings, "_gather_along_first_dim", gather_uneven)


def install_eager_fusions_on_host(patch) -> None:
    """The work is done before Megatron-Core's import (`compat/early.py`); here the decorator is
    also kept off for anything imported from now on, should Megatron-Core have come first."""
    from megatron.core import jit

    patch(jit, "jit_fuser", jit.noop_decorator)


ITEMS = (
    Item(1, "cuda_current_device", PLATFORM, NO_CUDA,
         "torch.cuda.current_device() places tensors in the router, experts, layers, mappings and "
         "the MTP/DSA loss trackers; it raises without CUDA (here: the CPU device)",
         install_current_device),
    Item(2, "host_streams", PLATFORM, NO_CUDA,
         "the all-to-all token dispatcher copies split sizes to the host on a torch.cuda.Stream "
         "and synchronises on its events (here: one host stream, no-op waits)",
         install_host_streams),
    Item(3, "host_rng_tracker", PLATFORM, NO_CUDA,
         "the tensor-parallel RNG tracker stores and swaps CUDA generator states (here: CPU "
         "generator states, one reproducible stream per parallel region)",
         install_host_rng_tracker),
    Item(6, "cuda_tensor_factories", PLATFORM, NO_CUDA,
         "optimizers, clipping, grad buffers and schedules build tensors with device='cuda' and "
         "call .cuda() (here: those factories build on the CPU, Tensor.cuda is the identity)",
         install_cuda_tensor_factories),
    Item(8, "cuda_type_names", PLATFORM, NO_CUDA,
         "the optimizers accept a parameter only if param.type() is a torch.cuda.*Tensor name "
         "(here: floating CPU tensors report the CUDA names)",
         install_cuda_type_names),
    Item(12, "host_split_sizes", PLATFORM, NO_CUDA,
         "maybe_move_tensor_to_cpu(as_numpy=True) converts only CUDA tensors, so all_to_all_single "
         "got tensor split sizes and expert parallelism failed (here: host tensors too)",
         install_host_split_sizes),
    Item(13, "uneven_gloo_all_gather", PLATFORM, NO_CUDA,
         "expert tensor parallelism all-gathers uneven token counts, which gloo rejects (here: "
         "pad every piece to the longest, gather, trim)",
         install_uneven_gloo_all_gather),
    Item(16, "eager_fusions_on_host", PLATFORM, NO_CUDA,
         "jit_fuser is torch.compile: 38 decorations at import (~5 s per process) and Dynamo "
         "tracing at the first routing, for no gain on a CPU (here: Megatron-Core's own "
         "noop_decorator, set as megatron.core.jit is imported; see compat/early.py)",
         install_eager_fusions_on_host),
)
