"""The fp32 rank-thin products of the C++ CPU path (csrc/cpu_thin.cpp: xa = x·Aᵀ, gb = g·B,
dA = s·gbᵀ·x~ and dB = s·gᵀ·xa as oneDNN fp32 brgemm tiles of 64, reductions in 64-long
slices): parity across every tile, slice and rank-block boundary, and bits that do not depend
on the thread count."""

from __future__ import annotations

import pytest
import torch

from conftest import load_extension_or_skip_module
from parity import assert_op_parity, make_inputs

load_extension_or_skip_module()

FORWARD = torch.ops.lora_fused.fused_forward.default
BACKWARD = torch.ops.lora_fused.fused_backward.default
SCALING = 0.7
SEED = 77

# The tile edge and slice length of csrc/cpu_thin.cpp.
TILE = 64


def run_ops(x, weight, bias, lora_A, lora_B, p, grad_y):
    seed = torch.tensor(SEED, dtype=torch.int64)
    y, xa = FORWARD(x, weight, bias, lora_A, lora_B, SCALING, p, seed)
    dx, dA, dB, db = BACKWARD(grad_y, x, weight, lora_A, lora_B, xa, SCALING, p, seed, True, True)
    return y, xa, dx, dA, dB, db


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("M, K, N, r", [
    (1, 7, 5, 1),                        # one short tile, one short slice everywhere
    (TILE + 1, 2 * TILE + 1, 3 * TILE - 5, TILE - 1),  # short last row tile and slices
    (2 * TILE + 2, TILE, TILE, TILE),    # exact tiles and slices
    (130, 3 * TILE + 3, 2 * TILE + 7, TILE + 1),  # two rank blocks, the second one rank wide
    (70, 50, 200, 2 * TILE + 2),         # rank wider than two tiles
])
def test_parity_across_tile_and_slice_boundaries(M, K, N, r, p):
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.float32, seed=M + K)
    grad_y = make_inputs(M, N, 1, 1, torch.float32, seed=M + N)[0]
    got = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    assert_op_parity(got, x, weight, bias, lora_A, lora_B, SCALING, p, SEED, grad_y)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_transposed_lora_operands(p):
    """A and B as transposed views: the thin operands are made row-major before the tiles."""
    x, weight, bias, lora_A, lora_B = make_inputs(90, 70, 60, 5, torch.float32, seed=3)
    lora_A, lora_B = lora_A.t().contiguous().t(), lora_B.t().contiguous().t()
    assert not lora_A.is_contiguous() and not lora_B.is_contiguous()
    grad_y = make_inputs(90, 60, 1, 1, torch.float32, seed=4)[0]
    got = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    assert_op_parity(got, x, weight, bias, lora_A, lora_B, SCALING, p, SEED, grad_y)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_thin_products_do_not_depend_on_the_thread_count(p):
    """xa, dA and dB come only from the brgemm tiles (one thread per output element, fixed
    order), so their bits match between 1 and 2 threads. y and dx also hold MKL's big GEMM,
    whose blocking may follow the thread count; they are checked by parity elsewhere."""
    x, weight, bias, lora_A, lora_B = make_inputs(5 * TILE + 9, 3 * TILE + 5, 2 * TILE + 3, 16, torch.float32,
                                                  seed=5)
    grad_y = make_inputs(5 * TILE + 9, 2 * TILE + 3, 1, 1, torch.float32, seed=6)[0]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
        torch.set_num_threads(2)
        two = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    finally:
        torch.set_num_threads(previous)
    for index, name in ((1, "xa"), (3, "dA"), (4, "dB")):
        assert torch.equal(one[index], two[index]), f"{name} differs between 1 and 2 threads"
