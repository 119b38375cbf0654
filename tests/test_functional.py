"""lora_linear on the reference backend: input checks, shapes, autocast, compile, opcheck."""

import os

import pytest
import torch
import torch.nn.functional as F

import lora_fused
from lora_fused import BackendUnavailableError, lora_linear
from lora_fused.ops import reference_backward, reference_forward
from parity import assert_parity, in_float64, make_inputs


def _plain(x, weight, bias, lora_A, lora_B, scaling):
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def _assert_matches_plain(y, x, weight, bias, lora_A, lora_B, scaling):
    """The fused op and the plain composite are two computations of one function (DESIGN.md §5)."""
    operands = (x, weight, bias, lora_A, lora_B)
    exact = _plain(*(t.double() for t in operands), scaling)
    assert_parity("lora_linear vs the plain formula", y, _plain(*operands, scaling), exact)


def test_matches_plain_formula_for_nd_and_strided_inputs():
    x, weight, bias, lora_A, lora_B = make_inputs(0, 12, 10, 3, torch.float32, leading=(2, 3, 4))
    _assert_matches_plain(lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend="torch"),
                          x, weight, bias, lora_A, lora_B, 0.5)
    strided = torch.randn(5, 24)[:, ::2]
    assert not strided.is_contiguous()
    _assert_matches_plain(lora_linear(strided, weight, bias, lora_A, lora_B, 0.5, backend="torch"),
                          strided, weight, bias, lora_A, lora_B, 0.5)


def test_empty_batch_returns_empty_output_with_zero_grads():
    x, weight, bias, lora_A, lora_B = make_inputs(0, 8, 6, 2, torch.float32)
    lora_A.requires_grad_()
    y = lora_linear(x, weight, bias, lora_A, lora_B, 1.0)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert lora_A.grad is not None and not lora_A.grad.any()


def test_dropout_only_in_training_and_reproducible_by_seed():
    x, weight, bias, lora_A, lora_B = make_inputs(16, 8, 6, 2, torch.float32)
    eval_out = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5, training=False)
    _assert_matches_plain(eval_out, x, weight, bias, lora_A, lora_B, 1.0)
    torch.manual_seed(3)
    first = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5)
    torch.manual_seed(3)
    again = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5)
    other = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, eval_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    x, weight, bias, lora_A, lora_B = make_inputs(4, 8, 6, 2, torch.float32)
    lora_A.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = lora_linear(x, weight, bias, lora_A, lora_B, 1.0)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32


def _bad_call(**overrides):
    x, weight, bias, lora_A, lora_B = make_inputs(4, 8, 6, 2, torch.float32)
    args = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scaling=1.0)
    args.update(overrides)
    return lambda: lora_linear(**args)


@pytest.mark.parametrize("overrides,error,message", [
    (dict(x=torch.randn(4, 9)), ValueError, "in_features mismatch"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "floating-point"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank must be >= 1"),
    (dict(bias=torch.randn(5)), ValueError, "bias must be"),
    (dict(weight=torch.randn(6, 8, requires_grad=True)), ValueError, "frozen"),
    (dict(scaling=float("inf")), ValueError, "finite"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
    (dict(x=torch.randn(4, 8, device="meta")), ValueError, "one device"),
])
def test_bad_input_raises_a_clear_error(overrides, error, message):
    with pytest.raises(error, match=message):
        _bad_call(**overrides)()


def test_unknown_or_unavailable_backend_explains_why(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        _bad_call(backend="tpu")()
    if "cuda" not in lora_fused.available_backends("cuda"):
        x, weight, bias, lora_A, lora_B = make_inputs(2, 8, 6, 2, torch.float32)
        with pytest.raises(BackendUnavailableError, match="cuda"):
            lora_fused.backends.resolve_backend("cuda", "cuda")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("LORA_FUSED_BACKEND", "torch")
    assert lora_fused.backends.resolve_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv("LORA_FUSED_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailableError, match="LORA_FUSED_BACKEND"):
        lora_fused.backends.resolve_backend("auto", "cpu")


def test_auto_always_resolves_on_cpu():
    assert lora_fused.backends.resolve_backend("auto", "cpu").name in lora_fused.available_backends("cpu")
    assert "torch" in lora_fused.available_backends("cpu")


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_reference_ops(bias):
    x, weight, b, lora_A, lora_B = make_inputs(5, 8, 6, 3, torch.float32, bias=bias)
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(reference_forward, (x, weight, b, lora_A, lora_B, 0.5, 0.2, seed))
    y, xa = reference_forward(x, weight, b, lora_A, lora_B, 0.5, 0.2, seed)
    torch.library.opcheck(reference_backward,
                          (torch.randn_like(y), x.detach(), weight, lora_A.detach(), lora_B.detach(), xa,
                           0.5, 0.2, seed, True, bias))


def test_torch_compile_fullgraph_model_with_lora_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lora_fused.inject_lora(model, rank=2, alpha=2.0, dropout=0.0, backend="torch")
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 12)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None
    if os.environ.get("LORA_FUSED_SKIP_INDUCTOR") != "1":
        # Inductor fuses the GELU and the bias adds its own way: another computation, so the parity rule.
        inductor_out = torch.compile(model, fullgraph=True)(x)
        assert_parity("inductor", inductor_out, eager.detach(), in_float64(model)(x.double()))


def test_torch_compile_fullgraph_with_auto_backend_and_dropout():
    torch.manual_seed(0)
    layer = lora_fused.LoRALinear(10, 7, rank=3, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 10)
    out = compiled(x)
    out.sum().backward()
    assert layer.lora_A.grad is not None
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_direct_op_call_refuses_a_weight_that_requires_grad(backend):
    if backend not in lora_fused.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} unavailable: {lora_fused.backend_report()[backend]['cpu']}")
    forward_op = lora_fused.backends.resolve_backend(backend, "cpu").forward
    x, weight, bias, lora_A, lora_B = make_inputs(3, 8, 6, 2, torch.float32)
    weight.requires_grad_()
    with pytest.raises(ValueError, match="frozen"):
        forward_op(x, weight, bias, lora_A, lora_B, 1.0, 0.0, torch.tensor(0))
