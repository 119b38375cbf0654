"""The counter-based dropout RNG that every backend implements bit-for-bit.

Each element ``(row, col)`` of the ``[M, K]`` input has the linear index
``idx = row * K + col``. Its 32-bit hash under a seed is::

    key  = mix32(seed_lo32 ^ (hi32(idx) * 0x9E3779B9))
    hash = mix32(mix32(lo32(idx) ^ key) + key)

with ``mix32`` the "lowbias32" integer finaliser (xor-shift / multiply, all
arithmetic modulo 2**32). The element is kept when ``hash >> 8 >= threshold``,
``threshold = round(p * 2**24)``, and kept elements are scaled by ``1 / (1 - p)``.

Because the mask is a pure function of (seed, index), forward and backward
regenerate it instead of storing it, and the Triton, C++ and CUDA kernels draw
exactly the mask this file draws, so all backends can be compared element by
element even with dropout on.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
THRESHOLD_BITS = 24
MAX_SEED = 2**31 - 1


def dropout_threshold(p: float) -> int:
    """Integer threshold on the top 24 hash bits below which an element is dropped."""
    return int(round(float(p) * (1 << THRESHOLD_BITS)))


def dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - float(p)) if p > 0 else 1.0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 products of two 32-bit values wrap like uint64; masking keeps the low word.
    x = x ^ (x >> 16)
    x = (x * MIX_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def element_hash(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash (as int64 values in [0, 2**32)) of linear indices ``index``."""
    index = index.to(torch.int64)
    lo = index & MASK32
    hi = index >> 32
    key = _mix32((int(seed) & MASK32) ^ ((hi * GOLDEN32) & MASK32))
    return _mix32((_mix32(lo ^ key) + key) & MASK32)


def keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of kept elements for dropout probability ``p``."""
    index = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    return (element_hash(seed, index) >> 8) >= dropout_threshold(p)


def seed_value(seed: torch.Tensor | int) -> int:
    """The seed as a Python int; the ops take it as a 0-dim int64 CPU tensor."""
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)


def new_seed() -> torch.Tensor:
    """A fresh seed from torch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, MAX_SEED, (), dtype=torch.int64)
