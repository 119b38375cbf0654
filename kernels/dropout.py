"""The shared dropout hash of :mod:`lora_fused.dropout`, in Triton, bit for bit.

Every kernel that touches the LoRA branch calls :func:`dropout_keep` on the linear
indices ``row * K + col`` (int64) of the elements it reads, so the mask drawn in the
forward pass is regenerated, never stored, in the backward pass. All arithmetic is
uint32 (wrapping), exactly as the PyTorch specification does it modulo 2**32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.debug import poison_
from lora_fused.dropout import dropout_threshold


@triton.jit
def _mix32(x):
    # "lowbias32": xor-shift / multiply finaliser on uint32 values.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def dropout_keep(seed, index, threshold, INDEX_BELOW_2_32: tl.constexpr):
    """Boolean keep mask for int64 linear ``index`` under a 32-bit ``seed`` (passed as int32).

    ``INDEX_BELOW_2_32``: every index of the launch is below 2**32 (the launcher knows: M·K),
    so the key mix of the index's high word is one value for the whole launch, computed once
    instead of once per element (a third of the hash's work); otherwise a key per element.
    """
    index = index.to(tl.int64)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    if INDEX_BELOW_2_32:
        key = _mix32(seed.to(tl.uint32))  # high word 0: seed ^ (0 * 0x9E3779B9)
    else:
        key = _mix32(seed.to(tl.uint32) ^ ((index >> 32).to(tl.uint32) * 0x9E3779B9))
    hashed = _mix32(_mix32(lo ^ key) + key)
    return (hashed >> 8) >= threshold.to(tl.uint32)


def index_below_2_32(rows: int, cols: int) -> bool:
    """Whether the linear indices ``row·cols + col`` of ``rows`` rows all stay below 2**32."""
    return rows * cols <= 2**32


def seed_as_int32(seed: int) -> int:
    """The low 32 bits of ``seed`` as a signed int32, so Triton always types the argument i32."""
    low = int(seed) & 0xFFFFFFFF
    return low - (1 << 32) if low >= (1 << 31) else low


# An int argument equal to 1 would otherwise become a constexpr on GPU (no .to(), and one more compile
# per argument that is 1): rows, row_start, seed and threshold stay runtime values.
@triton.jit(do_not_specialize=["rows", "row_start", "seed", "threshold"])
def _keep_mask_kernel(out_ptr, rows, K, row_start, seed, threshold, BLOCK: tl.constexpr,
                      INDEX_BELOW_2_32: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < rows.to(tl.int64) * K
    index = row_start.to(tl.int64) * K + offs
    keep = dropout_keep(seed, index, threshold, INDEX_BELOW_2_32)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=in_bounds)


def triton_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str,
                     row_start: int = 0) -> torch.Tensor:
    """The keep mask the kernels draw for rows ``[row_start, row_start + rows)`` of an ``[*, cols]`` input.

    An inspection helper: the fused kernels never materialise the mask. ``row_start``
    lets a caller look at indices past 2**32 without allocating that many elements.
    """
    out = poison_(torch.empty(rows, cols, dtype=torch.int8, device=device))
    if rows * cols:
        block = 1024
        grid = (triton.cdiv(rows * cols, block),)
        _keep_mask_kernel[grid](out, rows, cols, row_start, seed_as_int32(seed), dropout_threshold(p), BLOCK=block,
                                INDEX_BELOW_2_32=index_below_2_32(row_start + rows, cols))
    return out.bool()
