"""inject_lora in PEFT's language (LoraConfig, r/lora_alpha/lora_dropout, "all-linear",
exclude_modules, rank_pattern/alpha_pattern) selecting and sizing layers as the real PEFT
does, and modules_to_save written by us and restored by PEFT, and the other way round."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, from_peft, inject_lora, load_adapter, save_adapter
from adapter_files import edit_adapter
from parity import assert_module_parity

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


class Encoder(nn.Module):
    def __init__(self, dim=10, depth=2, classes=3):
        super().__init__()
        self.stem = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim), "norm": nn.LayerNorm(dim)})
            for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["proj"](torch.tanh(block["qkv"](block["norm"](x))[..., : x.shape[-1]]))
        return self.head(x)


class EncoderWithOutputLayer(Encoder):
    def get_output_embeddings(self):  # as transformers models name their output layer
        return self.head


def encoder(seed=0, cls=Encoder):
    torch.manual_seed(seed)
    return cls().eval()


def peft_layers(peft_model):
    """{module name in the base model: (rank, scaling)} of PEFT's LoRA layers."""
    from peft.tuners.lora.layer import LoraLayer

    base = peft_model.base_model.model
    return {name: (module.r["default"], module.scaling["default"])
            for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def our_layers(model):
    return {name: (m.rank, m.scaling) for name, m in model.named_modules() if isinstance(m, LoRALinear)}


CONFIGS = {
    "lists, exclude, patterns": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "proj", "head"], exclude_modules=["blocks.1.proj"],
        rank_pattern={"qkv": 2}, alpha_pattern={r"blocks\.0\.proj": 3}),
    "regex": lambda: LoraConfig(r=3, lora_alpha=6, target_modules=r"blocks\.\d\.(qkv|proj)", use_rslora=True),
    "all-linear": lambda: LoraConfig(r=2, lora_alpha=2, target_modules="all-linear", exclude_modules=r".*head"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_lora_config_selects_and_sizes_the_layers_peft_does(config):
    ours = encoder()
    report = inject_lora(ours, config())
    theirs = get_peft_model(encoder(), config())
    assert our_layers(ours) == peft_layers(theirs)  # scaling: the same formula, alpha / r or alpha / sqrt(r)
    assert sorted(report.replaced) == sorted(peft_layers(theirs))
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == theirs.get_nb_trainable_parameters()[0]


def test_all_linear_leaves_out_the_output_layer_like_peft_does_for_transformers_models():
    model = encoder(cls=EncoderWithOutputLayer)
    inject_lora(model, target_modules="all-linear")
    assert type(model.head) is nn.Linear and isinstance(model.stem, LoRALinear)
    plain = encoder()
    inject_lora(plain, target_modules="ALL-LINEAR")  # no output layer named: every linear, as PEFT
    assert isinstance(plain.head, LoRALinear)


def test_peft_option_names_and_a_dict_config_mean_the_same_as_ours():
    by_ours, by_peft, by_dict, by_keyword = encoder(), encoder(), encoder(), encoder()
    inject_lora(by_ours, rank=2, alpha=5.0, dropout=0.1, target_modules=["qkv"])
    inject_lora(by_peft, r=2, lora_alpha=5.0, lora_dropout=0.1, target_modules=["qkv"])
    inject_lora(by_dict, {"r": 2, "lora_alpha": 5.0, "lora_dropout": 0.1, "target_modules": ["qkv"]})
    inject_lora(by_keyword, config=LoraConfig(r=2, lora_alpha=5.0, lora_dropout=0.1, target_modules=["qkv"]))
    expected = {name: (m.rank, m.alpha, m.dropout) for name, m in by_ours.named_modules() if isinstance(m, LoRALinear)}
    for model in (by_peft, by_dict, by_keyword):
        assert {name: (m.rank, m.alpha, m.dropout)
                for name, m in model.named_modules() if isinstance(m, LoRALinear)} == expected
    assert len(expected) == 2


@pytest.mark.parametrize("call, message", [
    (lambda m: inject_lora(m, rank=2, r=2), "rank= and r= name the same option"),
    (lambda m: inject_lora(m, LoraConfig(r=2), alpha=3.0), "either config or keyword options"),
    (lambda m: inject_lora(m, LoraConfig(use_dora=True)), "DoRA"),
    (lambda m: inject_lora(m, LoraConfig(layers_to_transform=[0])), "layers_to_transform"),
    (lambda m: inject_lora(m, LoraConfig(init_lora_weights="gaussian")), "init_lora_weights='gaussian'"),
    (lambda m: inject_lora(m, config={"peft_type": "IA3"}), "only LoRA"),
    (lambda m: inject_lora(m, rank_pattern={"(": 2}), "rank_pattern key '\\(' is not a valid regular expression"),
    (lambda m: inject_lora(m, rank_pattern={"qkv": 0}), "a rank must be an integer >= 1"),
    (lambda m: inject_lora(m, alpha_pattern={"qkv": float("nan")}), "alpha must be a finite number"),
    (lambda m: inject_lora(m, rank=0), "inject_lora: rank must be an integer >= 1"),
    (lambda m: inject_lora(m, {"r": 0}), "inject_lora: config: r must be an integer >= 1"),
    (lambda m: inject_lora(m, target_modules="blocks.(qkv"), r"target_modules 'blocks.\(qkv' is not a valid regular"),
    (lambda m: inject_lora(m, exclude_modules=3), "exclude_modules must be null, a regex string, a list"),
    (lambda m: inject_lora(m, modules_to_save=["no_such"]), "'no_such' matches no module"),
    (lambda m: inject_lora(m, target_modules=["qkv"], modules_to_save=["blocks.0"]), "either trained fully"),
])
def test_bad_options_are_refused_before_the_model_changes(call, message):
    model = encoder()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises((TypeError, ValueError), match=message):
        call(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_target_modules_may_be_any_iterable_of_names():
    model = encoder()
    inject_lora(model, target_modules=(name for name in ("qkv", "head")))  # matched against every module
    assert sorted(our_layers(model)) == ["blocks.0.qkv", "blocks.1.qkv", "head"]


def test_modules_to_save_select_each_module_once_and_nothing_inside_lora_layers(tmp_path):
    from lora_fused.inject import select_modules_to_save

    def aliased():
        model = encoder()
        model.extra = nn.ModuleDict({"head": model.head, "qkv": model.blocks[0]["qkv"]})  # second names
        return model

    model = aliased()
    inject_lora(model, target_modules=["qkv"], modules_to_save=["head"])
    assert isinstance(model.extra["qkv"], LoRALinear) and model.extra["head"] is model.head
    assert [name for name, _ in select_modules_to_save(model, ["head"])] == ["head"]
    assert select_modules_to_save(model, ["default"]) == []  # an adapter is no module of the model, by any name
    with pytest.raises(ValueError, match="'default' matches no module"):
        inject_lora(model, target_modules=["proj"], modules_to_save=["default"])
    save_adapter(model, tmp_path)  # the second name is the same module, not another one PEFT would select
    fresh = aliased()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.head.weight, model.head.weight) and fresh.extra["head"] is fresh.head


def train_a_little(model, seed):
    """Stand-in for training: random LoRA B (A too) and a changed head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def test_modules_to_save_written_by_us_are_restored_by_peft(tmp_path):
    ours = encoder()
    inject_lora(ours, LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "proj"], modules_to_save=["head"]))
    assert all(p.requires_grad for p in ours.head.parameters())
    train_a_little(ours, seed=1)
    save_adapter(ours, tmp_path)
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= set(
        load_file(tmp_path / "adapter_model.safetensors"))

    theirs = PeftModel.from_pretrained(encoder(), tmp_path)
    assert isinstance(theirs.base_model.model.head, ModulesToSaveWrapper)
    restored = theirs.base_model.model.head.modules_to_save["default"]
    assert torch.equal(restored.weight, ours.head.weight) and torch.equal(restored.bias, ours.head.bias)
    x = torch.randn(4, 5, 6)
    assert_module_parity("ours vs PEFT, head restored", ours, theirs, x)


def test_modules_to_save_written_by_peft_are_restored_by_us_and_saved_again(tmp_path):
    theirs = get_peft_model(encoder(), LoraConfig(r=3, lora_alpha=3, target_modules=["qkv"],
                                                  modules_to_save=["head", "blocks.1.norm"]))
    train_a_little(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "peft")

    ours = encoder()
    load_adapter(ours, tmp_path / "peft")
    trained_head = theirs.base_model.model.head.modules_to_save["default"]
    assert torch.equal(ours.head.weight, trained_head.weight) and ours.head.weight.requires_grad
    x = torch.randn(3, 6)
    assert_module_parity("PEFT vs ours, head restored", ours, theirs, x)

    save_adapter(ours, tmp_path / "again")  # the modules read come along again
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert torch.equal(again["base_model.model.blocks.1.norm.weight"],
                       theirs.base_model.model.blocks[1]["norm"].modules_to_save["default"].weight)
    save_adapter(ours, tmp_path / "lora_only", modules_to_save=[])
    assert not any(".head." in key for key in load_file(tmp_path / "lora_only" / "adapter_model.safetensors"))


def test_modules_to_save_that_peft_would_read_differently_are_refused(tmp_path):
    model = encoder()
    inject_lora(model, target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"'norm' would also select \['blocks.0.norm', 'blocks.1.norm'\]"):
        model.norm = nn.LayerNorm(10)
        save_adapter(model, tmp_path, modules_to_save=["norm"])
    with pytest.raises(ValueError, match="holds LoRA layers"):
        save_adapter(model, tmp_path, modules_to_save=["blocks.0"])
    with pytest.raises(KeyError, match="'absent'"):
        save_adapter(model, tmp_path, modules_to_save=["absent"])
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_a_file_listing_modules_to_save_without_their_tensors_is_refused(tmp_path):
    model = encoder()
    inject_lora(model, target_modules=["qkv"], modules_to_save=["head"])
    save_adapter(model, tmp_path)
    edit_adapter(tmp_path, modules_to_save=["stem"])
    fresh = encoder()
    with pytest.raises(ValueError, match=r"lists 'stem' in modules_to_save but has no tensor .*stem.weight"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())


def test_from_peft_puts_the_trained_copy_of_a_module_to_save_in_place_and_saves_it(tmp_path):
    theirs = get_peft_model(encoder(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                  modules_to_save=["head"]))
    train_a_little(theirs, seed=3)
    x = torch.randn(2, 6)
    reference = copy.deepcopy(theirs)
    trained_head = theirs.base_model.model.head.modules_to_save["default"]
    converted = from_peft(theirs)
    assert converted.head is trained_head and trained_head.weight.requires_grad
    assert_module_parity("from_peft with modules_to_save", converted, reference, x)
    save_adapter(converted, tmp_path)
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["base_model.model.head.weight"],
                       trained_head.weight)
