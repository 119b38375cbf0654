"""The shared dropout hash of :mod:`lora_fused.dropout`, in Triton, bit for bit.

Every kernel that touches the LoRA branch calls :func:`dropout_keep` on the linear
indices ``row * K + col`` of the elements it reads (as a first index per tile row plus
in-row offsets), so the mask drawn in the
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
def dropout_keep(seed, first_index, offset, threshold, INDEX_BELOW_2_32: tl.constexpr):
    """Boolean keep mask of the linear indices ``first_index + offset`` under a 32-bit ``seed`` (an int32).

    ``first_index``: int64, a scalar or a tensor that broadcasts against ``offset`` (a row's
    ``row·K``, loop-invariant in a loop over the row's columns, say); ``offset``: int32 in
    ``[0, 2**31)`` (the column). The key mix depends only on the index's high word, and the
    indices ``first + offset`` with ``offset < 2**32`` have one of two high words, ``hi(first)``
    and ``hi(first) + 1`` (the latter exactly when the low words' sum wraps). So the two keys
    are mixed once per value of ``first_index`` (once per launch when every index is below
    2**32, ``INDEX_BELOW_2_32``: the launcher knows M·K), and each element adds its offset to
    the low word in uint32 and picks its key by the carry: no per-element mix, no int64 arithmetic.
    """
    first_index = first_index.to(tl.int64)
    first_lo = (first_index & 0xFFFFFFFF).to(tl.uint32)
    lo = first_lo + offset.to(tl.uint32)  # wraps modulo 2**32: the low word of first + offset
    seed32 = seed.to(tl.uint32)
    if INDEX_BELOW_2_32:
        key = _mix32(seed32)  # high word 0: seed ^ (0 * 0x9E3779B9)
    else:
        first_hi = (first_index >> 32).to(tl.uint32)
        key_same = _mix32(seed32 ^ (first_hi * 0x9E3779B9))
        key_next = _mix32(seed32 ^ ((first_hi + 1) * 0x9E3779B9))
        key = tl.where(lo < first_lo, key_next, key_same)
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
    first = pid.to(tl.int64) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    in_bounds = offs < rows.to(tl.int64) * K
    keep = dropout_keep(seed, row_start.to(tl.int64) * K + first, tl.arange(0, BLOCK), threshold, INDEX_BELOW_2_32)
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
