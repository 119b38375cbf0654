"""Backend registry: which implementation of the fused op serves which tensors.

``"torch"``  the reference (any device).
``"triton"`` Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``"cuda"``   the compiled extension ``lora_fused._C``: CUDA kernels for GPU tensors and
             C++ kernels for CPU tensors.
``"auto"``   the first backend of the device's :data:`AUTO_ORDER` that is available and
             accepts the operands' dtype and LoRA rank (Triton refuses float64 and ranks
             above its ``MAX_RANK``); the environment variable ``LORA_FUSED_BACKEND``
             overrides it (and is then held to the explicit rules).

Asking explicitly for a backend that cannot serve the tensors raises
:class:`BackendUnavailableError` saying why; ``auto`` falls back quietly.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKEND_NAMES = ("torch", "triton", "cuda")
ENV_BACKEND = "LORA_FUSED_BACKEND"
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cuda", "torch")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes it accepts; None: every floating dtype
    max_rank: int | None = None  # the largest LoRA rank it accepts; None: any


def operand_refusal(backend: Backend, dtype: torch.dtype, rank: int) -> str | None:
    """Why ``backend`` refuses operands of ``dtype`` with LoRA ``rank``, or None when it accepts them.

    Plain comparisons, so a symbolic rank under ``torch.compile(dynamic=True)`` becomes a guard.
    """
    if backend.dtypes is not None and dtype not in backend.dtypes:
        return f"backend {backend.name!r} does not support dtype {dtype} (supported: {backend.dtypes})"
    if backend.max_rank is not None and rank > backend.max_rank:
        return f"backend {backend.name!r} supports LoRA ranks up to {backend.max_rank}, got {rank}"
    return None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_torch() -> Backend:
    from . import ops

    return Backend("torch", ops.reference_forward, ops.reference_backward)


def _load_triton() -> Backend:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: triton is not installed ({exc})") from exc
    try:
        module = importlib.import_module("lora_fused.kernels.ops")
    except ImportError as exc:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: its kernels failed to import ({exc})") from exc
    return Backend("triton", module.triton_forward, module.triton_backward,
                   dtypes=module.SUPPORTED_DTYPES, max_rank=module.MAX_RANK)


def _load_cuda() -> Backend:
    from . import extension

    extension.load()  # raises BackendUnavailableError with the reason
    return Backend("cuda", torch.ops.lora_fused.fused_forward.default, torch.ops.lora_fused.fused_backward.default)


_LOADERS: dict[str, Callable[[], Backend]] = {"torch": _load_torch, "triton": _load_triton, "cuda": _load_cuda}
_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def _load(name: str) -> Backend:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        raise BackendUnavailableError(_load_errors[name])
    try:
        backend = _LOADERS[name]()
    except BackendUnavailableError as exc:
        _load_errors[name] = str(exc)
        raise
    _loaded[name] = backend
    return backend


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device``, or None when it can.

    Cached: the answer depends on no tensor, only on the process (what imported, whether a
    GPU is visible, fixed once CUDA initialises) and on what the key below holds
    (TRITON_INTERPRET, and which backends have loaded or failed to), so a call is a dict
    lookup instead of re-evaluating every candidate on every op (issue 12's review).
    """
    device_type = _device_type(device)
    key = (name, device_type, *_availability_state())
    if key not in _reason_cache:
        _reason_cache[key] = _evaluate_unavailable_reason(name, device_type)
    return _reason_cache[key]


_reason_cache: dict[tuple, str | None] = {}
_auto_cache: dict[tuple, tuple[str, ...]] = {}


def _availability_state() -> tuple:
    """What availability depends on besides the process: TRITON_INTERPRET and the backends
    loaded or failed so far (tests also edit these registries)."""
    return _triton_interpreting(), tuple(_loaded), tuple(_load_errors)


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def _evaluate_unavailable_reason(name: str, device_type: str) -> str | None:
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r}; expected one of {('auto',) + BACKEND_NAMES}"
    if device_type not in ("cpu", "cuda"):
        return f"backend {name!r} does not support device type {device_type!r} (only cpu and cuda)" if name != "torch" else None
    try:
        _load(name)
    except BackendUnavailableError as exc:
        return str(exc)
    if name == "triton":
        if device_type == "cpu" and not _triton_interpreting():
            return "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1 (set it before triton is imported)"
        if device_type == "cuda" and _triton_interpreting():
            return "backend 'triton' is in interpreter mode (TRITON_INTERPRET=1), which serves CPU tensors only"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "backend 'triton' needs a CUDA GPU and torch.cuda.is_available() is False"
    if name == "cuda" and device_type == "cuda":
        from . import extension

        return extension.cuda_unavailable_reason()
    return None


@torch.compiler.assume_constant_result
def candidate_backend_names(name: str, device_type: str) -> tuple[str, ...]:
    """The backends that may run ``device_type`` tensors for the requested ``name``, in order.

    An explicit name (or ``LORA_FUSED_BACKEND``) gives itself, or raises
    BackendUnavailableError saying why it cannot; ``auto`` gives every available backend of
    the device's order. Evaluated eagerly even under ``torch.compile`` (it imports modules
    and reads the environment), its result treated as a constant of the graph.
    """
    explicit_source = "backend"
    if name == "auto":
        override = os.environ.get(ENV_BACKEND, "auto").strip().lower()
        if override and override != "auto":
            name, explicit_source = override, f"{ENV_BACKEND}={override}"
    if name == "auto":
        order = AUTO_ORDER.get(device_type, ("torch",))
        key = (device_type, order, *_availability_state())
        if key not in _auto_cache:
            available = tuple(c for c in order if unavailable_reason(c, device_type) is None)
            _auto_cache[key] = available or ("torch",)
        return _auto_cache[key]
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"{explicit_source} {name!r} requested for {device_type} tensors: {reason}")
    return (name,)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    rank: int | None = None) -> Backend:
    """The backend that runs tensors on ``device`` for the requested ``name``.

    With ``dtype`` and ``rank``, ``auto`` takes the first candidate that accepts them; an
    explicitly named backend is returned as is, and its op raises its own clear error for
    operands it refuses.
    """
    candidates = candidate_backend_names(name, _device_type(device))
    if dtype is None or rank is None or len(candidates) == 1:
        return _load(candidates[0])
    for candidate in candidates:
        backend = _load(candidate)
        if operand_refusal(backend, dtype, rank) is None:
            return backend
    return _load(candidates[-1])


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can serve tensors on ``device`` (default: the GPU if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


def backend_report() -> dict[str, dict[str, str]]:
    """For each backend and device type, "ok" or the reason it is unavailable."""
    return {
        name: {dev: unavailable_reason(name, dev) or "ok" for dev in ("cpu", "cuda")}
        for name in BACKEND_NAMES
    }
