"""The ``torch.library`` glue shared by every backend.

Each backend provides two ops with the schemas below (Python ``custom_op``s for the
reference and Triton, ``TORCH_LIBRARY`` ops for the C++/CUDA extension). This file
gives all of them the same fake (meta) functions and the same autograd formula, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` see one contract::

    <fwd>(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B,
          float scaling, float dropout_p, Tensor seed) -> (Tensor y, Tensor xa)
    <bwd>(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa,
          float scaling, float dropout_p, Tensor seed, bool compute_dx, bool compute_db)
          -> (Tensor dx, Tensor dA, Tensor dB, Tensor db)

``x`` is 2-D ``[M, K]`` (any strides), ``seed`` a 0-dim int64 CPU tensor. ``dx``/``db``
are empty tensors when not requested. See :mod:`lora_fused.reference` for the math.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import reference
from .reference import accumulator_dtype

LIBRARY = "lora_fused"

# The attribute linking an autocast copy to the parameter it was cast from (autocast_copy).
_CAST_SOURCE = "_lora_fused_cast_source"


def autocast_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, remembering ``tensor`` when a copy was made.

    The autograd glue then saves the source (a parameter, alive anyway) instead of the copy
    and repeats the cast in backward: under autocast the op keeps no copy of W, A or B
    between forward and backward (PEFT keeps its autocast copies of all three). Eager mode
    only; under torch.compile the copy itself is saved.
    """
    copy = tensor.to(dtype)
    if copy is not tensor and not torch.compiler.is_compiling():
        setattr(copy, _CAST_SOURCE, tensor)
    return copy


def _saved_form(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """What to save for ``tensor``: its autocast source and the dtype to recast to, or itself."""
    source = getattr(tensor, _CAST_SOURCE, None)
    if source is None or torch.compiler.is_compiling():
        return tensor, None
    return source, tensor.dtype


def _restored(saved: torch.Tensor | None, cast_dtype: torch.dtype | None) -> torch.Tensor | None:
    return saved if saved is None or cast_dtype is None else saved.to(cast_dtype)


def _forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = x.new_empty(x.shape[0], weight.shape[0])
    xa = x.new_empty(x.shape[0], lora_A.shape[0], dtype=accumulator_dtype(x.dtype))
    return y, xa


def _backward_fake(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, compute_db):
    dx = grad_y.new_empty(x.shape) if compute_dx else grad_y.new_empty(0)
    db = grad_y.new_empty(weight.shape[0]) if compute_db else grad_y.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    if weight.requires_grad:
        # Direct op calls bypass lora_linear's checks; no backend computes dW, so refuse
        # rather than silently leave the weight without a gradient.
        raise ValueError("weight requires grad, but the fused LoRA ops keep the base weight frozen "
                         "(no dW is computed): call weight.requires_grad_(False)")
    _, xa = output
    ctx.mark_non_differentiable(xa)
    # W and A are read only for dx: saving them otherwise would keep autocast copies alive
    # for nothing (SAM's first block, whose input needs no gradient); autocast copies are
    # replaced by their parameters (autocast_copy). xa enters every backward product rounded
    # to x's dtype (reference.py), so it is kept rounded: half the bytes under autocast. The
    # seed matters only with dropout.
    needs_dx = ctx.needs_input_grad[0]
    saved_weight, ctx.weight_cast = _saved_form(weight) if needs_dx else (None, None)
    saved_A, ctx.lora_A_cast = _saved_form(lora_A) if needs_dx else (None, None)
    saved_B, ctx.lora_B_cast = _saved_form(lora_B)
    saved_xa = xa if xa.dtype == x.dtype else xa.to(x.dtype)
    ctx.save_for_backward(x, saved_weight, saved_A, saved_B, saved_xa, seed if dropout_p > 0.0 else None)
    ctx.weight_shape, ctx.lora_A_shape = tuple(weight.shape), tuple(lora_A.shape)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None


def _refuse_double_backward(forward_name: str, tensors) -> None:
    """create_graph=True would need a derivative of the backward op, which no backend has."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
        t is not None and t.requires_grad for t in tensors
    ):
        raise RuntimeError(
            f"{forward_name}: double backward (create_graph=True, higher-order gradients) is not "
            "supported by the fused LoRA ops on any backend; run the backward without create_graph, "
            "or compute higher-order gradients through an unfused layer (e.g. PEFT's)"
        )


def _make_backward(backward_op: Callable, forward_name: str) -> Callable:
    def backward(ctx, grad_y, grad_xa):
        x, weight, lora_A, lora_B, saved_xa, seed = ctx.saved_tensors
        _refuse_double_backward(forward_name, (grad_y, x, lora_A, lora_B))
        weight = _restored(weight, ctx.weight_cast)
        lora_A = _restored(lora_A, ctx.lora_A_cast)
        lora_B = _restored(lora_B, ctx.lora_B_cast)
        if weight is None:
            # dx is not requested, so no backend reads W or A: [N, K] / [r, K] views of K
            # elements pass the ops' shape checks without having kept either alive.
            weight = x.new_zeros(ctx.weight_shape[1]).expand(ctx.weight_shape)
            lora_A = x.new_zeros(ctx.lora_A_shape[1]).expand(ctx.lora_A_shape)
        if seed is None:
            seed = torch.zeros((), dtype=torch.int64)
        xa = saved_xa.to(accumulator_dtype(x.dtype))
        compute_dx = ctx.needs_input_grad[0]
        compute_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dA, dB, db = backward_op(
            grad_y.contiguous(), x, weight, lora_A, lora_B, xa,
            ctx.scaling, ctx.dropout_p, seed, compute_dx, compute_db,
        )
        return (
            dx if compute_dx else None,
            None,
            db if compute_db else None,
            dA,
            dB,
            None,
            None,
            None,
        )

    return backward


class _EagerAutograd(torch.autograd.Function):
    """Eager-mode autograd of a backend's op pair: the registered formula itself
    (``_setup_context`` and ``_make_backward``: the same saved tensors, gradients and refusals),
    applied by a plain ``autograd.Function`` instead of the wrapper ``torch.library`` generates
    around the op. Through that wrapper a forward+backward of the C++ CPU path measured
    0.3 ms slower at ViT-B's proj (M = 256, fp32, 1 thread: 1.18x nn.Linear against 1.14x
    here), more than its Python steps take at small shapes. Under ``torch.compile`` the
    registered autograd is used (:func:`fused_linear`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, forward_op, backward_fn):
        # Grad mode is off in here, so the op's own autograd kernel passes straight through.
        output = forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        _setup_context(ctx, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed), output)
        ctx.backward_fn = backward_fn
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_xa):
        return (*ctx.backward_fn(ctx, grad_y, grad_xa), None, None)


@functools.lru_cache(maxsize=None)
def _eager_backward(backward_op: Callable, forward_name: str) -> Callable:
    return _make_backward(backward_op, forward_name)


def fused_linear(forward_op: Callable, backward_op: Callable, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``y`` of a backend's fused op with its autograd: the registered op under torch.compile
    or without grad mode, :class:`_EagerAutograd` in eager mode."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    forward_name = getattr(forward_op, "_qualname", None) or forward_op.name()
    backward_fn = _eager_backward(backward_op, forward_name)
    return _EagerAutograd.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, forward_op,
                                backward_fn)[0]


def register_fake_and_autograd(forward_name: str, backward_name: str, backward_op: Callable) -> None:
    """Give an already-defined pair of ops the shared fake functions and autograd."""
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    torch.library.register_autograd(forward_name, _make_backward(backward_op, forward_name),
                                    setup_context=_setup_context)


def define_python_ops(prefix: str, forward_impl: Callable, backward_impl: Callable):
    """Define ``lora_fused::<prefix>_forward`` / ``_backward`` from Python implementations.

    The implementations take exactly the arguments of :func:`lora_fused.reference.forward`
    and :func:`lora_fused.reference.backward` and return fresh tensors.
    """
    forward_name = f"{LIBRARY}::{prefix}_forward"
    backward_name = f"{LIBRARY}::{prefix}_backward"

    @torch.library.custom_op(forward_name, mutates_args=())
    def forward_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)

    @torch.library.custom_op(backward_name, mutates_args=())
    def backward_op(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        xa: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: torch.Tensor,
        compute_dx: bool,
        compute_db: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward_impl(
            grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, compute_db
        )

    register_fake_and_autograd(forward_name, backward_name, backward_op)
    return forward_op, backward_op


reference_forward, reference_backward = define_python_ops("reference", reference.forward, reference.backward)
