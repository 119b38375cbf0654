"""LoRALinear: construction, from_linear, adapters, merge/unmerge, dtypes."""

import math

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused import LoRALinear
from parity import assert_parity, in_float64


def assert_unmerged_weight(layer, weight_before):
    """fl(fl(W + Δ) - Δ) with one Δ: two roundings of values no larger than |W| + |Δ|."""
    delta = layer.adapter.delta_weight().detach()
    bound = torch.finfo(weight_before.dtype).eps * (weight_before.abs() + delta.abs())
    assert ((layer.weight - weight_before).abs() <= bound).all()


def test_fresh_layer_equals_base_linear_and_has_the_documented_attributes():
    torch.manual_seed(0)
    layer = LoRALinear(10, 6, rank=4, alpha=8.0)
    assert layer.weight.shape == (6, 10) and layer.bias.shape == (6,)
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (6, 4)
    assert layer.rank == 4 and layer.alpha == 8.0 and layer.scaling == 2.0 and layer.backend == "auto"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert not layer.lora_B.any() and layer.lora_A.abs().sum() > 0
    x = torch.randn(2, 3, 10)
    plain = nn.Linear(10, 6)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    assert_parity("fresh layer vs nn.Linear", layer(x), plain(x), in_float64(plain)(x.double()))


def test_rslora_scaling():
    assert LoRALinear(8, 8, rank=16, alpha=4.0, use_rslora=True).scaling == pytest.approx(1.0)


def test_from_linear_reuses_tensors_and_freezes_them():
    linear = nn.Linear(7, 5)
    layer = LoRALinear.from_linear(linear, rank=2)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    no_bias = LoRALinear.from_linear(nn.Linear(7, 5, bias=False), rank=1)
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_state_dict_of_base_linear_loads_into_the_layer():
    linear = nn.Linear(6, 4)
    layer = LoRALinear(6, 4, rank=2)
    missing, unexpected = layer.load_state_dict(linear.state_dict(), strict=False)
    assert not unexpected and all("lora" in key for key in missing)
    torch.testing.assert_close(layer.weight, linear.weight)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(4, 4, **kwargs)


def test_training_updates_only_lora_parameters():
    torch.manual_seed(1)
    layer = LoRALinear(8, 8, rank=2, dropout=0.1)
    weight_before = layer.weight.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.weight, weight_before)
    assert layer.lora_B.abs().sum() > 0


def test_merge_and_unmerge_round_trip():
    torch.manual_seed(2)
    layer = LoRALinear(9, 7, rank=3, alpha=3.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 9)
    expected, exact = layer(x), in_float64(layer)(x.double())
    weight_before = layer.weight.clone()
    layer.merge()
    assert layer.merged_adapter == "default"
    merged = layer(x)
    assert torch.equal(merged, nn.functional.linear(x, layer.weight, layer.bias))  # literally F.linear
    assert_parity("LoRA vs merged", expected, merged, exact)
    layer.unmerge()
    assert_unmerged_weight(layer, weight_before)
    assert_parity("unmerged vs merged", layer(x), merged, exact)


def test_model_level_merge_and_switching_adapters():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    lora_fused.inject_lora(model, rank=2)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
        second = layer.add_adapter("second", rank=3, alpha=6.0)
        nn.init.normal_(second.lora_B)
    x = torch.randn(4, 6)
    out_default, exact_default = model(x), in_float64(model)(x.double())
    lora_fused.set_adapter(model, "second")
    assert model[0].rank == 3 and model[0].lora_A.requires_grad
    assert not model[0].adapters["default"].lora_A.requires_grad
    out_second, exact_second = model(x), in_float64(model)(x.double())
    assert not torch.allclose(out_default, out_second)
    assert lora_fused.merge_lora(model) == 2
    assert_parity("LoRA vs merged", out_second, model(x), exact_second)
    with pytest.raises(RuntimeError, match="merged"):
        model[0].set_adapter("default")
    lora_fused.unmerge_lora(model)
    lora_fused.set_adapter(model, "default")
    assert_parity("default adapter after unmerging", model(x), out_default, exact_default)
    with pytest.raises(KeyError, match="missing"):
        lora_fused.set_adapter(model, "absent")


def test_replacing_and_deleting_adapters():
    layer = LoRALinear(6, 4, rank=2)
    layer.add_adapter("other")
    replaced = layer.add_adapter("default", rank=3)  # replacing the active adapter keeps it active and trainable
    assert layer.active_adapter == "default" and layer.adapter is replaced and replaced.lora_A.requires_grad
    assert not layer.adapters["other"].lora_A.requires_grad
    with pytest.raises(KeyError, match="no adapter named 'absent'"):
        layer.delete_adapter("absent")
    layer.delete_adapter("default")
    assert layer.active_adapter == "other" and layer.lora_A.requires_grad
    with pytest.raises(ValueError, match="only adapter"):
        layer.delete_adapter("other")
    assert layer(torch.randn(2, 6)).shape == (2, 4)


def test_half_precision_base_keeps_fp32_adapters():
    layer = LoRALinear(8, 4, rank=2, dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
    reference = (x.float() @ layer.weight.float().t() + layer.bias.float()
                 + layer.scaling * x.float() @ layer.lora_A.t() @ layer.lora_B.t())
    assert (y.float() - reference.detach()).abs().max() < 0.1


def test_inject_report_counts_and_mark_trainable():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5), nn.LayerNorm(5))
    report = lora_fused.inject_lora(model, rank=4, target_modules=["0"])
    assert report.replaced == ["0"]
    assert report.trainable_params == 4 * (10 + 20)
    assert report.total_params == 10 * 20 + 20 + 20 * 5 + 5 + 10 + report.trainable_params
    assert math.isclose(report.trainable_percent, 100 * report.trainable_params / report.total_params)
    assert "trainable%" in str(report)
    assert lora_fused.mark_trainable(model, "3") == 2
    assert model[3].weight.requires_grad and not model[2].weight.requires_grad
    with pytest.raises(ValueError, match="no parameter"):
        lora_fused.mark_trainable(model, "decoder")
    with pytest.raises(ValueError, match="matched no"):
        lora_fused.inject_lora(nn.Sequential(nn.Linear(2, 2)), target_modules=["qkv"])


def test_inject_skips_multihead_attention_out_proj():
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    report = lora_fused.inject_lora(model, rank=2)
    assert sorted(report.replaced) == ["linear1", "linear2"]
    model(torch.randn(2, 3, 8))


def test_inject_replaces_a_shared_linear_everywhere_it_appears():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    report = lora_fused.inject_lora(model, rank=2)
    assert report.replaced == ["0"] and report.trainable_params == 2 * (4 + 4)
    assert isinstance(model[0], LoRALinear) and model[2][0] is model[0]
    with pytest.raises(TypeError, match="model itself is an nn.Linear"):
        lora_fused.inject_lora(nn.Linear(3, 3))
