"""Put LoRA into a model: ``inject_lora``, ``mark_trainable``, ``merge_lora``/``unmerge_lora``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch.nn as nn

from .layer import LoRALinear

ModuleSelector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def module_matches(selector: ModuleSelector, name: str, module: nn.Module) -> bool:
    """PEFT's rules: a string is a regex matched against the whole module name, a list
    of strings matches names equal to or ending in ``.<entry>``, a callable decides."""
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(name, module))
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in selector)


@dataclass
class InjectionReport:
    replaced: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        return (f"LoRA injected into {len(self.replaced)} linear layers | trainable params: "
                f"{self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {self.trainable_percent:.4f}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def parameter_report(model: nn.Module, replaced: list[str] | None = None) -> InjectionReport:
    trainable, total = count_parameters(model)
    return InjectionReport(list(replaced or []), trainable, total)


def inject_lora(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 1.0,
    dropout: float = 0.0,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    use_rslora: bool = False,
    backend: str = "auto",
) -> InjectionReport:
    """Replace every matching ``nn.Linear`` with a :class:`LoRALinear` sharing its weights,
    freeze every other parameter, and report what was done.

    ``target_modules=None`` targets all ``nn.Linear`` layers. Linears owned by
    ``nn.MultiheadAttention`` are skipped: it reads their weights directly, bypassing forward.
    A linear reachable under several names is selected by its first name and replaced by one
    :class:`LoRALinear` everywhere it appears.
    """
    owned_by_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in owned_by_mha:
            continue
        if target_modules is not None and not module_matches(target_modules, name, module):
            continue
        if module_matches(exclude_modules, name, module):
            continue
        targets.append(name)
    if "" in targets:
        raise TypeError("inject_lora: the model itself is an nn.Linear and cannot be replaced in place; "
                        "use LoRALinear.from_linear(model) instead")
    if target_modules is not None and not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}")
    for param in model.parameters():
        param.requires_grad_(False)
    replacements = {}
    for name in targets:
        linear = model.get_submodule(name)
        replacements[id(linear)] = LoRALinear.from_linear(linear, rank, alpha, dropout, use_rslora, backend)
    # Every place a replaced linear appears (named_modules above lists a shared module once).
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replacements:
            parent, child = _parent_and_attr(model, name)
            setattr(parent, child, replacements[id(module)])
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.adapter.requires_grad_(True)
    return parameter_report(model, targets)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def mark_trainable(model: nn.Module, patterns: str | Iterable[str]) -> int:
    """Unfreeze parameters whose name equals a pattern, lies under it (``pattern.``) or
    fully matches it as a regex. Returns how many parameter tensors were unfrozen."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    matched = [param for name, param in model.named_parameters()
               if any(name == p or name.startswith(p + ".") or re.fullmatch(p, name) for p in patterns)]
    if patterns and not matched:
        raise ValueError(f"mark_trainable: no parameter matches {patterns}")
    count = sum(not param.requires_grad for param in matched)
    for param in matched:
        param.requires_grad_(True)
    return count


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Merge the active adapter of every LoRA layer into its base weight; returns the count."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    layers = lora_layers(model)
    for _, layer in layers:
        layer.unmerge()
    return len(layers)


def set_adapter(model: nn.Module, name: str) -> None:
    """Switch every LoRA layer of ``model`` to adapter ``name``."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("set_adapter: the model has no LoRALinear layers")
    missing = [n for n, layer in layers if name not in layer.adapters]
    if missing:
        raise KeyError(f"adapter {name!r} is missing from {len(missing)} LoRA layers, e.g. {missing[:3]}")
    for _, layer in layers:
        layer.set_adapter(name)
