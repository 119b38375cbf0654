"""Adapter files: our round trip, interop with real PEFT both ways, atomic saves, several
named adapters on one model, and the errors for what we cannot load."""

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear, inject_lora, load_adapter, save_adapter, set_adapter
from lora_fused import adapters as adapters_module
from adapter_files import edit_adapter
from parity import assert_module_parity

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.proj(torch.nn.functional.gelu(self.qkv(self.norm(x))[..., : x.shape[-1]]))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(2)])
        self.head = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def base_model(seed=0):
    torch.manual_seed(seed)
    return Tiny().eval()


def randomize_lora(model, seed):
    """Give every active adapter a nonzero B (a fresh adapter is an exact no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.3)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.3)


def randomize_peft_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def trained_model(seed=1, rank=4, alpha=8.0, use_rslora=False, target_modules=None):
    model = base_model()
    inject_lora(model, rank=rank, alpha=alpha, use_rslora=use_rslora, target_modules=target_modules)
    randomize_lora(model, seed)
    return model.eval()


@pytest.fixture
def x():
    return torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(42))


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))


# -- our round trip ----------------------------------------------------------------------
def test_round_trip_into_plain_model(tmp_path, x):
    model = trained_model()
    expected = model(x)
    assert not torch.allclose(expected, base_model()(x)), "the adapter must change the output for the test to mean much"
    save_adapter(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(f"base_model.model.{n}.lora_{p}.weight" for n in lora_names(model) for p in "AB")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is False and config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["task_type"] is None and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == lora_names(model)

    fresh = base_model()
    assert load_adapter(fresh, tmp_path) is fresh
    assert lora_names(fresh) == lora_names(model)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    layer = fresh.blocks[1].qkv
    assert layer.active_adapter == "default" and layer.rank == 4 and layer.alpha == 8.0
    assert layer.lora_A.requires_grad and not layer.weight.requires_grad


def test_saved_tensors_keep_their_dtype(tmp_path):
    model = base_model().to(torch.bfloat16)
    inject_lora(model, rank=2)
    assert model.head.lora_A.dtype == torch.float32  # fp32 adapters over a bf16 base
    save_adapter(model, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "adapter_model.safetensors").values()} == {torch.float32}


def test_mixed_ranks_and_alphas_round_trip(tmp_path, x):
    model = trained_model()
    model.blocks[0].qkv.add_adapter("default", rank=7, alpha=3.5, activate=True)
    model.head.add_adapter("default", rank=2, alpha=8.0, activate=True)
    randomize_lora(model, 5)
    expected = model(x)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"^blocks\\.0\\.qkv": 7, "^head": 2}
    assert config["alpha_pattern"] == {"^blocks\\.0\\.qkv": 3.5}

    fresh = base_model()
    load_adapter(fresh, tmp_path)
    assert (fresh.blocks[0].qkv.rank, fresh.blocks[0].qkv.alpha, fresh.head.rank) == (7, 3.5, 2)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


# -- interop with real PEFT --------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_our_adapter_loads_into_peft(tmp_path, x, use_rslora):
    model = trained_model(use_rslora=use_rslora)
    model.blocks[1].proj.add_adapter("default", rank=6, alpha=2.0, use_rslora=use_rslora, activate=True)
    randomize_lora(model, 9)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    assert peft_model.base_model.model.blocks[1].proj.r["default"] == 6
    assert_module_parity("ours vs PEFT", model, peft_model, x)


def test_target_modules_stay_exact_when_names_are_suffixes_of_others(tmp_path, x):
    """Only `head` gets LoRA; a list ["head"] would make PEFT also wrap `aux.head`."""

    class WithAux(Tiny):
        def __init__(self):
            super().__init__()
            self.aux = nn.Module()
            self.aux.head = nn.Linear(16, 5)

        def forward(self, x):
            return super().forward(x) + self.aux.head(self.embed(x))

    torch.manual_seed(0)
    base = WithAux().eval()
    model = copy.deepcopy(base)
    inject_lora(model, rank=3, target_modules=lambda name, m: name == "head")
    randomize_lora(model, 2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(peft_model.base_model.model.aux.head, nn.Linear)
    assert_module_parity("ours vs PEFT", model, peft_model, x)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_peft_adapter_loads_into_ours(tmp_path, x, safe_serialization):
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["qkv", "head"], rank_pattern={"head": 2},
                        alpha_pattern={"blocks.1.qkv": 3}, use_rslora=True, lora_dropout=0.1)
    peft_model = get_peft_model(base_model(), config)
    randomize_peft_lora(peft_model, 3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    expected_file = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert expected_file in os.listdir(tmp_path)

    model = base_model()
    load_adapter(model, tmp_path)
    assert lora_names(model) == ["blocks.0.qkv", "blocks.1.qkv", "head"]
    assert isinstance(model.blocks[0].proj, nn.Linear) and not isinstance(model.blocks[0].proj, LoRALinear)
    assert (model.head.rank, model.blocks[1].qkv.alpha, model.blocks[0].qkv.alpha) == (2, 3.0, 6.0)
    assert model.blocks[0].qkv.dropout == 0.1 and model.blocks[0].qkv.use_rslora
    assert_module_parity("PEFT's adapter in ours vs PEFT", model, peft_model, x)


# -- several adapters ---------------------------------------------------------------------
def test_several_adapters_switch_without_reloading(tmp_path, x):
    first, second = trained_model(seed=1), trained_model(seed=2, rank=2, alpha=1.0)
    save_adapter(first, tmp_path / "first")
    save_adapter(second, tmp_path / "second")
    model = base_model()
    base_out = model(x)
    load_adapter(model, tmp_path / "first", adapter_name="first")
    load_adapter(model, tmp_path / "second", adapter_name="second")
    weight = model.head.weight
    assert model.head.active_adapter == "second"
    torch.testing.assert_close(model(x), second(x), rtol=0, atol=0)
    set_adapter(model, "first")
    torch.testing.assert_close(model(x), first(x), rtol=0, atol=0)
    assert model.head.weight is weight  # switching reloads nothing
    assert set(model.head.adapters) == {"first", "second"}  # no stray "default" from the conversion
    trainable_lora = {n for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n}
    assert trainable_lora and all(".adapters.first." in n for n in trainable_lora)
    with pytest.raises(KeyError, match="third"):
        set_adapter(model, "third")
    assert not torch.allclose(base_out, first(x))


def test_adapter_covering_some_layers_leaves_the_rest_as_base(tmp_path, x):
    full, head_only = trained_model(seed=1), trained_model(seed=2, target_modules=["head"])
    save_adapter(full, tmp_path / "full")
    save_adapter(head_only, tmp_path / "head")
    model = base_model()
    load_adapter(model, tmp_path / "full", adapter_name="full")
    load_adapter(model, tmp_path / "head", adapter_name="head")
    # Layers the adapter does not cover run as base layers here but as nn.Linear in head_only:
    # one function computed two ways, so DESIGN.md §5's rule, not equality.
    assert_module_parity("head adapter", model, head_only, x)
    # Saving it again writes only the layer it really covers.
    save_adapter(model, tmp_path / "again", adapter_name="head")
    assert sorted(load_file(tmp_path / "again" / "adapter_model.safetensors")) == [
        "base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"]
    set_adapter(model, "full")
    torch.testing.assert_close(model(x), full(x), rtol=0, atol=0)
    # Reloading "full" from the head-only file replaces it everywhere, not just on head.
    load_adapter(model, tmp_path / "head", adapter_name="full")
    assert_module_parity("full reloaded from the head-only file", model, head_only, x)


def test_save_picks_the_named_adapter(tmp_path, x):
    model = trained_model(seed=1)
    expected = model(x)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.add_adapter("other", rank=3, activate=True)
    save_adapter(model, tmp_path, adapter_name="default")
    fresh = base_model()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


# -- atomic writes ------------------------------------------------------------------------
def _files(directory):
    return sorted(os.listdir(directory))


def test_failed_save_keeps_the_old_adapter(tmp_path, x, monkeypatch):
    old = trained_model(seed=1)
    save_adapter(old, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    new = trained_model(seed=2, rank=2)
    monkeypatch.setattr(adapters_module.os, "fsync", crash)  # dies while writing the first temp file
    with pytest.raises(OSError, match="simulated"):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(adapters_module.os, "replace", crash)  # dies after both temp files are written
    with pytest.raises(OSError, match="simulated"):
        save_adapter(new, tmp_path)
    monkeypatch.undo()

    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before  # no temp files left
    fresh = base_model()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), old(x), rtol=0, atol=0)


def test_save_interrupted_between_renames_is_detected(tmp_path, monkeypatch):
    save_adapter(trained_model(seed=1), tmp_path)
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(adapters_module.os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained_model(seed=2, rank=2), tmp_path)
    monkeypatch.undo()
    assert _files(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="different saves"):
        load_adapter(base_model(), tmp_path)


# -- errors -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    save_adapter(trained_model(), tmp_path)
    return tmp_path


def _rewrite_weights(directory, edit):
    """Rewrite the safetensors file with edited tensors (and no config digest)."""
    tensors = load_file(directory / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "adapter_model.safetensors")


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_adapter(base_model(), tmp_path / "nowhere")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(base_model(), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(base_model(), saved)


def test_key_for_a_module_the_model_lacks(saved):
    def rename(tensors):
        for part in "AB":
            key = f"base_model.model.blocks.{{}}.qkv.lora_{part}.weight"
            tensors[key.format(7)] = tensors.pop(key.format(1))

    _rewrite_weights(saved, rename)
    model = base_model()
    with pytest.raises(KeyError, match=r"blocks\.7\.qkv"):
        load_adapter(model, saved)
    assert lora_names(model) == []  # nothing changed before the error


def test_shape_mismatch_names_the_key(saved):
    def widen(tensors):
        tensors["base_model.model.head.lora_B.weight"] = torch.zeros(6, 4)

    _rewrite_weights(saved, widen)
    with pytest.raises(ValueError, match=r"head\.lora_B\.weight.*\(6, 4\).*\(5, 4\)"):
        load_adapter(base_model(), saved)


def test_missing_half_of_a_pair(saved):
    _rewrite_weights(saved, lambda tensors: tensors.pop("base_model.model.head.lora_A.weight"))
    with pytest.raises(ValueError, match=r"no key base_model\.model\.head\.lora_A\.weight"):
        load_adapter(base_model(), saved)


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "DoRA"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("lora_bias", True, "LoRA bias"),
    ("bias", "all", "bias"),
    ("modules_to_save", ["head"], "modules_to_save"),
    ("peft_type", "IA3", "peft_type='IA3'"),
])
def test_unsupported_config(saved, field, value, message):
    edit_adapter(saved, **{field: value})
    with pytest.raises(ValueError, match=message):
        load_adapter(base_model(), saved)


class ConvEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)


@pytest.mark.parametrize("config_kwargs, message", [
    (dict(target_modules=["lin"], use_dora=True), "DoRA"),
    (dict(target_modules=["conv"]), "convolution"),
    (dict(target_modules=["emb"]), "embedding"),
])
def test_unsupported_peft_adapters(tmp_path, config_kwargs, message):
    """Adapters saved by real PEFT with features LoRALinear lacks are refused by name."""
    peft_model = get_peft_model(ConvEmbed(), LoraConfig(r=2, **config_kwargs))
    peft_model.save_pretrained(tmp_path)
    if config_kwargs.get("use_dora"):  # also the key alone, with the config flag cleared
        with pytest.raises(ValueError, match=message):
            load_adapter(ConvEmbed(), tmp_path)
        edit_adapter(tmp_path, use_dora=False)
    with pytest.raises(ValueError, match=message):
        load_adapter(ConvEmbed(), tmp_path)


def test_adapter_for_a_non_linear_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    inject_lora(model, rank=2)
    save_adapter(model, tmp_path)
    with pytest.raises(TypeError, match="LayerNorm"):
        load_adapter(nn.Sequential(nn.LayerNorm(4)), tmp_path)


def test_load_into_merged_model_is_refused(saved):
    model = trained_model()
    lora_fused.merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        load_adapter(model, saved, adapter_name="other")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_adapter(base_model(), tmp_path)
    model = trained_model()
    with pytest.raises(KeyError, match="nope"):
        save_adapter(model, tmp_path, adapter_name="nope")
    model.head.add_adapter("default", rank=2, use_rslora=True, activate=True)
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter(model, tmp_path)
    model.head.add_adapter("other", rank=2, activate=True)
    with pytest.raises(ValueError, match="different active adapters"):
        save_adapter(model, tmp_path)
    assert not os.listdir(tmp_path)
