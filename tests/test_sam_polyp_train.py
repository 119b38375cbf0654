"""Training of the SAM polyp example: loss falls and beats vanilla, exact resume, atomic
checkpoints, and a 2-process torchrun run that matches one process."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from examples.sam_polyp import checkpoint as ckpt
from examples.sam_polyp.distributed import DistContext
from examples.sam_polyp.evaluate import evaluate
from examples.sam_polyp.losses import LossWeights
from examples.sam_polyp.model import BoxPromptSam, TinySamConfig, build_tiny_sam, configure_mode
from examples.sam_polyp.preprocess import PromptedSegmentation
from examples.sam_polyp.synthetic import make_polyp_splits
from examples.sam_polyp.train import TrainConfig, param_groups, read_log, train

REPO = Path(__file__).resolve().parents[1]
SMALL = TinySamConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2)
SIGNATURE = {"test": "sam_polyp"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def splits():
    raw = make_polyp_splits(64, 48, 8, 16, 0)
    return {k: PromptedSegmentation(v, SMALL.img_size) for k, v in raw.items()}


def _model(mode, seed=0, train_decoder=False):
    torch.manual_seed(123)
    sam = build_tiny_sam(SMALL)
    torch.manual_seed(seed)
    configure_mode(sam, mode, train_decoder=train_decoder)
    return BoxPromptSam(sam)


def _trained_state(model):
    return {n: p.detach().clone() for n, p in model.sam.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_short_training_lowers_loss_and_beats_vanilla(splits, tmp_path):
    ctx = DistContext()
    vanilla = evaluate(_model("vanilla"), splits["test"], ctx)
    model = _model("lora", train_decoder=True)  # from random weights: box prompts take ~100 steps to click
    cfg = TrainConfig(steps=200, batch_size=8, lr=3e-3, warmup_steps=10, log_every=5)
    summary = train(model, splits["train"], None, cfg, tmp_path, ctx, SIGNATURE, decoder_trains=True)
    rows = read_log(tmp_path / "train_log.csv")
    early = sum(r["loss"] for r in rows[:3]) / 3
    late = sum(r["loss"] for r in rows[-3:]) / 3
    assert late < 0.8 * early, (early, late)
    trained = evaluate(model, splits["test"], ctx)
    assert trained["dice"] > vanilla["dice"] + 0.1, (vanilla["dice"], trained["dice"])
    assert summary["finished"] and (tmp_path / "checkpoints" / "latest").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode,train_decoder", [("lora", True), ("full", False)])
def test_resume_continues_exactly(splits, tmp_path, mode, train_decoder):
    ctx = DistContext()
    cfg = TrainConfig(steps=6, batch_size=4, accum_steps=2, lr=2e-3, warmup_steps=2, save_every=2, log_every=1,
                      loss=LossWeights())
    straight = _model(mode, train_decoder=train_decoder)
    train(straight, splits["train"], None, cfg, tmp_path / "straight", ctx, SIGNATURE, decoder_trains=True)

    first = _model(mode, train_decoder=train_decoder)
    part = train(first, splits["train"], None, replace(cfg, stop_after=3), tmp_path / "resumed", ctx, SIGNATURE,
                 decoder_trains=True)
    assert part["stopped_at"] == 3 and not part["finished"]
    torch.manual_seed(999)  # a fresh process: different global RNG, rebuilt model
    again = _model(mode, seed=7, train_decoder=train_decoder)
    rest = train(again, splits["train"], None, cfg, tmp_path / "resumed", ctx, SIGNATURE, resume=True,
                 decoder_trains=True)
    assert rest["start_step"] == 3 and rest["finished"]

    a, b = _trained_state(straight), _trained_state(again)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight_log = [r["loss"] for r in read_log(tmp_path / "straight" / "train_log.csv")]
    resumed_log = [r["loss"] for r in read_log(tmp_path / "resumed" / "train_log.csv")]
    assert straight_log == resumed_log  # the log is continued, not duplicated
    saved = ckpt.latest_checkpoint(tmp_path / "resumed")
    if mode == "lora":  # only what was trained: the adapter (PEFT files) and the decoder
        assert (saved / "adapter" / "adapter_model.safetensors").is_file()
        from safetensors.torch import load_file

        assert all(k.startswith("mask_decoder.") for k in load_file(str(saved / ckpt.WEIGHTS_FILE)))


def test_resume_refuses_a_different_setup(splits, tmp_path):
    ctx = DistContext()
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=1)
    train(_model("decoder"), splits["train"], None, cfg, tmp_path, ctx, {"lr": 1})
    with pytest.raises(ckpt.ResumeError, match="lr: checkpoint 1 vs now 2"):
        train(_model("decoder"), splits["train"], None, cfg, tmp_path, ctx, {"lr": 2}, resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = _model("lora", train_decoder=True)
    sam = model.sam
    first = ckpt.save_checkpoint(tmp_path, 1, sam, {"signature": SIGNATURE})
    before = {n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in sam.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, sam, {"signature": SIGNATURE})
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # no half-written step, no temp
    assert ckpt.latest_checkpoint(tmp_path) == first
    fresh = _model("lora", train_decoder=True)
    ckpt.load_model_weights(first, fresh.sam)
    for name, value in before.items():
        assert torch.equal(dict(fresh.sam.named_parameters())[name], value), name
    # and a later successful save replaces it, keeping only the newest ``keep_last``
    ckpt.save_checkpoint(tmp_path, 2, sam, {"signature": SIGNATURE}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]


def _cli(args, out, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "examples.sam_polyp"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "examples.sam_polyp"]
    proc = subprocess.run(launcher + ["train", "--out", str(out), "--threads", "1"] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--modes", "vanilla", "lora", "--train-decoder", "--steps", "3", "--batch-size", "4", "--num-train", "8",
            "--num-val", "4", "--num-test", "6", "--image-size", "64", "--eval-every", "3", "--save-every", "0",
            "--num-overlays", "1", "--lr", "1e-3"]
    one, _ = _cli(args, tmp_path / "one")
    two, stdout = _cli(args, tmp_path / "two", nproc=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert stdout.count("[seed 0] vanilla:") == 2  # printed by rank 0 only (parameter line + metrics)
    for run_one, run_two in zip(one["runs"], two["runs"]):
        assert run_one["mode"] == run_two["mode"]
        for test, metrics in run_one["tests"].items():
            other = run_two["tests"][test]
            assert other["images"] == metrics["images"] == 6  # every image once, none duplicated
            tolerance = 1e-9 if run_one["mode"] == "vanilla" else 2e-3  # trained: same batches, float sums differ
            assert other["dice"] == pytest.approx(metrics["dice"], abs=tolerance)
            assert other["iou"] == pytest.approx(metrics["iou"], abs=tolerance)
    for name in ("results.md", "training_curves.png"):
        assert (tmp_path / "two" / name).is_file()


def test_param_groups_scale_the_lr_by_prefix_and_skip_decay_on_vectors():
    sam = build_tiny_sam(SMALL)
    sam.requires_grad_(True)
    named = list(sam.named_parameters())
    cfg = TrainConfig(lr=1e-3, weight_decay=0.01, lr_scales={"image_encoder.": 0.1})
    groups = param_groups(named, cfg)
    assert sum(len(g["params"]) for g in groups) == len(named)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in named:
        assert lr_of[id(param)] == pytest.approx(1e-4 if name.startswith("image_encoder.") else 1e-3), name
        assert decay_of[id(param)] == (0.01 if param.dim() >= 2 else 0.0), name


def test_best_checkpoint_and_early_stopping_are_the_same_after_an_interruption(splits, tmp_path):
    ctx = DistContext()
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, save_every=2,
                      early_stop_patience=2, log_every=1)
    straight = train(_model("lora", train_decoder=True), splits["train"], splits["val"], cfg, tmp_path / "a", ctx,
                     SIGNATURE, decoder_trains=True)
    train(_model("lora", train_decoder=True), splits["train"], splits["val"], replace(cfg, stop_after=3),
          tmp_path / "b", ctx, SIGNATURE, decoder_trains=True)
    resumed = train(_model("lora", train_decoder=True, seed=5), splits["train"], splits["val"], cfg, tmp_path / "b",
                    ctx, SIGNATURE, resume=True, decoder_trains=True)
    for key in ("best_step", "best_val_dice", "stopped_at", "early_stopped", "finished"):
        assert straight[key] == resumed[key], key
    best_a, best_b = ckpt.best_checkpoint(tmp_path / "a"), ckpt.best_checkpoint(tmp_path / "b")
    assert best_a[1] == best_b[1] == {"step": straight["best_step"], "val_dice": straight["best_val_dice"]}
    from safetensors.torch import load_file

    a, b = load_file(str(best_a[0] / ckpt.WEIGHTS_FILE)), load_file(str(best_b[0] / ckpt.WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_when_validation_stops_improving_and_stays_stopped(splits, tmp_path):
    ctx = DistContext()
    # an LR too small to move validation Dice: the first evaluation stays the best
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-12, warmup_steps=1, eval_every=2, early_stop_patience=2)
    summary = train(_model("decoder"), splits["train"], splits["val"], cfg, tmp_path, ctx, SIGNATURE)
    assert summary["early_stopped"] and summary["finished"] and summary["stopped_at"] == 6
    assert summary["best_step"] == 2 and ckpt.best_checkpoint(tmp_path)[1]["step"] == 2
    again = train(_model("decoder"), splits["train"], splits["val"], cfg, tmp_path, ctx, SIGNATURE, resume=True)
    assert again["start_step"] == again["stopped_at"] == 6 and again["early_stopped"] and again["finished"]


def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    sam = _model("lora", train_decoder=True).sam
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000004-abc" / "adapter").mkdir(parents=True)  # a save killed mid-write
    (root / ".latest.x1y2.tmp").write_text("step_000004\n")
    ckpt.save_checkpoint(tmp_path, 6, sam, {"signature": SIGNATURE})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000006"]


def test_a_fresh_start_does_not_inherit_an_earlier_runs_checkpoints(splits, tmp_path, capsys):
    ctx = DistContext()
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=1)
    train(_model("decoder"), splits["train"], splits["val"], cfg, tmp_path, ctx, SIGNATURE)
    assert ckpt.best_checkpoint(tmp_path) is not None
    capsys.readouterr()
    summary = train(_model("decoder"), splits["train"], None, replace(cfg, steps=1), tmp_path, ctx, SIGNATURE)
    assert "removing the checkpoints of an earlier run" in capsys.readouterr().out
    assert summary["best_step"] is None and ckpt.best_checkpoint(tmp_path) is None  # not the old run's best
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
