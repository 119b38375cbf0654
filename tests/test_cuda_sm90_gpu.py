"""GPU tests of the Hopper (sm_90a) TMA + wgmma kernel, csrc/cuda_sm90.cu, and of the dispatch
that chooses it (csrc/cuda_ops.cpp): on a compute-capability-9.0 device, in a build with
sm_90a, fp16/bf16 forward runs it when x and W meet TMA's alignment (K % 8 == 0, 16-byte
aligned bases, x's row stride a multiple of 8), and dx when g and W do (also N % 8 == 0 for
g's rows); every other case runs the sm80 kernels. For r <= 32 and K <= 1024 the sm90 dx
computes gb itself from its g tiles (the fused-gb instantiation; no tall gb GEMM in the
backward), otherwise it reads the tall gb GEMM's round(gb). Which kernel ran is read from the
CUDA profiler's kernel names, so a case meant for one path cannot silently test the other.

Parity follows DESIGN.md §5 (tests/parity.py): each output within 2x PyTorch's own
same-dtype error of a float64 reference. Everything skips without a Hopper GPU and the
CUDA kernels; nothing here runs on the machines that build this project, which have no GPU
(tests/test_cuda_ptxas.py holds the compile-level evidence).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import requires_cuda
from parity import make_inputs
from test_cuda_ext import BACKWARD, FORWARD, SCALING, check_parity, requires_cuda_kernels, run_extension
import test_cuda_gpu
from test_cuda_gpu import _misaligned, _parity_of

from lora_fused import _C  # noqa: E402  (loaded by test_cuda_ext, which skips this module without it)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


requires_hopper = pytest.mark.skipif(not _is_hopper(), reason="needs a compute-capability-9.0 GPU (H100/H200)")
requires_sm90a_build = pytest.mark.skipif(
    not getattr(_C, "built_with_sm90a", 0), reason="lora_fused._C was built without sm_90a (LORA_FUSED_CUDA_ARCHS)"
)
pytestmark = [pytest.mark.gpu, requires_cuda_kernels, requires_cuda, requires_hopper, requires_sm90a_build]



@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and workspace the extension allocates starts as NaN (csrc/checks.h)."""
    monkeypatch.setenv("LORA_FUSED_POISON_OUTPUTS", "1")


def _sm90_launches(fn) -> dict[str, int]:
    """{"forward": n, "dx": n}: launches of the sm90 kernel's K-major (forward) and MN-major
    (dx) instantiations while fn() runs, from the profiler's kernel names."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {"forward": 0, "dx": 0}
    for event in prof.events():
        kind = _sm90_instantiation(event.name)
        if kind is not None:
            counts[kind] += 1
    return counts


def _sm90_instantiation(kernel_name: str, fused_gb_apart: bool = False) -> str | None:
    """"forward" or "dx" for lora_fused::cuda::sm90::gemm_kernel<T, kBKMajor, kFusedGb>
    (kBKMajor true: the forward's K-major W; false: dx's MN-major W; kFusedGb: dx computes gb),
    demangled or not; with fused_gb_apart, "dx+gb" for the fused-gb dx; None for others."""
    if "lora_fused::cuda::sm90::gemm_kernel<" in kernel_name:
        flags = kernel_name.split("gemm_kernel<", 1)[1].split(">", 1)[0].split(", ")[1:3]
    elif "4sm9011gemm_kernel" in kernel_name:  # mangled: ...ELb1ELb0EE: <T, true, false>
        flags = ["true" if bit == "1" else "false"
                 for bit in re.findall(r"Lb([01])E", kernel_name.split("4sm9011gemm_kernel", 1)[1])[:2]]
    else:
        return None
    assert len(flags) == 2, f"unexpected sm90 kernel name {kernel_name!r}"
    if flags[0] == "true":
        return "forward"
    return "dx+gb" if fused_gb_apart and flags[1] == "true" else "dx"


def test_kernel_name_parsing():
    mangled = "_ZN10lora_fused4cuda4sm9011gemm_kernelIN7cutlass10bfloat16_tELb{}ELb{}EEEvNS1_6ParamsIT_XT0_EEE"
    assert _sm90_instantiation(mangled.format(1, 0)) == "forward"
    assert _sm90_instantiation(mangled.format(0, 0)) == "dx"
    assert _sm90_instantiation(mangled.format(0, 1)) == "dx"
    assert _sm90_instantiation(mangled.format(0, 1), fused_gb_apart=True) == "dx+gb"
    assert _sm90_instantiation(mangled.format(0, 0), fused_gb_apart=True) == "dx"
    demangled = ("void lora_fused::cuda::sm90::gemm_kernel<cutlass::half_t, {}, {}>"
                 "(lora_fused::cuda::sm90::Params<cutlass::half_t, {}>)")
    assert _sm90_instantiation(demangled.format("true", "false", "true")) == "forward"
    assert _sm90_instantiation(demangled.format("false", "false", "false")) == "dx"
    assert _sm90_instantiation(demangled.format("false", "true", "false"), fused_gb_apart=True) == "dx+gb"
    assert _sm90_instantiation("void lora_fused::cuda::(anonymous namespace)::dx_kernel<cutlass::half_t, false>") is None


def _is_tall_gemm(kernel_name: str) -> bool:
    """cuda_sm80_thin.cu's tall_kernel: in a backward, the separate gb = g·B GEMM."""
    return "tall_kernel" in kernel_name


def _backward_gb_launches(grad_y, x, weight, lora_A, lora_B, dropout_p, seed) -> dict[str, int]:
    """{"dx+gb": fused-gb sm90 dx launches, "dx": other sm90 dx launches, "gb GEMM": tall gb
    GEMM launches} of one backward (the forward, whose xa pre-pass is a tall GEMM too, runs
    outside the profiled region)."""
    seed_t = torch.tensor(seed)
    _, xa = FORWARD(x, weight, None, lora_A, lora_B, SCALING, dropout_p, seed_t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        BACKWARD(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed_t, True, True)
        torch.cuda.synchronize()
    counts = {"dx+gb": 0, "dx": 0, "gb GEMM": 0}
    for event in prof.events():
        kind = _sm90_instantiation(event.name, fused_gb_apart=True)
        if kind in counts:
            counts[kind] += 1
        elif _is_tall_gemm(event.name):
            counts["gb GEMM"] += 1
    return counts


def _launches_for(M, K, N, r, dtype, x_transform=None):
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    if x_transform is not None:
        x = x_transform(x)
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0]
    return _sm90_launches(lambda: run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 3, grad_y))


# (M, K, N, r, bias, dropout_p): K and N multiples of 8 (both products on the sm90 kernel),
# M, N and K not multiples of the 128x128x64 tile, every rank of the brief (one rank tile up
# to 64, two at 65 and 128), dropout on and off, bias and none.
SM90_CASES = {
    "r1-edges-everywhere": (300, 200, 264, 1, True, 0.2),
    "r4-one-row-tile": (70, 72, 136, 4, False, 0.0),
    "r16-sam-like-k": (257, 768, 200, 16, True, 0.1),
    "r16-no-dropout-no-bias": (513, 136, 392, 16, False, 0.0),
    "r17-odd-rank-padded-lora-b": (129, 264, 72, 17, True, 0.3),
    "r64-full-rank-tile": (200, 128, 128, 64, True, 0.1),
    "r65-two-rank-tiles": (130, 520, 136, 65, False, 0.2),
    "r128-two-full-rank-tiles": (64, 72, 256, 128, True, 0.0),
    "k8-one-partial-k-tile": (131, 8, 16, 4, True, 0.2),
    # Depth residues 17-32 (two 16-deep k-blocks in the last tile: the Int<2> batch), forward
    # (K) and dx (N), and rank residues of two and three k-blocks (r = 24, 40).
    "k24-n280-two-kblock-residues": (300, 24, 280, 24, True, 0.1),
    "k88-n152-two-kblock-residues": (200, 88, 152, 40, False, 0.2),
    # One row: x's leading dimension becomes K (TMA with a single row).
    "m1-single-row": (1, 72, 136, 8, True, 0.1),
}

# More output tiles than an H100/H200 has SMs (132), with M, N, K and rank residues: the
# persistent blocks walk several tiles each, edges included (review of cuda4, C1).
# (M, K, N, r, bias, dropout_p)
SM90_MULTI_TILE_CASES = {
    "fwd-216-tiles-r65": (3000, 200, 1096, 65, True, 0.2),  # forward 24 x 9 tiles, dx 24 x 2
    "dx-216-tiles-r17": (3000, 1096, 520, 17, False, 0.2),  # forward 24 x 5, dx 24 x 9 (not fused: K > 1024)
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(SM90_CASES) + list(SM90_MULTI_TILE_CASES), ids=str)
def test_sm90_parity(case, dtype):
    M, K, N, r, bias, dropout_p = {**SM90_CASES, **SM90_MULTI_TILE_CASES}[case]
    check_parity(M, K, N, r, dtype, bias, dropout_p=dropout_p, device="cuda")
    assert _launches_for(M, K, N, r, dtype) == {"forward": 1, "dx": 1}, "both products must run on sm90"


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("case", ["r1-edges-everywhere", "r65-two-rank-tiles", "k24-n280-two-kblock-residues"])
def test_sm90_grid_capped_walks_every_tile(case, blocks, monkeypatch):
    """LORA_FUSED_SM90_MAX_BLOCKS caps the persistent grid: 1-3 blocks walk all the tiles of
    a small case, the stage indices and barrier phases wrapping mid-tile (each tile is
    rank + k tiles long against 5 stages) and the staging barrier reused per tile."""
    monkeypatch.setenv("LORA_FUSED_SM90_MAX_BLOCKS", str(blocks))
    M, K, N, r, bias, dropout_p = SM90_CASES[case]
    check_parity(M, K, N, r, torch.bfloat16, bias, dropout_p=dropout_p, device="cuda")
    assert _launches_for(M, K, N, r, torch.bfloat16) == {"forward": 1, "dx": 1}


# The sm90 dx's keep bits (csrc/cuda_keep_bits.cuh: a quad's shuffles, one store per word) read
# by sm80_dA: K % 32 != 0 and K % 128 != 0 over several column tiles, the persistent walk
# capped to 1 and 3 blocks (each block writes the words of many tiles) and uncapped, p = 0.5
# (the all-ones poison of an unwritten word keeps about half a word's elements that the
# reference drops). (M, K, N, r)
SM90_KEEP_BIT_CASES = {
    "r1-k200": (300, 200, 264, 1),
    "r16-k264": (257, 264, 136, 16),
    "r40-k520": (390, 520, 72, 40),
}


@pytest.mark.parametrize("blocks", [None, 1, 3])
@pytest.mark.parametrize("case", list(SM90_KEEP_BIT_CASES), ids=str)
def test_sm90_dx_keep_bits_feed_dA(case, blocks, monkeypatch):
    if blocks is not None:
        monkeypatch.setenv("LORA_FUSED_SM90_MAX_BLOCKS", str(blocks))
    M, K, N, r = SM90_KEEP_BIT_CASES[case]
    assert K % 32 != 0 and K % 8 == 0
    check_parity(M, K, N, r, torch.bfloat16, True, dropout_p=0.5, device="cuda")
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, torch.bfloat16, device="cuda")
    grad_y = make_inputs(M, N, 1, 1, torch.bfloat16, device="cuda", seed=1)[0]
    with_dx = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.5, 8, grad_y)
    if r > 32:
        # Without dx, dA hashes the mask itself from the same gb (the tall GEMM's both times):
        # same bits. For r <= 32 the sm90 dx computes gb itself (another computation of gb):
        # parity only, above.
        without_dx = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.5, 8, grad_y, compute_dx=False)
        assert torch.equal(with_dx[3], without_dx[3]), "dA from the sm90 dx's keep bits differs from dA hashing"
    launches = _sm90_launches(lambda: run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.5, 8, grad_y))
    assert launches == {"forward": 1, "dx": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_sm90_sam_vit_b_qkv_shape(dtype):
    """SAM ViT-B's qkv (K = 768, N = 2304) at M = 4096, r = 16, with dropout: many k-tiles,
    18 column tiles, the grouped raster over 32 x 18 = 576 output tiles, which the persistent
    kernel's blocks (one per SM: 132 on an H100/H200) walk several at a time, forward and dx
    (dx: 32 x 6 = 192 tiles)."""
    check_parity(4096, 768, 2304, 16, dtype, True, dropout_p=0.1, device="cuda")
    assert _launches_for(4096, 768, 2304, 16, dtype) == {"forward": 1, "dx": 1}, "both products must run on sm90"


# The fused gb (issue 11, item 1): for r <= 32 the sm90 dx accumulates gb = g·B from its own g
# stages (a 64x32 wgmma beside the main one), the blocks of column tile 0 write fp32 gb for dA,
# and round(gb) feeds the rank product; r = 33 keeps the tall gb GEMM. dA (which reads gb) and
# dB are checked with dx by check_parity. (M, K, N): M, K residues of the 128x128 tile, N
# residues of the 64-deep k-tile (200 % 64 = 8: one 16-deep block; 280 % 64 = 24: two; a full
# k-tile is SAM qkv's N = 2304, three blocks the padded test's N = 45), several column tiles
# (K = 264: 3, so column tiles 1, 2 compute gb and drop it). Ranks: one and two 16-deep rank
# blocks, each full (16, 32) and partial (1, 8; 17, 31), and r = 33 past the switch.
FUSED_GB_SHAPES = {"n200": (300, 264, 200), "n280-k136": (257, 136, 280)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("r", [1, 8, 16, 17, 31, 32, 33])
@pytest.mark.parametrize("shape", list(FUSED_GB_SHAPES), ids=str)
def test_sm90_dx_computes_gb_for_ranks_up_to_32(shape, r, dropout_p, dtype):
    M, K, N = FUSED_GB_SHAPES[shape]
    check_parity(M, K, N, r, dtype, True, dropout_p=dropout_p, device="cuda")
    x, weight, _, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0]
    fused = r <= 32
    assert _backward_gb_launches(grad_y, x, weight, lora_A, lora_B, dropout_p, 5) == {
        "dx+gb": int(fused), "dx": int(not fused), "gb GEMM": int(not fused)}


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("r", [8, 32])
@pytest.mark.parametrize("N", [136, 280])
def test_sm90_fused_gb_grid_capped_walks_every_tile(N, r, blocks, monkeypatch):
    """1 or 3 persistent blocks walk all 3 x 3 tiles of the fused-gb dx. A tile takes
    ceil(N / 64) k-stages plus a rank stage: 4 (N = 136) or 6 (N = 280) against 5 stages, a
    count prime to 5, so stage indices and phases wrap mid-tile and a block's successive rank
    stages land on different stage indices (one block: on all five); tile column 0 is reached
    by different blocks. (N = 200 or 520 would put every rank stage on index 4.)"""
    monkeypatch.setenv("LORA_FUSED_SM90_MAX_BLOCKS", str(blocks))
    check_parity(300, 264, N, r, torch.bfloat16, False, dropout_p=0.1, device="cuda")
    x, weight, _, lora_A, lora_B = make_inputs(300, 264, N, r, torch.bfloat16, device="cuda")
    grad_y = make_inputs(300, N, 1, 1, torch.bfloat16, device="cuda", seed=1)[0]
    assert _backward_gb_launches(grad_y, x, weight, lora_A, lora_B, 0.1, 5)["dx+gb"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("K", [1016, 1032])
@pytest.mark.parametrize("r", [1, 16, 17, 32])
def test_sm90_fused_gb_switch_on_column_tiles(r, K, dtype):
    """sm90_dx_computes_gb (csrc/cuda_kernels.h) fuses gb for r <= 32 up to 8 column tiles of
    128 (K = 1016: fused) and runs the tall gb GEMM first from 9 on (K = 1032), where the cost
    model prices the gb MMA every column tile repeats above the read of g it saves (lin2).
    Both sides correct, over 24 x 8 and 24 x 9 dx tiles (more than the 132 SMs: the
    persistent blocks walk several each, M, K, N and rank residues). r = 1 and 16 take one
    16-deep rank block of round(gb) on the unfused side (gb_rounded rows padded to 8 and 16),
    17 and 32 two (review-gb90b finding 1)."""
    M, N = 3000, 200
    check_parity(M, K, N, r, dtype, False, dropout_p=0.2, device="cuda")
    x, weight, _, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0]
    fused = K <= 1024
    assert _backward_gb_launches(grad_y, x, weight, lora_A, lora_B, 0.2, 5) == {
        "dx+gb": int(fused), "dx": int(not fused), "gb GEMM": int(not fused)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_sm90_fused_gb_with_padded_lora_b_t(dtype):
    """g a column slice ([M, 45] of rows 48 apart: TMA takes it) makes lora_Bᵀ [r, 45], whose
    rows are not 16-byte multiples: the op layer pads a copy (rank_rows_for_tma), and the
    fused-gb dx still runs and stays correct (dx, dA, dB, db)."""
    M, K, N, r = 200, 136, 45, 16
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    wide = make_inputs(M, 48, 1, 1, dtype, device="cuda", seed=1)[0]
    grad_y = wide[:, :N]
    inputs = (x, weight, b, lora_A, lora_B)
    got = run_extension(*inputs, SCALING, 0.2, 9, grad_y)
    _parity_of(got, inputs, SCALING, 0.2, 9, grad_y)
    assert _backward_gb_launches(grad_y, x, weight, lora_A, lora_B, 0.2, 9) == {"dx+gb": 1, "dx": 0, "gb GEMM": 0}


# The fallback: operands TMA cannot take keep the sm80 kernels (same parity rule).
FALLBACK_CASES = {
    # (M, K, N, r, bias): (forward on sm90, dx on sm90)
    "k-not-multiple-of-8": ((130, 70, 136, 16, True), (0, 0)),
    "n-not-multiple-of-8-dx-only-falls-back": ((130, 72, 45, 8, True), (1, 0)),
    "r1-k-odd": ((257, 33, 64, 1, False), (0, 0)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(FALLBACK_CASES), ids=str)
def test_fallback_to_sm80_when_tma_cannot_load(case, dtype):
    (M, K, N, r, bias), (forward, dx) = FALLBACK_CASES[case]
    check_parity(M, K, N, r, dtype, bias, dropout_p=0.2, device="cuda")
    assert _launches_for(M, K, N, r, dtype) == {"forward": forward, "dx": dx}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_misaligned_operands_fall_back(dtype):
    """x, W, lora_A, lora_B and grad_y off a 16-byte boundary (test_cuda_gpu's case): parity,
    and neither product may use TMA, whose descriptors need aligned bases."""
    test_cuda_gpu.test_misaligned_storage_offsets(dtype)
    x, weight, b, lora_A, lora_B = make_inputs(150, 72, 136, 8, dtype, device="cuda", seed=3)
    grad_y = make_inputs(150, 136, 1, 1, dtype, device="cuda", seed=4)[0]
    inputs = [_misaligned(t) for t in (x, weight, lora_A, lora_B, grad_y)]
    launches = _sm90_launches(lambda: run_extension(*inputs[:2], b, *inputs[2:4], SCALING, 0.1, 77, inputs[4]))
    assert launches == {"forward": 0, "dx": 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_misaligned_lora_parameters_keep_sm90(dtype):
    """Only lora_A and lora_B off a 16-byte boundary: the op layer copies them for TMA (a
    padded/aligned parameter copy), so both products stay on sm90 and stay correct."""
    M, K, N, r = 150, 72, 136, 8
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda", seed=3)
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=4)[0]
    inputs = (x, weight, b, _misaligned(lora_A), _misaligned(lora_B))
    got = run_extension(*inputs, SCALING, 0.1, 77, grad_y)
    _parity_of(got, inputs, SCALING, 0.1, 77, grad_y)
    assert _sm90_launches(lambda: run_extension(*inputs, SCALING, 0.1, 77, grad_y)) == {"forward": 1, "dx": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_strided_x_rows(dtype):
    """x a column slice with row stride K + 16 (a multiple of 8): TMA takes it (sm90 forward);
    row stride K + 3 is not 16-byte aligned: the sm80 forward."""

    def sliced(extra):
        def transform(x):
            wide = torch.randn(x.shape[0], x.shape[1] + extra, device=x.device, dtype=x.dtype)
            wide[:, : x.shape[1]] = x
            return wide[:, : x.shape[1]]
        return transform

    for extra, forward in ((16, 1), (3, 0)):
        check_parity(300, 136, 72, 16, dtype, True, dropout_p=0.2, device="cuda", x_transform=sliced(extra))
        assert _launches_for(300, 136, 72, 16, dtype, x_transform=sliced(extra))["forward"] == forward


def test_sm90_is_deterministic():
    x, weight, b, lora_A, lora_B = make_inputs(1000, 264, 392, 16, torch.bfloat16, device="cuda")
    grad_y = make_inputs(1000, 392, 1, 1, torch.bfloat16, device="cuda", seed=1)[0]
    first = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 3, grad_y)
    second = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 3, grad_y)
    for a, bb in zip(first, second, strict=True):
        assert torch.equal(a, bb)


def test_sm90_fp16_large_scaling_does_not_overflow():
    """test_cuda_gpu's case (s·xa past fp16's range while y stays in it; K = 64), which on
    this GPU runs the sm90 forward: s multiplies the fp32 accumulator, never a rounded rank
    intermediate."""
    test_cuda_gpu.test_fp16_forward_large_scaling_does_not_overflow()
    x, weight, _, lora_A, lora_B = make_inputs(64, 64, 48, 4, torch.float16, device="cuda")
    launches = _sm90_launches(lambda: FORWARD(x, weight, None, lora_A, lora_B, 200.0, 0.0, torch.tensor(0)))
    assert launches["forward"] == 1, "the overflow case must reach the sm90 forward"


def test_sm90_backward_without_dx_launches_no_dx_kernel():
    x, weight, b, lora_A, lora_B = make_inputs(130, 72, 40, 8, torch.bfloat16, device="cuda")
    grad_y = make_inputs(130, 40, 1, 1, torch.bfloat16, device="cuda", seed=1)[0]
    _, xa = FORWARD(x, weight, b, lora_A, lora_B, SCALING, 0.2, torch.tensor(5))
    launches = _sm90_launches(
        lambda: BACKWARD(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.2, torch.tensor(5), False, True))
    assert launches == {"forward": 0, "dx": 0}


# Views TMA cannot describe (review of cuda4, A1): an expanded tensor has row stride 0 and
# as_strided rows can overlap; the operand check sends them to the sm80 kernels (the driver
# would otherwise be asked to encode them, and CuTe aborts the process on a refused encode).
def _expanded_rows(t):
    return t[:1].expand_as(t)


def _overlapping_rows(t):
    """Rows 8 elements apart (ld = 8 < K): a 16-byte aligned stride whose rows overlap."""
    flat = t.reshape(-1)[: (t.shape[0] - 1) * 8 + t.shape[1]].clone()
    return flat.as_strided(t.shape, (8, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("view", [_expanded_rows, _overlapping_rows], ids=["expanded", "overlapping"])
def test_x_rows_tma_cannot_describe_take_sm80_forward(view, dtype):
    M, K, N, r = 300, 200, 264, 16
    assert view(torch.zeros(M, K)).stride(0) < K
    check_parity(M, K, N, r, dtype, True, dropout_p=0.2, device="cuda", x_transform=view)
    assert _launches_for(M, K, N, r, dtype, x_transform=view) == {"forward": 0, "dx": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("view", [_expanded_rows, _overlapping_rows], ids=["expanded", "overlapping"])
def test_grad_y_rows_tma_cannot_describe_take_sm80_dx(view, dtype):
    M, K, N, r = 300, 200, 264, 16
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    grad_y = view(make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0])
    inputs = (x, weight, b, lora_A, lora_B)
    got = run_extension(*inputs, SCALING, 0.2, 9, grad_y)
    _parity_of(got, inputs, SCALING, 0.2, 9, grad_y)
    assert _sm90_launches(lambda: run_extension(*inputs, SCALING, 0.2, 9, grad_y)) == {"forward": 1, "dx": 0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_transposed_views_stay_correct(dtype):
    """x and grad_y as transposes of [K, M] / [N, M] storage (column stride != 1): the op
    layer makes them row-major first, so both products still run on sm90."""
    M, K, N, r = 300, 200, 264, 16
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    x = x.t().contiguous().t()
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0].t().contiguous().t()
    inputs = (x, weight, b, lora_A, lora_B)
    got = run_extension(*inputs, SCALING, 0.1, 4, grad_y)
    _parity_of(got, inputs, SCALING, 0.1, 4, grad_y)
    assert _sm90_launches(lambda: run_extension(*inputs, SCALING, 0.1, 4, grad_y)) == {"forward": 1, "dx": 1}
