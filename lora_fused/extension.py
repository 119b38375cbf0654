"""Guarded loading of the compiled extension ``lora_fused._C``.

The extension registers ``lora_fused::fused_forward`` / ``fused_backward`` with
``TORCH_LIBRARY`` (C++ kernels for CPU; CUDA kernels when it was built with nvcc).
Loading it here also gives those ops their fake functions and autograd.
"""

from __future__ import annotations

import torch

_state: dict[str, object] = {}

FORWARD = "lora_fused::fused_forward"
BACKWARD = "lora_fused::fused_backward"


def load() -> None:
    """Import ``lora_fused._C`` once; raise BackendUnavailableError saying why it failed."""
    from .backends import BackendUnavailableError

    if "error" in _state:
        raise BackendUnavailableError(_state["error"])
    if "loaded" in _state:
        return
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        _state["error"] = (
            "backend 'cuda' is unavailable: the compiled extension lora_fused._C is not built "
            f"or failed to load ({exc}). Build it with `pip install -e . --no-build-isolation` "
            "or `python setup.py build_ext --inplace`."
        )
        raise BackendUnavailableError(_state["error"]) from exc
    from .ops import register_fake_and_autograd

    register_fake_and_autograd(FORWARD, BACKWARD, torch.ops.lora_fused.fused_backward.default)
    _state["loaded"] = True


def built_with_cuda() -> bool:
    """Whether the loaded extension registered CUDA kernels for its ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, "CUDA")


def cuda_unavailable_reason() -> str | None:
    if not built_with_cuda():
        return "backend 'cuda': lora_fused._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "backend 'cuda' has CUDA kernels but torch.cuda.is_available() is False (no GPU)"
    return None
