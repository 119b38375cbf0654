"""Put LoRA into a model and take it out: ``inject_lora``, ``mark_trainable``, ``merge_lora``/``unmerge_lora``,
``merge_and_unload``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from . import peft_config
from .layer import LoRALinear
from .peft_config import LoRAOptions, ModuleSelector


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


# PEFT's LoraConfig defaults, for a config given as a dict that leaves fields out.
_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}


def _resolve_options(config, keywords: dict) -> LoRAOptions:
    """One :class:`LoRAOptions` from either a PEFT config or keyword options (ours or PEFT's names)."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if config is not None:
        if given:
            raise TypeError(f"inject_lora: pass either config or keyword options, not both (got config and "
                            f"{sorted(given)})")
        where = "inject_lora: config"
        fields = {**_PEFT_DEFAULTS, **peft_config.config_as_dict(config, where)}
        if fields.get("init_lora_weights", True) is not True:
            raise ValueError(f"{where} asks for init_lora_weights={fields['init_lora_weights']!r}; LoRALinear "
                             "initialises as PEFT's default (init_lora_weights=True: Kaiming-uniform A, zero B)")
        return peft_config.options_from_config(fields, where)
    for peft, ours in peft_config.PEFT_ALIASES:
        if peft in given and ours in given:
            raise TypeError(f"inject_lora: {ours}= and {peft}= name the same option (PEFT calls {ours} {peft}); "
                            "pass one")
        if peft in given:
            given[ours] = given.pop(peft)
    return peft_config.make_options("inject_lora", **{"rank": 4, "alpha": 1.0, **given})


def _is_config(value) -> bool:
    """A peft.LoraConfig, or a dict of its fields, passed where the rank goes."""
    return isinstance(value, Mapping) or (not isinstance(value, (int, float)) and hasattr(value, "peft_type"))


def inject_lora(
    model: nn.Module,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    target_modules: ModuleSelector = None,
    exclude_modules: ModuleSelector = None,
    use_rslora: bool | None = None,
    backend: str = "auto",
    *,
    config=None,
    r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    modules_to_save: list[str] | None = None,
) -> InjectionReport:
    """Replace every matching ``nn.Linear`` with a :class:`LoRALinear` sharing its weights,
    freeze every other parameter, and report what was done.

    Options (defaults rank 4, alpha 1, dropout 0) come either as keywords, under our names
    or PEFT's (``r``, ``lora_alpha``, ``lora_dropout``), or as a ``peft.LoraConfig`` (or a
    dict of its fields): ``inject_lora(model, LoraConfig(...))`` or ``config=``.
    ``target_modules`` follows PEFT: a regex fully matching the module name, a list of names
    (equal or ``.<name>`` suffix), ``"all-linear"`` (every linear but the output embedding
    layer), a callable ``(name, module) -> bool``, or ``None`` for every ``nn.Linear``;
    ``exclude_modules`` likewise. ``rank_pattern`` / ``alpha_pattern`` map regexes to
    per-layer ranks / alphas as in PEFT; ``modules_to_save`` names modules (PEFT's suffix
    rule) that are trained fully and saved with the adapter by :func:`save_adapter`.

    Linears owned by ``nn.MultiheadAttention`` are skipped: it reads their weights directly,
    bypassing forward. A linear reachable under several names is selected by its first name
    and replaced by one :class:`LoRALinear` everywhere it appears. Everything is checked
    before the model changes; selecting nothing (a second call, an ``exclude_modules`` that
    covers every linear) is an error.
    """
    if _is_config(rank):
        if config is not None:
            raise TypeError("inject_lora: a config was passed both positionally and as config=")
        config, rank = rank, None
    options = _resolve_options(config, {
        "rank": rank, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora, "target_modules": target_modules,
        "exclude_modules": exclude_modules, "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": modules_to_save,
    })
    targets = _select_targets(model, options)
    settings = {name: options.layer_rank_alpha(name) for name in targets}
    saved = _checked_modules_to_save(model, options.modules_to_save, targets)

    for param in model.parameters():
        param.requires_grad_(False)
    replacements = {}
    for name in targets:
        linear = model.get_submodule(name)
        layer_rank, layer_alpha = settings[name]
        replacements[id(linear)] = LoRALinear.from_linear(linear, layer_rank, layer_alpha, options.dropout,
                                                          options.use_rslora, backend)
    replace_everywhere(model, replacements)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.adapter.requires_grad_(True)
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    if saved:
        record_modules_to_save(model, saved)
    return parameter_report(model, targets)


MODULES_TO_SAVE_ATTR = "_lora_fused_modules_to_save"


def record_modules_to_save(model: nn.Module, names: Iterable[str]) -> None:
    """Remember fully trained extra modules on ``model`` so :func:`save_adapter` writes them."""
    known = list(getattr(model, MODULES_TO_SAVE_ATTR, ()))
    object.__setattr__(model, MODULES_TO_SAVE_ATTR, tuple(known + [n for n in names if n not in known]))


def recorded_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, MODULES_TO_SAVE_ATTR, ()))


def _select_targets(model: nn.Module, options: LoRAOptions) -> list[str]:
    """The names of the linears to replace; raises when that is none, saying why."""
    target_modules, exclude_modules = options.target_modules, options.exclude_modules
    selected = selected_linears(model, target_modules, None, (nn.Linear,))
    targets = selected_linears(model, target_modules, exclude_modules, (nn.Linear,))
    if "" in targets:
        raise TypeError("inject_lora: the model itself is an nn.Linear and cannot be replaced in place; "
                        "use LoRALinear.from_linear(model) instead")
    if targets:
        return targets
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"inject_lora: {type(model).__name__} already has {len(existing)} LoRA layers (e.g. "
                         f"{[n for n, _ in existing[:3]]}) and no nn.Linear left to replace that target_modules="
                         f"{target_modules!r} selects: was inject_lora called before? Add another adapter with "
                         "LoRALinear.add_adapter or load_adapter instead")
    if selected:
        raise ValueError(f"inject_lora: exclude_modules={exclude_modules!r} excludes every one of the "
                         f"{len(selected)} linear layers that target_modules={target_modules!r} selects "
                         f"(e.g. {selected[:3]}), leaving nothing to adapt")
    if target_modules is not None:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}")
    raise ValueError(f"inject_lora: {type(model).__name__} has no nn.Linear layers to adapt")


def selected_linears(model: nn.Module, target_modules: ModuleSelector, exclude_modules: ModuleSelector,
                     kinds: tuple[type, ...]) -> list[str]:
    """Names of the ``kinds`` modules that ``target_modules`` selects and ``exclude_modules``
    does not (PEFT's rules, ``"all-linear"`` included), each module once, in model order.
    Linears owned by ``nn.MultiheadAttention`` never count (it bypasses their forward)."""
    owned_by_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, kinds) and id(module) not in owned_by_mha]
    if isinstance(target_modules, str) and target_modules.lower() == peft_config.ALL_LINEAR:
        output_layer = _output_embeddings(model)
        selected = [(name, module) for name, module in candidates if module is not output_layer]
    else:
        selected = [(name, module) for name, module in candidates
                    if target_modules is None or module_matches(target_modules, name, module)]
    return [name for name, module in selected if not module_matches(exclude_modules, name, module)]


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """The output layer that PEFT's ``"all-linear"`` leaves out (transformers models name it)."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def select_modules_to_save(model: nn.Module, entries: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module PEFT's ``modules_to_save`` rule selects (its name
    ends with an entry), each module once under its first name, in model order. The model
    is seen as PEFT sees it: the insides of LoRA layers (their adapters) are not modules of it."""
    entries = list(entries)
    if not entries:
        return []
    seen, selected, lora_prefixes = set(), [], ()
    for name, module in model.named_modules(remove_duplicate=False):  # parents before children
        if name.startswith(lora_prefixes):
            continue
        if isinstance(module, LoRALinear):
            lora_prefixes += (name + ".",)
        if name and peft_config.modules_to_save_match(entries, name) and id(module) not in seen:
            seen.add(id(module))
            selected.append((name, module))
    return selected


def unmatched_entries(entries: Iterable[str], selected: list[tuple[str, nn.Module]]) -> list[str]:
    """The ``modules_to_save`` entries that select none of ``selected``."""
    return [entry for entry in entries if not any(name.endswith(entry) for name, _ in selected)]


def _checked_modules_to_save(model: nn.Module, entries: list[str], targets: list[str]) -> list[str]:
    """Names of the modules ``modules_to_save`` selects; each entry must select one, and none
    may be (or hold, or lie inside) a LoRA layer."""
    selected = select_modules_to_save(model, entries)
    unmatched = unmatched_entries(entries, selected)
    if unmatched:
        raise ValueError(f"inject_lora: modules_to_save entry {unmatched[0]!r} matches no module of "
                         f"{type(model).__name__}")
    names = [name for name, _ in selected]
    lora_names = targets + [name for name, _ in lora_layers(model)]
    for name in names:
        overlap = [t for t in lora_names if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if overlap:
            raise ValueError(f"inject_lora: module {name!r} is selected both by modules_to_save and as (or around) "
                             f"the LoRA layer {overlap[0]!r}; a module is either trained fully or adapted by LoRA")
    return names


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_everywhere(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap each module whose ``id`` is a key of ``replacements`` at EVERY name it has in
    ``model`` (``named_modules`` lists a module shared under several names only once)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in replacements:
            parent, child = _parent_and_attr(model, name)
            setattr(parent, child, replacements[id(module)])


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


# -- merging ----------------------------------------------------------------------------
def _memory_span(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that ``tensor`` can touch."""
    size = tensor.element_size()
    first = tensor.storage_offset() * size
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) if tensor.numel() else 0
    return tensor.untyped_storage().data_ptr(), first, first + extent * size


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[0] != 0 and a[1] < b[2] and b[1] < a[2]


def _merge_groups(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> list[list[tuple[str, LoRALinear]]]:
    """The LoRA layers grouped by the base weight memory they share (one group per weight).

    Merging writes into the base weight, so a group can only be merged if every layer in it
    adds the same delta (then it is written once), and no other parameter or buffer of the
    model reads that memory. Anything else raises, naming the modules, before any change.
    """
    spans = [(_memory_span(layer.weight), name, layer) for name, layer in layers]
    groups: list[list[tuple[tuple[int, int, int], str, LoRALinear]]] = []
    for entry in spans:  # an entry touching several groups joins them into one
        touching = [g for g in groups if any(_overlaps(entry[0], other[0]) for other in g)]
        groups = [g for g in groups if not any(g is t for t in touching)]
        groups.append([member for g in touching for member in g] + [entry])

    # A weight tied to something that is not a LoRA base weight (e.g. an embedding) would change too.
    lora_weight_names = {f"{name}.weight" if name else "weight"
                         for name, module in model.named_modules(remove_duplicate=False)
                         if isinstance(module, LoRALinear)}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for tensor_name, tensor in tensors:
        if tensor_name in lora_weight_names:
            continue
        span = _memory_span(tensor)
        for group in groups:
            if any(_overlaps(span, other[0]) for other in group):
                raise RuntimeError(f"cannot merge LoRA layer {group[0][1]!r}: its weight shares memory with "
                                   f"{tensor_name!r}, which merging would change too (untie them first)")

    for group in groups:
        if len(group) == 1:
            continue
        deltas = [_effective_delta(layer) for _, _, layer in group]
        if any(not torch.equal(deltas[0], delta) for delta in deltas[1:]):
            names = [name for _, name, _ in group]
            raise RuntimeError(f"cannot merge: LoRA layers {names} share one base weight but add different deltas "
                               "(their adapters differ), so no single merged weight serves them all")
    return [[(name, layer) for _, name, layer in group] for group in groups]


def _effective_delta(layer: LoRALinear) -> torch.Tensor:
    """The delta ``layer``'s weight holds once merged: its merged adapter's, else its active one's."""
    return layer.adapters[layer.merged_adapter or layer.active_adapter].delta_weight()


def merge_lora(model: nn.Module) -> int:
    """Merge the active adapter of every LoRA layer into its base weight; returns the count.

    A base weight shared by several LoRA layers is written once (allowed only when they add
    the same delta); weights tied to other parameters are refused. Checked before any change.
    """
    layers = lora_layers(model)
    for group in _merge_groups(model, layers):
        merged = next((layer for _, layer in group if layer.merged_adapter is not None), None)
        if merged is None:
            merged = group[0][1]
            merged.merge()
        for _, layer in group:
            if layer.merged_adapter is None:
                layer._set_merged_flag(layer.active_adapter)
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`: each merged base weight gets its delta subtracted once."""
    layers = lora_layers(model)
    for group in _merge_groups(model, layers):
        merged = [layer for _, layer in group if layer.merged_adapter is not None]
        if merged:
            merged[0].unmerge()
            for layer in merged[1:]:
                layer._set_merged_flag(None)
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer's active adapter into its weight and put a plain ``nn.Linear``
    back in its place (PEFT's ``merge_and_unload``). Returns the model (the new linear if
    ``model`` itself is a :class:`LoRALinear`).

    The result's state dict has the keys of the model before LoRA was injected; it runs at
    plain ``nn.Linear`` cost and no longer holds adapters. Layers shared under several names
    stay shared; shared weights follow :func:`merge_lora`'s rules.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"merge_and_unload: {type(model).__name__} has no LoRALinear layers")
    merge_lora(model)
    replacements = {id(layer): _plain_linear(layer) for _, layer in layers}
    if isinstance(model, LoRALinear):
        return replacements[id(model)]
    replace_everywhere(model, replacements)
    return model


def _plain_linear(layer: LoRALinear) -> nn.Linear:
    """An ``nn.Linear`` reusing ``layer``'s (merged) weight and bias parameters."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    linear.train(layer.training)
    return linear


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
