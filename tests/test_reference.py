"""The reference op: gradcheck of its explicit backward, and its dropout contract."""

import pytest
import torch

from lora_fused import dropout, reference
from lora_fused.ops import reference_backward, reference_forward


def _op_inputs(M, K, N, r, bias, requires_grad=True, leading=None):
    gen = torch.Generator().manual_seed(M * 1000 + K * 10 + r)
    x = torch.randn(*(leading or (M,)), K, generator=gen, dtype=torch.float64)
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64)
    b = torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    lora_A = torch.randn(r, K, generator=gen, dtype=torch.float64)
    lora_B = torch.randn(N, r, generator=gen, dtype=torch.float64)
    for t in (x, b, lora_A, lora_B):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, weight, b, lora_A, lora_B


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,N,r", [(1, 5, 3, 1), (7, 9, 6, 3), (12, 16, 11, 4)])
def test_reference_op_gradcheck(M, K, N, r, bias, dropout_p):
    x, weight, b, lora_A, lora_B = _op_inputs(M, K, N, r, bias)
    seed = torch.tensor(1234, dtype=torch.int64)

    def fn(x, b, lora_A, lora_B):
        return reference_forward(x, weight, b, lora_A, lora_B, 0.75, dropout_p, seed)[0]

    inputs = (x, b, lora_A, lora_B) if bias else (x, None, lora_A, lora_B)
    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_matches_composite_autograd():
    """The explicit backward equals autograd of the plain formula (no dropout)."""
    x, weight, b, lora_A, lora_B = _op_inputs(6, 10, 8, 4, bias=True)
    y, _ = reference_forward(x, weight, b, lora_A, lora_B, 2.0, 0.0, torch.tensor(0))
    expected = x @ weight.t() + b + 2.0 * (x @ lora_A.t()) @ lora_B.t()
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b, lora_A, lora_B), g)
    want = torch.autograd.grad(expected, (x, b, lora_A, lora_B), g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def test_backward_skips_dx_and_db_when_not_requested():
    x, weight, b, lora_A, lora_B = _op_inputs(5, 6, 4, 2, bias=True, requires_grad=False)
    y, xa = reference_forward(x, weight, b, lora_A, lora_B, 1.0, 0.0, torch.tensor(0))
    dx, dA, dB, db = reference_backward(torch.ones_like(y), x, weight, lora_A, lora_B, xa, 1.0, 0.0,
                                        torch.tensor(0), False, False)
    assert dx.numel() == 0 and db.numel() == 0
    assert dA.shape == lora_A.shape and dB.shape == lora_B.shape


def test_xa_is_fp32_for_half_inputs_and_fp64_for_fp64():
    assert reference.accumulator_dtype(torch.bfloat16) == torch.float32
    assert reference.accumulator_dtype(torch.float16) == torch.float32
    assert reference.accumulator_dtype(torch.float64) == torch.float64
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    _, xa = reference.forward(x, torch.randn(5, 8, dtype=torch.bfloat16), None,
                              torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(5, 2, dtype=torch.bfloat16),
                              1.0, 0.0, torch.tensor(0))
    assert xa.dtype == torch.float32 and xa.shape == (3, 2)


def test_saved_tensors_are_x_xa_and_seed_only():
    """Nothing of size M×N and no mask is kept for backward, even with dropout."""
    M, K, N, r = 64, 32, 48, 4
    x, weight, b, lora_A, lora_B = _op_inputs(M, K, N, r, bias=True)
    x = x.float().detach().requires_grad_()
    params = [t.float().detach().requires_grad_() for t in (weight, b, lora_A, lora_B)]
    params[0].requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_forward(x, params[0], params[1], params[2], params[3], 1.0, 0.5, torch.tensor(7))
    param_ptrs = {p.data_ptr() for p in params}
    activation_bytes = sum(t.numel() * t.element_size() for t in saved
                           if t.data_ptr() not in param_ptrs and t.dim() > 0)
    assert activation_bytes == x.numel() * 4 + M * r * 4
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "x must be saved itself, not a copy"


def test_dropout_mask_is_deterministic_and_has_rate_p():
    keep = dropout.keep_mask(42, 200, 300, 0.25)
    assert torch.equal(keep, dropout.keep_mask(42, 200, 300, 0.25))
    assert not torch.equal(keep, dropout.keep_mask(43, 200, 300, 0.25))
    n = keep.numel()
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5
    # Rows and columns are not correlated: every row and column sees drops near p.
    assert keep.float().mean(1).sub(0.75).abs().max() < 0.12
    assert keep.float().mean(0).sub(0.75).abs().max() < 0.12


def test_dropout_hash_uses_high_index_word():
    """Indices that differ only above bit 32 (M·K > 2³²) must not share mask bits."""
    low = torch.arange(4096, dtype=torch.int64)
    high = low + (1 << 32)
    assert not torch.equal(dropout.element_hash(5, low), dropout.element_hash(5, high))


def test_dropout_reference_forward_uses_the_mask():
    x = torch.ones(20, 30, dtype=torch.float64)
    p = 0.4
    dropped = reference.dropped_input(x, p, torch.tensor(9))
    keep = dropout.keep_mask(9, 20, 30, p)
    torch.testing.assert_close(dropped, keep.double() / (1 - p))
