"""Workarounds for Megatron-Core 0.16.1, one registry of items.

Megatron-Core assumes a GPU and, in places, Transformer Engine (TE); on the CPU machines used
for development, tests and CI neither exists. It also has bugs on code paths it offers, found
by the parallel-layout equivalence tests. Each item is a record (`items.Item`): its number and
name, its kind, the condition it applies under, the Megatron-Core versions it was checked
against, the upstream behaviour it works around, and the function that installs it.

- Platform shims (`platform.py`) stand in for what a machine without CUDA lacks; they apply only
  there: 1 cuda_current_device, 2 host_streams, 3 host_rng_tracker, 6 cuda_tensor_factories,
  8 cuda_type_names, 12 host_split_sizes, 13 uneven_gloo_all_gather,
  16 eager_fusions_on_host (acts at `import glm52_train`, before Megatron-Core's import).
- Upstream fixes (`upstream.py`) correct Megatron-Core itself. Without TE (Megatron-Core then
  runs its local layers and torch AdamW): 4 router_gemm_symbol, 5 mla_have_te,
  9 fresh_adam_state, 10 checkpoint_keys_only, 11 fp64_grad_norm, 15 untied_adam_steps.
  Always: 7 in_process_checkpoint_writer, 14 aux_loss_token_count.

What applies where:

- CPU (no CUDA, no TE): all 16.
- GPU without TE (CUDA present, as on the H100 runs): 4, 5, 7, 9, 10, 11, 14, 15; none of the
  platform shims, so torch.cuda and every tensor factory are Megatron-Core's own.
- GPU with TE: 7 and 14.

(With Apex but no TE, Megatron-Core's optimizer and norm are Apex's: 9, 11 and 15 are installed
and find nothing to change.)

`apply()` installs the items that apply, once per process; `parallel.init_distributed()` calls
it, which every process does before it builds a model, so nothing else does. A Megatron-Core
other than `PINNED` warns once, naming the items to re-check. `installed()` lists what was
installed; `removed(name)` takes one item out for a while (the tests in `tests/test_compat.py`
show, for each item, the failure without it and the success with it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings

from glm52_train.compat.items import ALWAYS, NO_CUDA, NO_TE, PINNED, Item, Patch

_installed: dict[str, Patch] = {}
_applied = False


class VersionWarning(UserWarning):
    """Megatron-Core is not the version the compatibility items were written against."""


@functools.cache
def _items() -> tuple[Item, ...]:
    # The items' modules import torch: loaded on first use, so that `import glm52_train` (and
    # `glm52 --help`, `info`, `plan`) stays free of torch and Megatron-Core.
    from glm52_train.compat import platform, upstream

    return tuple(sorted(platform.ITEMS + upstream.ITEMS, key=lambda item: item.number))


def __getattr__(name: str):
    if name == "ITEMS":  # the registry, as `compat.ITEMS`
        return _items()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - TE fails to import in many ways without a GPU
        return False
    return True


def applies(item: Item) -> bool:
    if item.condition == ALWAYS:
        return True
    if item.condition == NO_CUDA:
        return not cuda_available()
    if item.condition == NO_TE:
        return not transformer_engine_available()
    raise ValueError(f"item {item}: unknown condition {item.condition!r}")


def megatron_version() -> str:
    import megatron.core

    return megatron.core.__version__


def check_version(version: str | None = None) -> list[Item]:
    """The items not checked against this Megatron-Core version (warns when there are any)."""
    version = version or megatron_version()
    stale = [i for i in _items() if version not in i.versions]
    if stale:
        warnings.warn(
            f"megatron-core {version} is not the pinned {PINNED}; re-check compatibility items "
            + ", ".join(str(i) for i in stale),
            VersionWarning,
            stacklevel=2,
        )
    return stale


def apply() -> None:
    """Install every item that applies on this machine; idempotent."""
    global _applied
    if _applied:
        return
    check_version()
    for candidate in _items():
        if candidate.name not in _installed and applies(candidate):
            patch = Patch()
            candidate.install(patch)
            _installed[candidate.name] = patch
    _applied = True


def installed() -> list[Item]:
    return [i for i in _items() if i.name in _installed]


def describe() -> str:
    """One line for a run's log: the Megatron-Core version and the items installed."""
    names = ", ".join(str(i) for i in installed()) or "none"
    return f"megatron-core {megatron_version()}; compatibility items installed: {names}"


@contextlib.contextmanager
def removed(name: str):
    """Megatron-Core as it is without item `name` (which must be installed), then the item back."""
    if name not in _installed:
        raise KeyError(f"compatibility item {name!r} is not installed here")
    patch = _installed[name]
    patch.undo()
    try:
        yield
    finally:
        patch.redo()


@functools.cache
def default_device() -> torch.device:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
