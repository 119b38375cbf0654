"""The C++ CPU kernels of lora_fused._C beyond the shared parity matrix of test_cuda_ext.py:
the dropout row blocks and their grouped dA partials, strided x with dropout, outputs not
requested, thread counts, and determinism."""

from __future__ import annotations


import pytest
import torch

from lora_fused.debug import poison_enabled
from conftest import load_extension_or_skip_module
from parity import assert_op_parity, make_inputs

load_extension_or_skip_module()

FORWARD = torch.ops.lora_fused.fused_forward.default
BACKWARD = torch.ops.lora_fused.fused_backward.default
NAMES = ("y", "xa", "dx", "dA", "dB", "db")
SCALING = 1.3
SEED = 4242

# The kernel's dropout blocking (csrc/cpu_ops.cpp): 64-row blocks, at most 16 dA partials.
BLOCK_ROWS, MAX_PARTIALS = 64, 16


def run_ops(x, weight, bias, lora_A, lora_B, p, grad_y, compute_dx=True, compute_db=True):
    seed = torch.tensor(SEED, dtype=torch.int64)
    y, xa = FORWARD(x, weight, bias, lora_A, lora_B, SCALING, p, seed)
    dx, dA, dB, db = BACKWARD(grad_y, x, weight, lora_A, lora_B, xa, SCALING, p, seed, compute_dx, compute_db)
    return y, xa, dx, dA, dB, db


def check_against_reference(x, weight, bias, lora_A, lora_B, p, grad_y, compute_dx=True):
    got = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y, compute_dx=compute_dx)
    assert_op_parity(got, x, weight, bias, lora_A, lora_B, SCALING, p, SEED, grad_y,
                     absent=() if compute_dx else ("dx",))
    return got


def test_suite_poisons_kernel_outputs():
    assert poison_enabled(), "tests/conftest.py should set LORA_FUSED_POISON_OUTPUTS=1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("M", [
    BLOCK_ROWS * MAX_PARTIALS + 3,        # 17 blocks: partial groups of two blocks, the last with one
    BLOCK_ROWS * MAX_PARTIALS * 2 + 65,   # 34 blocks: groups of three, a short last group
    BLOCK_ROWS - 1,                       # one partial block
])
def test_dropout_blocks_and_grouped_partials(dtype, M):
    x, weight, bias, lora_A, lora_B = make_inputs(M, 40, 23, 8, dtype, seed=M)
    grad_y = make_inputs(M, 23, 1, 1, dtype, seed=M + 1)[0]
    check_against_reference(x, weight, bias, lora_A, lora_B, 0.3, grad_y)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("compute_dx", [True, False])
def test_strided_x_with_and_without_dx(p, compute_dx):
    x, weight, bias, lora_A, lora_B = make_inputs(150, 45, 31, 4, torch.float32, seed=9)
    wide = make_inputs(150, 90, 1, 1, torch.float32, seed=10)[0]
    x = wide[:, 1::2]  # row stride 90, column stride 2, storage offset 1
    grad_y = make_inputs(150, 31, 1, 1, torch.float32, seed=11)[0]
    check_against_reference(x, weight, bias, lora_A, lora_B, p, grad_y, compute_dx=compute_dx)


def test_transposed_grad_and_x_views():
    """Column-major x and grad_y reach BLAS as transposed views."""
    x, weight, bias, lora_A, lora_B = make_inputs(70, 33, 21, 3, torch.float32, seed=12)
    x = x.t().contiguous().t()
    grad_y = make_inputs(21, 70, 1, 1, torch.float32, seed=13)[0].t()
    assert not x.is_contiguous() and not grad_y.is_contiguous()
    check_against_reference(x, weight, bias, lora_A, lora_B, 0.1, grad_y)


@pytest.mark.parametrize("threads", [1, 2])
def test_parity_at_each_thread_count(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, weight, bias, lora_A, lora_B = make_inputs(300, 96, 80, 16, torch.float32, seed=14)
        grad_y = make_inputs(300, 80, 1, 1, torch.float32, seed=15)[0]
        for p in (0.0, 0.1):
            check_against_reference(x, weight, bias, lora_A, lora_B, p, grad_y)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_repeated_calls_are_bitwise_identical(p):
    x, weight, bias, lora_A, lora_B = make_inputs(1500, 48, 40, 8, torch.float32, seed=16)
    grad_y = make_inputs(1500, 40, 1, 1, torch.float32, seed=17)[0]
    first = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    second = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_large_scaling_in_half_precision_does_not_overflow():
    """s multiplies the fp32 accumulators (reference.py's rounding order): s·xa and s·gb are
    never rounded to fp16, where they would overflow although y and dx are finite."""
    M, K, N, r, s = 33, 64, 24, 4, 200.0
    gen = torch.Generator().manual_seed(18)
    x = (torch.rand(M, K, generator=gen) * 60).half()
    weight = (torch.randn(N, K, generator=gen) * 0.01).half()
    lora_A = torch.rand(r, K, generator=gen).half()
    lora_B = torch.full((N, r), 1e-3).half()
    grad_y = torch.full((M, N), 2.0**11).half()
    seed = torch.tensor(SEED)
    y, xa = FORWARD(x, weight, None, lora_A, lora_B, s, 0.0, seed)
    dx, dA, dB, _ = BACKWARD(grad_y, x, weight, lora_A, lora_B, xa, s, 0.0, seed, True, False)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (s * xa.abs().max()).item() > 65504, "the test must make s·xa overflow fp16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_call_on_two_threads(dtype):
    """Through autograd on two OpenMP threads: the worker threads run the kernels' ATen ops
    below autograd like the calling thread (they raised "functions with out=... don't support
    automatic differentiation" before the thread-local state was passed on)."""
    import lora_fused

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, weight, bias, lora_A, lora_B = make_inputs(300, 64, 40, 4, dtype, seed=19)
        for t in (x, lora_A, lora_B):
            t.requires_grad_()
        y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p=0.2, backend="cuda")
        y.float().square().sum().backward()
    finally:
        torch.set_num_threads(previous)
    assert all(torch.isfinite(t.grad).all() for t in (x, lora_A, lora_B))
