"""Adapter I/O in PEFT's format, and conversion of PEFT models.

Files (as ``PeftModel.save_pretrained`` writes them): ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name in the key)
plus ``base_model.model.<module>.<tensor>`` for every tensor of a module in ``modules_to_save``,
and ``adapter_config.json`` with ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``rank_pattern`` /
``alpha_pattern`` for layers that differ, ``target_modules`` and the rest. PEFT loads what
:func:`save_adapter` writes; :func:`load_adapter` reads that and PEFT's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from . import peft_config
from .inject import (
    _parent_and_attr,
    lora_layers,
    record_modules_to_save,
    recorded_modules_to_save,
    replace_everywhere,
    select_modules_to_save,
    selected_linears,
    unmatched_entries,
)
from .layer import DEFAULT_ADAPTER, LoRALinear
from .peft_config import LoRAOptions

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
# Stored in the safetensors header: ties the weights file to the config written with it, so
# a save interrupted between the two renames is detected on load instead of mixing files.
CONFIG_DIGEST_KEY = "lora_fused_config_sha256"
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# PEFT's older saves kept this segment in modules_to_save keys (``head.modules_to_save.weight``).
_MODULES_TO_SAVE_SEGMENT = ".modules_to_save."


# -- pattern helpers (PEFT's matching rules) ---------------------------------------------
def _exact_pattern(module_name: str) -> str:
    # '^' inside PEFT's "(.*\.)?(...)$" can only match at position 0, so no other module
    # whose name merely ends with this one picks up the pattern.
    return "^" + re.escape(module_name)


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """target_modules naming exactly ``names`` under PEFT's rules: a list of names (matched
    by equality or ``.<name>`` suffix) when that selects nothing else, else a full-match regex."""
    wanted = set(names)
    # Judge against the tree PEFT will see: the base model, without LoRALinear internals.
    lora_prefixes = tuple(name + "." for name, _ in lora_layers(model))
    collides = any(
        other not in wanted and not other.startswith(lora_prefixes) and any(other.endswith("." + n) for n in names)
        for other, _ in model.named_modules()
    )
    if not collides:
        return sorted(names)
    return "^(?:" + "|".join(re.escape(name) for name in sorted(names)) + ")$"


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# -- save --------------------------------------------------------------------------------
def _collect_for_save(model: nn.Module, adapter_name: str | None):
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layers")
    if adapter_name is None:
        active = sorted({layer.active_adapter for _, layer in layers})
        if len(active) != 1:
            raise ValueError(f"save_adapter: LoRA layers have different active adapters {active}; "
                             "pass adapter_name to choose one")
        adapter_name = active[0]
    chosen = [(name, layer.adapters[adapter_name]) for name, layer in layers
              if adapter_name in layer.adapters and not getattr(layer.adapters[adapter_name], "_placeholder", False)]
    if not chosen:
        have = sorted({a for _, layer in layers for a in layer.adapters})
        raise KeyError(f"save_adapter: no LoRA layer has an adapter named {adapter_name!r}; adapters present: {have}")
    return adapter_name, chosen


def _build_config(model: nn.Module, chosen, modules_to_save: list[str]) -> dict:
    rslora = {adapter.use_rslora for _, adapter in chosen}
    if len(rslora) > 1:
        raise ValueError("save_adapter: the adapter mixes use_rslora=True and False across layers; "
                         "PEFT's format has one use_rslora per adapter")
    rank = Counter(a.rank for _, a in chosen).most_common(1)[0][0]
    alpha = Counter(a.alpha for _, a in chosen).most_common(1)[0][0]
    dropouts = Counter(a.dropout for _, a in chosen)
    dropout = dropouts.most_common(1)[0][0]
    if len(dropouts) > 1:
        warnings.warn(f"save_adapter: layers use different dropouts {sorted(dropouts)}; PEFT's format has one "
                      f"lora_dropout, saving {dropout} (dropout does not change inference outputs)", stacklevel=3)
    names = [name for name, _ in chosen]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, names),
        "exclude_modules": None,
        "rank_pattern": {_exact_pattern(n): a.rank for n, a in chosen if a.rank != rank},
        "alpha_pattern": {_exact_pattern(n): _json_number(a.alpha) for n, a in chosen if a.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a temp file beside ``path`` and fsync it; returns the temp name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _modules_to_save_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The state of each extra module under PEFT's keys (``base_model.model.<module>.<tensor>``),
    refusing names PEFT would read differently (its suffix rule selecting other modules too)."""
    tensors = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"save_adapter: modules_to_save names {name!r}, which {type(model).__name__} does not "
                           "have") from None
        inner = [n for n, _ in lora_layers(module)]
        if inner:
            raise ValueError(f"save_adapter: module_to_save {name!r} holds LoRA layers (e.g. {inner[0]!r}); a module "
                             "is either trained fully or adapted by LoRA")
        others = [n for n, other in select_modules_to_save(model, [name])
                  if other is not module and not n.startswith(name + ".")]
        if others:
            raise ValueError(f"save_adapter: PEFT selects modules_to_save by name suffix, so {name!r} would also "
                             f"select {others[:3]}; rename the module or save without it")
        state = module.state_dict()
        if not state:
            raise ValueError(f"save_adapter: module_to_save {name!r} has no parameters or buffers to save")
        for key, tensor in state.items():
            tensors[f"{KEY_PREFIX}{name}.{key}"] = tensor.detach().to("cpu").contiguous()
    return tensors


def _remove_stale_temps(directory: Path) -> None:
    """Temp files a killed earlier save left behind (ours only: ``.<file name>.<random>.tmp``)."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 modules_to_save: list[str] | None = None) -> Path:
    """Save one adapter of ``model``'s LoRA layers to directory ``path`` in PEFT's format.

    ``adapter_name=None`` saves the active adapter. ``modules_to_save`` names fully trained
    extra modules to store with it as PEFT's ``modules_to_save`` (PEFT restores them too);
    ``None`` means those given to :func:`inject_lora` or read by :func:`load_adapter`, ``[]``
    none. Tensors keep their stored dtype. Both files are written to temp files first and
    then renamed over the old ones, so an interrupted save leaves the previous adapter
    whole; temp files left by a killed save are removed by the next one (one saver per
    directory at a time). Returns the directory.
    """
    from safetensors.torch import save as safetensors_save

    _, chosen = _collect_for_save(model, adapter_name)
    extra_names = list(recorded_modules_to_save(model) if modules_to_save is None else modules_to_save)
    extra_tensors = _modules_to_save_tensors(model, extra_names)
    config = _build_config(model, chosen, extra_names)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    tensors = {}
    for name, adapter in chosen:
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.detach().to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.detach().to("cpu").contiguous()
    tensors.update(extra_tensors)
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: hashlib.sha256(config_bytes).hexdigest()}
    weights_bytes = safetensors_save(tensors, metadata=metadata)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    temps: list[str] = []
    try:
        temps.append(_write_temp(directory / WEIGHTS_NAME, weights_bytes))
        temps.append(_write_temp(directory / CONFIG_NAME, config_bytes))
        # Weights first: if only they get replaced, their config digest no longer matches and
        # load_adapter says so; the files themselves are never partly written.
        os.replace(temps[0], directory / WEIGHTS_NAME)
        os.replace(temps[1], directory / CONFIG_NAME)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    # A .bin from an earlier (PEFT) save would describe a different adapter than the new files.
    stale_bin = directory / WEIGHTS_NAME_BIN
    if stale_bin.exists():
        stale_bin.unlink()
    return directory


# -- load --------------------------------------------------------------------------------
def _read_adapter_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"load_adapter: {directory} is not a directory holding an adapter")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"load_adapter: missing {config_path}")
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"load_adapter: {config_path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        kind = "null" if config is None else {list: "list", str: "string"}.get(type(config), "number")
        raise ValueError(f"load_adapter: {config_path} holds a JSON {kind}, not an object with the adapter's "
                         "settings (peft_type, r, lora_alpha, target_modules, ...)")

    safetensors_path, bin_path = directory / WEIGHTS_NAME, directory / WEIGHTS_NAME_BIN
    if safetensors_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors_path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:
            raise ValueError(f"load_adapter: cannot read {safetensors_path}: {exc}") from exc
        digest = metadata.get(CONFIG_DIGEST_KEY)
        if digest is not None and digest != hashlib.sha256(config_bytes).hexdigest():
            raise ValueError(f"load_adapter: {safetensors_path} and {config_path} come from different saves "
                             "(an interrupted save_adapter?); save the adapter again")
    elif bin_path.is_file():
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"load_adapter: cannot read {bin_path}: {exc}") from exc
    else:
        raise FileNotFoundError(f"load_adapter: missing {safetensors_path} (or {WEIGHTS_NAME_BIN})")
    return config, tensors


def _check_config(config: dict, config_path: Path) -> LoRAOptions:
    """Every setting of the file, validated (before anything in the model changes)."""
    where = f"load_adapter: {config_path}"
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where} has peft_type={peft_type!r}; only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"{where} lacks the field {field!r}")
    return peft_config.options_from_config(config, where)


def _split_tensors(tensors: dict[str, torch.Tensor], weights_path: Path, takes_extras: bool):
    """``({module: {"lora_A": A, "lora_B": B}}, {extra-module key: tensor})`` from the file's keys
    (without PEFT's prefix); anything else is refused."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        short = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        match = _KEY_RE.match(short)
        if match is None:
            feature = next((f for marker, f in (("lora_magnitude_vector", "DoRA"),
                                                ("lora_embedding_", "embedding LoRA"),
                                                ("lora_A.bias", "LoRA bias"), ("lora_B.bias", "LoRA bias"))
                            if marker in key), None)
            if feature is None and takes_extras:
                extras[short.replace(_MODULES_TO_SAVE_SEGMENT, ".")] = tensor
                continue
            feature = feature or ("modules_to_save, but the config lists none" if "modules_to_save" in key else
                                  "a tensor that is not a LoRA A/B weight, and the config has no modules_to_save")
            raise ValueError(f"load_adapter: {weights_path} holds key {key!r} ({feature}), "
                             "which LoRALinear does not support")
        if tensor.dim() != 2:
            raise ValueError(f"load_adapter: {weights_path} key {key!r} has shape {tuple(tensor.shape)}; only linear "
                             "LoRA (2-D A and B) is supported, not convolution LoRA")
        modules.setdefault(match["module"], {})[match["part"]] = tensor
    for name, parts in modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise ValueError(f"load_adapter: {weights_path} has no key {KEY_PREFIX}{name}.{part}.weight")
    if not modules:
        raise ValueError(f"load_adapter: {weights_path} holds no LoRA weights")
    return modules, extras


def _plan_lora(model: nn.Module, modules: dict, settings: LoRAOptions, weights_path: Path) -> list:
    """``[(name, module, rank, alpha, parts)]``, one entry per module (a module shared under
    several names appears once; the file must then give it the same weights everywhere)."""
    plan, by_module = [], {}
    for name, parts in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"load_adapter: {weights_path} has weights for module {name!r}, which "
                           f"{type(model).__name__} does not have") from None
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise TypeError(f"load_adapter: module {name!r} is a {type(module).__name__}; only nn.Linear and "
                            "LoRALinear can take a LoRA adapter")
        if isinstance(module, LoRALinear) and module.merged_adapter is not None:
            raise RuntimeError(f"load_adapter: module {name!r} has adapter {module.merged_adapter!r} merged; "
                               "call unmerge_lora(model) first")
        rank, alpha = settings.layer_rank_alpha(name)
        expected = {"lora_A": (rank, module.in_features), "lora_B": (module.out_features, rank)}
        for part, shape in expected.items():
            if tuple(parts[part].shape) != shape:
                raise ValueError(f"load_adapter: {weights_path} key {KEY_PREFIX}{name}.{part}.weight has shape "
                                 f"{tuple(parts[part].shape)}, expected {shape} (module {name!r}: in_features="
                                 f"{module.in_features}, out_features={module.out_features}, rank={rank})")
        if id(module) in by_module:
            first_name, first_parts = by_module[id(module)]
            if any(not torch.equal(parts[p], first_parts[p]) for p in ("lora_A", "lora_B")):
                raise ValueError(f"load_adapter: {weights_path} gives {name!r} and {first_name!r}, two names of one "
                                 "shared module, different LoRA weights")
            continue
        by_module[id(module)] = (name, parts)
        plan.append((name, module, rank, alpha, parts))
    return plan


def _plan_modules_to_save(model: nn.Module, entries: list[str], extras: dict[str, torch.Tensor],
                          lora_plan: list, weights_path: Path) -> list[tuple[str, nn.Module, dict]]:
    """``[(name, module, {state key: tensor})]`` for the modules PEFT's ``modules_to_save`` rule
    selects; every one of their tensors must be in the file and every extra tensor used."""
    selected = select_modules_to_save(model, entries)
    plan, unused = [], dict(extras)
    for name, module in selected:
        if isinstance(module, LoRALinear) or lora_layers(module) or any(n == name for n, *_ in lora_plan):
            raise ValueError(f"load_adapter: {weights_path} both adapts {name!r} with LoRA (or inside it) and lists "
                             "it in modules_to_save")
        values = {}
        for key, current in module.state_dict().items():
            stored = unused.pop(f"{name}.{key}", None)
            if stored is None:
                raise ValueError(f"load_adapter: {weights_path} lists {name!r} in modules_to_save but has no tensor "
                                 f"{KEY_PREFIX}{name}.{key}")
            if stored.shape != current.shape:
                raise ValueError(f"load_adapter: {weights_path} key {KEY_PREFIX}{name}.{key} has shape "
                                 f"{tuple(stored.shape)}, expected {tuple(current.shape)}")
            values[key] = stored
        plan.append((name, module, values))
    unmatched = unmatched_entries(entries, selected)
    if unmatched:
        raise KeyError(f"load_adapter: {weights_path} lists {unmatched[0]!r} in modules_to_save, which matches no "
                       f"module of {type(model).__name__}")
    if unused:
        raise ValueError(f"load_adapter: {weights_path} holds keys no module in modules_to_save takes, e.g. "
                         f"{KEY_PREFIX}{next(iter(unused))}")
    return plan


def _warn_uncovered_targets(model: nn.Module, settings: LoRAOptions, lora_plan: list, weights_path: Path) -> None:
    """PEFT warns when modules its target_modules select get no weights; so do we."""
    if settings.target_modules is None:
        return
    covered = {id(module) for _, module, *_ in lora_plan}
    names = selected_linears(model, settings.target_modules, settings.exclude_modules, (nn.Linear, LoRALinear))
    missing = [name for name in names if id(model.get_submodule(name)) not in covered]
    if missing:
        warnings.warn(f"load_adapter: {weights_path} has no LoRA weights for {len(missing)} modules that its "
                      f"target_modules={settings.target_modules!r} selects, e.g. {missing[:5]}; they run without "
                      "this adapter", stacklevel=3)


def _add_placeholder(layer: LoRALinear, name: str) -> None:
    """Give ``layer`` an inert adapter ``name``: A = B = 0 adds exactly nothing and receives
    zero gradients, so the layer behaves as its base when ``name`` is active."""
    adapter = layer.add_adapter(name, rank=1, alpha=1.0)
    with torch.no_grad():
        adapter.lora_A.zero_()
    adapter._placeholder = True


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` or by PEFT into ``model`` as ``adapter_name``
    and make it active on every LoRA layer.

    Plain ``nn.Linear`` modules named in the adapter become :class:`LoRALinear` (sharing
    their weights) at every name they have; an existing adapter of the same name is
    replaced. LoRA layers the adapter does not cover get an inert ``adapter_name`` so the
    whole model switches together with :func:`lora_fused.set_adapter`. Modules listed in
    ``modules_to_save`` get the saved tensors copied into them (one copy: switching adapters
    does not switch them) and become trainable. Modules that the file's ``target_modules``
    selects but that it has no weights for draw a warning (as in PEFT). Everything is
    checked before the model is changed. Returns ``model``.
    """
    directory = Path(path)
    config, tensors = _read_adapter_files(directory)
    weights_path = directory / (WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else WEIGHTS_NAME_BIN)
    settings = _check_config(config, directory / CONFIG_NAME)
    modules, extras = _split_tensors(tensors, weights_path, takes_extras=bool(settings.modules_to_save))
    lora_plan = _plan_lora(model, modules, settings, weights_path)
    extra_plan = _plan_modules_to_save(model, settings.modules_to_save, extras, lora_plan, weights_path)
    for _, layer in lora_layers(model):
        if layer.merged_adapter is not None:
            raise RuntimeError(f"load_adapter: adapter {layer.merged_adapter!r} is merged; "
                               "call unmerge_lora(model) first")
    _warn_uncovered_targets(model, settings, lora_plan, weights_path)

    covered, replacements = set(), {}
    dropout, use_rslora = settings.dropout, settings.use_rslora
    for _, module, rank, alpha, parts in lora_plan:
        if isinstance(module, LoRALinear):
            layer = module
            adapter = layer.add_adapter(adapter_name, rank, alpha, dropout, use_rslora)
        else:
            layer = LoRALinear.from_linear(module, rank, alpha, dropout, use_rslora)
            if adapter_name != DEFAULT_ADAPTER:
                layer.add_adapter(adapter_name, rank, alpha, dropout, use_rslora)
                layer.delete_adapter(DEFAULT_ADAPTER)
            adapter = layer.adapters[adapter_name]
            replacements[id(module)] = layer
        with torch.no_grad():
            adapter.lora_A.copy_(parts["lora_A"])
            adapter.lora_B.copy_(parts["lora_B"])
        covered.add(id(layer))
    replace_everywhere(model, replacements)  # one walk of the model for all new layers
    for _, layer in lora_layers(model):
        if id(layer) not in covered:  # the file defines the whole adapter: replace any older one here
            _add_placeholder(layer, adapter_name)
        layer.set_adapter(adapter_name)
    with torch.no_grad():
        for _, module, values in extra_plan:
            state = module.state_dict(keep_vars=True)
            for key, value in values.items():
                state[key].copy_(value)
            module.requires_grad_(True)
    if extra_plan:
        record_modules_to_save(model, [name for name, _, _ in extra_plan])
    return model


# -- PEFT conversion ---------------------------------------------------------------------
def _peft_scaling_alpha(layer, adapter: str, rank: int, use_rslora: bool) -> float:
    """The alpha that gives PEFT's current scaling under our formula (PEFT's scaling can be
    changed after creation, e.g. by ``set_scale``, so the stored alpha alone may not match)."""
    alpha = float(layer.lora_alpha[adapter])
    scaling = float(layer.scaling[adapter])
    ours = alpha / rank ** 0.5 if use_rslora else alpha / rank
    if abs(ours - scaling) <= 1e-12 * max(abs(scaling), 1.0):
        return alpha
    return scaling * (rank ** 0.5 if use_rslora else rank)


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Convert PEFT's LoRA ``Linear`` layers in ``peft_model`` into :class:`LoRALinear` in place.

    Base weights and LoRA parameters are reused (not copied), every adapter is kept with
    its rank, alpha, dropout and scaling, and PEFT's active adapter stays active. Accepts a
    ``PeftModel``, a ``LoraModel`` or any module holding PEFT LoRA layers; returns the
    underlying base model. Refuses merged layers and features LoRALinear lacks (DoRA and
    other LoRA variants, fan_in_fan_out, LoRA bias, embedding/conv/quantized LoRA layers,
    several active adapters at once). A ``modules_to_save`` wrapper gives way to the active
    adapter's trained copy, which :func:`save_adapter` then writes as ``modules_to_save``.
    """
    try:
        from peft.tuners.lora.layer import Linear as PeftLinear
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError as exc:
        raise ImportError(f"from_peft needs the optional dependency peft ({exc})") from exc

    base = peft_model
    configs = getattr(peft_model, "peft_config", {}) or {}
    if hasattr(base, "base_model") and hasattr(base.base_model, "model"):  # PeftModel
        base = base.base_model
    if hasattr(base, "peft_config") and hasattr(base, "model") and isinstance(base.model, nn.Module):  # LoraModel
        base = base.model

    targets, wrapped = [], []
    for name, module in base.named_modules():
        if any(name.startswith(outer + ".") for outer, *_ in wrapped):
            continue  # the original and the trained copies inside a modules_to_save wrapper
        if isinstance(module, ModulesToSaveWrapper):
            wrapped.append((name, *_saved_module(name, module)))
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise ValueError(f"from_peft: module {name!r} is a PEFT {type(module).__name__} (trainable tokens), "
                             "which from_peft does not convert")
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not PeftLinear or not isinstance(module, LoraLayer):
            raise ValueError(f"from_peft: module {name!r} is a {type(module).__module__}.{type(module).__name__}; "
                             "only PEFT's LoRA Linear over an nn.Linear converts to LoRALinear")
        if not isinstance(module.base_layer, nn.Linear):
            raise ValueError(f"from_peft: module {name!r} wraps a {type(module.base_layer).__name__}, not an nn.Linear")
        if module.merged:
            raise ValueError(f"from_peft: module {name!r} has merged adapters {module.merged_adapters}; "
                             "unmerge them (peft_model.unmerge_adapter()) before converting")
        if module.fan_in_fan_out:
            raise ValueError(f"from_peft: module {name!r} uses fan_in_fan_out=True, which LoRALinear does not support")
        if module.disable_adapters:
            raise ValueError(f"from_peft: module {name!r} has its adapters disabled (inside disable_adapter()?)")
        if len(module.active_adapters) > 1:
            raise ValueError(f"from_peft: module {name!r} has several active adapters {module.active_adapters}; "
                             "LoRALinear runs one at a time")
        for adapter in module.lora_A:
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if module.use_dora.get(adapter, False) or variant is not None:
                what = "DoRA" if module.use_dora.get(adapter, False) else type(variant).__name__
                raise ValueError(f"from_peft: module {name!r} adapter {adapter!r} uses {what}, which LoRALinear "
                                 "does not support")
            if module.lora_bias.get(adapter, False):
                raise ValueError(f"from_peft: module {name!r} adapter {adapter!r} has a LoRA bias (lora_bias=True), "
                                 "which LoRALinear does not support")
        if len(module.lora_embedding_A) or len(module.lora_magnitude_vector):
            raise ValueError(f"from_peft: module {name!r} holds embedding or DoRA parameters, which LoRALinear "
                             "does not support")
        targets.append((name, module))
    if not targets:
        raise ValueError(f"from_peft: {type(peft_model).__name__} has no PEFT LoRA Linear layers to convert")

    for name, module in targets:
        layer = LoRALinear.from_linear(module.base_layer)
        active = module.active_adapters[0] if module.active_adapters else None
        placeholder_default = True
        for adapter_name in module.lora_A:
            rank = int(module.r[adapter_name])
            config = configs.get(adapter_name)
            if config is not None:
                use_rslora = bool(config.use_rslora)
            else:  # no config at hand: tell rsLoRA from plain LoRA by the stored scaling
                use_rslora = abs(module.scaling[adapter_name] - module.lora_alpha[adapter_name] / rank ** 0.5) < \
                    abs(module.scaling[adapter_name] - module.lora_alpha[adapter_name] / rank)
            alpha = _peft_scaling_alpha(module, adapter_name, rank, use_rslora)
            dropout_module = module.lora_dropout[adapter_name]
            dropout = float(dropout_module.p) if isinstance(dropout_module, nn.Dropout) else 0.0
            adapter = layer.add_adapter(adapter_name, rank, alpha, dropout, use_rslora)
            # Reuse PEFT's parameters so optimizer state and references stay valid.
            adapter.lora_A = module.lora_A[adapter_name].weight
            adapter.lora_B = module.lora_B[adapter_name].weight
            if adapter_name == DEFAULT_ADAPTER:
                placeholder_default = False
        if placeholder_default:
            layer.delete_adapter(DEFAULT_ADAPTER)
        if active is not None and active not in layer.adapters:
            _add_placeholder(layer, active)  # PEFT runs the base layer alone here
        if active is not None:
            layer.set_adapter(active)
        layer.train(module.training)
        parent, child = _parent_and_attr(base, name)
        setattr(parent, child, layer)
    for name, module, _ in wrapped:
        parent, child = _parent_and_attr(base, name)
        setattr(parent, child, module)
    record_modules_to_save(base, [name for name, _, trained_copy in wrapped if trained_copy])
    return base


def _saved_module(name: str, wrapper) -> tuple[nn.Module, bool]:
    """The module a PEFT ``ModulesToSaveWrapper`` runs now, which takes the wrapper's place:
    (the active adapter's trained copy, True), or (the original, False) where it has none."""
    if wrapper.disable_adapters:
        raise ValueError(f"from_peft: module {name!r} has its adapters disabled (inside disable_adapter()?)")
    if len(wrapper.active_adapters) > 1:
        raise ValueError(f"from_peft: module {name!r} has several active adapters {wrapper.active_adapters}; "
                         "a converted model keeps one trained copy")
    active = wrapper.active_adapters[0] if wrapper.active_adapters else None
    if active in wrapper.modules_to_save:
        return wrapper.modules_to_save[active], True
    return wrapper.original_module, False
