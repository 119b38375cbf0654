#!/usr/bin/env python
"""Cost model of one LoRA linear per provider: device-memory bytes, MMA flops, launches, roofline time.

For each provider (frozen ``nn.Linear``, PEFT, the unfused ``addmm`` layer of
bench_layer.py, the Triton kernels, the CUDA kernels) and shape, a list of kernel
launches, each with the bytes it reads and writes in device memory and the MMA flops it
issues. On a named GPU (peaks below, as data) each launch costs
``max(bytes / bandwidth, flops / MMA peak)`` and the layer the sum: its roofline time. A
benchmark divides its measured time by that ("measured / roofline") and by the frozen
linear's roofline (the predicted ratio).

Sources of the entries:
- ``triton``: :func:`lora_fused.kernels.plan.launch_plan`, the plan the launchers follow
  (tests/test_cost_model.py counts the launches of an instrumented run against it).
- ``triton_v1``: the Triton kernels before issue 10's rewrite (:func:`triton_v1_plan`), kept
  to compare the two plans; no longer in the code.
- ``cuda``: :func:`cuda_plan`, a description of the kernels csrc/cuda_ops.cpp launches (the
  CuTe sm80 forward and dx, or on Hopper the sm90 TMA + wgmma forward and dx; the CuTe
  rank-thin xa, gb, dB and dA GEMMs): keep it in step.
- ``linear``, ``peft``, ``addmm``: the PyTorch ops those layers run, one launch per op.

What it leaves out: L2 misses on re-read operand tiles (assumed hits), L2→SM traffic of
narrow tiles (see the caveat under the prediction table), launch latency,
wave quantisation, tile padding of M/N/K, and elementwise work inside kernels (the dropout
hash). Sizes: ``elt`` bytes per element of the input dtype; ``xa`` is fp32 in the fused
backends and in the input dtype in the unfused ones; bool masks are 1 byte per element.

    python benchmarks/cost_model.py --gpu H100-SXM            # ViT-B table of predicted ratios
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_fused.kernels.plan import FP32, Launch, launch_plan  # noqa: E402


@dataclass(frozen=True)
class GPU:
    """Dense peaks: MMA TFLOP/s for 16-bit inputs and for TF32, HBM TB/s; SMs (size the Triton plan's grids);
    ``hopper``: compute capability 9.0, where the CUDA backend runs its sm90 TMA + wgmma kernel."""

    name: str
    tflops_16bit: float
    tflops_tf32: float
    hbm_tb_s: float
    sms: int = 132
    hopper: bool = True


# Vendor datasheet peaks (dense, no sparsity).
GPUS = {
    "H100-SXM": GPU("H100 SXM", 989.4, 494.7, 3.35, sms=132),
    "H200": GPU("H200", 989.4, 494.7, 4.8, sms=132),
    "A100-SXM": GPU("A100 SXM 80GB", 312.0, 156.0, 2.039, sms=108, hopper=False),
}
PROVIDERS = ("linear", "peft", "addmm", "triton", "triton_v1", "cuda")
MODES = ("forward", "backward", "full")


def gpu_for_device_name(device_name: str) -> GPU | None:
    """The GPU entry a CUDA device name denotes (``'NVIDIA H100 80GB HBM3'`` -> H100 SXM), else None."""
    name = device_name.upper()
    if "H200" in name:
        return GPUS["H200"]
    if "H100" in name and "PCIE" not in name:
        return GPUS["H100-SXM"]
    if "A100" in name and "PCIE" not in name:
        return GPUS["A100-SXM"]
    return None


def roofline_ms(launches: list[Launch], gpu: GPU, elt: int) -> float:
    peak = (gpu.tflops_tf32 if elt == 4 else gpu.tflops_16bit) * 1e12
    bandwidth = gpu.hbm_tb_s * 1e12
    return sum(max(launch.bytes / bandwidth, launch.mma_flops / peak) for launch in launches) * 1e3


def _op(name, reads, writes, flops=0):
    return Launch(name, int(reads), int(writes), int(flops))


def linear_plan(M, K, N, elt):
    """Frozen ``F.linear`` with bias: one GEMM forward, dx = g·W backward (no dW, no db)."""
    x, w, y = M * K * elt, N * K * elt, M * N * elt
    return {"forward": [_op("addmm", x + w + N * elt, y, 2 * M * N * K)],
            "backward": [_op("mm dx", y + w, x, 2 * M * N * K)]}


def peft_plan(M, K, N, r, elt, p):
    """PEFT's ``result = base(x) + lora_B(lora_A(dropout(x))) * s`` and its autograd backward."""
    x, w, y, xa, a, b = M * K * elt, N * K * elt, M * N * elt, M * r * elt, r * K * elt, N * r * elt
    mask = M * K
    forward = [_op("base addmm", x + w + N * elt, y, 2 * M * N * K)]
    if p > 0:
        forward.append(_op("dropout", x, x + mask))
    forward += [_op("lora_A mm", x + a, xa, 2 * M * K * r), _op("lora_B mm", xa + b, y, 2 * M * N * r),
                _op("mul s", y, y), _op("add", 2 * y, y)]
    backward = [_op("mul s", y, y), _op("lora_B dx", y + b, xa, 2 * M * N * r),
                _op("lora_B dW", y + xa, b, 2 * M * N * r),
                _op("lora_A dx", xa + a, x, 2 * M * K * r), _op("lora_A dW", xa + x, a, 2 * M * K * r)]
    if p > 0:
        backward.append(_op("dropout backward", x + mask, x))
    backward += [_op("base dx", y + w, x, 2 * M * N * K), _op("accumulate dx", 2 * x, x)]
    return {"forward": forward, "backward": backward}


def addmm_plan(M, K, N, r, elt, p):
    """bench_layer.py's AddmmLoRAFunction (Unsloth style): y.addmm_ re-reads and rewrites y."""
    x, w, y, xa, a, b = M * K * elt, N * K * elt, M * N * elt, M * r * elt, r * K * elt, N * r * elt
    mask = M * K
    forward = [_op("native_dropout", x, x + mask)] if p > 0 else []
    forward += [_op("xa mm", x + a, xa, 2 * M * K * r), _op("linear", x + w + N * elt, y, 2 * M * N * K),
                _op("y.addmm_", y + xa + b, y, 2 * M * N * r)]
    backward = [_op("gb mm", y + b, xa, 2 * M * N * r)]
    if p > 0:
        backward += [_op("x*mask", x + mask, x), _op("*scale", x, x)]
    backward.append(_op("dx mm", y + w, x, 2 * M * N * K))
    if p > 0:
        backward += [_op("gb@A", xa + a, x, 2 * M * K * r), _op("dx.addcmul_", 2 * x + mask, x)]
    else:
        backward.append(_op("dx.addmm_", x + xa + a, x, 2 * M * K * r))
    backward += [_op("dA mm", xa + x, a, 2 * M * K * r), _op("dA mul_", a, a),
                 _op("dB mm", y + xa, b, 2 * M * N * r), _op("dB mul_", b, b)]
    return {"forward": forward, "backward": backward}


def triton_v1_plan(M, K, N, r, elt, p, programs=264):
    """The Triton kernels before issue 10's rewrite (replaced; kept here to compare plans).

    Forward: xa recomputed in every output column block (p = 0), or the pre-pass. Backward:
    dx with gb recomputed per column block (gb stored), a g-pass reading g again for dB/db,
    a dA kernel reading x again, and one split-M partial sum per gradient: 5-6 launches."""
    from lora_fused.kernels.configs import padded_rank

    def cdiv(a, b):
        return -(-a // b)

    def split_rows(other_blocks):  # v1's split-M reductions: about `programs` programs, 128-row splits
        splits = max(1, min(cdiv(programs, other_blocks), cdiv(M, 128)))
        return cdiv(M, cdiv(cdiv(M, splits), 128) * 128)

    r_pad = padded_rank(r)
    g, x, w, a, b = M * N * elt, M * K * elt, N * K * elt, r * K * elt, N * r * elt
    xa, gb, block = M * r * FP32, M * r_pad * FP32, 128
    if p > 0 or r_pad > 64:
        forward = [_op("thin_projection_kernel", x + a, xa, 2 * M * K * r_pad),
                   _op("lora_forward_kernel", x + w + b + N * elt + xa, g, 2 * M * N * K + 2 * M * N * r_pad)]
    else:
        forward = [_op("lora_forward_kernel", x + w + a + b + N * elt, g + xa,
                       2 * M * N * K + 2 * M * K * r_pad * -(-N // block) + 2 * M * N * r_pad)]
    fused_gb = r_pad <= 64
    backward = [] if fused_gb else [_op("thin_projection_kernel", g + b, gb, 2 * M * N * r_pad)]
    backward.append(_op("_input_grad_kernel", g + w + a + (b if fused_gb else gb), x + gb * fused_gb,
                        2 * M * N * K + 2 * M * K * r_pad + 2 * M * N * r_pad * -(-K // block) * fused_gb))
    gpass_n = 256 if r_pad <= 32 else 128 if r_pad <= 64 else 64
    splits, da_splits = split_rows(-(-N // gpass_n)), split_rows(-(-K // 64))
    backward += [_op("_gpass_kernel", g + xa, splits * N * r_pad * FP32, 2 * M * N * r_pad),
                 _op("_sum_partials_kernel", splits * N * r_pad * FP32, N * r * elt),
                 _op("_lora_a_grad_kernel", x + gb, da_splits * r_pad * K * FP32, 2 * M * K * r_pad),
                 _op("_sum_partials_kernel", da_splits * r_pad * K * FP32, r * K * elt)]
    return {"forward": forward, "backward": backward}


def cuda_plan(M, K, N, r, elt, p, hopper=False):
    """The C++/CUDA backend's launches (csrc/cuda_ops.cpp) for fp16/bf16, every product on the
    CuTe sm80 mainloop, and for fp32 with TF32 allowed (the model's fp32 peak is TF32's); the
    rank-thin ones (csrc/cuda_sm80_thin.cu) pad the rank to 32-rank tiles and read their wide
    operand once per rank tile.

    ``hopper`` (fp16/bf16 on a compute-capability-9.0 GPU, operands TMA can load: K and N
    multiples of 8, as at SAM's shapes): forward and dx run on the sm90 TMA + wgmma kernel
    (csrc/cuda_sm90.cu, :func:`_cuda_sm90_plan`); the thin GEMMs stay the same.

    Forward: the tall xa GEMM (reads x, hashes the mask once, writes fp32 xa) and the
    forward GEMM (the rank-r up-projection in one-k-tile chunks: 32 ranks, 16 for fp32, then
    x·Wᵀ on top). Backward (the benchmark's frozen bias: no db): lora_B transposed once, dB
    (round(xa)ᵀ for the wide GEMM's split-M partials + its fixed-order reduce), dx (reads g
    and W as stored, fp32 included), which for r ≤ 32 also computes gb = g·B from the g tiles
    it streams (each of its K/128 column tiles repeats that 32-rank product; one writes gb) —
    for larger r the tall gb GEMM reads g once more first —, dA (round(gb)ᵀ for the wide GEMM,
    reads x once per 32-rank tile) + reduce; fp32 (TF32) the same launches but dB|db, which
    stays on the exact fp32 SIMT GEMM (db = Σ g an exact sum, as nn.Linear's). With dropout
    (p > 0) the fp16/bf16 backward hashes the mask once: dx's epilogue writes it as keep bits
    (M × ⌈K/32⌉ words, csrc/cuda_keep_bits.cuh) that dA reads with each x tile instead of
    hashing; the TF32 dx writes none and its dA hashes (compute, not bytes)."""
    if hopper and elt == 2:
        return _cuda_sm90_plan(M, K, N, r, elt, p)
    tiles = -(-r // 32)
    r_tile = tiles * 32
    lora_chunk = 64 // elt  # the forward's and dx's LoRA stage: one k-tile of 64 bytes per row
    r_lora = -(-r // lora_chunk) * lora_chunk
    x, w, y, a, b, xa, gb = M * K * elt, N * K * elt, M * N * elt, r * K * elt, N * r * elt, M * r * FP32, M * r * FP32
    splits = max(1, min(64, -(-M // 512)))  # reduction_splits in csrc/cuda_kernels.h
    rank_operand = r * (-(-M // 8) * 8) * elt
    forward = [_op("xa (CuTe thin)", x * tiles + a, xa, 2 * M * K * r_tile),
               _op("forward (CuTe sm80)", x + w + b + N * elt + xa, y, 2 * M * N * K + 2 * M * N * r_lora)]
    dB_partials, dA_partials = splits * N * r * FP32, splits * r * K * FP32
    backward = [_op("lora_B transpose", b, b)]
    gb_in_dx = r <= 32  # sm80_dx_computes_gb in csrc/cuda_kernels.h
    if gb_in_dx:
        dx_reads, dx_writes, dx_gb_flops = y + w + a + b, x + gb, 2 * M * N * 32 * -(-K // 128)
    else:
        backward.append(_op("gb (CuTe thin)", y * tiles + b, gb, 2 * M * N * r_tile))
        dx_reads, dx_writes, dx_gb_flops = y + w + a + gb, x, 0
    dx_name = "dx + gb (CuTe sm80)" if gb_in_dx else "dx (CuTe sm80)"
    if elt == 4:
        dx_name += ", TF32"
    keep = keep_bits_bytes(M, K, p) if elt == 2 else 0  # the TF32 dx writes no keep bits
    if elt == 4:
        # TF32: dB|db on the exact fp32 SIMT GEMM (db an exact sum, as nn.Linear's): 64×64
        # tiles, the wide operand once per 64-rank tile, xa once per 64 columns; its 2·M·N·r
        # flops are left out (not MMAs; memory-bound at r ≤ 64 on these GPUs' fp32 SIMT rates).
        backward += [_op("dB partials (SIMT)", y * -(-(r + 1) // 64) + xa * -(-N // 64), dB_partials)]
    else:
        backward += [_op("round(xa)ᵀ", xa, rank_operand),
                     _op("dB partials (CuTe thin)", y * tiles + rank_operand, dB_partials, 2 * M * N * r_tile)]
    backward += [_op("dB reduce", dB_partials, N * r * elt),
                 _op(dx_name, dx_reads, dx_writes + keep, 2 * M * N * K + 2 * M * K * r_lora + dx_gb_flops),
                 _op("round(gb)ᵀ", gb, rank_operand),
                 _op("dA partials (CuTe thin)", (x + keep) * tiles + rank_operand, dA_partials, 2 * M * K * r_tile),
                 _op("dA reduce", dA_partials, r * K * elt)]
    return {"forward": forward, "backward": backward}


def keep_bits_bytes(M, K, p):
    """Bytes of the fp16/bf16 backward's keep-bit workspace: one uint32 per 32 columns of x per
    row when dropout is on (csrc/cuda_keep_bits.cuh), none without dropout."""
    return M * -(-K // 32) * 4 if p > 0 else 0


# csrc/cuda_kernels.h's sm90_dx_computes_gb, the dispatch rule this model prices (the
# constants are read from the header by tests/test_cost_model.py, so the two cannot drift).
SM90_FUSED_GB_MAX_RANK = 32  # kSm90FusedGbMaxRank: one 32-rank wgmma tile
SM90_FUSED_GB_MAX_COLUMN_TILES = 8  # kSm90FusedGbMaxColumnTiles: K <= 1024


def sm90_dx_computes_gb(r: int, K: int) -> bool:
    """Whether the sm90 dx accumulates gb = g·B itself (else the tall gb GEMM runs first): r ≤ 32
    and at most 8 column tiles of 128 (K ≤ 1024). Each column tile repeats gb's 64x32 MMA
    (2·M·N·32 flops) to save one read of g (2·M·N bytes) and the gb GEMM's launch and MMA. In
    this model (M = 4096, r = 16, N = 768 or 3072) fusing is cheaper up to 9 column tiles on
    the H100 (3.35 TB/s) and up to 6 on the H200 (4.8 TB/s): 8 lies between
    (test_sm90_fused_gb_switch_follows_the_cost_model). ViT-B's lin2 (K = 3072, 24 column
    tiles) is past it on both: fused 35.8 µs against 32.9 µs separate on the H100, 32.5 against
    29.0 on the H200 (backward, N = 768, p = 0)."""
    return r <= SM90_FUSED_GB_MAX_RANK and -(-K // 128) <= SM90_FUSED_GB_MAX_COLUMN_TILES


def _cuda_sm90_plan(M, K, N, r, elt, p, fused_gb=None):
    """fp16/bf16 on Hopper: the tall xa GEMM also writes round(xa) (the input dtype, rows padded
    to 8 ranks: TMA's 16-byte row stride), and the sm90 forward reads it with x, W and lora_B
    (64-deep rank tiles whose wgmmas past r are skipped, then x·Wᵀ, through one TMA pipeline).
    Backward: lora_B transposed, dB as on sm80, the sm90 dx (g, W, lora_A; the mask in its
    epilogue, written as keep bits with dropout), dA as on sm80 (reading those keep bits). For
    r ≤ 32 and K ≤ 1024 (sm90_dx_computes_gb below) the sm90 dx also accumulates gb = g·B
    from its g stages (a 32-rank wgmma beside the main one, repeated by each of its K/128
    column tiles, and lora_Bᵀ's 32-row tiles per k-stage; the blocks of column tile 0 write
    fp32 gb), so g is read by dB and dx only; otherwise the tall gb GEMM reads g once more
    first and writes round(gb) for dx. ``fused_gb``: None for the dispatch rule, True/False
    to price one side."""
    if fused_gb is None:
        fused_gb = sm90_dx_computes_gb(r, K)
    if fused_gb and r > SM90_FUSED_GB_MAX_RANK:
        raise ValueError(f"the fused-gb sm90 dx holds {SM90_FUSED_GB_MAX_RANK} ranks, not r = {r}")
    tiles = -(-r // 32)
    r_tile = tiles * 32
    r_sm90 = -(-r // 16) * 16  # the rank tiles' wgmmas (16 deep) past r are skipped
    x, w, y, a, b, xa, gb = M * K * elt, N * K * elt, M * N * elt, r * K * elt, N * r * elt, M * r * FP32, M * r * FP32
    rounded = M * (-(-r // 8) * 8) * elt  # round(xa) / round(gb) workspaces, 16-byte rows
    splits = max(1, min(64, -(-M // 512)))
    rank_operand = r * (-(-M // 8) * 8) * elt
    dB_partials, dA_partials = splits * N * r * FP32, splits * r * K * FP32
    keep = keep_bits_bytes(M, K, p)
    forward = [_op("xa + round(xa) (CuTe thin)", x * tiles + a, xa + rounded, 2 * M * K * r_tile),
               _op("forward (sm90 TMA + wgmma)", x + w + b + N * elt + rounded, y,
                   2 * M * N * K + 2 * M * N * r_sm90)]
    backward = [_op("lora_B transpose", b, b)]
    dx_flops = 2 * M * N * K + 2 * M * K * r_sm90
    if fused_gb:
        column_tiles = -(-K // 128)
        dx = _op("dx + gb (sm90 TMA + wgmma)", y + w + a + b * column_tiles, x + gb + keep,
                 dx_flops + 2 * M * N * 32 * column_tiles)
    else:
        backward.append(_op("gb + round(gb) (CuTe thin)", y * tiles + b, gb + rounded, 2 * M * N * r_tile))
        dx = _op("dx (sm90 TMA + wgmma)", y + w + rounded + a, x + keep, dx_flops)
    backward += [_op("round(xa)ᵀ", xa, rank_operand),
                 _op("dB partials (CuTe thin)", y * tiles + rank_operand, dB_partials, 2 * M * N * r_tile),
                 _op("dB reduce", dB_partials, N * r * elt),
                 dx,
                 _op("round(gb)ᵀ", gb, rank_operand),
                 _op("dA partials (CuTe thin)", (x + keep) * tiles + rank_operand, dA_partials, 2 * M * K * r_tile),
                 _op("dA reduce", dA_partials, r * K * elt)]
    return {"forward": forward, "backward": backward}


def provider_plan(provider: str, M: int, K: int, N: int, r: int, elt: int, p: float,
                  sms: int = 132, hopper: bool = False) -> dict[str, list[Launch]]:
    """``{"forward": [...], "backward": [...]}`` launches of ``provider``; bias frozen as in bench_layer (no db).

    ``sms``: the GPU's SM count, which sizes the Triton plan's column and row groups as its launchers do;
    ``hopper``: a compute-capability-9.0 GPU (the CUDA backend's sm90 kernel)."""
    if provider == "linear":
        return linear_plan(M, K, N, elt)
    if provider == "peft":
        return peft_plan(M, K, N, r, elt, p)
    if provider == "addmm":
        return addmm_plan(M, K, N, r, elt, p)
    if provider == "triton":
        return launch_plan(M, K, N, r, elt, p, compute_dx=True, compute_db=False, sms=sms)
    if provider == "triton_v1":
        return triton_v1_plan(M, K, N, r, elt, p)
    if provider == "cuda":
        return cuda_plan(M, K, N, r, elt, p, hopper=hopper)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def mode_launches(plan: dict[str, list[Launch]], mode: str) -> list[Launch]:
    if mode == "full":
        return plan["forward"] + plan["backward"]
    if mode in plan:
        return plan[mode]
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


@dataclass(frozen=True)
class Estimate:
    bytes: int
    mma_flops: int
    launches: int
    roofline_ms: float | None


def estimate(provider: str, M: int, K: int, N: int, r: int, elt: int, p: float, mode: str,
             gpu: GPU | None) -> Estimate:
    launches = mode_launches(provider_plan(provider, M, K, N, r, elt, p, gpu.sms if gpu else 132,
                                           hopper=gpu.hopper if gpu else False), mode)
    return Estimate(sum(launch.bytes for launch in launches), sum(launch.mma_flops for launch in launches),
                    len(launches), roofline_ms(launches, gpu, elt) if gpu else None)


def annotate_row(row: dict, gpu: GPU | None) -> str | None:
    """Add the model's figures to a bench_layer result row; returns a one-line summary (None: no model).

    Fields: ``model_bytes``, ``model_mma_flops``, ``model_launches``, ``roofline_ms`` and
    ``measured_over_roofline`` (None where the GPU has no entry or nothing was measured).
    """
    if row["provider"] not in PROVIDERS:
        return None
    elt = {"fp32": 4, "fp16": 2, "bf16": 2}[row["dtype"]]
    est = estimate(row["provider"], row["tokens"], row["in_features"], row["out_features"], row["rank"], elt,
                   row["dropout"], row["mode"], gpu)
    measured = row.get("median_ms")
    row.update(model_bytes=est.bytes, model_mma_flops=est.mma_flops, model_launches=est.launches,
               roofline_ms=est.roofline_ms,
               measured_over_roofline=measured / est.roofline_ms if measured and est.roofline_ms else None)
    roof = (f"roofline {est.roofline_ms:.4f} ms on {gpu.name}" if gpu else "no roofline (GPU not in the model)")
    ratio = f", measured/roofline {row['measured_over_roofline']:.2f}" if row["measured_over_roofline"] else ""
    timing = f"{measured:.4f} ms" if measured else row.get("status", "not run")
    return (f"    {row['provider']}/{row['mode']}: {timing} | model: {est.launches} launches, "
            f"{est.bytes / 1e6:.1f} MB, {est.mma_flops / 1e9:.2f} GFLOP, {roof}{ratio}")


# SAM ViT-B image-encoder linears, one 1024² image (4096 tokens): (name, K, N).
VIT_B_LAYERS = (("qkv", 768, 2304), ("proj", 768, 768), ("lin1", 768, 3072), ("lin2", 3072, 768))


def predicted_ratios_markdown(gpu: GPU, tokens: int = 4096, elt: int = 2, ranks=(4, 16), dropouts=(0.0, 0.1),
                              providers=("peft", "addmm", "cuda", "triton_v1", "triton"), modes=("forward", "full")) -> str:
    """Predicted roofline time / frozen nn.Linear's, per provider, at ViT-B's four linears."""
    lines = [f"Predicted roofline ratios to the frozen nn.Linear — {gpu.name}, {elt * 8}-bit inputs, "
             f"M = {tokens} tokens (predictions of benchmarks/cost_model.py, not measurements)", ""]
    header = ["layer", "r", "p", "mode", "nn.Linear µs"] + list(providers)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, K, N in VIT_B_LAYERS:
        for r in ranks:
            for p in dropouts:
                for mode in modes:
                    base = estimate("linear", tokens, K, N, r, elt, p, mode, gpu).roofline_ms
                    cells = [name, str(r), f"{p:g}", mode, f"{base * 1e3:.1f}"]
                    for prov in providers:
                        est = estimate(prov, tokens, K, N, r, elt, p, mode, gpu)
                        cells.append(f"{est.roofline_ms / base:.2f}× ({est.launches})")
                    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: roofline time ÷ nn.Linear's (launches). `triton` is the plan in the code "
              "(kernels/plan.py); `triton_v1` the plan it replaced (issue 10).",
              "", "Caveat (`triton`, full): the model prices DRAM bytes and peak MMA only. The v2 backward's "
              "dx tiles are 64 columns wide (128×64 on sm90, 32×64 on sm80: wider ones spill), so each row block's "
              "g is streamed from L2 once per 64 columns of K and W once per row block, and its dB/db steps read "
              "each chunk of g rows back from L2 and read-modify-write fp32 partials there (|g|/2 of L2 traffic "
              "at r ≤ 128; g itself is read from DRAM once), all unpriced here. The `triton` full-mode ratios "
              "are lower bounds."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100-SXM")
    parser.add_argument("--tokens", type=int, default=4096, help="M (4096 = one 1024² image)")
    parser.add_argument("--modes", nargs="+", choices=("forward", "backward", "full"), default=["forward", "full"])
    args = parser.parse_args(argv)
    print(predicted_ratios_markdown(GPUS[args.gpu], tokens=args.tokens, modes=tuple(args.modes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
