"""DESIGN.md §5's parity rule and input builders, shared by every backend's tests.

A fused result passes when its max error against a float64 reference is at most twice
the error of the same computation done by plain PyTorch in the same dtype, plus one
rounding unit of the dtype at the result's scale (see ``rounding_unit``): the tolerance
adapts to each dtype and each machine's BLAS by itself. The same rule compares any two
different computations of one function (ours vs PEFT, a merged model vs the LoRA model).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

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


def rounding_unit(dtype: torch.dtype, float64_reference: torch.Tensor) -> float:
    """One unit of ``dtype``'s rounding at the result's scale: eps · max|reference|.

    Any computation in ``dtype`` ends with rounding to it (up to half this), so when the
    PyTorch baseline happens to land within a few of these units, 2× its error alone would
    demand more than a result rounded in another order can give (M = 1, r = 1 on one CPU's
    BLAS); one unit more keeps the rule meaningful there and negligible elsewhere."""
    if not float64_reference.numel():
        return 0.0
    return torch.finfo(dtype).eps * float64_reference.double().abs().max().item()


def assert_parity(name: str, value, same_dtype_torch, float64_reference) -> None:
    """``value`` (a backend's result) must be within 2× PyTorch's own same-dtype error, plus
    one rounding unit of the dtype at the result's scale and a tiny absolute atol."""
    budget = (2.0 * max_error(same_dtype_torch, float64_reference) + rounding_unit(value.dtype, float64_reference)
              + ATOL[value.dtype])
    error = max_error(value, float64_reference)
    assert error <= budget, f"{name}: max error {error:.3e} exceeds budget {budget:.3e} ({value.dtype})"


def assert_all_parity(names: Sequence[str], values, same_dtype_torch, float64_references) -> None:
    """:func:`assert_parity` for each named result of one computation (``y``, ``dx``, ... in
    the same order in all four sequences, which must have one length)."""
    for name, value, same, exact in zip(names, values, same_dtype_torch, float64_references, strict=True):
        assert_parity(name, value, same, exact)


def reference_outputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y):
    """Forward and backward of the reference op: (y, xa, dx, dA, dB, db)."""
    seed_t = torch.tensor(seed, dtype=torch.int64)
    y, xa = reference.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
    dx, dA, dB, db = reference.backward(
        grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed_t, True, bias is not None
    )
    return y, xa, dx, dA, dB, db


OP_OUTPUTS = ("y", "xa", "dx", "dA", "dB", "db")


def assert_op_parity(got, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, *, absent=(),
                     same_dtype=False) -> None:
    """One backend's ``(y, xa, dx, dA, dB, db)`` vs the reference op: each within DESIGN.md §5's
    budget of the float64 reference; the outputs named in ``absent`` must be empty (not requested);
    ``same_dtype`` also requires each output's dtype to be the same-dtype reference's."""
    exact = reference_outputs(*(None if t is None else t.double() for t in (x, weight, bias, lora_A, lora_B)),
                              scaling, dropout_p, seed, grad_y.double())
    torch_outputs = reference_outputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y)
    for name, value, torch_value, exact_value in zip(OP_OUTPUTS, got, torch_outputs, exact, strict=True):
        if name in absent:
            assert value.numel() == 0
            continue
        if same_dtype:
            assert value.dtype == torch_value.dtype, (name, value.dtype, torch_value.dtype)
        assert_parity(name, value, torch_value, exact_value)


def in_float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``module``: the exact function a float32 model approximates."""
    return copy.deepcopy(module).double()


def assert_module_parity(name: str, candidate: Callable, baseline: torch.nn.Module, *inputs) -> None:
    """``candidate(*inputs)`` computes the function of ``baseline`` (a plain PyTorch or PEFT
    model) another way: its error against ``baseline`` run in float64 must be within 2× the
    baseline's own error (DESIGN.md §5). Works for any CPU's BLAS, unlike an exact compare."""
    reference = in_float64(baseline)(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                       for t in inputs))
    assert_parity(name, candidate(*inputs), baseline(*inputs), reference)


def forward_backward(module: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor,
                     parameters: Callable[[torch.nn.Module], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """``[y, dx, *grads of parameters(module)]`` of one forward/backward in the inputs' dtype."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_y)
    return [y.detach(), x.grad, *(p.grad for p in parameters(module))]
