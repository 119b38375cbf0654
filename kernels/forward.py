"""Forward kernel: ``y = x·Wᵀ + b + s·(x~·Aᵀ)·Bᵀ`` and ``xa = x~·Aᵀ`` in one pass over x.

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of y (grouped order for L2 reuse). Its
K loop loads every x tile once and feeds two MMAs: ``acc += x·Wᵀ`` and
``xa += (x⊙mask)·Aᵀ`` (A padded to ``R_PAD`` rows with zeros). The dropout mask comes
from the shared hash, and the ``1/(1-p)`` rescale is applied once to xa instead of to
every x element. The epilogue adds the LoRA up-projection as one more MMA,
``acc += (s·xa)·Bᵀ``, then the bias, and programs with ``pid_n == 0`` store xa.

Cost notes (unmeasured here, for the benchmark issue): every column block recomputes
its row block's xa (an extra ``R_PAD/BLOCK_N`` of MMA work) and, with dropout, the mask
hash of its x tiles (~30 integer ops per element per column block), which may show at
large N; the persistent M-major schedule of DESIGN.md §2 would compute both once per row
block. Ranks above 64 keep only small tiles after pruning (correct, slower).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.dropout import dropout_scale, dropout_threshold

from .common import cast_to, device_guard, dot_operand, input_precision, interpreted_bf16
from .configs import gemm_configs, m_bucket, padded_rank, prune_gemm_configs
from .dropout import dropout_keep, seed_as_int32


@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_DROPOUT": lambda args: args["dropout_threshold"] > 0,
})
@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "R_PAD", "M_BUCKET", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "seed", "dropout_threshold"])
def lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scaling, keep_scale, seed, dropout_threshold,
    R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + steps) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(dot_operand(x, INTERPRETED_BF16), dot_operand(w, INTERPRETED_BF16), acc,
                     input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[:, None] * K + (k0 + steps)[None, :], dropout_threshold)
            x = tl.where(keep, x, 0.0)
        xa = tl.dot(dot_operand(x, INTERPRETED_BF16), dot_operand(a, INTERPRETED_BF16), xa,
                    input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    xa = xa * keep_scale
    if pid_n == 0:
        xa_ptrs = xa_ptr + rows[:, None] * stride_xam + ranks[None, :] * stride_xar
        tl.store(xa_ptrs, xa, mask=row_ok[:, None] & rank_ok[None, :])

    # LoRA up-projection: one more MMA into the same accumulator, in the input dtype as the reference does.
    b_ptrs = b_ptr + ranks[:, None] * stride_br + cols.to(tl.int64)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    scaled_xa = cast_to(xa * scaling, y_ptr.dtype.element_ty, INTERPRETED_BF16)
    acc = tl.dot(dot_operand(scaled_xa, INTERPRETED_BF16), dot_operand(b, INTERPRETED_BF16), acc,
                 input_precision=INPUT_PRECISION)
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
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    xa = torch.empty(M, R, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(x):
        lora_forward_kernel[grid](
            x, weight, bias, lora_A, lora_B, y, xa,
            M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
            float(scaling), dropout_scale(dropout_p), seed_as_int32(seed), dropout_threshold(dropout_p),
            R_PAD=padded_rank(R), INTERPRETED_BF16=interpreted_bf16(x.dtype), INPUT_PRECISION=input_precision(x.dtype),
        )
    return y, xa
