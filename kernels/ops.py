"""The ``"triton"`` backend: input checks and normalisation around the kernels, and op registration.

``triton_forward`` / ``triton_backward`` are ``lora_fused::triton_forward`` /
``lora_fused::triton_backward`` (``torch.library.custom_op``s with the shared fake
functions and autograd of :mod:`lora_fused.ops`). ``custom_op`` rather than
``triton_op`` because the latter breaks under the interpreter with fake tensors.

The checks here repeat part of :func:`lora_fused.lora_linear`'s on purpose: the ops can be
called directly (``torch.ops.lora_fused.triton_forward``), and a wrong shape or dtype would
otherwise reach the kernels as out-of-bounds reads. They add what only this backend
limits: the dtypes, ranks up to ``MAX_RANK`` and the device/interpreter pairing.

Inputs may be strided: only a tensor whose last dimension is not unit-stride is copied
(the kernels take both strides, but a strided last dimension defeats coalesced loads).
M = 0 launches nothing.
"""

from __future__ import annotations

import torch

from lora_fused.dropout import seed_value
from lora_fused.ops import define_python_ops

from .backward import lora_backward
from .configs import interpreting
from .forward import lora_forward
from .tuning import seed_shipped_configs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256


def _unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _check_device(tensors: dict[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"triton backend: all tensors must be on one device, got {devices}")
    device = next(iter(devices.values()))
    if device.type == "cuda" and interpreting():
        raise ValueError("triton backend: TRITON_INTERPRET=1 runs CPU tensors only, got CUDA tensors")
    if device.type == "cpu" and not interpreting():
        raise ValueError("triton backend: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported); "
                         "move the tensors to a CUDA device or use backend='torch'/'cuda'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"triton backend: unsupported device {device}")
    seed_shipped_configs(device)


def _check_operands(x, weight, bias, lora_A, lora_B) -> None:
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend supports {SUPPORTED_DTYPES}, got x of dtype {x.dtype} "
                        "(float64 runs on backend='torch' or 'cuda')")
    mismatched = {name: t.dtype for name, t in tensors.items() if t.dtype != x.dtype}
    if mismatched:
        raise TypeError(f"triton backend: all tensors must share x's dtype {x.dtype}, got {mismatched}")
    for name in ("x", "weight", "lora_A", "lora_B"):
        if tensors[name].dim() != 2:
            raise ValueError(f"triton backend: {name} must be 2-D, got shape {tuple(tensors[name].shape)}")
    K, (N, K_w), (R, K_a) = x.shape[1], weight.shape, lora_A.shape
    if K_w != K or K_a != K:
        raise ValueError(f"triton backend: in_features mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_A {tuple(lora_A.shape)}")
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"triton backend supports LoRA ranks 1..{MAX_RANK}, got lora_A of shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, R):
        raise ValueError(f"triton backend: lora_B must be [{N}, {R}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"triton backend: bias must be [{N}], got {tuple(bias.shape)}")
    _check_device(tensors)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    _check_operands(x, weight, bias, lora_A, lora_B)
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    if M == 0:
        return x.new_empty(0, N), x.new_empty(0, R, dtype=torch.float32)
    if bias is not None:
        bias = _unit_last_stride(bias)
    return lora_forward(
        _unit_last_stride(x), _unit_last_stride(weight), bias, _unit_last_stride(lora_A), _unit_last_stride(lora_B),
        scaling, dropout_p, seed_value(seed),
    )


def _backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, compute_dx, compute_db):
    _check_operands(x, weight, None, lora_A, lora_B)
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if tuple(grad_y.shape) != (M, N) or grad_y.dtype != x.dtype:
        raise ValueError(f"triton backend: grad_y must be [{M}, {N}] of dtype {x.dtype}, "
                         f"got {tuple(grad_y.shape)} of {grad_y.dtype}")
    if tuple(xa.shape) != (M, R) or xa.dtype != torch.float32:
        raise ValueError(f"triton backend: xa must be [{M}, {R}] float32 (the forward's output), "
                         f"got {tuple(xa.shape)} of {xa.dtype}")
    if M == 0:
        dx = grad_y.new_empty(0, K) if compute_dx else grad_y.new_empty(0)
        db = grad_y.new_zeros(N) if compute_db else grad_y.new_empty(0)
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B), db
    return lora_backward(
        _unit_last_stride(grad_y), _unit_last_stride(x), _unit_last_stride(weight), _unit_last_stride(lora_A),
        _unit_last_stride(lora_B), _unit_last_stride(xa), scaling, dropout_p, seed_value(seed), compute_dx, compute_db,
    )


triton_forward, triton_backward = define_python_ops("triton", _forward, _backward)
