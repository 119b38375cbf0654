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
def dropout_keep(seed, index, threshold, first_index, last_index):
    """Boolean keep mask for int64 linear ``index`` under a 32-bit ``seed`` (passed as int32).

    ``first_index`` / ``last_index`` bound the tile's indices (any bounds that contain them).
    The key mix of the index's high word is uniform over a tile that does not cross a
    multiple of 2**32, so there it is computed once per tile instead of once per element
    (a third of the hash's work); a tile that crosses one mixes a key per element.
    """
    index = index.to(tl.int64)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi_first = (first_index.to(tl.int64) >> 32).to(tl.uint32)
    if hi_first == (last_index.to(tl.int64) >> 32).to(tl.uint32):
        key = _mix32(seed.to(tl.uint32) ^ (hi_first * 0x9E3779B9))
        hashed = _mix32(_mix32(lo ^ key) + key)
    else:
        keys = _mix32(seed.to(tl.uint32) ^ ((index >> 32).to(tl.uint32) * 0x9E3779B9))
        hashed = _mix32(_mix32(lo ^ keys) + keys)
    return (hashed >> 8) >= threshold.to(tl.uint32)


def seed_as_int32(seed: int) -> int:
    """The low 32 bits of ``seed`` as a signed int32, so Triton always types the argument i32."""
    low = int(seed) & 0xFFFFFFFF
    return low - (1 << 32) if low >= (1 << 31) else low


# An int argument equal to 1 would otherwise become a constexpr on GPU (no .to(), and one more compile
# per argument that is 1): rows, row_start, seed and threshold stay runtime values.
@triton.jit(do_not_specialize=["rows", "row_start", "seed", "threshold"])
def _keep_mask_kernel(out_ptr, rows, K, row_start, seed, threshold, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < rows.to(tl.int64) * K
    index_start = row_start.to(tl.int64) * K
    index = index_start + offs
    keep = dropout_keep(seed, index, threshold, index_start + pid.to(tl.int64) * BLOCK,
                        index_start + pid.to(tl.int64) * BLOCK + BLOCK - 1)
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
        _keep_mask_kernel[grid](out, rows, cols, row_start, seed_as_int32(seed), dropout_threshold(p), BLOCK=block)
    return out.bool()
