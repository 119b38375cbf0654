"""PEFT's LoRA configuration language, shared by ``inject_lora`` and the adapter files.

``LoraConfig`` field names (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``), PEFT's
matching rules for them, and the fields whose features ``LoRALinear`` lacks. Every check
here runs before a model is changed, and its message names where the bad value came from
(``where``: a file, or the call).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Union

import torch.nn as nn

from .layer import _check_hyperparameters

ALL_LINEAR = "all-linear"

# Which modules a setting selects: PEFT's forms (a regex, a list of names, "all-linear") or
# a callable ``(name, module) -> bool``; ``None`` selects nothing (or, for target_modules, every linear).
ModuleSelector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

# Fields that change what an adapter computes and that LoRALinear does not implement:
# (field, value meaning "off", what it is).
UNSUPPORTED_FIELDS = (
    ("use_dora", False, "DoRA (use_dora=True)"),
    ("fan_in_fan_out", False, "fan_in_fan_out=True (Conv1D-style transposed weights)"),
    ("lora_bias", False, "a trainable LoRA bias (lora_bias=True)"),
    ("bias", "none", "trained base biases (bias != 'none')"),
    ("trainable_token_indices", None, "trainable token indices"),
    ("layer_replication", None, "layer_replication"),
    ("target_parameters", None, "LoRA on parameters (target_parameters)"),
    ("alora_invocation_tokens", None, "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", False, "QA-LoRA (use_qalora=True)"),
    ("use_bdlora", None, "block-diagonal LoRA (use_bdlora)"),
    ("layers_to_transform", None, "layers_to_transform (LoRA on selected layer indices only)"),
)

# The hyperparameters under PEFT's names and ours (keyword options of inject_lora take either).
PEFT_NAMES = ("r", "lora_alpha", "lora_dropout")
OUR_NAMES = ("rank", "alpha", "dropout")
PEFT_ALIASES = tuple(zip(PEFT_NAMES, OUR_NAMES))


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """One adapter's settings under our names, validated: what ``inject_lora`` was asked for,
    or what an adapter file's config holds. Build it with :func:`make_options` or
    :func:`options_from_config`."""

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: ModuleSelector
    exclude_modules: ModuleSelector
    rank_pattern: dict
    alpha_pattern: dict
    modules_to_save: list[str]

    def layer_rank_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of the layer ``module_name``: ``rank_pattern`` / ``alpha_pattern``
        by PEFT's rule, else the defaults."""
        return (pattern_value(self.rank_pattern, module_name, self.rank),
                float(pattern_value(self.alpha_pattern, module_name, self.alpha)))


def make_options(where: str, *, rank, alpha, dropout=0.0, use_rslora=False, target_modules=None, exclude_modules=None,
                 rank_pattern=None, alpha_pattern=None, modules_to_save=None,
                 names: tuple[str, str, str] = OUR_NAMES) -> LoRAOptions:
    """Every setting checked (before any model changes) into one :class:`LoRAOptions`; errors
    start with ``where`` and call rank, alpha and dropout by ``names``."""
    try:
        _check_hyperparameters(rank, alpha, dropout, names)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return LoRAOptions(
        rank=rank, alpha=float(alpha), dropout=float(dropout), use_rslora=bool(use_rslora),
        target_modules=check_selector(target_modules, "target_modules", where),
        exclude_modules=check_selector(exclude_modules, "exclude_modules", where),
        rank_pattern=check_patterns(rank_pattern, "rank_pattern", where),
        alpha_pattern=check_patterns(alpha_pattern, "alpha_pattern", where),
        modules_to_save=check_modules_to_save(modules_to_save, where),
    )


def options_from_config(fields: Mapping, where: str) -> LoRAOptions:
    """:class:`LoRAOptions` from a LoRA config's fields under PEFT's names (``r`` and
    ``lora_alpha`` present: the caller supplies defaults or requires them), refusing the
    features LoRALinear lacks."""
    check_supported(fields, where)
    rank_field, alpha_field, dropout_field = PEFT_NAMES
    return make_options(
        where, rank=fields[rank_field], alpha=fields[alpha_field], dropout=fields.get(dropout_field) or 0.0,
        use_rslora=fields.get("use_rslora", False), target_modules=fields.get("target_modules"),
        exclude_modules=fields.get("exclude_modules"), rank_pattern=fields.get("rank_pattern"),
        alpha_pattern=fields.get("alpha_pattern"), modules_to_save=fields.get("modules_to_save"), names=PEFT_NAMES,
    )


def config_as_dict(config: Any, where: str) -> dict:
    """A ``peft.LoraConfig`` (or any dataclass / mapping with its field names) as a plain dict."""
    if isinstance(config, Mapping):
        fields = dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        raise TypeError(f"{where}: expected a peft.LoraConfig or a dict of its fields, got {type(config).__name__}")
    peft_type = fields.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)) != "LORA":
        raise ValueError(f"{where}: peft_type={peft_type!r}; only LoRA ('LORA') configurations are supported")
    return fields


def check_supported(config: Mapping, where: str) -> None:
    """Refuse a configuration that asks for a feature LoRALinear does not have."""
    for name, off, what in UNSUPPORTED_FIELDS:
        value = config.get(name, off)
        if value != off and value not in (None, False, [], {}):
            raise ValueError(f"{where} uses {what}, which LoRALinear does not support ({name}={value!r})")


def check_patterns(patterns: Any, field: str, where: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: a dict of regular expressions to numbers, each
    valid; returns it (``None`` reads as empty)."""
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise ValueError(f"{where}: {field} must be a dict of regex -> value, got {type(patterns).__name__}")
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: {field} key {key!r} is not a string")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{where}: {field} key {key!r} is not a valid regular expression ({exc})") from None
        if field == "rank_pattern":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {field}[{key!r}] = {value!r}; a rank must be an integer >= 1")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {field}[{key!r}] = {value!r}; alpha must be a finite number")
    return dict(patterns)


def pattern_value(patterns: Mapping, module_name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key ``k`` for which the module
    name matches ``(.*\\.)?(k)$`` from its start."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def modules_to_save_match(entries, name: str) -> bool:
    """PEFT's rule for ``modules_to_save``: the module name ends with an entry (plain suffix)."""
    return any(name.endswith(entry) for entry in entries)


def check_modules_to_save(entries: Any, where: str) -> list[str]:
    if entries is None:
        return []
    if isinstance(entries, str) or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"{where}: modules_to_save must be a list of module names, got {entries!r}")
    return list(entries)


def check_selector(value: Any, field: str, where: str) -> ModuleSelector:
    """target_modules / exclude_modules: ``None``, a callable, a regex string (or
    ``"all-linear"``) that compiles, or a collection of module names; returned as given
    (an iterator becomes a list, so it can be matched against every module)."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        if value.lower() != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{where}: {field} {value!r} is not a valid regular expression ({exc})") from None
        return value
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        entries = value if isinstance(value, (list, tuple, set, frozenset)) else list(value)
        if all(isinstance(entry, str) for entry in entries):
            return entries
    raise ValueError(f"{where}: {field} must be null, a regex string, a list of module names or a callable, "
                     f"got {value!r}")
