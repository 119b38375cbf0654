"""Thin projection kernel: ``out[M, :] = scale · (in ⊙ mask)[M, K] · P[K, R]`` with R ≤ 256.

Used where the rank-sized product is worth computing once instead of inside every
column block of a wide GEMM:

- forward pre-pass ``xa = (x ⊙ mask)·Aᵀ / (1-p)`` when dropout is on or R_PAD > 64
  (P = Aᵀ): one read of x, the dropout hash evaluated once per element of x;
- backward ``gb = g·B`` when R_PAD > 64 (P = B, no dropout): a [BLOCK_M, R_PAD] gb beside the
  dx tile does not fit the one-pass backward's registers.

Each program owns ``BLOCK_M`` rows and all ``R_PAD`` (zero-padded) rank columns, and
loops over K; no reduction crosses programs, so results are deterministic. Columns
``[0, R_OUT)`` of the output are stored (R_OUT = R for xa, R_PAD for the padded gb buffer,
whose padding columns come out as zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_operand
from .configs import m_bucket, projection_configs, prune_projection_configs
from .dropout import dropout_keep, index_below_2_32


@triton.heuristics({"HAS_DROPOUT": lambda args: args["dropout_threshold"] > 0,
                    "INDEX_BELOW_2_32": lambda args: index_below_2_32(args["M"], args["K"])})
@triton.autotune(
    configs=projection_configs(),
    # stride_pk tells Aᵀ (k contiguous) from B (rank contiguous): same sizes, different best tiles.
    key=["K", "R_PAD", "M_BUCKET", "HAS_DROPOUT", "stride_pk"],
    prune_configs_by={"early_config_prune": prune_projection_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "R", "R_OUT", "seed", "dropout_threshold"])
def thin_projection_kernel(
    in_ptr, p_ptr, out_ptr,
    M, K, R, R_OUT, M_BUCKET,
    stride_im, stride_ik, stride_pk, stride_pr, stride_om, stride_or,
    scale, seed, dropout_threshold,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, INDEX_BELOW_2_32: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    rank_ok = ranks < R

    in_ptrs = in_ptr + rows[:, None] * stride_im + steps[None, :] * stride_ik
    p_ptrs = p_ptr + steps.to(tl.int64)[:, None] * stride_pk + ranks[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + steps) < K
        tile = tl.load(in_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[:, None] * K, (k0 + steps)[None, :], dropout_threshold, INDEX_BELOW_2_32)
            tile = tile * keep.to(tile.dtype)  # a multiply, as x * keep: a dropped inf gives NaN like the reference
        acc = tl.dot(dot_operand(tile, INTERPRETED_BF16), dot_operand(p, INTERPRETED_BF16), acc,
                     input_precision=INPUT_PRECISION)
        in_ptrs += BLOCK_K * stride_ik
        p_ptrs += BLOCK_K * stride_pk

    # Zero-padded rank columns of P meet an inf in the input as inf·0 = NaN: keep them zero.
    acc = tl.where(rank_ok[None, :], acc * scale, 0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & (ranks < R_OUT)[None, :])


def project_rows(inp: torch.Tensor, mat: torch.Tensor, mat_stride_k: int, mat_stride_r: int, rank: int,
                 out: torch.Tensor, r_pad: int, scale: float, seed: int, threshold: int,
                 interpreted_bf16: bool, input_precision: str) -> torch.Tensor:
    """``out[:, :out.shape[1]] = scale · (inp ⊙ mask) · P`` where ``P[k, r] = mat[k·mat_stride_k + r·mat_stride_r]``.

    ``threshold`` 0 means no dropout; ``seed`` must already be an int32 (``seed_as_int32``).
    """
    M, K = inp.shape
    R_out = out.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    thin_projection_kernel[grid](
        inp, mat, out,
        M, K, rank, R_out, m_bucket(M),
        inp.stride(0), inp.stride(1), mat_stride_k, mat_stride_r, out.stride(0), out.stride(1),
        float(scale), seed, threshold,
        R_PAD=r_pad, INTERPRETED_BF16=interpreted_bf16, INPUT_PRECISION=input_precision,
    )
    return out
