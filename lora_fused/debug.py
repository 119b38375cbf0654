"""Debug switch: poison every output and workspace with NaN before the kernels run.

``LORA_FUSED_POISON_OUTPUTS=1`` makes every backend (the Triton launchers through
:func:`poison_`, the C++/CUDA extension through ``lora_fused::poison_`` in csrc/checks.h)
fill each tensor it allocates for a kernel to write — outputs and workspaces alike — with
NaN (float dtypes) or an all-ones bit pattern (integer dtypes) before launching. An
element a kernel forgets to write then shows up as NaN in a parity test instead of passing
on whatever the allocator left there. The tests switch it on (tests/conftest.py); it costs
one extra write per allocation, so it is off by default.

The variable is read at each call (cheap next to a kernel launch), so a test can turn it
on and off with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "LORA_FUSED_POISON_OUTPUTS"


def poison_enabled() -> bool:
    """Whether ``LORA_FUSED_POISON_OUTPUTS`` asks for poisoned allocations (any value but '', '0')."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` with NaN (or -1 for integer dtypes) when poisoning is on; returns it."""
    if tensor.numel() and poison_enabled() and not torch.compiler.is_compiling():
        tensor.fill_(float("nan") if tensor.is_floating_point() else -1)
    return tensor
