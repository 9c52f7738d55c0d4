"""What the Triton kernel modules share: output allocation (poisoned under test) and log2(e)."""

from __future__ import annotations

import torch

# Tests set this to fill every output with NaN (floats) or -2 (indices) before the kernels run,
# so that an element a kernel failed to write shows up.
POISON_OUTPUTS = False

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * LOG2E)


def empty(shape, dtype, device) -> torch.Tensor:
    """`torch.empty`, or a poisoned tensor when the tests ask for one."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -2
    return torch.full(shape, fill, dtype=dtype, device=device)


# The launch configuration each kernel settled on, per (kernel, compile-time constants).
_SETTLED: dict = {}


def launch(kernel, grid, args: tuple, meta: dict, configs: list[dict]):
    """Launch `kernel[grid](*args, **meta, **config)` with the first of `configs` that fits
    this GPU's shared memory and registers, and keep using it for the same constants.

    The tuned configurations (first) come from the H100 analysis in docs/kernels.md; the
    later ones need fewer resources, so a GPU with less shared memory, or a Triton whose
    pipelining allocates differently, still runs, and says which configuration it fell
    back to (once). Only resource errors fall through; any other error is raised."""
    from triton.runtime.errors import OutOfResources

    key = (getattr(kernel, "__name__", repr(kernel)), tuple(sorted(meta.items())))
    start = _SETTLED.get(key, 0)
    last_error = None
    for i in range(start, len(configs)):
        try:
            result = kernel[grid](*args, **meta, **configs[i])
        except OutOfResources as e:
            last_error = e
            continue
        if i != start:
            import warnings

            warnings.warn(f"{key[0]}: configuration {configs[start]} needs more than this GPU has "
                          f"({last_error}); using {configs[i]}", stacklevel=2)
        _SETTLED[key] = i
        return result
    raise last_error
