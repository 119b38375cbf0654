"""lora_fused: fused LoRA linear layers (Triton, C++/CUDA, PyTorch reference)."""

from .adapters import from_peft, load_adapter, save_adapter
from .backends import BackendUnavailableError, available_backends, backend_report
from .functional import lora_linear
from .inject import (
    InjectionReport,
    inject_lora,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    parameter_report,
    set_adapter,
    unmerge_lora,
)
from .layer import LoRAAdapter, LoRALinear

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "BackendUnavailableError",
    "InjectionReport",
    "LoRAAdapter",
    "LoRALinear",
    "available_backends",
    "backend_report",
    "from_peft",
    "inject_lora",
    "load_adapter",
    "lora_linear",
    "mark_trainable",
    "merge_and_unload",
    "merge_lora",
    "parameter_report",
    "save_adapter",
    "set_adapter",
    "unmerge_lora",
]
