"""The Triton backend's launch plan: which kernels a forward and a backward launch, and what each moves.

The launchers (:mod:`.forward`, :mod:`.backward`) take their schedule decisions from the
functions here, and :func:`launch_plan` lists the same launches with their device-memory
traffic and MMA flops, so the cost model (benchmarks/cost_model.py) describes the code
that runs; tests/test_cost_model.py checks the kernel sequence against instrumented
interpreter launches.

Traffic model (DRAM bytes, not L2): every tensor a launch touches is counted once per
launch, i.e. operand tiles re-read by other programs of the same launch are assumed to
hit L2 (W, A, B and the row block of x or g a program just read). The backward's dB/db steps
read back a chunk of at most :func:`~.configs.backward_db_rows` rows of g that the group's
programs have just streamed (L2 hits: g is read from DRAM once) and read-modify-write the
group's partial slices in L2 (``4·R_PAD/DB_ROWS`` of |g|, kernels/backward.py "dB/db"), unpriced;
L2→SM traffic (g streamed once per 64-wide column block, W once per row block) is not priced. MMA flops count what the kernels issue, padded rank ``R_PAD`` and
recomputations included; the forward's xa recomputation is counted with the nominal tile
``PLAN_BLOCK_M × PLAN_BLOCK_N``, the backward's gb with the dx tile's BLOCK_N
(:data:`BACKWARD_DX_BLOCK_N`; the autotuned tile may differ). ``sms`` (132 on an H100 SXM) sizes the forward's column groups and
the backward's row groups, as the launchers do with the device's SM count. The backward's partials (fp32 per row group) are counted written and read.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .configs import backward_row_groups, forward_columns_per_program, padded_rank

# Largest padded rank whose xa (forward) or gb (backward) product stays inside the GEMM kernel.
MAX_FUSED_R_PAD = 64
# Nominal tile the planning decisions use (the autotuned tile may differ): the backward's row groups are
# sized for K / PLAN_BLOCK_N column blocks, and the model counts the forward's xa and the backward's gb
# recomputations with it.
PLAN_BLOCK_M = 128
PLAN_BLOCK_N = 128
# The widest dx tile (BLOCK_N columns of K) the backward's config lists keep with fused gb (configs.py:
# 128×64 on sm90, 32×64 on sm80): every such column block recomputes gb, so the model counts gb's flops at
# cdiv(K, 64) column blocks when dx is computed (without dx, wide tiles run and PLAN_BLOCK_N stands).
BACKWARD_DX_BLOCK_N = 64
FP32 = 4


def forward_uses_prepass(n: int, r_pad: int, dropout_p: float) -> bool:
    """xa from the thin projection kernel (one more launch) instead of inside the GEMM kernel."""
    return dropout_p > 0 or r_pad > MAX_FUSED_R_PAD or n == 0


def backward_fuses_gb(r_pad: int) -> bool:
    """gb = g·B inside the backward kernel (else the thin projection kernel computes it first)."""
    return r_pad <= MAX_FUSED_R_PAD


def backward_column_block(compute_dx: bool) -> int:
    """BLOCK_N (columns of K per program) the backward's row groups are sized for: the dx tile's with dx."""
    return BACKWARD_DX_BLOCK_N if compute_dx else PLAN_BLOCK_N


def backward_pads_b(r: int) -> bool:
    """B is copied to a zero-padded [N, R_PAD] buffer for the fused gb loop (rank-masked loads do not pipeline)."""
    return r != padded_rank(r)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its kernel's name, DRAM bytes read and written, MMA flops issued."""

    kernel: str
    reads: int
    writes: int
    mma_flops: int

    @property
    def bytes(self) -> int:
        return self.reads + self.writes


def forward_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, has_bias: bool = True,
                 sms: int = 132) -> list[Launch]:
    r_pad = padded_rank(r)
    x, w, a, b, y, xa = M * K * elt, N * K * elt, r * K * elt, N * r * elt, M * N * elt, M * r * FP32
    bias = N * elt if has_bias else 0
    if M == 0:
        return []
    if forward_uses_prepass(N, r_pad, dropout_p):
        return [
            Launch("thin_projection_kernel", x + a, xa, 2 * M * K * r_pad),
            Launch("lora_forward_kernel", x + w + b + bias + xa, y, 2 * M * N * K + 2 * M * N * r_pad),
        ]
    # xa is computed once per (row block, column group): once per row block when M fills the GPU.
    col_blocks = triton.cdiv(N, PLAN_BLOCK_N)
    col_groups = triton.cdiv(col_blocks, forward_columns_per_program(M, N, PLAN_BLOCK_M, PLAN_BLOCK_N, r_pad, sms))
    return [Launch("lora_forward_kernel", x + w + a + b + bias, y + xa,
                   2 * M * N * K + 2 * M * K * r_pad * col_groups + 2 * M * N * r_pad)]


def backward_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, compute_dx: bool = True,
                  compute_db: bool = True, sms: int = 132) -> list[Launch]:
    """``sms``: the GPU's SM count (132 on an H100 SXM), which sizes the row groups as the launcher does."""
    if M == 0:
        return []
    r_pad = padded_rank(r)
    g, x, w, a, b = M * N * elt, M * K * elt, N * K * elt, r * K * elt, N * r * elt
    xa, gb = M * r * FP32, M * r_pad * FP32
    launches = []
    fused_gb = backward_fuses_gb(r_pad)
    if not fused_gb:
        launches.append(Launch("thin_projection_kernel", g + b, gb, 2 * M * N * r_pad))
    elif backward_pads_b(r):
        launches.append(Launch("_pad_rank_kernel", b, N * r_pad * elt, 0))
    col_blocks = triton.cdiv(K, backward_column_block(compute_dx))
    groups, _ = backward_row_groups(M, col_blocks, sms)
    partials = groups * (r_pad * K + N * r_pad + N * compute_db) * FP32
    rank_operand = N * r_pad * elt if fused_gb else gb
    flops = 2 * M * K * r_pad + 2 * M * N * r_pad  # dA, dB
    if fused_gb:
        # gb, recomputed by every column block of the tile that runs (narrower with dx, see BACKWARD_DX_BLOCK_N)
        flops += 2 * M * N * r_pad * max(col_blocks, 1)
    if compute_dx:
        flops += 2 * M * N * K + 2 * M * K * r_pad
    # W and A are loaded only for dx (A for its LoRA term).
    launches.append(Launch("lora_backward_kernel", g + x + xa + rank_operand + (w + a) * compute_dx,
                           x * compute_dx + partials, flops))
    outputs = (r * K + N * r + N * compute_db)
    launches.append(Launch("_reduce_partials_kernel", groups * outputs * FP32, outputs * elt, 0))
    return launches


def launch_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, compute_dx: bool = True,
                compute_db: bool = True, has_bias: bool = True, sms: int = 132) -> dict[str, list[Launch]]:
    """``{"forward": [...], "backward": [...]}`` for one layer call; ``elt`` is the input dtype's size in bytes."""
    return {"forward": forward_plan(M, K, N, r, elt, dropout_p, has_bias, sms),
            "backward": backward_plan(M, K, N, r, elt, dropout_p, compute_dx, compute_db, sms)}
