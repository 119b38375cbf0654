"""Issue 9's numerical edges for the Triton backend: rounding order, infinities, empty and tiny
dimensions, poisoned allocations and the autotune knob. Runs under the interpreter (CPU) and on CUDA.

Rounding order (lora_fused/reference.py): xa and gb enter the next product rounded to the
input dtype unscaled, s multiplies the fp32 accumulator. With the old order (``s·xa`` or
``s·gb`` rounded to fp16) the fp16 cases below overflow although every true value is finite.
"""

from __future__ import annotations

import pytest
import torch

from lora_fused import reference
from lora_fused.kernels import backward as triton_backward_module
from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import dropout as triton_dropout_module
from lora_fused.kernels import forward as triton_forward_module
from lora_fused.kernels import ops as triton_ops
from parity import assert_parity, reference_outputs

INTERPRETING = triton_configs.interpreting()
DEVICE = "cpu" if INTERPRETING else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1",
)
NAMES = ("y", "xa", "dx", "dA", "dB", "db")


def _uniform(shape, low, high, gen):
    return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _signed(shape, scale, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _run_triton(x, weight, bias, lora_A, lora_B, grad_y, scaling, dropout_p=0.0, seed=5):
    seed_t = torch.tensor(seed, dtype=torch.int64)
    dev = [t.to(DEVICE) if t is not None else None for t in (x, weight, bias, lora_A, lora_B, grad_y)]
    y, xa = triton_ops.triton_forward(*dev[:5], scaling, dropout_p, seed_t)
    grads = triton_ops.triton_backward(dev[5], dev[0], dev[1], dev[3], dev[4], xa, scaling, dropout_p, seed_t,
                                       True, bias is not None)
    return tuple(t.cpu() for t in (y, xa, *grads))


def _check_against_reference(inputs, scaling, dropout_p=0.0, seed=5):
    x, weight, bias, lora_A, lora_B, grad_y = inputs
    got = _run_triton(*inputs, scaling, dropout_p, seed)
    same_dtype = reference_outputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y)
    exact = reference_outputs(*(None if t is None else t.double() for t in (x, weight, bias, lora_A, lora_B)),
                              scaling, dropout_p, seed, grad_y.double())
    for name, value, torch_value, exact_value in zip(NAMES, got, same_dtype, exact, strict=True):
        assert torch.isfinite(torch_value).all(), f"the fp16 reference itself overflows in {name}: fix the test"
        assert_parity(name, value, torch_value, exact_value)


@pytest.mark.parametrize("rank,dropout_p", [(4, 0.0), (4, 0.2), (64, 0.0)])
def test_large_scaling_does_not_overflow_fp16_forward(rank, dropout_p):
    # x in [0, 60), K = 64, A in [0, 1), B ~ 1e-3, s = 200: xa reaches ~2000 and s·xa ~ 4e5 > 65504,
    # while every true output stays far below fp16's range.
    gen = torch.Generator().manual_seed(0)
    M, K, N = 7, 64, 20
    x = _uniform((M, K), 0, 60, gen)
    weight = _signed((N, K), 1e-3, gen)
    bias = _signed((N,), 1.0, gen)
    lora_A = _uniform((rank, K), 0, 1, gen)
    lora_B = _uniform((N, rank), 0.5e-3, 1.5e-3, gen) / rank
    grad_y = _signed((M, N), 1e-3, gen)
    inputs = tuple(t.half() for t in (x, weight, bias, lora_A, lora_B, grad_y))
    xa = reference.dropped_input(x, dropout_p, torch.tensor(5)) @ lora_A.t()
    assert xa.abs().max() * 200 > 65504, "s·xa must exceed fp16's range for this test to mean anything"
    _check_against_reference(inputs, 200.0, dropout_p)


@pytest.mark.parametrize("rank,dropout_p", [(4, 0.0), (4, 0.3), (128, 0.0)])
def test_gradscaler_sized_fp16_gradients_stay_finite(rank, dropout_p):
    # GradScaler multiplies the loss by 2**16, so |g| reaches ~2**16 (here 2**14·N(0, 1), max ~4e4 < 65504);
    # with s = 200, s·gb ~ 2e5 > 65504 while gb, dx, dA and dB themselves are representable.
    gen = torch.Generator().manual_seed(1)
    M, K, N = 9, 40, 24
    x = _signed((M, K), 1e-3, gen)
    weight = _signed((N, K), 1e-4, gen)
    lora_A = _uniform((rank, K), 0, 1e-3, gen)
    lora_B = _uniform((N, rank), 0.5e-2, 1.5e-2, gen)
    grad_y = _signed((M, N), 2.0 ** 14, gen)
    # No bias: db = Σ_rows g would overflow (as in any fp16 layer at this gradient size).
    inputs = tuple(None if t is None else t.half() for t in (x, weight, None, lora_A, lora_B, grad_y))
    gb = grad_y @ lora_B
    assert gb.abs().max() * 200 > 65504 > gb.abs().max(), "s·gb must overflow fp16 and gb must not"
    _check_against_reference(inputs, 200.0, dropout_p)


def _positive_inputs(M, K, N, rank, dtype):
    gen = torch.Generator().manual_seed(2)
    tensors = (_uniform((M, K), 0.5, 1, gen), _uniform((N, K), 0.1, 1, gen), _uniform((N,), 0.1, 1, gen),
               _uniform((rank, K), 0.1, 1, gen), _uniform((N, rank), 0.1, 1, gen), _uniform((M, N), 0.1, 1, gen))
    return [t.to(dtype) for t in tensors]


def _same_specials(name, value, expected):
    assert torch.equal(torch.isnan(value), torch.isnan(expected)), f"{name}: NaN where the reference has none"
    assert torch.equal(torch.isposinf(value), torch.isposinf(expected)), f"{name}: +inf pattern differs"
    assert torch.equal(torch.isneginf(value), torch.isneginf(expected)), f"{name}: -inf pattern differs"


@pytest.mark.parametrize("rank,dropout_p", [(3, 0.0), (3, 0.25), (100, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inf_in_x_gives_inf_like_the_reference(rank, dropout_p, dtype):
    # Positive operands: an inf in x makes its row of y +inf everywhere (x·Wᵀ and the LoRA term alike).
    # The zero-padded rank columns (R_PAD > rank) would give inf·0 = NaN if they reached y.
    x, weight, bias, lora_A, lora_B, grad_y = _positive_inputs(9, 40, 37, rank, dtype)
    x[2, 5] = float("inf")
    got = _run_triton(x, weight, bias, lora_A, lora_B, grad_y, 1.5, dropout_p)
    expected = reference_outputs(x, weight, bias, lora_A, lora_B, 1.5, dropout_p, 5, grad_y)
    for name, value, ref in zip(NAMES, got, expected, strict=True):
        _same_specials(name, value, ref)
    assert torch.isposinf(got[0][2]).all()


@pytest.mark.parametrize("rank", [3, 100])
def test_a_dropped_inf_gives_nan_like_the_reference(rank):
    # x~ = x · keep / (1 - p) multiplies, as PEFT's nn.Dropout does: a dropped inf is inf · 0 = NaN,
    # never silently 0. Seed 0 drops x[2, 5] at this shape (asserted, so the test keeps its meaning).
    from lora_fused.dropout import keep_mask
    assert not keep_mask(0, 9, 40, 0.25)[2, 5]
    x, weight, bias, lora_A, lora_B, grad_y = _positive_inputs(9, 40, 37, rank, torch.float32)
    x[2, 5] = float("inf")
    got = _run_triton(x, weight, bias, lora_A, lora_B, grad_y, 1.5, 0.25, seed=0)
    expected = reference_outputs(x, weight, bias, lora_A, lora_B, 1.5, 0.25, 0, grad_y)
    assert torch.isnan(expected[0][2]).all()
    for name, value, ref in zip(NAMES, got, expected, strict=True):
        _same_specials(name, value, ref)


@pytest.mark.parametrize("rank", [3, 100])
def test_inf_in_grad_gives_inf_like_the_reference(rank):
    x, weight, bias, lora_A, lora_B, grad_y = _positive_inputs(9, 40, 37, rank, torch.float32)
    grad_y[4, 7] = float("inf")
    got = _run_triton(x, weight, bias, lora_A, lora_B, grad_y, 1.5)
    expected = reference_outputs(x, weight, bias, lora_A, lora_B, 1.5, 0.0, 5, grad_y)
    for name, value, ref in zip(NAMES, got, expected, strict=True):
        _same_specials(name, value, ref)
    assert torch.isposinf(got[2][4]).all()


@pytest.mark.parametrize("M,K,N", [(0, 5, 7), (6, 0, 7), (6, 5, 0), (6, 3, 7), (6, 7, 9)])
def test_empty_and_tiny_dimensions(M, K, N):
    gen = torch.Generator().manual_seed(3)
    tensors = [_signed(shape, 1.0, gen).float() for shape in ((M, K), (N, K), (N,), (4, K), (N, 4), (M, N))]
    got = _run_triton(*tensors, 1.5, 0.1)
    same_dtype = reference_outputs(*tensors[:5], 1.5, 0.1, 5, tensors[5])
    exact = reference_outputs(*(t.double() for t in tensors[:5]), 1.5, 0.1, 5, tensors[5].double())
    for name, value, torch_value, exact_value in zip(NAMES, got, same_dtype, exact, strict=True):
        assert value.shape == torch_value.shape, (name, value.shape, torch_value.shape)
        assert_parity(name, value, torch_value, exact_value)


def test_every_launcher_allocation_is_poisoned(monkeypatch):
    # With LORA_FUSED_POISON_OUTPUTS=1 every tensor a launcher allocates for a kernel goes through poison_.
    monkeypatch.setenv("LORA_FUSED_POISON_OUTPUTS", "1")
    allocated, poisoned = [], []
    real_empty = torch.empty

    def recording_empty(*size, **kwargs):
        out = real_empty(*size, **kwargs)
        allocated.append(out)
        return out

    def recording_poison(tensor):
        poisoned.append(tensor)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-1)

    for module in (triton_forward_module, triton_backward_module, triton_dropout_module):
        monkeypatch.setattr(module, "poison_", recording_poison)
    monkeypatch.setattr(torch, "empty", recording_empty)
    for rank, p in ((4, 0.0), (4, 0.2), (128, 0.0)):
        tensors = _positive_inputs(9, 40, 37, rank, torch.float32)
        _run_triton(*tensors, 1.5, p)
        triton_dropout_module.triton_keep_mask(3, 4, 5, 0.5, DEVICE)
    poisoned_ids = {id(t) for t in poisoned}
    missing = [tuple(t.shape) for t in allocated if id(t) not in poisoned_ids]
    assert allocated and not missing, f"allocations not poisoned: {missing}"


def test_autotune_knob_keeps_one_config(monkeypatch):
    weight = torch.empty(8, 8, dtype=torch.float16)
    tiles = triton_configs._GEMM_HOPPER
    monkeypatch.setenv(triton_configs.AUTOTUNE_ENV_VAR, "1")
    full = triton_configs.prune_gemm_configs(tiles, {"w_ptr": weight}, R_PAD=16)
    monkeypatch.setenv(triton_configs.AUTOTUNE_ENV_VAR, "0")
    single = triton_configs.prune_gemm_configs(tiles, {"w_ptr": weight}, R_PAD=16)
    assert len(full) > 1 and single == full[:1]
    projection = triton_configs.prune_projection_configs(triton_configs.projection_configs(),
                                                         {"in_ptr": weight}, R_PAD=16)
    assert len(projection) == 1
