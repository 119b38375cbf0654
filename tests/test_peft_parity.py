"""LoRALinear against the real ``peft`` package: same outputs and gradients for the same
weights (fp32, dropout 0), and ``from_peft`` conversion that keeps what PEFT computes."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, from_peft, set_adapter
from parity import assert_all_parity, assert_parity, forward_backward, in_float64

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

BACKENDS = ["torch", "auto"]


def peft_linear(in_features, out_features, rank, alpha, bias, use_rslora, seed=0):
    """A PEFT LoRA Linear (built through get_peft_model, as users do) with random A and B."""
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.lin = nn.Linear(in_features, out_features, bias=bias)
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], use_rslora=use_rslora))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
    return layer


def matching_lora_linear(layer: PeftLinear, use_rslora, backend):
    base = copy.deepcopy(layer.base_layer)
    ours = LoRALinear.from_linear(base, rank=layer.r["default"], alpha=layer.lora_alpha["default"],
                                  use_rslora=use_rslora, backend=backend)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rank, alpha, use_rslora, shape", [
    (4, 8, False, (7, 19)),
    (1, 1, False, (1, 19)),
    (3, 16, True, (2, 5, 3, 19)),  # SAM-style [B, H, W, C] input
    (16, 4, False, (130, 19)),
])
def test_same_outputs_and_gradients(backend, bias, rank, alpha, use_rslora, shape):
    layer = peft_linear(19, 13, rank, alpha, bias, use_rslora)
    ours = matching_lora_linear(layer, use_rslora, backend)
    assert ours.scaling == pytest.approx(layer.scaling["default"], rel=1e-15)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(*shape[:-1], 13, generator=torch.Generator().manual_seed(2))

    def peft_lora_params(module):
        return [module.lora_A["default"].weight, module.lora_B["default"].weight]

    # Ours and PEFT compute one function two ways: each is held to float64 with DESIGN.md §5's rule.
    exact = forward_backward(in_float64(layer), x.double(), grad.double(), peft_lora_params)
    peft_values = forward_backward(layer, x, grad, peft_lora_params)
    our_values = forward_backward(ours, x, grad, lambda m: [m.lora_A, m.lora_B])
    assert_all_parity(("y", "dx", "dA", "dB"), our_values, peft_values, exact)
    assert ours.weight.grad is None and layer.base_layer.weight.grad is None
    if bias:
        assert ours.bias.grad is None and layer.base_layer.bias.grad is None


# -- from_peft ---------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 12)
        self.b = nn.Linear(12, 12, bias=False)
        self.c = nn.Linear(12, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def multi_adapter_peft_model():
    """Two adapters: "default" (rsLoRA, mixed ranks, dropout) on a, b, c; "extra" on b only."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b", "c"],
                                             rank_pattern={"c": 2}, use_rslora=True, lora_dropout=0.2))
    model.add_adapter("extra", LoraConfig(r=3, lora_alpha=5, target_modules=["b"]))
    randomize(model, 1)
    return model


def test_from_peft_keeps_outputs_adapters_and_parameters():
    peft_model = multi_adapter_peft_model().eval()
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    expected = {}  # adapter -> (PEFT's fp32 output, the float64 truth), taken before the in-place conversion
    for adapter in ("default", "extra"):
        peft_model.set_adapter(adapter)
        expected[adapter] = (peft_model(x), in_float64(peft_model)(x.double()))
    peft_layer_b = peft_model.base_model.model.b
    base_weight, extra_b = peft_layer_b.base_layer.weight, peft_layer_b.lora_B["extra"].weight

    model = from_peft(peft_model)
    assert type(model) is Net
    assert all(isinstance(getattr(model, n), LoRALinear) for n in "abc")
    assert model.b.weight is base_weight and model.b.adapters["extra"].lora_B is extra_b  # reused, not copied
    assert model.b.active_adapter == "extra"  # PEFT's active adapter stays active
    assert not model.a.training  # PEFT model was in eval mode: no dropout
    assert_parity("extra adapter", model(x), *expected["extra"])

    set_adapter(model, "default")
    a, c = model.a.adapter, model.c.adapter
    assert (a.rank, a.alpha, a.use_rslora, a.dropout) == (4, 8.0, True, 0.2)
    assert c.rank == 2 and c.scaling == pytest.approx(8 / 2 ** 0.5)
    assert_parity("default adapter", model(x), *expected["default"])
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())


def test_from_peft_keeps_a_rescaled_adapter():
    """PEFT's scaling can change after creation (set_scale); the converted layer follows it."""
    peft_model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["a"])).eval()
    randomize(peft_model, 4)
    peft_model.base_model.model.a.set_scale("default", 0.5)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    reference, expected = in_float64(peft_model)(x.double()), peft_model(x)
    model = from_peft(peft_model)
    assert model.a.scaling == pytest.approx(1.0)
    assert_parity("rescaled adapter", model(x), expected, reference)


def test_from_peft_accepts_the_lora_model_and_trains():
    peft_model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["b"]))
    model = from_peft(peft_model.base_model)
    assert type(model) is Net and isinstance(model.b, LoRALinear) and model.b.training
    model(torch.randn(2, 10)).sum().backward()
    assert model.b.lora_B.grad is not None and model.b.weight.grad is None


@pytest.mark.parametrize("setup, message", [
    (lambda m: m.merge_adapter(), "merged"),
    (lambda m: m.base_model.model.a.__setattr__("fan_in_fan_out", True), "fan_in_fan_out"),
    (lambda m: m.base_model.model.a.set_adapter(["default", "second"]), "several active adapters"),
])
def test_from_peft_refuses_what_it_cannot_keep(setup, message):
    peft_model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b"]))
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["a"]))
    setup(peft_model)
    with pytest.raises(ValueError, match=message):
        from_peft(peft_model)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize("config_kwargs, message", [
    (dict(target_modules=["lin"], use_dora=True), "DoRA"),
    (dict(target_modules=["emb"]), "Embedding"),
    (dict(target_modules=["conv"]), "Conv2d"),
    (dict(target_modules=["lin"], trainable_token_indices={"emb": [0, 1]}), "TrainableTokensWrapper"),
])
def test_from_peft_refuses_unsupported_layers(config_kwargs, message):
    peft_model = get_peft_model(Mixed(), LoraConfig(r=2, **config_kwargs))
    with pytest.raises(ValueError, match=message):
        from_peft(peft_model)


def test_from_peft_needs_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        from_peft(Net())
