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
