"""The op layer shared by every backend (lora_fused/ops.py, functional.py, backends.py):
what autograd saves, how ``auto`` picks a backend for the operands, ``torch.compile`` with
dynamic shapes, and the refusal of double backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import backends
from lora_fused.backends import BackendUnavailableError
from parity import assert_parity, make_inputs, reference_outputs

CPU_BACKENDS = [name for name in lora_fused.backends.BACKEND_NAMES]


def backend_or_skip(name: str) -> None:
    if name not in lora_fused.available_backends("cpu"):
        pytest.skip(f"backend {name!r} unavailable on cpu: {lora_fused.backend_report()[name]['cpu']}")


def saved_tensors(run):
    """The tensors autograd saves while ``run()`` builds its graph (run's output kept alive)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = run()
    return saved, output


def unique_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages of ``tensors``, leaving out those of ``exclude``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in excluded)


# ---- saved for backward ----------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_autocast_saves_weight_only_for_dx_no_copies_and_xa_in_the_autocast_dtype(backend, x_needs_grad):
    backend_or_skip(backend)
    layer = lora_fused.LoRALinear(48, 40, rank=4, alpha=8.0, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 48, requires_grad=x_needs_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, y = saved_tensors(lambda: layer(x))
    weight_like = [t for t in saved if tuple(t.shape) == (40, 48)]
    assert bool(weight_like) == x_needs_grad, [tuple(t.shape) for t in saved]
    # The frozen fp32 weight itself, not an autocast copy of it (recast in backward).
    assert all(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in weight_like)
    xa = [t for t in saved if tuple(t.shape) == (18, 4)]
    assert len(xa) == 1 and xa[0].dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert (x.grad is not None) == x_needs_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_without_dx_match_the_reference(backend):
    """x needing no grad: the weight is not saved and backward gets a placeholder it must not read."""
    backend_or_skip(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(37, 24, 19, 4, torch.float32, seed=3)
    grad_y = make_inputs(37, 19, 1, 1, torch.float32, seed=4)[0]
    expected = reference_outputs(*(t.double() for t in (x, weight, bias, lora_A, lora_B)), 1.5, 0.0, 0,
                                 grad_y.double())
    same_dtype = reference_outputs(x, weight, bias, lora_A, lora_B, 1.5, 0.0, 0, grad_y)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, backend=backend)
    y.backward(grad_y)
    assert_parity("dA", lora_A.grad, same_dtype[3], expected[3])
    assert_parity("dB", lora_B.grad, same_dtype[4], expected[4])


peft = pytest.importorskip("peft")


def peft_and_ours(backend, dropout):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(64, 96))
    peft_model = get_peft_model(holder, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["lin"]))
    ours = lora_fused.LoRALinear(64, 96, rank=8, alpha=16, dropout=dropout, backend=backend)
    return peft_model, ours


SEED_BYTES = 8  # the dropout seed, a 0-dim int64 tensor saved only when p > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_saved_bytes_under_autocast_at_most_peft(backend, dropout, x_needs_grad):
    """The issue's SAM targets on one layer: ≤ PEFT at p = 0; ≤ 0.8× PEFT at p = 0.1 where x needs
    grad (PEFT then keeps its dropout mask too). Without grad for x PEFT keeps only the dropped
    x, as we keep x: equal, plus our seed."""
    backend_or_skip(backend)
    peft_model, ours = peft_and_ours(backend, dropout)
    x = torch.randn(4, 50, 64, requires_grad=x_needs_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_saved, _ = saved_tensors(lambda: peft_model(x))
        our_saved, _ = saved_tensors(lambda: ours(x))
    peft_bytes = unique_bytes(peft_saved, exclude=[x, *peft_model.parameters()])
    our_bytes = unique_bytes(our_saved, exclude=[x, *ours.parameters()])
    if dropout == 0.0:
        assert our_bytes <= peft_bytes, (our_bytes, peft_bytes)
    elif x_needs_grad:
        assert our_bytes <= 0.8 * peft_bytes, (our_bytes, peft_bytes)
    else:
        assert our_bytes <= peft_bytes + SEED_BYTES, (our_bytes, peft_bytes)


# ---- auto picks a backend that accepts the operands -------------------------------------


@pytest.fixture
def triton_first_on_cpu(monkeypatch):
    """Triton ahead of the others on CPU (as on CUDA): under TRITON_INTERPRET=1 it serves CPU tensors."""
    backend_or_skip("triton")
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "cuda", "torch"))


def test_auto_takes_triton_when_it_accepts(triton_first_on_cpu):
    assert backends.resolve_backend("auto", "cpu", torch.float32, 16).name == "triton"


@pytest.mark.parametrize("dtype,rank,refusal", [(torch.float64, 4, TypeError), (torch.float32, 257, ValueError)],
                         ids=["float64", "rank257"])
def test_auto_falls_back_where_triton_refuses(triton_first_on_cpu, dtype, rank, refusal):
    x, weight, bias, lora_A, lora_B = make_inputs(6, 20, 9, rank, dtype, seed=5)
    with pytest.raises(refusal, match="triton backend"):
        lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, backend="triton")
    chosen = backends.resolve_backend("auto", "cpu", dtype, rank).name
    assert chosen in ("cuda", "torch") and chosen in lora_fused.available_backends("cpu")
    lora_A.requires_grad_()
    y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
    y.sum().backward()
    expected = reference_outputs(*(t.detach().double() for t in (x, weight, bias, lora_A, lora_B)), 0.5, 0.0, 0,
                                 torch.ones(6, 9, dtype=torch.float64))
    same_dtype = reference_outputs(x, weight, bias, lora_A.detach(), lora_B, 0.5, 0.0, 0, torch.ones(6, 9, dtype=dtype))
    assert_parity("y", y.detach(), same_dtype[0], expected[0])
    assert_parity("dA", lora_A.grad, same_dtype[3], expected[3])


def test_explicit_unavailable_backend_still_raises(monkeypatch):
    monkeypatch.setitem(backends._load_errors, "cuda", "backend 'cuda' is unavailable: test")
    monkeypatch.delitem(backends._loaded, "cuda", raising=False)
    with pytest.raises(BackendUnavailableError, match="test"):
        backends.resolve_backend("cuda", "cpu", torch.float32, 4)
    assert backends.resolve_backend("auto", "cpu", torch.float32, 4).name != "cuda"


# ---- torch.compile(dynamic=True) --------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_dynamic_shapes(backend):
    backend_or_skip(backend)
    torch._dynamo.reset()  # layer_fn is one code object for every backend: start its cache afresh
    compiler = "inductor" if backend == "torch" and os.environ.get("LORA_FUSED_SKIP_INDUCTOR") != "1" else "aot_eager"

    def layer_fn(x, weight, bias, lora_A, lora_B, scaling):
        return lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, scaling, backend=backend)

    compiled = torch.compile(layer_fn, dynamic=True, fullgraph=True, backend=compiler)
    _, weight, bias, lora_A, lora_B = make_inputs(1, 12, 10, 3, torch.float32, seed=6)
    lora_A.requires_grad_()
    # New M under one graph; a new scaling recompiles (the op's float argument is specialised).
    for rows, scaling in ((5, 0.5), (11, 0.5), (3, 1.25)):
        x = make_inputs(rows, 12, 1, 1, torch.float32, seed=rows)[0].requires_grad_()
        x_eager = x.detach().clone().requires_grad_()
        got = compiled(x, weight, bias, lora_A, lora_B, scaling)
        want = layer_fn(x_eager, weight, bias, lora_A, lora_B, scaling)
        assert torch.equal(got, want)  # the same op on the same inputs
        got.sum().backward()
        want.sum().backward()
        assert torch.equal(x.grad, x_eager.grad)

    module = lora_fused.LoRALinear(12, 10, rank=3, dropout=0.2, backend=backend)
    compiled_module = torch.compile(module, dynamic=True, fullgraph=True, backend="aot_eager")
    for rows in (4, 7):
        compiled_module(torch.randn(2, rows, 12)).sum().backward()
        assert module.lora_A.grad is not None


# ---- double backward ------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_refused_with_a_clear_error(backend):
    backend_or_skip(backend)
    x, weight, bias, lora_A, lora_B = make_inputs(5, 8, 6, 2, torch.float32, seed=7)
    x.requires_grad_()
    lora_A.requires_grad_()
    y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match=r"lora_fused::\w+_forward: double backward \(create_graph=True"):
        torch.autograd.grad(y.square().sum(), (x, lora_A), create_graph=True)
    # A plain backward of the same graph still works afterwards.
    y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 1.0, backend=backend)
    dx, dA = torch.autograd.grad(y.square().sum(), (x, lora_A))
    assert torch.isfinite(dx).all() and torch.isfinite(dA).all()
