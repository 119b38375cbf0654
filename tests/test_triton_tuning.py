"""Tuned-config files (kernels/tuning.py): dump, seed, names, and clear errors. Runs on CPU."""

from __future__ import annotations

import json

import pytest
import triton

from lora_fused.kernels import tuning


@pytest.fixture
def clean_caches():
    tuners = tuning.autotuned_kernels()
    saved = {name: dict(t.cache) for name, t in tuners.items()}
    for t in tuners.values():
        t.cache.clear()
    yield tuners
    for name, t in tuners.items():
        t.cache.clear()
        t.cache.update(saved[name])


def test_dump_then_seed_round_trip(tmp_path, clean_caches):
    tuners = clean_caches
    key = (768, 2304, 16, 4096, False, "torch.bfloat16", "torch.bfloat16")
    chosen = tuners["forward"].configs[-1]  # seeding accepts only configs of the kernel's own list
    tuners["forward"].cache[key] = chosen
    path = tmp_path / "tuned" / "gpu.json"
    assert tuning.dump_tuned_configs(path, gpu_name="NVIDIA H200") == 1
    document = json.loads(path.read_text())
    assert document["gpu"] == "NVIDIA H200" and document["format"] == tuning.FORMAT_VERSION
    assert not list(path.parent.glob(".*.tmp")), "the atomic write left its temporary file"

    tuners["forward"].cache.clear()
    assert tuning.seed_from_file(path) == 1
    seeded = tuners["forward"].cache[key]
    assert (seeded.kwargs, seeded.num_warps, seeded.num_stages) == (chosen.kwargs, chosen.num_warps, chosen.num_stages)
    assert tuning.seed_from_file(path) == 0, "a key already in the cache is kept"


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot be read as JSON"),
    ('{"format": 99, "entries": []}', "expected format"),
])
def test_bad_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        tuning.seed_from_file(path)


def _one_entry_file(tmp_path, kernel, config, triton_version=triton.__version__):
    path = tmp_path / "entries.json"
    path.write_text(json.dumps({"format": tuning.FORMAT_VERSION, "triton": triton_version, "entries": [
        {"kernel": kernel, "key": [1, 2, 3], "config": config}]}))
    return path


def test_entries_this_version_cannot_use_are_skipped_with_a_warning(tmp_path, clean_caches):
    tuners = clean_caches
    real = tuning._config_to_json(tuners["forward"].configs[0])
    foreign = {**real, "kwargs": {**real["kwargs"], "BLOCK_K": 7}}  # not in the config list: would skip pruning
    for kernel, config, match in (("nope", real, "unknown kernel 'nope'"), ("forward", foreign, "not one of")):
        with pytest.warns(UserWarning, match=match):
            assert tuning.seed_from_file(_one_entry_file(tmp_path, kernel, config)) == 0
    with pytest.warns(UserWarning, match="written under triton 0.0"):
        assert tuning.seed_from_file(_one_entry_file(tmp_path, "forward", real, triton_version="0.0")) == 0
    assert tuning.seed_from_file(_one_entry_file(tmp_path, "forward", real)) == 1
    assert (1, 2, 3) in tuners["forward"].cache


def test_no_dump_when_autotuning_is_off(tmp_path, monkeypatch, clean_caches):
    clean_caches["forward"].cache[(1, 2, 3)] = clean_caches["forward"].configs[0]
    monkeypatch.setenv(tuning.TUNED_OUT_ENV_VAR, str(tmp_path / "out.json"))
    monkeypatch.setenv("LORA_FUSED_TRITON_AUTOTUNE", "0")
    assert tuning.dump_at_exit() == 0 and not (tmp_path / "out.json").exists()


def test_gpu_names_normalise_to_file_names():
    assert tuning.normalised_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.shipped_file("NVIDIA H200").name == "nvidia-h200.json"
    assert tuning.shipped_file("NVIDIA H200").parent == tuning.TUNED_DIR


def test_every_autotuned_kernel_is_listed():
    from lora_fused.kernels import backward, forward, projection
    from triton.runtime.autotuner import Autotuner

    listed = {id(t) for t in tuning.autotuned_kernels().values()}
    for module in (forward, backward, projection):
        for value in vars(module).values():
            while hasattr(value, "fn") and not isinstance(value, Autotuner):
                value = value.fn
            if isinstance(value, Autotuner):
                assert id(value) in listed, f"{value.base_fn.__name__} is autotuned but not in autotuned_kernels()"


def test_exit_hook_merges_into_the_file_named_by_the_environment(tmp_path, monkeypatch, clean_caches):
    tuners = clean_caches
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuning.TUNED_OUT_ENV_VAR, str(path))
    assert tuning.dump_at_exit() == 0 and not path.exists(), "nothing tuned: nothing written"
    first = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=2)
    tuners["backward"].cache[(64, 16)] = first
    assert tuning.dump_at_exit() == 1
    tuners["backward"].cache.clear()
    tuners["projection"].cache[(32, 16)] = triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)
    assert tuning.dump_at_exit() == 2, "a second process adds its entries to the first one's"
    kernels = sorted(e["kernel"] for e in json.loads(path.read_text())["entries"])
    assert kernels == ["backward", "projection"]
