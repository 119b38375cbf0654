"""In-kernel dropout of the Triton backend: the shared hash bit for bit, one mask for both passes.

The kernels never store the mask, so it is read back through the ops themselves: with
``A = I`` (rank = K) the forward's ``xa = (x ⊙ mask)/(1-p)`` shows the forward mask, and
with ``W = 0`` the backward's ``dx = s·(g·B ⊙ mask)/(1-p)`` shows the backward mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import lora_fused
from lora_fused import reference
from lora_fused.dropout import dropout_threshold, element_hash, keep_mask
from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import ops as triton_ops
from lora_fused.kernels.dropout import dropout_keep, seed_as_int32, triton_keep_mask
from parity import make_inputs

INTERPRETING = triton_configs.interpreting()
DEVICE = "cpu" if INTERPRETING else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1",
)


def _seed(value):
    return torch.tensor(value, dtype=torch.int64)


def _masks_seen_by_ops(M, K, p, seed):
    """(forward mask, backward mask) as the fused forward and backward kernels applied them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(DEVICE)
    weight = torch.zeros(20, K, device=DEVICE)
    lora_A = torch.eye(K, device=DEVICE)
    lora_B = torch.randn(20, K, generator=gen).to(DEVICE)
    grad_y = torch.randn(M, 20, generator=gen).to(DEVICE)
    _, xa = triton_ops.triton_forward(x, weight, None, lora_A, lora_B, 1.0, p, _seed(seed))
    dx, _, _, _ = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, 1.0, p, _seed(seed), True, False)
    return xa != 0, dx != 0


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**33 + 5])
@pytest.mark.parametrize("rows,cols,p", [(7, 13, 0.1), (33, 50, 0.5), (5, 300, 0.9)])
def test_kernel_hash_matches_specification(seed, rows, cols, p):
    assert torch.equal(triton_keep_mask(seed, rows, cols, p, DEVICE).cpu(), keep_mask(seed, rows, cols, p))


def test_kernel_hash_past_32_bit_indices():
    # Linear indices beyond 2**32 exercise the high word of the index: the mask kernel's 1024-element blocks
    # (one first index each) include one whose indices cross 2**32, so its elements pick the key by carry.
    cols, row_start = 1000, (2**32) // 1000 - 1
    got = triton_keep_mask(7, 4, cols, 0.3, DEVICE, row_start=row_start).cpu()
    index = torch.arange(row_start * cols, (row_start + 4) * cols, dtype=torch.int64).view(4, cols)
    assert index.max() >= 2**32 > index.min()
    assert torch.equal(got, (element_hash(7, index) >> 8) >= dropout_threshold(0.3))


@triton.jit
def _row_tile_mask_kernel(out_ptr, row_start, col_start, K, seed, threshold, ROWS: tl.constexpr, COLS: tl.constexpr,
                          INDEX_BELOW_2_32: tl.constexpr):
    # As the backward and the projection kernels call it: one first index per tile row, in-row offsets.
    rows = row_start.to(tl.int64) + tl.arange(0, ROWS)
    offsets = tl.arange(0, COLS)
    keep = dropout_keep(seed, rows[:, None] * K + col_start, offsets[None, :], threshold, INDEX_BELOW_2_32)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * COLS + offsets[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("row_start,K,col_start", [
    ((2**32) // 100 - 2, 100, 37),  # the row that crosses 2**32 (and rows above it, all past 2**32)
    (3 * 2**32 // 77, 77, 5),  # near the next high word, 3
    (5, 1000, 10),  # every index below 2**32: the one-key path must agree
])
@pytest.mark.parametrize("seed", [7, 2**31 - 1])
def test_hoisted_key_mix_matches_the_specification_per_row(row_start, K, col_start, seed):
    rows, cols, p = 16, 64, 0.4
    out = torch.empty(rows, cols, dtype=torch.int8, device=DEVICE)
    index = (torch.arange(row_start, row_start + rows, dtype=torch.int64)[:, None] * K + col_start
             + torch.arange(cols, dtype=torch.int64)[None, :])
    expected = ((element_hash(seed, index) >> 8) >= dropout_threshold(p)).to(DEVICE)
    below = int(index.max()) < 2**32
    for one_key in ((False, True) if below else (False,)):
        out.fill_(-1)
        _row_tile_mask_kernel[(1,)](out, row_start, col_start, K, seed_as_int32(seed), dropout_threshold(p),
                                    ROWS=rows, COLS=cols, INDEX_BELOW_2_32=one_key)
        assert torch.equal(out.bool(), expected), (row_start, K, col_start, one_key)
    if not below:
        # The tile holds indices on both sides of a 2**32 boundary (both keys used).
        assert len(torch.unique(index >> 32)) == 2


@pytest.mark.parametrize("p", [0.15, 0.5])
def test_forward_and_backward_apply_the_specified_mask(p):
    M, K = 130, 48
    forward_mask, backward_mask = _masks_seen_by_ops(M, K, p, seed=31)
    expected = keep_mask(31, M, K, p)
    assert torch.equal(forward_mask.cpu(), expected)
    assert torch.equal(backward_mask.cpu(), expected)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropped_fraction_matches_p(p):
    rows, cols = 256, 257
    kept = triton_keep_mask(12345, rows, cols, p, DEVICE).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / (rows * cols))
    assert abs((1 - kept) - p) < 5 * sigma, f"dropped {1 - kept:.4f}, expected {p} ± {5 * sigma:.4f}"


def test_different_seeds_give_different_masks():
    first, _ = _masks_seen_by_ops(64, 32, 0.5, seed=1)
    second, _ = _masks_seen_by_ops(64, 32, 0.5, seed=2)
    differing = (first != second).float().mean().item()
    assert 0.4 < differing < 0.6, differing  # independent masks differ in 2·p·(1-p) = 50% of elements


def test_zero_probability_is_the_no_dropout_path_exactly():
    x, weight, bias, lora_A, lora_B = make_inputs(130, 70, 45, 16, torch.float16, device=DEVICE)
    grad_y = torch.randn(130, 45, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float16)
    outputs = []
    for seed in (3, 4):
        y, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.0, _seed(seed))
        grads = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, 2.0, 0.0, _seed(seed), True, True)
        outputs.append((y, xa, *grads))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    eval_mode = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, dropout_p=0.3, training=False,
                                       backend="triton")
    assert torch.equal(eval_mode, outputs[0][0])
    dropped, _ = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.3, _seed(3))
    assert not torch.equal(dropped, outputs[0][0])


def test_finite_differences_use_the_forward_mask():
    """Whole-op directional derivatives in fp32 at a fixed seed match the backward's gradients.

    y is linear in each of x, A and B separately (the mask is fixed by the seed), so central
    differences are exact up to fp32 rounding, and the step can be large. The tolerance is
    checked to be far below what a backward with a different mask would be off by.
    """
    M, K, N, r, p, s = 9, 40, 24, 4, 0.5, 3.0
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.float32, device=DEVICE, seed=8)
    gen = torch.Generator().manual_seed(9)
    probe = torch.randn(M, N, generator=gen, dtype=torch.float64).to(DEVICE)
    seed = _seed(4242)

    def loss(x_, A_, B_):
        y, _ = triton_ops.triton_forward(x_, weight, bias, A_, B_, s, p, seed)
        return (y.double() * probe).sum().item()

    _, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, s, p, seed)
    dx, dA, dB, _ = triton_ops.triton_backward(probe.float(), x, weight, lora_A, lora_B, xa, s, p, seed, True, False)
    wrong_xa = reference.forward(x, weight, bias, lora_A, lora_B, s, p, _seed(1))[1]
    wrong = reference.backward(probe.float(), x, weight, lora_A, lora_B, wrong_xa, s, p, _seed(1), True, False)

    step = 0.5
    for index, (tensor, grad, wrong_grad) in enumerate(zip((x, lora_A, lora_B), (dx, dA, dB), wrong[:3], strict=True)):
        direction = torch.randn(tensor.shape, generator=gen).to(DEVICE)
        args_plus = [x, lora_A, lora_B]
        args_minus = [x, lora_A, lora_B]
        args_plus[index] = tensor + step * direction
        args_minus[index] = tensor - step * direction
        numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * step)
        analytic = (grad.double() * direction.double()).sum().item()
        with_wrong_mask = (wrong_grad.double() * direction.double()).sum().item()
        tolerance = 1e-4 * (1 + abs(numeric))
        assert abs(with_wrong_mask - numeric) > 50 * tolerance, "test not sensitive to the mask"
        assert abs(analytic - numeric) <= tolerance, (["x", "A", "B"][index], analytic, numeric)
