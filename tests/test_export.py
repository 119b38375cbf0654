"""merge_and_unload, merging shared weights once, and the merged state carried by state dicts."""

import copy

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear
from parity import assert_parity


class TwoPaths(nn.Module):
    """A model with a linear shared under two names (``first`` and ``again``), one without bias."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(12, 12)
        self.mid = nn.Sequential(nn.GELU(), nn.Linear(12, 9, bias=False))
        self.again = self.first
        self.head = nn.Linear(9, 5)

    def forward(self, x):
        h = self.again(torch.tanh(self.first(x)))
        return self.head(self.mid(h))


def _trained_lora_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TwoPaths()
    plain = copy.deepcopy(model)
    lora_fused.inject_lora(model, rank=3, alpha=6.0, **kwargs)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B, std=0.5)
    return plain, model.eval()


def _float64_and_torch_copies(model):
    """The same LoRA model as a float64 reference and as plain-PyTorch fp32 (the error yardstick)."""
    reference, yardstick = copy.deepcopy(model).double(), copy.deepcopy(model)
    for copy_ in (reference, yardstick):
        for layer in copy_.modules():
            if isinstance(layer, LoRALinear):
                layer.backend = "torch"
    return reference, yardstick


def test_merge_and_unload_gives_plain_linears_with_the_lora_outputs_and_the_plain_keys():
    plain, model = _trained_lora_model()
    x = torch.randn(2, 7, 12)
    reference, yardstick = _float64_and_torch_copies(model)
    expected64, same_dtype = reference(x.double()), yardstick(x)
    assert_parity("LoRA model", model(x), same_dtype, expected64)

    result = lora_fused.merge_and_unload(model)
    assert result is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for m in (model.first, model.mid[1], model.head))
    assert model.again is model.first  # the shared linear stays one module
    assert list(model.state_dict()) == list(plain.state_dict())
    assert_parity("merged model", model(x), same_dtype, expected64)

    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(plain(x), model(x))  # literally the same computation


def test_merge_and_unload_after_merge_lora_applies_the_delta_once():
    _, model = _trained_lora_model(seed=1)
    x = torch.randn(5, 12)
    reference, yardstick = _float64_and_torch_copies(model)
    lora_fused.merge_lora(model)
    lora_fused.merge_and_unload(model)
    assert_parity("merged twice", model(x), yardstick(x), reference(x.double()))


def test_merge_and_unload_of_a_single_layer_returns_a_linear():
    torch.manual_seed(2)
    layer = LoRALinear(6, 4, rank=2).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    reference, yardstick = _float64_and_torch_copies(layer)
    linear = lora_fused.merge_and_unload(layer)
    assert type(linear) is nn.Linear and linear.weight is layer.weight and not linear.training
    assert_parity("merged layer", linear(x), yardstick(x), reference(x.double()))
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora_fused.merge_and_unload(nn.Sequential(nn.Linear(2, 2)))


def _two_layers_sharing_one_weight():
    torch.manual_seed(3)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    lora_fused.inject_lora(model, rank=2)
    return model


def test_layers_sharing_a_weight_with_different_deltas_are_refused_before_any_change():
    model = _two_layers_sharing_one_weight()
    nn.init.normal_(model[0].lora_B)
    nn.init.normal_(model[2].lora_B)
    weight = model[0].weight.clone()
    for merge in (lora_fused.merge_lora, lora_fused.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"share one base weight but add different deltas"):
            merge(model)
        assert torch.equal(model[0].weight, weight)
        assert model[0].merged_adapter is None and model[2].merged_adapter is None
        assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)


def test_layers_sharing_a_weight_with_the_same_delta_merge_it_once():
    model = _two_layers_sharing_one_weight()
    nn.init.normal_(model[0].lora_B)
    model[2].adapters["default"] = model[0].adapters["default"]  # one adapter on both layers
    x = torch.randn(4, 8)
    reference, yardstick = _float64_and_torch_copies(model)
    weight = model[0].weight.clone()
    delta = model[0].adapter.delta_weight()

    lora_fused.merge_lora(model)
    assert model[0].merged_adapter == model[2].merged_adapter == "default"
    torch.testing.assert_close(model[0].weight, weight + delta)  # once, not twice
    assert_parity("merged shared weight", model(x), yardstick(x), reference(x.double()))
    lora_fused.unmerge_lora(model)
    assert model[0].merged_adapter is None and model[2].merged_adapter is None
    torch.testing.assert_close(model[0].weight, weight)

    lora_fused.merge_and_unload(model)
    assert model[0].weight is model[2].weight
    assert_parity("unloaded shared weight", model(x), yardstick(x), reference(x.double()))


def test_a_weight_tied_to_a_non_lora_parameter_is_refused():
    torch.manual_seed(4)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 6), "head": nn.Linear(6, 10, bias=False)})
    model["head"].weight = model["embed"].weight
    lora_fused.inject_lora(model, rank=2)
    nn.init.normal_(model["head"].lora_B)
    with pytest.raises(RuntimeError, match=r"'head'.*shares memory with 'embed.weight'"):
        lora_fused.merge_and_unload(model)
    assert model["head"].merged_adapter is None


def test_a_merged_state_dict_loads_as_merged_and_an_unmerged_one_as_unmerged():
    _, merged_model = _trained_lora_model(seed=5)
    _, fresh = _trained_lora_model(seed=6)
    x = torch.randn(3, 12)
    reference, yardstick = _float64_and_torch_copies(merged_model)
    lora_fused.merge_lora(merged_model)
    state = merged_model.state_dict()
    assert state["first.lora_merged_adapter"].dtype == torch.uint8

    fresh.load_state_dict(state, strict=True)
    assert all(layer.merged_adapter == "default" for _, layer in lora_fused.inject.lora_layers(fresh))
    assert_parity("merged state dict", fresh(x), yardstick(x), reference(x.double()))
    lora_fused.unmerge_lora(fresh)
    assert_parity("loaded then unmerged", fresh(x), yardstick(x), reference(x.double()))

    lora_fused.merge_lora(fresh)  # now an unmerged state dict into a merged model
    lora_fused.unmerge_lora(merged_model)
    fresh.load_state_dict(merged_model.state_dict(), strict=True)
    assert all(layer.merged_adapter is None for _, layer in lora_fused.inject.lora_layers(fresh))
    assert_parity("unmerged state dict", fresh(x), yardstick(x), reference(x.double()))


def test_merged_state_naming_an_absent_adapter_is_refused():
    layer = LoRALinear(4, 4, rank=1)
    layer.merge()
    state = layer.state_dict()
    state["lora_merged_adapter"] = torch.tensor(list(b"other"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="adapter 'other' merged into it"):
        LoRALinear(4, 4, rank=1).load_state_dict(state)


def test_adapter_weights_alone_cannot_load_into_a_merged_layer():
    torch.manual_seed(7)
    layer = LoRALinear(5, 3, rank=2)
    nn.init.normal_(layer.lora_B)
    adapter_only = {k: v for k, v in copy.deepcopy(layer.state_dict()).items() if k.startswith("adapters.")}
    layer.merge()
    weight = layer.weight.clone()
    with pytest.raises(RuntimeError, match="'default' is merged into the weight, so its A/B cannot be loaded"):
        layer.load_state_dict(adapter_only, strict=False)
    marker_only = {"lora_merged_adapter": layer.state_dict()["lora_merged_adapter"]}
    with pytest.raises(RuntimeError, match="says the weight is merged, but weight is missing"):
        LoRALinear(5, 3, rank=2).load_state_dict(marker_only, strict=False)
    assert torch.equal(layer.weight, weight) and layer.merged_adapter == "default"
