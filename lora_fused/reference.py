"""The PyTorch reference of the fused LoRA linear: the contract every backend meets.

Shapes: ``x [M, K]``, ``weight [N, K]``, ``bias [N]`` or None, ``lora_A [r, K]``,
``lora_B [N, r]``, ``scaling = alpha / r`` (or ``alpha / sqrt(r)``).
``x~ = x * keep / (1 - p)`` with the mask of :mod:`lora_fused.dropout`.

Forward returns ``(y, xa)``::

    xa = x~ · Aᵀ                    [M, r]  accumulated in fp32 (fp64 for fp64 x), kept for backward
    y  = x · Wᵀ + b + s · xa · Bᵀ    [M, N]  in x's dtype

Backward, given ``g = dL/dy``, returns ``(dx, dA, dB, db)``::

    gb = g · B                                   [M, r]
    dx = g · W + s · (gb · A) ⊙ keep / (1 - p)    only when compute_dx, else an empty tensor
    dA = s · gbᵀ · x~                             [r, K]
    dB = s · gᵀ · xa                              [N, r]
    db = Σ_rows g                                 only when compute_db, else an empty tensor

Only ``x`` (no copy), ``xa`` and the seed are saved between the two: nothing of size
M×N and no mask. These are explicit functions, not autograd of a composite, so the
reference saves exactly what a fused kernel saves.

Rounding order (fp16/bf16), which every backend follows so that no intermediate
overflows where PEFT's ``lora_B(lora_A(x~)) * scaling`` would not (DESIGN.md §5):

- every product accumulates in fp32 (fp64 for fp64 inputs);
- the rank-r intermediates ``xa`` and ``gb`` enter the next product rounded to the
  input dtype *unscaled* (as PEFT's ``lora_A(x~)`` is), never as ``s·xa`` or ``s·gb``;
- ``s`` (and the dropout factor) multiply the fp32 accumulator of the rank-r product,
  which is added to the fp32 accumulator of the base product; the sum is rounded once.

So ``y = round(acc(x·Wᵀ) + b + s · acc(round(xa)·Bᵀ))`` and
``dx = round(acc(g·W) + s · acc(round(gb)·A) ⊙ keep/(1-p))``; ``dA`` and ``dB`` take
``round(gb)`` / ``round(xa)`` as operands and apply ``s`` to their fp32 accumulators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import dropout_scale, keep_mask, seed_value


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``xa`` and of internal sums: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropped_input(x: torch.Tensor, dropout_p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """``x~``: x with the dropout mask applied and rescaled (x itself when p == 0)."""
    if dropout_p <= 0.0:
        return x
    keep = keep_mask(seed_value(seed), x.shape[0], x.shape[1], dropout_p, x.device)
    return x * keep.to(x.dtype) * dropout_scale(dropout_p)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulator_dtype(x.dtype)
    x_dropped = dropped_input(x, dropout_p, seed)
    xa = x_dropped.to(acc) @ lora_A.to(acc).t()
    base = _matmul_acc(x, weight.t(), acc)
    if bias is not None:
        base = base + bias.to(acc)
    lora = _matmul_acc(xa.to(x.dtype), lora_B.t(), acc) * scaling
    return (base + lora).to(x.dtype), xa


def backward(
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
    acc = xa.dtype
    g = grad_y
    gb_rounded = _matmul_acc(g, lora_B, acc).to(g.dtype)
    x_dropped = dropped_input(x, dropout_p, seed)

    dx = g.new_empty(0)
    if compute_dx:
        lora_dx = _matmul_acc(gb_rounded, lora_A.to(g.dtype), acc) * scaling
        if dropout_p > 0.0:
            keep = keep_mask(seed_value(seed), x.shape[0], x.shape[1], dropout_p, x.device)
            lora_dx = lora_dx * keep.to(acc) * dropout_scale(dropout_p)
        dx = (_matmul_acc(g, weight, acc) + lora_dx).to(g.dtype)
    dA = (_matmul_acc(gb_rounded.t(), x_dropped, acc) * scaling).to(lora_A.dtype)
    dB = (_matmul_acc(g.t(), xa.to(g.dtype), acc) * scaling).to(lora_B.dtype)
    db = g.to(acc).sum(0).to(g.dtype) if compute_db else g.new_empty(0)
    return dx, dA, dB, db


def _matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` of two same-dtype operands with an ``acc`` accumulator and result (no
    intermediate rounding to a half dtype, as a tensor-core MMA with fp32 accumulation)."""
    return a.to(acc) @ b.to(acc)
