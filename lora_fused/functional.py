"""``lora_linear``: the functional fused LoRA linear, with input checks at the boundary."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .backends import resolve_backend
from .dropout import new_seed
from .ops import autocast_copy, fused_linear

_MAX_FLOAT = sys.float_info.max


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {tensor.dtype}")
    mismatched = {n: t.dtype for n, t in tensors.items() if t.dtype != x.dtype}
    if mismatched:
        raise TypeError(f"all tensors must share x's dtype {x.dtype} (or run under autocast); got {mismatched}")
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-dim tensor")
    for name in ("weight", "lora_A", "lora_B"):
        if tensors[name].dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensors[name].shape)}")
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"in_features mismatch: x has last dimension {x.shape[-1]} but weight is [{out_features}, {in_features}]")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [rank, in_features] = [{rank}, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must be [out_features, rank] = [{out_features}, {rank}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out_features] = [{out_features}], got {tuple(bias.shape)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad, but the base weight of a LoRA layer is frozen: call weight.requires_grad_(False)")
    if not isinstance(scaling, (int, float, torch.SymInt, torch.SymFloat)) or not _is_finite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float, torch.SymInt, torch.SymFloat)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _is_finite(value) -> bool:
    # math.isfinite cannot be traced when torch.compile(dynamic=True) turns a float argument
    # into a symbolic one; |v| <= max float is the same test in plain comparisons (NaN fails).
    return abs(value) <= _MAX_FLOAT


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ`` for ``x [..., in]``, as one fused op.

    ``weight`` must not require grad; ``lora_A``/``lora_B`` (and ``bias``) may. Dropout
    acts on the LoRA branch only and only when ``training``. Under autocast all operands
    are cast to the autocast dtype, as ``nn.Linear`` does.
    """
    if isinstance(x, torch.Tensor):
        cast_to = _autocast_dtype(x.device.type)
        if cast_to is not None and x.is_floating_point():
            x = x.to(cast_to)
            weight, lora_A, lora_B = (autocast_copy(t, cast_to) for t in (weight, lora_A, lora_B))
            bias = bias.to(cast_to) if bias is not None else None
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)

    out_features, in_features = weight.shape
    leading = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        # Nothing to fuse; the composite keeps autograd wiring (zero grads) for free.
        y = F.linear(x2d, weight, bias) + scaling * F.linear(F.linear(x2d, lora_A), lora_B)
        return y.reshape(*leading, out_features)

    p = float(dropout_p) if training else 0.0
    seed = new_seed() if p > 0.0 else torch.zeros((), dtype=torch.int64)
    op = resolve_backend(backend, x.device, x.dtype, lora_A.shape[0])
    y = fused_linear(op.forward, op.backward, x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return y.reshape(*leading, out_features)
