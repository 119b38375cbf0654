"""Forward: ``y = x·Wᵀ + b + s·(x~·Aᵀ)·Bᵀ`` and ``xa = x~·Aᵀ`` (``x~`` = x ⊙ mask / (1-p)).

Grid: row blocks × column groups, row-block-major (the programs of one row block are adjacent
ids, so its x tiles stay in L2). A program owns ``BLOCK_M`` rows and ``cols_per_program``
consecutive ``BLOCK_N``-wide column blocks of y:

1. xa for its row block, once: loaded from the pre-pass, or (fused schedule) a thin K loop
   ``xa = x·Aᵀ`` over the row block's x tiles (A's ``[BLOCK_K, R_PAD]`` tile is contiguous
   along K, so its rank mask does not stop asynchronous copies); programs of column group 0
   store it (fp32) for backward; it is rounded to the input dtype once and kept in registers;
2. for each of its column blocks: the LoRA up-projection in the reference's rounding order,
   ``acc = s·(round(xa)·Bᵀ)`` (xa rounded unscaled, s on the fp32 product, so nothing
   overflows where PEFT's ``lora_B(lora_A(x))·s`` would not), then the base GEMM
   ``acc += x·Wᵀ`` seeded with it (a plain K loop with no rank-sized operand: asynchronous
   at every rank), the bias, the store.

Seeding the accumulator keeps one ``[BM, BN]`` fp32 tile live (a separate LoRA accumulator
in the epilogue would double the registers of the widest tiles).

``cols_per_program`` (:func:`~.configs.forward_columns_per_program`, a heuristic on each
autotuned tile) is all of a row block's column blocks when M fills the GPU — xa computed
exactly once per row block — and at small M just few enough that the grid still fills the
SMs in the fewest rounds (each column group then computes xa once: ``R_PAD/BLOCK_N`` of a
tile's MMA work per group).

Schedules, chosen per call:

- **Fused (p = 0 and R_PAD <= 64)**: one launch.
- **Pre-pass (p > 0 or R_PAD > 64)**: :func:`~.projection.thin_projection_kernel` computes
  ``xa = (x ⊙ mask)·Aᵀ·1/(1-p)`` once (one read of x, the dropout hash evaluated once per
  element of x), then the GEMM kernel runs with ``PRECOMPUTED_XA`` (one column block per
  program) and loads it. Hashing inside the GEMM instead would hash every x tile once per
  column block.

Cost (``kernels/plan.py`` and benchmarks/cost_model.py): the pre-pass reads x once more
from memory and costs one more launch. ``plan.MAX_FUSED_R_PAD`` is the switch-over rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.debug import poison_
from lora_fused.dropout import dropout_scale, dropout_threshold

from .common import (accumulate_product, cast_to, device_guard, dot_operand, input_precision, interpreted_bf16,
                     rank_product)
from .configs import forward_columns_per_program, gemm_configs, m_bucket, multiprocessors, padded_rank, prune_gemm_configs
from .dropout import seed_as_int32
from .plan import forward_uses_prepass
from .projection import project_rows



def _columns_per_program(args) -> int:
    # With xa loaded from the pre-pass there is nothing to share between column blocks: one per program.
    if args["PRECOMPUTED_XA"]:
        return 1
    return forward_columns_per_program(args["M"], args["N"], args["BLOCK_M"], args["BLOCK_N"], args["R_PAD"],
                                       multiprocessors(args["x_ptr"].device))


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.autotune(
    configs=gemm_configs(),
    # Everything that changes the best tile (the autotuner adds every tensor's dtype): R for R_PAD and
    # the rank mask of A's loads, the dot precision, the schedule.
    key=["N", "K", "R", "R_PAD", "M_BUCKET", "PRECOMPUTED_XA", "HAS_BIAS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
# Below the autotuner, so it sees each config's tile: the column blocks a program walks with one xa.
@triton.heuristics({"cols_per_program": _columns_per_program})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "cols_per_program"])
def lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scaling, cols_per_program,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECOMPUTED_XA: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Row-block-major: the column groups of one row block are adjacent program ids (x stays in L2).
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(N, BLOCK_N)
    col_groups = tl.cdiv(col_blocks, cols_per_program)
    pid_m = pid // col_groups
    col_group = pid % col_groups

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    rank_ok = ranks < R

    x_ptrs = x_ptr + rows[:, None] * stride_xm + steps[None, :] * stride_xk
    xa_ptrs = xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar
    if PRECOMPUTED_XA:
        # Already masked and scaled by 1/(1-p) by the pre-pass.
        xa = tl.load(xa_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    else:
        # A's tile [BLOCK_K, R_PAD] is contiguous along K: its rank mask does not stop asynchronous copies.
        a_ptrs = a_ptr + ranks[None, :] * stride_ar + steps[:, None] * stride_ak
        xa = rank_product(x_ptrs, a_ptrs, BLOCK_K * stride_xk, BLOCK_K * stride_ak, K, row_ok, rank_ok,
                          BLOCK_M, R_PAD, BLOCK_K, True, INTERPRETED_BF16, INPUT_PRECISION)
        if col_group == 0:
            tl.store(xa_ptrs, xa, mask=row_ok[:, None] & rank_ok[None, :])
    xa_rounded = dot_operand(cast_to(xa, y_ptr.dtype.element_ty, INTERPRETED_BF16), INTERPRETED_BF16)

    first = col_group * cols_per_program
    for pid_n in range(first, tl.minimum(first + cols_per_program, col_blocks)):
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # The LoRA up-projection first, in the reference's rounding order: xa rounded to the input dtype
        # unscaled, s applied to the fp32 product, which then seeds the base GEMM's accumulator.
        b = tl.load(b_ptr + ranks[:, None] * stride_br + cols.to(tl.int64)[None, :] * stride_bn,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xa_rounded, dot_operand(b, INTERPRETED_BF16), input_precision=INPUT_PRECISION) * scaling
        w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + steps[:, None] * stride_wk
        acc = accumulate_product(acc, x_ptrs, w_ptrs, BLOCK_K * stride_xk, BLOCK_K * stride_wk, K, row_ok, col_ok,
                                 BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION, True)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, INTERPRETED_BF16),
                 mask=row_ok[:, None] & col_ok[None, :])


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated 2-D inputs with M >= 1; returns (y, xa)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = poison_(torch.empty(M, N, dtype=x.dtype, device=x.device))
    xa = poison_(torch.empty(M, R, dtype=torch.float32, device=x.device))

    def grid(meta):
        col_groups = triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["cols_per_program"])
        return (triton.cdiv(M, meta["BLOCK_M"]) * col_groups,)

    r_pad = padded_rank(R)
    bf16_fixes, precision = interpreted_bf16(x.dtype), input_precision(x.dtype)
    precomputed = forward_uses_prepass(N, r_pad, dropout_p)  # N = 0 included: no GEMM program would store xa
    with device_guard(x):
        if precomputed:
            # xa[m, r] = (1/(1-p)) · Σ_k (x ⊙ mask)[m, k] · A[r, k]: P[k, r] = A[r, k].
            project_rows(x, lora_A, lora_A.stride(1), lora_A.stride(0), R, xa, r_pad,
                         dropout_scale(dropout_p), seed_as_int32(seed), dropout_threshold(dropout_p),
                         bf16_fixes, precision)
        lora_forward_kernel[grid](
            x, weight, bias, lora_A, lora_B, y, xa,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
            float(scaling),
            R_PAD=r_pad, PRECOMPUTED_XA=precomputed, INTERPRETED_BF16=bf16_fixes, INPUT_PRECISION=precision,
        )
    return y, xa
