"""The reliability probes of issue 13: bad flags, resumes under changed settings, damaged
checkpoints, divergence, odd data, train/test overlap. Each failed once as a new user met it."""

import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.sam_polyp import checkpoint as ckpt
from examples.sam_polyp.cli import build_parser, main, train_config
from examples.sam_polyp.data import DataValidationError, check_input_sizes, load_image_mask_folders, open_polyp_data, read_image
from examples.sam_polyp.distributed import DistContext
from examples.sam_polyp.experiment import ExperimentConfig, load_data, run_signature
from examples.sam_polyp.model import BoxPromptSam, TinySamConfig, build_tiny_sam, configure_mode
from examples.sam_polyp.overlap import DataOverlapError, check_no_overlap
from examples.sam_polyp.preprocess import PromptedSegmentation
from examples.sam_polyp.synthetic import make_polyp_splits
from examples.sam_polyp.train import NonFiniteLossError, TrainConfig, train

SMALL = TinySamConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2)
TINY_RUN = ["--num-train", "8", "--num-val", "4", "--num-test", "4", "--image-size", "64", "--batch-size", "4",
            "--steps", "2", "--eval-every", "2", "--save-every", "0", "--num-overlays", "0", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def splits():
    raw = make_polyp_splits(64, 16, 4, 4, 0)
    return {k: PromptedSegmentation(v, SMALL.img_size) for k, v in raw.items()}


def _model(mode="lora", seed=0):
    torch.manual_seed(123)
    sam = build_tiny_sam(SMALL)
    torch.manual_seed(seed)
    configure_mode(sam, mode, train_decoder=True)
    return BoxPromptSam(sam)


# -- flags are checked when parsed ---------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-4"], "--batch-size"),
    (["--accum-steps", "0"], "--accum-steps"), (["--threads", "-1"], "--threads"),
    (["--eval-batch-size", "0"], "--eval-batch-size"), (["--steps", "-5"], "--steps"),
    (["--boundary-width", "-3"], "--boundary-width"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"), (["--lora-dropout", "1"], "--lora-dropout"),
    (["--rank", "0"], "--rank"), (["--batch-size", "6", "--accum-steps", "4"], "multiple of --accum-steps"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"] + flags)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


# -- the run signature ---------------------------------------------------------------------------
def _signature(*flags):
    return run_signature(train_config(build_parser().parse_args(["train", *flags])), "lora", 0, None)


@pytest.mark.parametrize("flags", [
    ["--num-train", "100"], ["--image-size", "96"], ["--num-val", "8"], ["--num-test", "8"], ["--clip-grad", "0.5"],
    ["--val-fraction", "0.2"], ["--lr", "0.5"], ["--rank", "16"], ["--eval-every", "10"], ["--input-size", "512"],
    ["--early-stop-patience", "2"], ["--preprocess", "medsam"], ["--test-data", "x"], ["--weight-decay", "0"],
    ["--boundary-gain", "2"], ["--data-seed", "3"], ["--box-jitter", "0.1"],
])
def test_every_setting_that_changes_a_result_is_in_the_signature(flags):
    assert _signature(*flags) != _signature()


@pytest.mark.parametrize("flags", [["--out", "elsewhere"], ["--num-workers", "4"], ["--eval-batch-size", "2"],
                                   ["--backend", "torch"], ["--grad-checkpointing"], ["--save-every", "7"],
                                   ["--num-overlays", "1"], ["--seeds", "0", "1"]])
def test_settings_that_do_not_change_a_result_are_not(flags):
    assert _signature(*flags) == _signature()


def test_a_finished_run_is_not_reused_under_new_settings(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--modes", "lora"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *TINY_RUN, *out]) == 0
        capsys.readouterr()
        assert main(["train", *TINY_RUN, *out, "--resume", "--lr", "0.5", "--rank", "16"]) == 2
        err = capsys.readouterr().err
        assert "metrics.json was written by a different run set-up" in err and "rank: checkpoint 4 vs now 16" in err
        assert main(["train", *TINY_RUN, *out, "--resume"]) == 0  # the same settings: reused
        assert "finished earlier, reusing" in capsys.readouterr().out


# -- damaged checkpoints ---------------------------------------------------------------------------
def _interrupted_run(splits, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=2e-3, warmup_steps=1, save_every=2, keep_checkpoints=3)
    train(_model(), splits["train"], None, TrainConfig(**{**cfg.__dict__, "stop_after": 4}), tmp_path,
          DistContext(), {"s": 1})
    return cfg


def test_a_checkpoint_without_its_adapter_resumes_from_the_newest_complete_step(splits, tmp_path, capsys):
    cfg = _interrupted_run(splits, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000004" / "adapter")
    summary = train(_model(), splits["train"], None, cfg, tmp_path, DistContext(), {"s": 1}, resume=True)
    assert summary["start_step"] == 2 and summary["finished"]
    assert "step_000004 lacks adapter; resuming from the newest complete checkpoint" in capsys.readouterr().out


def test_a_deleted_latest_pointer_resumes_from_the_newest_complete_step(splits, tmp_path, capsys):
    cfg = _interrupted_run(splits, tmp_path)
    (tmp_path / "checkpoints" / "latest").unlink()
    summary = train(_model(), splits["train"], None, cfg, tmp_path, DistContext(), {"s": 1}, resume=True)
    assert summary["start_step"] == 4
    assert "latest is missing; resuming from the newest complete checkpoint" in capsys.readouterr().out


def test_no_complete_checkpoint_left_is_refused_not_restarted(splits, tmp_path):
    cfg = _interrupted_run(splits, tmp_path)
    for step in tmp_path.glob("checkpoints/step_*"):
        shutil.rmtree(step / "adapter")
    with pytest.raises(ckpt.ResumeError, match="no complete checkpoint is left"):
        train(_model(), splits["train"], None, cfg, tmp_path, DistContext(), {"s": 1}, resume=True)


def test_loading_weights_refuses_a_checkpoint_missing_a_trained_part(splits, tmp_path):
    _interrupted_run(splits, tmp_path)
    directory = tmp_path / "checkpoints" / "step_000004"
    (directory / ckpt.WEIGHTS_FILE).unlink()
    with pytest.raises(ckpt.ResumeError, match="lacks trained_weights.safetensors"):
        ckpt.load_model_weights(directory, _model().sam)


# -- divergence ------------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(splits, tmp_path):
    cfg = TrainConfig(steps=40, batch_size=4, lr=1e6, warmup_steps=1, save_every=1, clip_grad=0)
    with pytest.raises(NonFiniteLossError, match="training diverged at step .*lower --lr") as exc:
        train(_model("decoder"), splits["train"], None, cfg, tmp_path, DistContext(), {"s": 1})
    kept = ckpt.latest_checkpoint_or_none(tmp_path)  # step 1: its update was still finite
    assert kept is not None and str(kept) in str(exc.value)
    fresh = _model("decoder")
    ckpt.load_model_weights(kept, fresh.sam)
    assert all(torch.isfinite(p).all() for p in fresh.sam.parameters())


def test_the_cli_exits_non_zero_on_divergence(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *TINY_RUN, "--steps", "30", "--modes", "decoder", "--lr", "1e6", "--clip-grad", "0",
                     "--out", str(tmp_path)])
    assert code == 2 and "training diverged" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# -- data ------------------------------------------------------------------------------------------
def _write_pairs(root: Path, count: int, rng, masks=True, offset=0):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"f{i + offset}.png")
        if masks:
            mask = np.zeros((24, 32), np.uint8)
            mask[5:15, 8:20] = 255
            Image.fromarray(mask).save(root / "masks" / f"f{i + offset}.png")


def test_an_empty_masks_folder_names_the_missing_masks(tmp_path):
    _write_pairs(tmp_path / "kvasir", 3, np.random.default_rng(0), masks=False)
    with pytest.raises(DataValidationError, match=r"f0.png has no mask named f0\.\*"):
        open_polyp_data(tmp_path / "kvasir")


def test_a_2000x8_image_is_refused_before_training_naming_the_file(tmp_path):
    Image.fromarray(np.zeros((8, 2000, 3), np.uint8)).save(tmp_path / "thin.png")
    Image.fromarray(np.zeros((8, 2000), np.uint8)).save(tmp_path / "thin_mask.png")
    (tmp_path / "i").mkdir(), (tmp_path / "m").mkdir()
    shutil.move(tmp_path / "thin.png", tmp_path / "i" / "thin.png")
    shutil.move(tmp_path / "thin_mask.png", tmp_path / "m" / "thin.png")
    dataset = load_image_mask_folders(tmp_path / "i", tmp_path / "m")
    with pytest.raises(DataValidationError, match=r"thin.png .*2000x8 image .* too thin"):
        check_input_sizes({"test": dataset}, 64)
    check_input_sizes({"test": dataset}, 1024)  # 1024 px keeps 4 rows: fine


def test_ten_bit_values_in_a_16_bit_png_scale_by_their_bit_depth(tmp_path, caplog):
    values = np.array([[0, 512, 1023]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "ten_bit.png")
    with caplog.at_level(logging.WARNING):
        image = read_image(tmp_path / "ten_bit.png")
    assert image[0, :, 0].tolist() == [0, 128, 255]  # not 0, 2, 4 (divided by 257)
    assert "values up to 1023 read as 10-bit" in caplog.text
    full = np.array([[0, 65535]], dtype=np.uint16).repeat(2, 0)
    Image.fromarray(full).save(tmp_path / "sixteen.png")
    assert read_image(tmp_path / "sixteen.png")[0, :, 0].tolist() == [0, 255]


def test_a_test_image_that_is_also_a_training_image_is_refused_naming_both(tmp_path):
    rng = np.random.default_rng(0)
    _write_pairs(tmp_path / "train_set", 12, rng)
    _write_pairs(tmp_path / "other", 3, rng, offset=100)
    copied = read_image(tmp_path / "train_set" / "images" / "f4.png")  # re-encoded: JPEG-free, lossless BMP
    Image.fromarray(copied).save(tmp_path / "other" / "images" / "renamed.bmp")
    shutil.copy(tmp_path / "train_set" / "masks" / "f4.png", tmp_path / "other" / "masks" / "renamed.png")
    cfg = ExperimentConfig(data=str(tmp_path / "train_set"), test_data=[str(tmp_path / "other")])
    with pytest.raises(DataOverlapError, match=r"(?s)1 test image\(s\).*renamed.bmp .*== .*f4.png"):
        load_data(cfg, DistContext())
    (tmp_path / "other" / "images" / "renamed.bmp").unlink()
    (tmp_path / "other" / "masks" / "renamed.png").unlink()
    load_data(cfg, DistContext())  # disjoint: accepted


def test_the_checks_before_training_decode_each_image_once(tmp_path, monkeypatch):
    """Validation, the input-size check and the overlap check share one decode per image file."""
    from examples.sam_polyp import data

    rng = np.random.default_rng(2)
    _write_pairs(tmp_path / "train_set", 12, rng)
    _write_pairs(tmp_path / "other", 3, rng, offset=100)
    decoded, open_decoded = [], data._open_decoded
    monkeypatch.setattr(data, "_open_decoded", lambda path, what: decoded.append((what, path.name)) or
                        open_decoded(path, what))
    load_data(ExperimentConfig(data=str(tmp_path / "train_set"), test_data=[str(tmp_path / "other")]), DistContext())
    names = [f"f{i}.png" for i in range(12)] + ["f100.png", "f101.png", "f102.png"]
    assert sorted(decoded) == sorted((what, name) for what in ("image", "mask") for name in names)

    image = tmp_path / "other" / "images" / "f100.png"  # a file changed on disk is decoded again
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(1, 1))
    decoded.clear()
    assert data.image_facts(image).hw == (24, 32) and decoded == [("image", "f100.png")]


def test_overlap_check_compares_pixels_not_names(tmp_path):
    rng = np.random.default_rng(1)
    _write_pairs(tmp_path / "a", 2, rng)
    _write_pairs(tmp_path / "b", 2, rng)  # same names, other pixels
    a = load_image_mask_folders(tmp_path / "a" / "images", tmp_path / "a" / "masks")
    b = load_image_mask_folders(tmp_path / "b" / "images", tmp_path / "b" / "masks")
    check_no_overlap({"train": a}, {"test": b})
    with pytest.raises(DataOverlapError):
        check_no_overlap({"train": a}, {"test": a})


# -- the other preprocessing and model sizes run end to end ---------------------------------------
def test_medsam_preprocessing_and_no_validation_set_run_end_to_end(tmp_path, capsys):
    import json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *TINY_RUN, "--modes", "lora", "--preprocess", "medsam", "--num-val", "0",
                     "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["eval_step"] == 2 and run["eval_val_dice"] is None  # no validation: the last step
    assert json.loads((tmp_path / "runs" / "seed0" / "lora" / "run.json").read_text())["preprocess"] == "medsam"


@pytest.mark.slow
def test_vit_b_at_a_small_input_size_trains_and_evaluates(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *TINY_RUN, "--model", "vit_b", "--input-size", "64", "--modes", "lora", "--steps", "1",
                     "--batch-size", "2", "--num-train", "2", "--num-val", "0", "--num-test", "2", "--rank", "2",
                     "--grad-checkpointing", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert "| lora | " in (tmp_path / "results.md").read_text()
