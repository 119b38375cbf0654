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
from collections.abc import Mapping
from typing import Any

ALL_LINEAR = "all-linear"

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

# Keyword options of inject_lora under PEFT's name and ours.
PEFT_ALIASES = (("r", "rank"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"))


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
