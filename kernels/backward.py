"""Backward kernels: dx (with gb = g·B fused), the g-pass (dB, db), and dA, all deterministic.

Given ``g = dL/dy [M, N]`` and the saved ``x``, ``xa`` and seed::

    dx       dx = g·W + (s/(1-p))·(gb·A) ⊙ mask,  gb = g·B   one kernel, reduction over N
    g-pass   dB partial = g[rows]ᵀ·xa[rows],  db partial = Σ_rows g[rows]
    dA       dA = (s/(1-p))·gbᵀ·(x ⊙ mask)                   one read of x per (column block, row split)

The dx kernel mirrors the forward: each program (row block × dx column block) first runs
a thin loop ``gb = g·B`` over its row block's g tiles (B tile ``[BLOCK_K, R_PAD]``), then
seeds its accumulator with the LoRA term in the reference's rounding order,
``(s/(1-p))·(round(gb)·A) ⊙ mask`` (gb rounded to the input dtype unscaled, the scale on the
fp32 product), and runs the plain ``g·W`` loop into it (no rank-sized operand, so its
loads stay asynchronous at every rank). Programs with ``pid_k == 0`` store gb (fp32
``[M, R_PAD]``) for dA. Computing gb in the g-pass instead would need per-column-block
partials (``(N/BLOCK_N)·M·R_PAD`` fp32 written and re-read: 1/4 of g's bytes at r = 16 in
bf16, 2× at r = 64); here it costs one ``M·R_PAD`` store, a second pass over the row
block's g tiles (from L2) and a recomputation of gb in every dx column block (an extra
``R_PAD/BLOCK_N`` of the dx MMA work, like the forward's xa).

When the gb product would not be cheap inside the dx loop (R_PAD > 64: its stage buffers
and ``[BM, R_PAD]`` accumulator squeeze the dx tiles) or dx is not requested, gb comes
from :func:`~.projection.thin_projection_kernel` instead (one more read of g, no
partials) and the dx kernel loads it in the epilogue (``PRECOMPUTED_GB``).

Reductions over M never use atomics: each program writes its own partial sum (dB, db:
``splits×N×R_PAD``; dA: ``splits×R_PAD×K``) and :func:`_sum_partials_kernel` adds them in
a fixed order, so the same inputs give bit-identical gradients (for a given autotuned
config and device). Nothing of size M×N is allocated besides dx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.debug import poison_
from lora_fused.dropout import dropout_scale, dropout_threshold

from .common import accumulate_product, cast_to, device_guard, dot_operand, input_precision, interpreted_bf16
from .configs import (
    gemm_configs,
    gpass_block_n,
    gpass_configs,
    lora_a_grad_configs,
    m_bucket,
    padded_rank,
    prune_gemm_configs,
    prune_gpass_configs,
    prune_lora_a_grad_configs,
    split_rows,
)
from .dropout import dropout_keep, index_below_2_32, seed_as_int32
from .plan import DA_PLANNING_BLOCK_K, backward_fuses_gb
from .projection import project_rows



@triton.heuristics({"COMPUTE_DB": lambda args: args["db_partial_ptr"] is not None})
@triton.autotune(
    configs=gpass_configs(),
    key=["N", "R_PAD", "BLOCK_N", "M_BUCKET", "COMPUTE_DB"],
    prune_configs_by={"early_config_prune": prune_gpass_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_split"])
def _gpass_kernel(
    g_ptr, xa_ptr, dB_partial_ptr, db_partial_ptr,
    M, N, R, rows_per_split, M_BUCKET,
    stride_gm, stride_gn, stride_xam, stride_xar,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE_DB: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    col_ok = cols < N
    rank_ok = ranks < R

    dB = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = min(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        xa = tl.load(xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar,
                     mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        xa = cast_to(xa, g_ptr.dtype.element_ty, INTERPRETED_BF16)
        dB = tl.dot(dot_operand(tl.trans(g), INTERPRETED_BF16), dot_operand(xa, INTERPRETED_BF16), dB,
                    input_precision=INPUT_PRECISION)
        if COMPUTE_DB:
            db += tl.sum(g.to(tl.float32), axis=0)

    split_offset = pid_split.to(tl.int64) * N
    dB_ptrs = dB_partial_ptr + (split_offset + cols)[:, None] * R_PAD + ranks[None, :]
    tl.store(dB_ptrs, dB, mask=col_ok[:, None])
    if COMPUTE_DB:
        tl.store(db_partial_ptr + split_offset + cols, db, mask=col_ok)


@triton.heuristics({"HAS_DROPOUT": lambda args: args["dropout_threshold"] > 0,
                    "INDEX_BELOW_2_32": lambda args: index_below_2_32(args["M"], args["K"])})
@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "R_PAD", "M_BUCKET", "HAS_DROPOUT", "PRECOMPUTED_GB"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "seed", "dropout_threshold"])
def _input_grad_kernel(
    g_ptr, w_ptr, a_ptr, b_ptr, gb_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk,
    lora_scale, seed, dropout_threshold,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, INDEX_BELOW_2_32: tl.constexpr, PRECOMPUTED_GB: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Tiles of dx [M, K]: BLOCK_N spans dx's columns (K), BLOCK_K steps through the reduction over N.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_k
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_group) % group_rows
    pid_k = (pid % programs_per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    rank_ok = ranks < R

    g_ptrs = g_ptr + rows[:, None] * stride_gm + steps[None, :] * stride_gn
    w_ptrs = w_ptr + steps.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk
    b_ptrs = b_ptr + steps.to(tl.int64)[:, None] * stride_bn + ranks[None, :] * stride_br
    gb_ptrs = gb_ptr + rows[:, None] * R_PAD + ranks[None, :]
    if PRECOMPUTED_GB:
        gb = tl.load(gb_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        # gb = g·B over the row block's g tiles (B padded to R_PAD columns with zeros).
        gb = accumulate_product(tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), g_ptrs, b_ptrs,
                                BLOCK_K * stride_gn, BLOCK_K * stride_bn, N, row_ok, rank_ok,
                                BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION)
        # An inf in g makes the zero-padded rank columns inf·0 = NaN; keep them zero for dx and dA.
        gb = tl.where(rank_ok[None, :], gb, 0.0)
        if pid_k == 0:
            # Every column block computes the same gb; one stores it (all R_PAD columns) for the dA kernel.
            tl.store(gb_ptrs, gb, mask=row_ok[:, None])

    # The LoRA term first, in the reference's rounding order: gb rounded to the input dtype unscaled,
    # s/(1-p) and the mask on the fp32 product, which then seeds the base GEMM's accumulator.
    a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols.to(tl.int64)[None, :] * stride_ak,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    gb_rounded = cast_to(gb, dx_ptr.dtype.element_ty, INTERPRETED_BF16)
    acc = tl.dot(dot_operand(gb_rounded, INTERPRETED_BF16), dot_operand(a, INTERPRETED_BF16),
                 input_precision=INPUT_PRECISION) * lora_scale
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rows[:, None] * K + cols[None, :], dropout_threshold, INDEX_BELOW_2_32)
        acc = acc * keep.to(tl.float32)  # a multiply, as the reference: a dropped inf gives NaN
    acc = accumulate_product(acc, g_ptrs, w_ptrs, BLOCK_K * stride_gn, BLOCK_K * stride_wn, N, row_ok, col_ok,
                             BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION)
    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk
    tl.store(dx_ptrs, cast_to(acc, dx_ptr.dtype.element_ty, INTERPRETED_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.heuristics({"HAS_DROPOUT": lambda args: args["dropout_threshold"] > 0,
                    "INDEX_BELOW_2_32": lambda args: index_below_2_32(args["M"], args["K"])})
@triton.autotune(
    configs=lora_a_grad_configs(),
    key=["K", "R_PAD", "M_BUCKET", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_lora_a_grad_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_split", "seed", "dropout_threshold"])
def _lora_a_grad_kernel(
    x_ptr, gb_ptr, dA_partial_ptr,
    M, K, rows_per_split, M_BUCKET,
    stride_xm, stride_xk,
    seed, dropout_threshold,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, INDEX_BELOW_2_32: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_PAD)
    col_ok = cols < K

    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = min(row_start + rows_per_split, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[:, None] * K + cols[None, :], dropout_threshold, INDEX_BELOW_2_32)
            x = x * keep.to(x.dtype)  # a multiply, as the reference: a dropped inf gives NaN
        gb = tl.load(gb_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=row_ok[:, None], other=0.0)
        gb = cast_to(gb, x_ptr.dtype.element_ty, INTERPRETED_BF16)
        acc = tl.dot(dot_operand(tl.trans(gb), INTERPRETED_BF16), dot_operand(x, INTERPRETED_BF16), acc,
                     input_precision=INPUT_PRECISION)

    out_ptrs = dA_partial_ptr + pid_split.to(tl.int64) * R_PAD * K + ranks[:, None] * K + cols[None, :]
    tl.store(out_ptrs, acc, mask=col_ok[None, :])


@triton.jit
def _sum_partials_kernel(
    partial_ptr, out_ptr,
    S, ROWS, COLS,
    stride_ps, stride_pr, stride_pc, stride_or, stride_oc,
    scale,
    INTERPRETED_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[r, c] = scale * sum over s = 0, 1, ..., S-1 (in that order) of partial[s, r, c].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    ptrs = partial_ptr + rows[:, None] * stride_pr + cols[None, :] * stride_pc
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for _ in range(0, S):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += stride_ps
    acc = acc * scale
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED_BF16), mask=ok)


def _sum_partials(partial: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = scale * partial.sum(0)`` over a 3-D fp32 ``partial`` whose trailing dims may exceed ``out``'s."""
    splits = partial.shape[0]
    rows, cols = out.shape
    block_c = min(64, max(16, triton.next_power_of_2(cols)))
    grid = (triton.cdiv(rows, 64), triton.cdiv(cols, block_c))
    _sum_partials_kernel[grid](
        partial, out, splits, rows, cols,
        partial.stride(0), partial.stride(1), partial.stride(2), out.stride(0), out.stride(1),
        float(scale), INTERPRETED_BF16=interpreted_bf16(out.dtype), BLOCK_R=64, BLOCK_C=block_c,
    )
    return out


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    compute_dx: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on validated 2-D inputs with M >= 1; returns (dx, dA, dB, db)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = padded_rank(R)
    device, f32 = x.device, torch.float32
    bf16_fixes = interpreted_bf16(x.dtype)
    precision = input_precision(x.dtype)
    bucket = m_bucket(M)
    threshold, keep_scale, seed32 = dropout_threshold(dropout_p), dropout_scale(dropout_p), seed_as_int32(seed)

    with device_guard(x):
        # gb = g·B, fp32 [M, R_PAD] (padding columns zero): inside the dx kernel when it runs and the
        # rank is small, else from the thin projection kernel.
        gb = poison_(torch.empty(M, r_pad, dtype=f32, device=device))
        fused_gb = backward_fuses_gb(compute_dx, r_pad)
        if not fused_gb:
            project_rows(grad_y, lora_B, lora_B.stride(0), lora_B.stride(1), R, gb, r_pad,
                         1.0, 0, 0, bf16_fixes, precision)

        dx = grad_y.new_empty(0)
        if compute_dx:
            dx = poison_(torch.empty(M, K, dtype=grad_y.dtype, device=device))

            def dx_grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

            _input_grad_kernel[dx_grid](
                grad_y, weight, lora_A, lora_B, gb, dx,
                M, N, K, R, bucket,
                grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
                lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), dx.stride(0), dx.stride(1),
                float(scaling) * keep_scale, seed32, threshold,
                R_PAD=r_pad, PRECOMPUTED_GB=not fused_gb, INTERPRETED_BF16=bf16_fixes, INPUT_PRECISION=precision,
            )

        # g-pass: dB/db partials per row split (reductions over M), summed in a fixed order.
        block_n = gpass_block_n(N, r_pad)
        col_blocks = triton.cdiv(N, block_n)
        splits, rows_per_split = split_rows(M, col_blocks, device)
        dB_partial = poison_(torch.empty(splits, N, r_pad, dtype=f32, device=device))
        db_partial = poison_(torch.empty(splits, N, dtype=f32, device=device)) if compute_db else None
        _gpass_kernel[(col_blocks, splits)](
            grad_y, xa, dB_partial, db_partial,
            M, N, R, rows_per_split, bucket,
            grad_y.stride(0), grad_y.stride(1), xa.stride(0), xa.stride(1),
            R_PAD=r_pad, BLOCK_N=block_n, INTERPRETED_BF16=bf16_fixes, INPUT_PRECISION=precision,
        )
        dB = _sum_partials(dB_partial, poison_(torch.empty(N, R, dtype=lora_B.dtype, device=device)), scaling)
        db = grad_y.new_empty(0)
        if compute_db:
            db = poison_(torch.empty(N, dtype=grad_y.dtype, device=device))
            _sum_partials(db_partial.unsqueeze(2), db.unsqueeze(1), 1.0)

        # dA: per (column block, row split) partials of gbᵀ·(x ⊙ mask), then one fixed-order sum.
        da_splits, da_rows_per_split = split_rows(M, triton.cdiv(K, DA_PLANNING_BLOCK_K), device)
        dA_partial = poison_(torch.empty(da_splits, r_pad, K, dtype=f32, device=device))

        def da_grid(meta):
            return (triton.cdiv(K, meta["BLOCK_K"]), da_splits)

        _lora_a_grad_kernel[da_grid](
            x, gb, dA_partial,
            M, K, da_rows_per_split, bucket,
            x.stride(0), x.stride(1),
            seed32, threshold,
            R_PAD=r_pad, INTERPRETED_BF16=bf16_fixes, INPUT_PRECISION=precision,
        )
        dA = poison_(torch.empty(R, K, dtype=lora_A.dtype, device=device))
        _sum_partials(dA_partial, dA, scaling * keep_scale)
    return dx, dA, dB, db
