"""Forward: ``y = x·Wᵀ + b + s·(x~·Aᵀ)·Bᵀ`` and ``xa = x~·Aᵀ`` (``x~`` = x ⊙ mask / (1-p)).

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of y (grouped order for L2 reuse) and runs:

1. xa for its row block: loaded from the pre-pass, or (fused schedule) a thin K loop
   ``xa = x·Aᵀ`` over the row block's x tiles (A padded to ``R_PAD`` rows with zeros);
   programs with ``pid_n == 0`` store it (fp32) for backward;
2. the LoRA up-projection in the reference's rounding order: ``acc = s·(round(xa)·Bᵀ)``
   (xa rounded to the input dtype unscaled, s on the fp32 product, so nothing overflows
   where PEFT's ``lora_B(lora_A(x))·s`` would not);
3. the base GEMM ``acc += x·Wᵀ`` seeded with that accumulator: a plain K loop with no
   rank-sized operand, so its loads stay asynchronous at every rank; then the bias.

Seeding the accumulator keeps one ``[BM, BN]`` fp32 tile live (a separate LoRA
accumulator in the epilogue would double the registers of the widest tiles).

Schedules, chosen per call:

- **Fused (p = 0 and R_PAD <= 64)**: one launch. Every column block recomputes its row
  block's xa: an extra ``R_PAD/BLOCK_N`` of MMA work and a second pass over the row
  block's x tiles (from L2: the same program just read them).
- **Pre-pass (p > 0 or R_PAD > 64)**: :func:`~.projection.thin_projection_kernel` computes
  ``xa = (x ⊙ mask)·Aᵀ·1/(1-p)`` once (one read of x, the dropout hash evaluated once per
  element of x), then the GEMM kernel runs with ``PRECOMPUTED_XA`` and loads it.

Cost (``kernels/plan.py`` and benchmarks/cost_model.py): the pre-pass reads x once more
from memory and costs one more launch. ``plan.MAX_FUSED_R_PAD`` is the switch-over rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.debug import poison_
from lora_fused.dropout import dropout_scale, dropout_threshold

from .common import accumulate_product, cast_to, device_guard, dot_operand, input_precision, interpreted_bf16
from .configs import gemm_configs, m_bucket, padded_rank, prune_gemm_configs
from .dropout import seed_as_int32
from .plan import forward_uses_prepass
from .projection import project_rows



@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "R_PAD", "M_BUCKET", "PRECOMPUTED_XA"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scaling,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECOMPUTED_XA: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R

    x_ptrs = x_ptr + rows[:, None] * stride_xm + steps[None, :] * stride_xk
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + steps[:, None] * stride_wk
    a_ptrs = a_ptr + ranks[None, :] * stride_ar + steps[:, None] * stride_ak

    xa_ptrs = xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar
    if PRECOMPUTED_XA:
        # Already masked and scaled by 1/(1-p) by the pre-pass.
        xa = tl.load(xa_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    else:
        xa = accumulate_product(tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), x_ptrs, a_ptrs,
                                BLOCK_K * stride_xk, BLOCK_K * stride_ak, K, row_ok, rank_ok,
                                BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION)
        # An inf in x makes the zero-padded rank columns inf·0 = NaN; they must not reach y.
        xa = tl.where(rank_ok[None, :], xa, 0.0)
        if pid_n == 0:
            tl.store(xa_ptrs, xa, mask=row_ok[:, None] & rank_ok[None, :])

    # The LoRA up-projection first, in the reference's rounding order: xa rounded to the input dtype
    # unscaled, s applied to the fp32 product, which then seeds the base GEMM's accumulator.
    b_ptrs = b_ptr + ranks[:, None] * stride_br + cols.to(tl.int64)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    xa_rounded = cast_to(xa, y_ptr.dtype.element_ty, INTERPRETED_BF16)
    acc = tl.dot(dot_operand(xa_rounded, INTERPRETED_BF16), dot_operand(b, INTERPRETED_BF16),
                 input_precision=INPUT_PRECISION) * scaling
    acc = accumulate_product(acc, x_ptrs, w_ptrs, BLOCK_K * stride_xk, BLOCK_K * stride_wk, K, row_ok, col_ok,
                             BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, cast_to(acc, y_ptr.dtype.element_ty, INTERPRETED_BF16), mask=row_ok[:, None] & col_ok[None, :])


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
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

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
