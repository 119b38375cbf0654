"""The adapter and injection failures of issue 13's probe run, each with a test: malformed
configs name their file, everything is validated before the model changes, uncovered
targets warn, doing nothing is an error, killed saves leave no litter, and a linear shared
under two names gets one LoRA layer when an adapter is loaded."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

from lora_fused import LoRALinear, inject_lora, load_adapter, save_adapter
from adapter_files import edit_adapter
from parity import assert_module_parity


class Shared(nn.Module):
    """``inner`` is one linear reachable as ``inner`` and as ``path.0``."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.path = nn.Sequential(self.inner, nn.Tanh())
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.path(torch.relu(self.inner(x))))


def shared_model(seed=0):
    torch.manual_seed(seed)
    return Shared().eval()


def trained(seed=1, **kwargs):
    model = shared_model()
    inject_lora(model, rank=2, alpha=4.0, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    return model


@pytest.fixture
def saved(tmp_path):
    save_adapter(trained(), tmp_path)
    return tmp_path


def assert_untouched(model):
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    fresh = shared_model()
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("null", "null"), ('"LORA"', "string"), ("4", "number")])
def test_a_config_that_is_not_a_json_object_names_the_file(saved, text, kind):
    edit_adapter(saved, config_text=text)
    model = shared_model()
    with pytest.raises(ValueError, match=rf"adapter_config.json holds a JSON {kind}, not an object"):
        load_adapter(model, saved)
    assert_untouched(model)


@pytest.mark.parametrize("changes, message", [
    ({"rank_pattern": {"inn(er": 3}}, r"adapter_config.json: rank_pattern key 'inn\(er' is not a valid regular"),
    ({"rank_pattern": ["inner"]}, r"adapter_config.json: rank_pattern must be a dict"),
    ({"alpha_pattern": {"out": float("nan")}}, r"adapter_config.json: alpha_pattern\['out'\] = nan"),
    ({"rank_pattern": {"inner": 0}}, r"adapter_config.json: rank_pattern\['inner'\] = 0; a rank must be"),
    ({"lora_alpha": float("inf")}, r"adapter_config.json: lora_alpha must be a finite number"),  # the file's names
    ({"lora_alpha": "8"}, r"adapter_config.json: lora_alpha must be a finite number, got '8'"),
    ({"r": 0}, r"adapter_config.json: r must be an integer >= 1"),
    ({"lora_dropout": 1.5}, r"adapter_config.json: lora_dropout must be in \[0, 1\)"),
    ({"target_modules": "inner|("}, r"adapter_config.json: target_modules 'inner\|\(' is not a valid regular"),
    ({"exclude_modules": 3}, r"adapter_config.json: exclude_modules must be null, a regex string, a list"),
    ({"modules_to_save": "out"}, r"adapter_config.json: modules_to_save must be a list"),
])
def test_bad_config_values_name_the_file_and_change_nothing(saved, changes, message):
    edit_adapter(saved, **changes)
    model = shared_model()
    with pytest.raises(ValueError, match=message):
        load_adapter(model, saved)
    assert_untouched(model)


def test_an_alpha_pattern_with_nan_is_refused_before_any_module_is_replaced(saved):
    # A NaN for the second module in file order: the first one must not be replaced either.
    edit_adapter(saved, alpha_pattern={"^out": float("nan")})
    assert "NaN" in (saved / "adapter_config.json").read_text()
    model = shared_model()
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        load_adapter(model, saved)
    assert_untouched(model)


def test_targets_without_weights_warn_as_in_peft(saved):
    model = shared_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete adapter loads quietly
        load_adapter(model, saved)
    edit_adapter(saved, drop_keys=("base_model.model.out.lora_A.weight", "base_model.model.out.lora_B.weight"))
    with pytest.warns(UserWarning, match=r"no LoRA weights for 1 modules that its target_modules=\['inner', 'out'\] "
                                         r"selects, e\.g\. \['out'\]"):
        load_adapter(shared_model(), saved)


def test_loading_replaces_a_linear_shared_under_two_names_at_both(saved):
    model = shared_model()
    load_adapter(model, saved)
    assert isinstance(model.inner, LoRALinear) and model.path[0] is model.inner
    x = torch.randn(5, 8)
    assert_module_parity("loaded into a shared linear", model, trained(), x)


def test_two_names_of_one_module_with_different_weights_are_refused(saved):
    tensors = {"base_model.model.path.0.lora_A.weight": torch.randn(2, 8),
               "base_model.model.path.0.lora_B.weight": torch.randn(8, 2)}
    from safetensors.torch import load_file, save_file

    save_file({**load_file(saved / "adapter_model.safetensors"), **tensors}, saved / "adapter_model.safetensors")
    model = shared_model()
    with pytest.raises(ValueError, match=r"gives 'path.0' and 'inner', two names of one shared module"):
        load_adapter(model, saved)
    assert_untouched(model)


def test_inject_twice_and_an_exclude_covering_everything_say_so():
    model = trained()
    with pytest.raises(ValueError, match=r"already has 2 LoRA layers .* was inject_lora called before"):
        inject_lora(model, rank=2)
    plain = shared_model()
    with pytest.raises(ValueError, match=r"exclude_modules=\['inner', 'out'\] excludes every one of the 2 linear"):
        inject_lora(plain, exclude_modules=["inner", "out"])
    assert_untouched(plain)
    with pytest.raises(ValueError, match="has no nn.Linear layers"):
        inject_lora(nn.Sequential(nn.ReLU()))


def test_a_save_removes_temp_files_left_by_a_killed_save(tmp_path):
    tmp_path.joinpath(".adapter_model.safetensors.k1ll3d.tmp").write_bytes(b"half a file")
    tmp_path.joinpath(".adapter_config.json.k1ll3d.tmp").write_text("{")
    tmp_path.joinpath(".notes.tmp").write_text("not ours")
    save_adapter(trained(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
