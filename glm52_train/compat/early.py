"""Item 16, eager_fusions_on_host: the one compatibility item that must act before Megatron-Core
is imported.

Megatron-Core 0.16.1 decorates its fused kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add, the
router's top-k and score functions, ... 50 uses) with `megatron.core.jit.jit_fuser`, which is
`torch.compile` at import. On a machine without CUDA that buys nothing at the sizes run there and
costs each process about 5 s at import (38 `torch.compile` calls pull in Inductor) and a few
seconds of Dynamo tracing per new shape at the first routing: most of a tiny run's start-up, paid
again by every rank of every multi-process test. Here the decorator is Megatron-Core's own
`noop_decorator` (its `disable_jit_fuser()`), set the moment `megatron.core.jit` has executed, so
every later `from megatron.core.jit import jit_fuser` gets the plain function. The functions compute
the same thing eagerly. Where CUDA is present nothing changes.

`install()` runs when `glm52_train` is imported (`glm52_train/__init__.py`), which precedes every
import of Megatron-Core in this project's processes; the registry entry (`platform.ITEMS`) records
the item and turns the decorator off for anything imported later if Megatron-Core came first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "megatron.core.jit"


class _EagerFuserFinder(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` as the path finder would, and disables the fuser after it runs."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            if needed():  # torch is imported by now: Megatron-Core imports it first
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


_FINDER = _EagerFuserFinder()


def needed() -> bool:
    import torch

    return not torch.cuda.is_available()


def install() -> bool:
    """Disable Megatron-Core's `torch.compile` decorator on a host without CUDA; True when the
    finder is in place before Megatron-Core's import (so that no function is compiled there).
    Whether CUDA is present is asked only once `megatron.core.jit` executes (torch is loaded by
    then), so that `import glm52_train` does not import torch."""
    jit = sys.modules.get(TARGET)
    if jit is not None:  # too late for what is already decorated; later imports get the plain function
        if needed():
            jit.disable_jit_fuser()
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def is_compiled(function) -> bool:
    """Whether `function` is wrapped by `torch.compile`."""
    return hasattr(function, "_torchdynamo_orig_callable")
