"""Small pieces every kernel file shares: the interpreter's bf16 workaround and dot precision."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .configs import interpreting


@triton.jit
def dot_operand(tile, INTERPRETED_BF16: tl.constexpr):
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers (triton#11584);
    # under the interpreter only, bf16 operands are widened to fp32 first.
    if INTERPRETED_BF16:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def cast_to(value, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    # The interpreter truncates fp32 -> bf16 casts (and its "rtne" mode breaks on mantissa carry),
    # so under the interpreter bf16 is rounded to nearest even here, as the GPU cast does.
    if INTERPRETED_BF16 and dtype == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def accumulate_product(acc, lhs_ptrs, rhs_ptrs, lhs_step, rhs_step, length, lhs_row_ok, rhs_col_ok,
                       BLOCK_K: tl.constexpr, INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       RHS_COLS_MASKED: tl.constexpr):
    """``acc += lhs[:, :length] · rhs[:length, :]``, one ``[·, BLOCK_K]`` / ``[BLOCK_K, ·]`` tile pair per step.

    ``lhs_ptrs`` / ``rhs_ptrs`` point at the first tiles (reduction index along their columns /
    rows) and advance by ``lhs_step`` / ``rhs_step`` elements per step; rows of lhs outside
    ``lhs_row_ok`` and the reduction tail load as zeros, and so do columns of rhs outside
    ``rhs_col_ok`` unless ``RHS_COLS_MASKED`` is off (rhs padded in memory: its loads then carry
    only the reduction-tail mask, which is uniform along a row, so they stay asynchronous).
    """
    steps = tl.arange(0, BLOCK_K)
    for k0 in range(0, length, BLOCK_K):
        k_ok = (k0 + steps) < length
        lhs = tl.load(lhs_ptrs, mask=lhs_row_ok[:, None] & k_ok[None, :], other=0.0)
        if RHS_COLS_MASKED:
            rhs = tl.load(rhs_ptrs, mask=k_ok[:, None] & rhs_col_ok[None, :], other=0.0)
        else:
            rhs = tl.load(rhs_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(dot_operand(lhs, INTERPRETED_BF16), dot_operand(rhs, INTERPRETED_BF16), acc,
                     input_precision=INPUT_PRECISION)
        lhs_ptrs += lhs_step
        rhs_ptrs += rhs_step
    return acc


@triton.jit
def accumulate_product_and_thin(acc, thin, lhs_ptrs, rhs_ptrs, thin_ptrs, lhs_step, rhs_step, thin_step, length,
                                lhs_row_ok, rhs_col_ok, BLOCK_K: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr):
    """``acc += lhs·rhs`` and ``thin += lhs·thin_rhs`` over ``[:length]`` with ONE load of each lhs tile.

    As :func:`accumulate_product` (rhs columns masked by ``rhs_col_ok``), plus a second product
    of the same lhs tile with a thin ``[BLOCK_K, ·]`` operand padded in memory (only the
    reduction-tail mask: asynchronous). The backward's dx loop: g is streamed once per row block
    for both ``g·W`` and ``gb = g·B``.
    """
    steps = tl.arange(0, BLOCK_K)
    for k0 in range(0, length, BLOCK_K):
        k_ok = (k0 + steps) < length
        lhs = dot_operand(tl.load(lhs_ptrs, mask=lhs_row_ok[:, None] & k_ok[None, :], other=0.0), INTERPRETED_BF16)
        rhs = tl.load(rhs_ptrs, mask=k_ok[:, None] & rhs_col_ok[None, :], other=0.0)
        thin_rhs = tl.load(thin_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(lhs, dot_operand(rhs, INTERPRETED_BF16), acc, input_precision=INPUT_PRECISION)
        thin = tl.dot(lhs, dot_operand(thin_rhs, INTERPRETED_BF16), thin, input_precision=INPUT_PRECISION)
        lhs_ptrs += lhs_step
        rhs_ptrs += rhs_step
        thin_ptrs += thin_step
    return acc, thin


@triton.jit
def rank_product(lhs_ptrs, rhs_ptrs, lhs_step, rhs_step, length, lhs_row_ok, rank_ok,
                 BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, RANK_MASKED: tl.constexpr,
                 INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The thin product ``lhs[BLOCK_M, :length] · rhs[:length, R_PAD]`` in fp32 (xa = x·Aᵀ, gb = g·B).

    Rank columns at or past R come out as exactly zero: the rhs has zeros there (masked, or
    padded in memory when ``RANK_MASKED`` is off), but an inf in lhs would make them inf·0 = NaN,
    and they must reach neither the next product nor a stored output.
    """
    acc = accumulate_product(tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), lhs_ptrs, rhs_ptrs, lhs_step, rhs_step,
                             length, lhs_row_ok, rank_ok, BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION, RANK_MASKED)
    return tl.where(rank_ok[None, :], acc, 0.0)


def interpreted_bf16(dtype: torch.dtype) -> bool:
    """Whether the interpreter's bf16 workarounds (dot upcast, rounded casts) apply."""
    return interpreting() and dtype == torch.bfloat16


def _cublas_allows_tf32() -> bool:
    # torch >= 2.9: fp32_precision reflects both APIs (and the global torch.backends.fp32_precision),
    # while reading allow_tf32 raises once the new API has been used.
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow cuBLAS's TF32 setting (``allow_tf32`` / ``fp32_precision``), as ``nn.Linear`` does."""
    if dtype == torch.float32 and not interpreting() and _cublas_allows_tf32():
        return "tf32"
    return "ieee"


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device and stream)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
