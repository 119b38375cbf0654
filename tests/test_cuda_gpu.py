"""GPU tests of the extension's CUDA kernels for what a review of code nobody here could run
fears (issue 9 point 4): strides and alignment, empty and tiny shapes, streams, CUDA
graphs, determinism, float64, fp16 gradients of GradScaler size with large scalings, the
split-M reductions over many slices and column tiles, and one parity case per kernel
instantiation.

All of them skip without a GPU (or without the CUDA kernels in lora_fused._C). Parity
follows DESIGN.md §5; exact equality only where the computation is literally the same
(two runs of the same kernels on the same inputs).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from conftest import requires_cuda
from lora_fused import reference
from parity import assert_parity, make_inputs, reference_outputs
from test_cuda_ext import (
    BACKWARD,
    FORWARD,
    OUTPUT_NAMES,
    SCALING,
    check_parity,
    requires_cuda_kernels,
    run_extension,
)

pytestmark = [pytest.mark.gpu, requires_cuda_kernels, requires_cuda]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and workspace the extension allocates starts as NaN (csrc/checks.h)."""
    monkeypatch.setenv("LORA_FUSED_POISON_OUTPUTS", "1")


def _parity_of(got, inputs, scaling, dropout_p, seed, grad_y, names=OUTPUT_NAMES):
    """Each of `got` (named by `names`) within 2x PyTorch's own same-dtype error of float64."""
    x, weight, b, lora_A, lora_B = inputs
    expected = reference_outputs(
        *(t.double() if t is not None else None for t in inputs), scaling, dropout_p, seed, grad_y.double()
    )
    same_dtype = reference_outputs(x, weight, b, lora_A, lora_B, scaling, dropout_p, seed, grad_y)
    for name, value, same, ref in zip(OUTPUT_NAMES, got, same_dtype, expected):
        if name not in names or (name == "db" and b is None):
            continue
        assert_parity(name, value.cpu(), same.cpu(), ref.cpu())


# ---- one parity case per kernel instantiation -----------------------------------------
#
# fp16/bf16, every kernel on the CuTe sm80 mainloop: cuda_sm80.cu's forward_kernel<T> and
# dx_kernel<T> (every rank: the LoRA stage loops over 32-rank chunks; cp.async path when the
# contiguous extents are multiples of 8, element loads otherwise; 16-byte stores when N (K
# for dx) is a multiple of 8; dx computes gb itself for r <= 32 — written by the first of
# its column tiles, read by dA — and reads sm80_gb's for r >= 33); cuda_sm80_thin.cu's
# tall_kernel<T> (xa with the mask formed in shared memory; gb for r >= 33 or without dx)
# and wide_kernel<T> (dB|db, dA with the mask) over 1, 2 or 3 tiles of
# 32 ranks (db adds a rank row: r = 31 fills one tile, r = 32 needs two) and 1 or more
# split-M slices, rank_transpose_kernel<T> (M not a multiple of 8: zero padding), and the
# fixed-order reduce kernels. fp32 (TF32 off)/fp64: every product on SIMT; fp32 on TF32
# below. Each case names what it
# reaches; dropout on, so the masked variants run too.
INSTANTIATION_CASES = {
    # (M, K, N, r, bias): what it reaches in fp16/bf16
    "r15-one-rank-tile-vector-loads-and-stores": (130, 72, 136, 15, False),
    "r16-element-loads-and-stores": (130, 70, 45, 16, True),
    "r31-with-db-fills-one-rank-tile": (257, 40, 72, 31, True),
    "r32-with-db-needs-a-second-rank-tile": (257, 40, 72, 32, True),
    "r33-two-rank-tiles-two-lora-chunks": (257, 40, 72, 33, True),
    "r64-two-full-rank-tiles": (129, 136, 40, 64, False),
    "r65-three-rank-tiles": (70, 48, 33, 65, True),
    "vector-loads-element-stores": (130, 72, 45, 8, True),
    "three-splits-grouped-raster-9x3-tiles": (1100, 136, 300, 16, True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(INSTANTIATION_CASES), ids=str)
def test_every_instantiation_parity(case, dtype):
    M, K, N, r, bias = INSTANTIATION_CASES[case]
    if dtype == torch.float64 and M > 300:
        pytest.skip("float64's budget is PyTorch's own error (about 0) plus 1e-12: a reduction over "
                    f"{M} rows in another order can exceed it; test_float64 covers the fp64 kernels")
    check_parity(M, K, N, r, dtype, bias, dropout_p=0.25, device="cuda")


# ---- fp32 on TF32 tensor cores ---------------------------------------------------------
#
# With torch.backends.cuda.matmul.allow_tf32 (or float32 matmul precision "high"/"medium")
# fp32 runs forward_kernel<float>, dx_kernel<float> (W read as stored: MN-major stages, 32-bit
# shared-memory loads), tall_kernel<float> (xa with the mask, gb) and wide_kernel<float, false>
# (dA, hashing the mask: TF32 has no keep bits) on TF32 mma.sync, each operand rounded with
# cvt.rna; dB|db stays on the exact fp32 SIMT GEMM (db an exact sum, as nn.Linear's). With TF32 off everything is the exact fp32 SIMT path. The TF32 budget does
# not depend on which kernel cuBLAS picks for a shape (_assert_tf32_parity).
TF32_CASES = {
    # (M, K, N, r, bias): what each reaches on TF32
    "r16-vector-loads-one-lora-chunk-5x2-tiles": (520, 264, 136, 16, True),
    "r33-element-loads-three-lora-chunks-two-rank-tiles": (390, 70, 90, 33, True),
    "r32-vector-loads-two-lora-chunks-no-bias": (256, 128, 256, 32, False),
}


@pytest.fixture(params=[True, False], ids=["tf32-on", "tf32-off"])
def allow_tf32(request):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = previous


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """What cvt.rna.tf32.f32 makes of each fp32 element: the nearest value with 10 mantissa
    bits, ties away from zero (add half of the dropped 13 bits to the magnitude, then clear
    them); Inf and NaN unchanged."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), rounded, t)


@contextlib.contextmanager
def _reference_products_on_tf32():
    """reference.py's products (every ``_matmul_acc``: all but the forward's xa) take their
    fp32 operands rounded to TF32 first, as a TF32 matmul does, and accumulate in fp32."""
    exact = reference._matmul_acc

    def on_tf32(a, b, acc):
        return exact(round_to_tf32(a.to(acc)), round_to_tf32(b.to(acc)), acc)

    with mock.patch.object(reference, "_matmul_acc", on_tf32):
        yield


def _assert_tf32_parity(got, inputs, scaling, dropout_p, seed, grad_y):
    """DESIGN.md §5 for the TF32 kernels' results, whichever kernel cuBLAS would pick for the
    shape: the float64 reference is computed from the product operands (x, W, A, B, g) rounded
    to TF32 as the kernels round them, so their input rounding is no error, and PyTorch's
    same-dtype computation is fp32 (on the CPU) with every product's operands rounded to TF32.
    What remains in both is fp32 accumulation and the TF32 rounding of xa and gb entering the
    next product, the same in kind, so 2x PyTorch's error is the budget it is for any dtype."""
    x, weight, b, lora_A, lora_B = (None if t is None else t.cpu() for t in inputs)
    grad_y = grad_y.cpu()
    rounded = [round_to_tf32(t).double() for t in (x, weight, lora_A, lora_B, grad_y)]
    expected = reference_outputs(*rounded[:2], None if b is None else b.double(), *rounded[2:4], scaling,
                                 dropout_p, seed, rounded[4])
    with _reference_products_on_tf32():
        same_dtype = reference_outputs(x, weight, b, lora_A, lora_B, scaling, dropout_p, seed, grad_y)
    for name, value, same, ref in zip(OUTPUT_NAMES, got, same_dtype, expected, strict=True):
        if not (name == "db" and b is None):
            assert_parity(name, value.cpu(), same, ref)


def _check_float32_with_tf32_allowed(M, K, N, r, bias, weight_transform=None, grad_y_transform=None,
                                     dropout_p=0.25):
    """The extension's fp32 results with TF32 allowed (the caller set it): every output written
    (finite under the poison switch), shaped, and within _assert_tf32_parity's budget.
    weight_transform / grad_y_transform: a same-valued view of W / grad_y to pass instead."""
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, torch.float32, device="cuda", bias=bias)
    grad_y = make_inputs(M, N, 1, 1, torch.float32, device="cuda", seed=1)[0]
    if weight_transform is not None:
        weight = weight_transform(weight)
    if grad_y_transform is not None:
        grad_y = grad_y_transform(grad_y)
    got = run_extension(x, weight, b, lora_A, lora_B, SCALING, dropout_p, 1234, grad_y)
    shapes = ((M, N), (M, r), (M, K), (r, K), (N, r), (N if bias else 0,))
    for name, value, shape in zip(OUTPUT_NAMES, got, shapes, strict=True):
        assert tuple(value.shape) == shape, name
        assert torch.isfinite(value).all(), f"{name}: NaN/inf (an unwritten element under the poison switch)"
    _assert_tf32_parity(got, (x, weight, b, lora_A, lora_B), SCALING, dropout_p, 1234, grad_y)


@pytest.mark.parametrize("case", list(TF32_CASES), ids=str)
def test_float32_parity_with_tf32_on_and_off(case, allow_tf32):
    M, K, N, r, bias = TF32_CASES[case]
    if allow_tf32:
        _check_float32_with_tf32_allowed(M, K, N, r, bias)
    else:  # the exact fp32 SIMT path, every output
        check_parity(M, K, N, r, torch.float32, bias, dropout_p=0.25, device="cuda")


# dx on TF32 reads W [N, K] as stored (no transposed copy): its MN-major stages take 4-float
# cp.async chunks along K when K is a multiple of 4 and element loads otherwise, and 32-bit
# shared-memory loads into the B fragments. Every case puts a residue on both of dx's tile
# edges (K against the 128-column tile and 4-float chunks, N against the 16-deep k-tile, so
# the last k-tile spans W's rows and g's columns past N) and surrounds the operands with NaN:
# W has NaN rows before and after it (past row N up to the forward's whole 128-column tile),
# grad_y NaN rows before and after and NaN columns past N within each row (a row stride of
# N + extra: vector loads of g when that is a multiple of 4, element loads otherwise). A read
# of any of them (instead of the zero fill) makes an output NaN; TF32 on and off (then SIMT).
TF32_DX_CASES = {
    # (M, K, N, r, extra columns of grad_y's row stride beyond N)
    "K260-vector-W-N100-k-residue-fused-gb-vector-g": (384, 260, 100, 8, 4),
    "K141-element-W-N77-k-residue-r40-gb-first": (384, 141, 77, 40, 3),
    "K136-vector-W-N100-odd-grad_y-row-stride-103": (384, 136, 100, 16, 3),
}


def _inside_nan(t, rows_after, cols_after=0, rows_before=16):
    """A view of t's values inside a NaN-filled allocation: `rows_before` NaN rows before it,
    `rows_after` after it, `cols_after` NaN columns after each row (the row stride grows by
    them). With cols_after = 0 the view is contiguous (`.contiguous()` keeps it in place), and
    its base stays 16-byte aligned (rows_before a multiple of 4)."""
    rows, cols = t.shape
    padded = torch.full((rows_before + rows + rows_after, cols + cols_after), float("nan"), device=t.device,
                        dtype=t.dtype)
    view = padded[rows_before : rows_before + rows, :cols]
    view.copy_(t)
    assert view.stride(0) == cols + cols_after and view.data_ptr() % 16 == 0
    return view


def _weight_inside_nan(weight):
    """W with NaN rows from N up to the end of the last 128-row tile (and 16 more)."""
    return _inside_nan(weight, rows_after=-(-weight.shape[0] // 128) * 128 - weight.shape[0] + 16)


@pytest.mark.parametrize("case", list(TF32_DX_CASES), ids=str)
def test_every_instantiation_tf32_dx_reads_weight_as_stored(case, allow_tf32):
    """In the GPU check's first (smoke) stage with the other instantiation cases (its -k filter)."""
    M, K, N, r, extra = TF32_DX_CASES[case]
    assert N % 16 and K % 128, "a residue on both tile edges of dx"

    def grad_y_inside_nan(g):
        return _inside_nan(g, rows_after=16, cols_after=extra)

    if allow_tf32:
        _check_float32_with_tf32_allowed(M, K, N, r, True, weight_transform=_weight_inside_nan,
                                         grad_y_transform=grad_y_inside_nan)
        return
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, torch.float32, device="cuda", bias=True)
    weight = _weight_inside_nan(weight)
    grad_y = grad_y_inside_nan(make_inputs(M, N, 1, 1, torch.float32, device="cuda", seed=1)[0])
    got = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.25, 1234, grad_y)
    _parity_of(got, (x, weight, b, lora_A, lora_B), SCALING, 0.25, 1234, grad_y)


@pytest.mark.parametrize("case", list(INSTANTIATION_CASES), ids=str)
def test_every_instantiation_case_on_tf32(case):
    """The instantiation cases (element and vector paths, rank tiles, splits) through the TF32
    kernels (test_every_instantiation_parity[float32] runs them with TF32 off, on SIMT)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_float32_with_tf32_allowed(*INSTANTIATION_CASES[case])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# dA on TF32, dB|db beside it on SIMT (wide_kernel<float, false>: 32 ranks × 128 columns, 16-deep k-tiles
# along M, g / x MN-major in 4-float chunks, round(xa)ᵀ / round(gb)ᵀ from rank_transpose<float>)
# at the residues of each of its edges, dropout on (dA hashes the mask) and off: N and K
# against the 128-column tile and the 4-float chunk (element loads of g or x when not a
# multiple of 4), M against the 16-deep k-tile, the split-M slices (M > 512: 2-3 slices, the
# last one partial) and rank_transpose's 8-column padding, r against the 32-rank tile with
# db's ones row (r = 31 fills one tile, 32 needs two) and without db.
TF32_WIDE_CASES = {
    # (M, K, N, r, bias)
    "r4-three-splits-N90-element-g-K132-vector-x": (1100, 132, 90, 4, True),
    "r31-db-one-rank-tile-M1037-last-split-partial": (1037, 256, 136, 31, True),
    "r32-db-two-rank-tiles-K70-element-x-two-splits": (515, 70, 260, 32, True),
    "r33-no-db-two-rank-tiles-M300": (300, 136, 45, 33, False),
    "r65-three-rank-tiles-M17-one-partial-k-tile": (17, 40, 33, 65, True),
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("case", list(TF32_WIDE_CASES), ids=str)
def test_every_instantiation_tf32_dB_db_dA_residues(case, dropout_p):
    M, K, N, r, bias = TF32_WIDE_CASES[case]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_float32_with_tf32_allowed(M, K, N, r, bias, dropout_p=dropout_p)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# ---- strides, alignment, empty and tiny shapes ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_stride_other_than_K_keeps_the_fast_path_correct(dtype):
    """x a column slice whose row stride (K + 16) is a multiple of 8: the cp.async path with
    ldx != K, forward and backward (dA reads x with that stride too)."""

    def column_slice(x):
        wide = torch.randn(x.shape[0], x.shape[1] + 16, device=x.device, dtype=x.dtype)
        wide[:, : x.shape[1]] = x
        sliced = wide[:, : x.shape[1]]
        assert sliced.stride(0) % 8 == 0 and sliced.stride(0) != sliced.shape[1]
        return sliced

    check_parity(300, 136, 72, 16, dtype, True, dropout_p=0.2, device="cuda", x_transform=column_slice)


def _misaligned(t, elements=1):
    """A copy of t whose storage starts `elements` past a 16-byte boundary (same values)."""
    flat = torch.empty(t.numel() + elements, device=t.device, dtype=t.dtype)
    view = flat[elements:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_misaligned_storage_offsets(dtype):
    """x, weight, lora_A, lora_B and grad_y starting off a 16-byte boundary: the kernels
    must fall back to element loads, not issue misaligned vector copies."""
    M, K, N, r = 150, 72, 136, 8
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda", seed=3)
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=4)[0]
    inputs = (_misaligned(x), _misaligned(weight), b, _misaligned(lora_A), _misaligned(lora_B))
    got = run_extension(*inputs, SCALING, 0.1, 77, _misaligned(grad_y))
    _parity_of(got, inputs, SCALING, 0.1, 77, grad_y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_no_dx(dtype):
    x, weight, b, lora_A, lora_B = make_inputs(130, 72, 40, 8, dtype, device="cuda")
    grad_y = make_inputs(130, 40, 1, 1, dtype, device="cuda", seed=1)[0]
    got = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.2, 5, grad_y, compute_dx=False)
    assert got[2].numel() == 0
    _parity_of(got, (x, weight, b, lora_A, lora_B), SCALING, 0.2, 5, grad_y,
               names=("y", "xa", "dA", "dB", "db"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("M,K,N,r", [(0, 24, 16, 4), (9, 0, 16, 4), (9, 24, 0, 4), (0, 0, 0, 1),
                                     (11, 5, 13, 3), (11, 7, 9, 16), (11, 1, 1, 1)])
def test_empty_and_tiny_shapes(M, K, N, r, dtype):
    """M, N or K = 0, and K < 8 (no vector path): sums over an empty range are zeros."""
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):  # make_inputs scales by K ** -0.5, undefined at K = 0
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device="cuda", dtype=dtype)

    x, weight, b, lora_A, lora_B, grad_y = rand(M, K), rand(N, K), rand(N), rand(r, K), rand(N, r), rand(M, N)
    got = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.3, 9, grad_y)
    for value, expected_shape in zip(got, ((M, N), (M, r), (M, K), (r, K), (N, r), (N,)), strict=True):
        assert tuple(value.shape) == expected_shape
    _parity_of(got, (x, weight, b, lora_A, lora_B), SCALING, 0.3, 9, grad_y)


@pytest.mark.parametrize("M,K,N,r", [(7, 33, 17, 3), (130, 72, 136, 16)])
def test_float64(M, K, N, r):
    check_parity(M, K, N, r, torch.float64, True, dropout_p=0.2, device="cuda")


# ---- reductions over many rows --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reductions_over_many_splits_and_column_tiles(dtype):
    """M = 16500 gives dB|db and dA 33 split-M slices (the last one partial) and the tall
    GEMMs 129 row tiles; N = 200 gives the wide dB GEMM two 128-column tiles of g."""
    check_parity(16500, 40, 200, 8, dtype, True, dropout_p=0.1, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_empty_trailing_split_slices_store_zeros(dtype):
    """M = 32769 hits the 64-split cap, and rounding each slice up to whole k-tiles leaves the
    last slices empty: tensor cores 544 rows per slice (slices 61-63 start past M), SIMT 528
    (slice 63). Their partial sums must still be written (zeros) under the poison switch, or
    the fixed-order reduce adds NaN into dA, dB and db."""
    M = 32769
    splits = min(64, -(-M // 512))
    per_slice_tc, per_slice_simt = -(-(-(-M // splits)) // 32) * 32, -(-(-(-M // splits)) // 16) * 16
    assert splits == 64 and per_slice_tc * 61 >= M and per_slice_simt * 63 >= M
    check_parity(M, 24, 40, 4, dtype, True, dropout_p=0.1, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_backward_is_deterministic(dtype):
    """Fixed-order partial sums: two runs give the same bits (no atomics)."""
    x, weight, b, lora_A, lora_B = make_inputs(20000, 136, 200, 16, dtype, device="cuda")
    grad_y = make_inputs(20000, 200, 1, 1, dtype, device="cuda", seed=1)[0]
    first = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 3, grad_y)
    second = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 3, grad_y)
    for name, a, bb in zip(OUTPUT_NAMES, first, second, strict=True):
        assert torch.equal(a, bb), f"{name} differs between two identical calls"


# ---- the dropout mask hashed once in the backward: dx's keep bits, read by dA ----------
#
# fp16/bf16 with dropout: the dx kernel (sm80, or sm90 on Hopper) writes the mask as keep bits
# uint32 [M][ceil(K/32)] (csrc/cuda_keep_bits.cuh) and sm80_dA reads them instead of hashing.
# The workspace is poisoned to all ones ("keep everything"): a word dx leaves unwritten keeps
# elements the reference drops (about half of them at p = 0.5). Tolerance parity catches a
# systematic miss (a lane, a row, a K residue, a tile: many words), not reliably one isolated
# word; the bitwise test below (dA from the bits == dA hashing) catches any wrong word, and its
# r > 32 cases with K % 8 != 0 check the sm80 dx's words on every GPU. K % 32 != 0 (the last
# word of a row clipped at K) and K % 128 != 0 over several 128-column dx tiles and row tiles;
# r = 1 and 16 (sm80 dx computes gb itself) and 40 (two rank tiles: dA reads the bits once per
# rank tile; gb from the tall GEMM).
KEEP_BIT_CASES = {
    # (M, K, N, r)
    "r1-k300-three-column-tiles": (260, 300, 72, 1),
    "r16-k200-two-column-tiles": (300, 200, 136, 16),
    "r40-k264-two-rank-tiles": (257, 264, 72, 40),
    "r16-k150-element-loads": (130, 150, 45, 16),  # K % 8 != 0: the sm80 dx on every GPU
    "r16-k520-three-splits": (1100, 520, 40, 16),  # dA over 3 split-M slices, 5 column tiles
    "r40-k150-element-loads": (130, 150, 45, 40),  # K % 8 != 0: the sm80 dx on every GPU
    "r40-k300-three-column-tiles": (260, 300, 72, 40),  # K % 8 != 0: the sm80 dx on every GPU
    "r40-k520-three-splits": (1100, 520, 40, 40),  # the same with gb from the tall GEMM
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(KEEP_BIT_CASES), ids=str)
def test_dropout_keep_bits_parity(case, dtype):
    M, K, N, r = KEEP_BIT_CASES[case]
    assert K % 32 != 0 and K > 128
    check_parity(M, K, N, r, dtype, True, dropout_p=0.5, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["r40-k264-two-rank-tiles", "r40-k150-element-loads",
                                  "r40-k300-three-column-tiles", "r40-k520-three-splits"])
def test_dA_from_keep_bits_equals_dA_hashed(case, dtype):
    """dA with dx (the mask from dx's keep bits) and without (dA hashes it): the same x~ =
    x·keep/(1-p) and the same products, so the same bits, when gb is the tall GEMM's both
    times (r > 32). For r <= 32 dx computes gb itself (sm80, and sm90 up to K = 1024), another
    computation of gb: parity only (test_dropout_keep_bits_parity)."""
    M, K, N, r = KEEP_BIT_CASES[case]
    assert r > 32, "dA's gb must be the tall GEMM's with and without dx"
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda")
    grad_y = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0]
    with_dx = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.5, 21, grad_y)
    without_dx = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.5, 21, grad_y, compute_dx=False)
    assert torch.equal(with_dx[3], without_dx[3]), "dA from dx's keep bits differs from dA hashing the mask"
    _parity_of(with_dx, (x, weight, b, lora_A, lora_B), SCALING, 0.5, 21, grad_y)


# ---- rounding order: no overflow where PEFT's order has none ---------------------------


def test_fp16_forward_large_scaling_does_not_overflow():
    """Issue 9's case: x in [0, 60), K = 64, A in [0, 1), B ~ 1e-3, s = 200. s·xa passes
    65504 although y stays under ~1000; s must multiply the fp32 accumulator, not xa."""
    gen = torch.Generator().manual_seed(0)
    M, K, N, r, s = 64, 64, 48, 4, 200.0
    x = (torch.rand(M, K, generator=gen) * 60).half().cuda()
    weight = (torch.randn(N, K, generator=gen) / K**0.5).half().cuda()
    lora_A = torch.rand(r, K, generator=gen).half().cuda()
    lora_B = (torch.randn(N, r, generator=gen) * 1e-3).half().cuda()
    grad_y = torch.randn(M, N).half().cuda()
    y, xa = FORWARD(x, weight, None, lora_A, lora_B, s, 0.0, torch.tensor(0))
    assert (s * xa).abs().max() > 65504, "the case must push s·xa past fp16's range"
    _parity_of((y, xa), (x, weight, None, lora_A, lora_B), s, 0.0, 0, grad_y, names=("y", "xa"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_fp16_gradients_of_gradscaler_size(dropout_p):
    """grad_y scaled by GradScaler's initial 2^16 and s = 1000: s·gb passes 65504 while
    every true output stays in fp16's range; dx must not round s·gb to fp16."""
    gen = torch.Generator().manual_seed(1)
    M, K, N, r, s = 8, 128, 256, 8, 1000.0

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).half().cuda()

    x, weight = rand(M, K, scale=5e-3), rand(N, K, scale=K**-0.5)
    lora_A, lora_B, bias = rand(r, K, scale=1e-3), rand(N, r, scale=0.4), rand(N, scale=1.0)
    grad_y = rand(M, N, scale=1e-3 * 2.0**16)
    gb = grad_y.float() @ lora_B.float()
    assert (s * gb).abs().max() > 65504, "the case must push s·gb past fp16's range"
    got = run_extension(x, weight, bias, lora_A, lora_B, s, dropout_p, 21, grad_y)
    _parity_of(got, (x, weight, bias, lora_A, lora_B), s, dropout_p, 21, grad_y)


# ---- streams and CUDA graphs ----------------------------------------------------------


def test_runs_on_the_current_stream():
    """On a side stream whose input is written only after a long sleep on that stream, a
    kernel launched on any other stream would read the unwritten input."""
    x, weight, b, lora_A, lora_B = make_inputs(256, 136, 72, 8, torch.bfloat16, device="cuda")
    grad_y = make_inputs(256, 72, 1, 1, torch.bfloat16, device="cuda", seed=1)[0]
    expected = run_extension(x, weight, b, lora_A, lora_B, SCALING, 0.1, 4, grad_y)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    x_late = torch.full_like(x, float("nan"))
    side.wait_stream(torch.cuda.current_stream())  # x_late's fill, not its copy, precedes the side stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before x_late gets its values
        x_late.copy_(x)
        got = run_extension(x_late, weight, b, lora_A, lora_B, SCALING, 0.1, 4, grad_y)
    side.synchronize()
    for name, a, e in zip(OUTPUT_NAMES, got, expected, strict=True):
        assert torch.equal(a, e), f"{name} on a side stream differs from the default stream's"


def test_cuda_graph_capture_of_forward_and_backward():
    """Forward + backward captured once, replayed on new input values: the same bits as
    eager calls on those values (the seed is a CPU tensor, fixed at capture)."""
    M, K, N, r = 200, 136, 72, 16
    dtype = torch.float16
    static = [t.clone() for t in make_inputs(M, K, N, r, dtype, device="cuda")]
    static_g = make_inputs(M, N, 1, 1, dtype, device="cuda", seed=1)[0].clone()
    seed = torch.tensor(8)

    def step():
        x, weight, b, lora_A, lora_B = static
        y, xa = FORWARD(x, weight, b, lora_A, lora_B, SCALING, 0.2, seed)
        return (y, xa, *BACKWARD(static_g, x, weight, lora_A, lora_B, xa, SCALING, 0.2, seed, True, True))

    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = make_inputs(M, K, N, r, dtype, device="cuda", seed=5)
    for target, value in zip(static, fresh, strict=True):
        target.copy_(value)
    static_g.copy_(make_inputs(M, N, 1, 1, dtype, device="cuda", seed=6)[0])
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for name, a, e in zip(OUTPUT_NAMES, captured, eager, strict=True):
        assert torch.equal(a, e), f"{name} from the replayed graph differs from an eager call"
