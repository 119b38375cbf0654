"""The Triton backend's launch plan: which kernels a forward and a backward launch, and what each moves.

The launchers (:mod:`.forward`, :mod:`.backward`) take their schedule decisions from the
functions here, and :func:`launch_plan` lists the same launches with their device-memory
traffic and MMA flops, so the cost model (benchmarks/cost_model.py) describes the code
that runs; tests/test_cost_model.py checks the kernel sequence against instrumented
interpreter launches.

Traffic model (DRAM bytes, not L2): every tensor a launch touches is counted once per
launch, i.e. operand tiles re-read by other programs of the same launch are assumed to
hit L2 (W, A, B and the row block of x or g a program just read). MMA flops count what
the kernels issue, padded rank ``R_PAD`` and recomputations included; the xa and gb
recomputed per column block are counted with the nominal tile width ``PLAN_BLOCK_N``
(the autotuned width may differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .configs import gpass_block_n, padded_rank, split_rows_for

# Largest padded rank whose xa (forward) or gb (dx) product stays inside the GEMM kernel.
MAX_FUSED_R_PAD = 64
# Column-block width the dA split count is planned for (its BLOCK_K is autotuned).
DA_PLANNING_BLOCK_K = 64
# Nominal output-tile width used to count the per-column-block recomputation of xa / gb.
PLAN_BLOCK_N = 128
FP32 = 4


def forward_uses_prepass(n: int, r_pad: int, dropout_p: float) -> bool:
    """xa from the thin projection kernel (one more launch) instead of inside the GEMM kernel."""
    return dropout_p > 0 or r_pad > MAX_FUSED_R_PAD or n == 0


def backward_fuses_gb(compute_dx: bool, r_pad: int) -> bool:
    """gb = g·B inside the dx kernel (else the thin projection kernel computes it)."""
    return compute_dx and r_pad <= MAX_FUSED_R_PAD


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


def forward_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, has_bias: bool = True) -> list[Launch]:
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
    column_blocks = triton.cdiv(N, PLAN_BLOCK_N)
    return [Launch("lora_forward_kernel", x + w + a + b + bias, y + xa,
                   2 * M * N * K + 2 * M * K * r_pad * column_blocks + 2 * M * N * r_pad)]


def backward_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, compute_dx: bool = True,
                  compute_db: bool = True, programs: int = 264) -> list[Launch]:
    """``programs``: how many programs a split-M reduction aims for (two waves of SMs on a GPU)."""
    if M == 0:
        return []
    r_pad = padded_rank(r)
    g, x, w, a, b = M * N * elt, M * K * elt, N * K * elt, r * K * elt, N * r * elt
    xa, gb = M * r * FP32, M * r_pad * FP32
    launches = []
    fused_gb = backward_fuses_gb(compute_dx, r_pad)
    if not fused_gb:
        launches.append(Launch("thin_projection_kernel", g + b, gb, 2 * M * N * r_pad))
    if compute_dx:
        column_blocks = triton.cdiv(K, PLAN_BLOCK_N)
        gb_flops = 2 * M * N * r_pad * column_blocks if fused_gb else 0
        launches.append(Launch("_input_grad_kernel", g + w + a + b * fused_gb + gb * (not fused_gb),
                               M * K * elt + gb * fused_gb, 2 * M * N * K + 2 * M * K * r_pad + gb_flops))
    splits, _ = split_rows_for(M, triton.cdiv(N, gpass_block_n(N, r_pad)), programs)
    dB_partial, db_partial = splits * N * r_pad * FP32, splits * N * FP32
    launches.append(Launch("_gpass_kernel", g + xa, dB_partial + db_partial * compute_db, 2 * M * N * r_pad))
    launches.append(Launch("_sum_partials_kernel", dB_partial, N * r * elt, 0))
    if compute_db:
        launches.append(Launch("_sum_partials_kernel", db_partial, N * elt, 0))
    da_splits, _ = split_rows_for(M, triton.cdiv(K, DA_PLANNING_BLOCK_K), programs)
    dA_partial = da_splits * r_pad * K * FP32
    launches.append(Launch("_lora_a_grad_kernel", x + gb, dA_partial, 2 * M * K * r_pad))
    launches.append(Launch("_sum_partials_kernel", dA_partial, r * K * elt, 0))
    return launches


def launch_plan(M: int, K: int, N: int, r: int, elt: int, dropout_p: float, compute_dx: bool = True,
                compute_db: bool = True, has_bias: bool = True, programs: int = 264) -> dict[str, list[Launch]]:
    """``{"forward": [...], "backward": [...]}`` for one layer call; ``elt`` is the input dtype's size in bytes."""
    return {"forward": forward_plan(M, K, N, r, elt, dropout_p, has_bias),
            "backward": backward_plan(M, K, N, r, elt, dropout_p, compute_dx, compute_db, programs)}
