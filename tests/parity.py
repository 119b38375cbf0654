"""DESIGN.md §5's parity rule and input builders, shared by every backend's tests.

A fused result passes when its max error against a float64 reference is at most twice
(plus a tiny atol) the error of the same computation done by plain PyTorch in the same
dtype: the tolerance adapts to each dtype by itself.
"""

from __future__ import annotations

import torch

from lora_fused import reference

ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(M, K, N, r, dtype, device="cpu", bias=True, seed=0, leading=None):
    """Random LoRA inputs (never zeros): x [M, K] (or leading + [K]), W, b, A, B."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rand(*(leading or (M,)), K)
    weight = rand(N, K, scale=K ** -0.5)
    b = rand(N) if bias else None
    lora_A = rand(r, K, scale=K ** -0.5)
    lora_B = rand(N, r, scale=r ** -0.5)
    return x, weight, b, lora_A, lora_B


def max_error(value: torch.Tensor, reference_value: torch.Tensor) -> float:
    assert value.shape == reference_value.shape, (value.shape, reference_value.shape)
    assert torch.isfinite(value).all(), "result has NaN/inf (an unwritten or overflowed element)"
    return (value.double() - reference_value.double()).abs().max().item() if value.numel() else 0.0


def assert_parity(name: str, value, same_dtype_torch, float64_reference) -> None:
    """``value`` (a backend's result) must be within 2× PyTorch's own same-dtype error."""
    budget = 2.0 * max_error(same_dtype_torch, float64_reference) + ATOL[value.dtype]
    error = max_error(value, float64_reference)
    assert error <= budget, f"{name}: max error {error:.3e} exceeds budget {budget:.3e} ({value.dtype})"


def reference_outputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y):
    """Forward and backward of the reference op: (y, xa, dx, dA, dB, db)."""
    seed_t = torch.tensor(seed, dtype=torch.int64)
    y, xa = reference.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
    dx, dA, dB, db = reference.backward(
        grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed_t, True, bias is not None
    )
    return y, xa, dx, dA, dB, db
