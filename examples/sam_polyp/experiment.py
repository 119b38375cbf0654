"""One experiment = data + every (seed, mode) run + the combined report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .checkpoint import ResumeError, check_signature
from .distributed import DistContext, barrier
from .evaluate import evaluate
from .export import RUN_FILE, run_description
from .model import BoxPromptSam, build_sam, configure_mode, enable_gradient_checkpointing, model_input_size
from .preprocess import PromptedSegmentation
from .pretrain import PretrainConfig, pretrained_tiny_checkpoint
from .report import markdown_table, plot_curves, summarise, write_json
from .train import TrainConfig, plain_config, read_log, resolve_amp, train


@dataclass
class ExperimentConfig:
    model: str = "tiny"
    checkpoint: str | None = None
    pretrained_tiny: bool = False
    modes: list[str] = field(default_factory=lambda: ["vanilla", "lora"])
    seeds: list[int] = field(default_factory=lambda: [0])
    rank: int = 4
    alpha: float = 1.0
    lora_dropout: float = 0.0
    train_decoder: bool = False
    backend: str = "auto"
    data: str = "synthetic"
    test_data: list[str] = field(default_factory=list)
    data_seed: int = 0
    val_fraction: float = 0.1
    synthetic_image_size: int = 128
    synthetic_train: int = 240
    synthetic_val: int = 32
    synthetic_test: int = 64
    out: str = "outputs/sam_polyp"
    resume: bool = False
    num_overlays: int = 4
    input_size: int | None = None  # registry models: encoder input in px (None: 1024)
    preprocess: str = "sam"  # sam | medsam (see preprocess.py)
    grad_checkpointing: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def say(ctx: DistContext, *args) -> None:
    if ctx.is_main:
        print(*args, flush=True)


# -- data ----------------------------------------------------------------------------------
def load_data(cfg: ExperimentConfig, ctx: DistContext):
    """``(train, val, {test_name: test})`` as raw sample datasets, validated before training."""
    if cfg.data == "synthetic":
        from .synthetic import make_polyp_splits

        splits = make_polyp_splits(cfg.synthetic_image_size, cfg.synthetic_train, cfg.synthetic_val,
                                   cfg.synthetic_test, cfg.data_seed)
        tests = {"synthetic": splits["test"], "synthetic-shifted": splits["test_shifted"]}
        extra = _extra_tests(cfg)
        _check_folder_data(cfg, None, None, extra)  # generated splits come from disjoint seeds
        # --num-val 0: no validation (the last step is evaluated), not an empty set scoring 0
        return splits["train"], splits["val"] if len(splits["val"]) else None, {**tests, **extra}
    from .data import PolypFolderDataset, check_dataset, open_polyp_data

    train_set, tests = open_polyp_data(cfg.data, seed=cfg.data_seed)
    val_set = None
    if isinstance(train_set, PolypFolderDataset) and cfg.val_fraction > 0 and len(train_set) >= 10:
        train_set, val_set = train_set.holdout(cfg.val_fraction, cfg.data_seed)
    # Box prompts need a polyp: empty masks leave training (reported), but stay in evaluation.
    train_set = check_dataset(train_set, drop_empty_masks=True, name=f"--data {cfg.data} (train)")
    if val_set is not None:
        val_set = check_dataset(val_set, name=f"--data {cfg.data} (validation)")
    tests = {name: check_dataset(ds, name=name) for name, ds in tests.items()}
    tests = {**tests, **_extra_tests(cfg)}
    _check_folder_data(cfg, train_set, val_set, tests)
    return train_set, val_set, tests


def _check_folder_data(cfg: ExperimentConfig, train_set, val_set, tests: dict) -> None:
    """Before any training: every image fits the model input, and no test image is also a
    training or validation image (compared by the hash of its decoded pixels)."""
    from .data import check_input_sizes
    from .overlap import check_no_overlap

    learned = {f"--data {cfg.data} (train)": train_set, f"--data {cfg.data} (validation)": val_set}
    learned = {name: ds for name, ds in learned.items() if ds is not None}
    check_input_sizes({**learned, **tests}, model_input_size(cfg.model, cfg.input_size), cfg.preprocess)
    check_no_overlap(learned, tests)


def _extra_tests(cfg: ExperimentConfig) -> dict:
    from .data import check_dataset, open_polyp_data

    extra = {}
    for path in cfg.test_data:
        whole, tests = open_polyp_data(path, holdout_fraction=0)
        found = tests or {Path(path).name: whole}
        for name, ds in found.items():
            extra[name if name not in extra else f"{Path(path).name}/{name}"] = check_dataset(ds, name=f"--test-data {path}")
    return extra


# -- model ---------------------------------------------------------------------------------
def base_checkpoint(cfg: ExperimentConfig, ctx: DistContext) -> str | None:
    if cfg.pretrained_tiny:
        if cfg.model != "tiny" or cfg.checkpoint:
            raise ValueError("--pretrained-tiny goes with --model tiny and no --checkpoint")
        return str(pretrained_tiny_checkpoint(cfg.pretrain, ctx, log=lambda *a: say(ctx, *a)))
    return cfg.checkpoint


# Settings that cannot change a run's result; every other setting is part of its signature, so
# a setting added later is guarded by default. (The backend and gradient checkpointing compute
# the same thing; the pretraining config is covered by the base checkpoint's hashed name.)
NOT_IN_SIGNATURE = {"out", "resume", "num_overlays", "backend", "grad_checkpointing", "seeds", "modes", "checkpoint",
                    "pretrained_tiny", "pretrain", "train"}
TRAIN_NOT_IN_SIGNATURE = {"seed", "save_every", "keep_checkpoints", "log_every", "num_workers", "eval_batch_size",
                          "stop_after"}


def run_signature(cfg: ExperimentConfig, mode: str, seed: int, base: str | None) -> dict:
    """Everything that determines one (seed, mode) run's result: ``--resume`` refuses a
    checkpoint or a finished run whose signature differs."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_SIGNATURE}
    settings.update({f"train.{k}": v for k, v in asdict(cfg.train).items() if k not in TRAIN_NOT_IN_SIGNATURE})
    settings.update(base=base, mode=mode, seed=seed)
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
            for k, v in plain_config(settings).items()}


def param_line(report) -> str:
    return (f"trainable params: {report.trainable_params:,} || all params: {report.total_params:,} || "
            f"trainable%: {report.trainable_percent:.4f}")


def run_one(cfg: ExperimentConfig, ctx: DistContext, mode: str, seed: int, base: str | None, data,
            vanilla_cache: dict) -> dict:
    train_raw, val_raw, tests_raw = data
    run_dir = Path(cfg.out) / "runs" / f"seed{seed}" / mode
    done_file = run_dir / "metrics.json"
    signature = run_signature(cfg, mode, seed, base)
    if cfg.resume and done_file.exists():
        finished = json.loads(done_file.read_text())
        check_signature(finished.get("signature", {}), signature, done_file)
        say(ctx, f"[seed {seed}] {mode}: finished earlier, reusing {done_file}")
        return finished
    torch.manual_seed(seed)  # LoRA A matrices and anything else initialised below
    sam = build_sam(cfg.model, base, init_seed=seed, input_size=cfg.input_size)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(sam)
    # the IoU head learns the achieved IoU wherever the decoder trains (lora-all: through its adapters)
    decoder_trains = mode in ("decoder", "full", "lora-all") or (mode.startswith("lora") and cfg.train_decoder)
    report = configure_mode(sam, mode, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.train_decoder, cfg.backend)
    if ctx.is_main:
        write_json(run_dir / RUN_FILE, run_description(cfg, model_input_size(cfg.model, cfg.input_size), mode, seed,
                                                      base, signature))
    label = mode + ("+decoder" if mode.startswith("lora") and cfg.train_decoder else "")
    say(ctx, f"[seed {seed}] {label}: {report if mode.startswith('lora') else param_line(report)}")
    model = BoxPromptSam(sam).to(ctx.device)
    img_size = model.img_size
    result = {"mode": label, "seed": seed, "trainable_params": report.trainable_params,
              "total_params": report.total_params, "trainable_percent": report.trainable_percent, "tests": {},
              "signature": signature, "eval_step": None}

    def prompted(ds):
        return PromptedSegmentation(ds, img_size, preprocess=cfg.preprocess)

    if mode != "vanilla":
        summary = train(model, prompted(train_raw), prompted(val_raw) if val_raw is not None else None,
                        replace(cfg.train, seed=seed), run_dir, ctx, signature, resume=cfg.resume,
                        decoder_trains=decoder_trains, desc=f"{label} seed {seed}")
        result["train"] = summary
        if not summary["finished"]:
            say(ctx, f"[seed {seed}] {label}: stopped after step {summary['stopped_at']} (--stop-after); "
                     f"continue with --resume")
            return result
        if summary["first_loss"] is None:  # --resume from the final checkpoint: nothing left to train
            say(ctx, f"[seed {seed}] {label}: training had finished at step {summary['stopped_at']}; evaluating")
        else:
            say(ctx, f"[seed {seed}] {label}: trained {summary['stopped_at'] - summary['start_step']} steps in "
                     f"{summary['seconds']:.0f}s, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
                     + (" (early stop: validation Dice stopped improving)" if summary["early_stopped"] else ""))
        result["eval_step"], result["eval_val_dice"] = summary["stopped_at"], None
        best = ckpt.best_checkpoint(run_dir)
        if best is not None:  # evaluate the weights with the best validation Dice, not the last ones
            ckpt.load_model_weights(best[0], sam)
            result["eval_step"], result["eval_val_dice"] = best[1]["step"], best[1]["val_dice"]
            say(ctx, f"[seed {seed}] {label}: evaluating the best validation checkpoint, step {best[1]['step']} "
                     f"(val Dice {best[1]['val_dice']:.3f}; last step {summary['stopped_at']})")
    vanilla_key = (cfg.model, base) if base is not None else None  # random init depends on the seed
    if mode == "vanilla" and vanilla_key in vanilla_cache:
        result["tests"] = vanilla_cache[vanilla_key]
    else:
        amp_dtype = resolve_amp(cfg.train.amp, ctx.device)
        for name, ds in tests_raw.items():
            overlays = Path(cfg.out) / "overlays" / label / name if seed == cfg.seeds[0] else None
            metrics = evaluate(model, prompted(ds), ctx, cfg.train.eval_batch_size, amp_dtype,
                               desc=f"eval {name}", overlay_dir=overlays, num_overlays=cfg.num_overlays)
            result["tests"][name] = metrics
        if mode == "vanilla" and vanilla_key is not None:
            vanilla_cache[vanilla_key] = result["tests"]
    say(ctx, f"[seed {seed}] {label}: " + ", ".join(f"{n} Dice {m['dice']:.3f} IoU {m['iou']:.3f}"
                                                    for n, m in result["tests"].items()))
    if ctx.is_main:
        write_json(done_file, result)
    return result


def run_experiment(cfg: ExperimentConfig, ctx: DistContext) -> dict:
    started = time.time()
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg, ctx)
    say(ctx, f"data: train {len(data[0])}, val {len(data[1]) if data[1] is not None else 0}, tests "
             + ", ".join(f"{n} {len(d)}" for n, d in data[2].items()))
    base = base_checkpoint(cfg, ctx)
    runs, vanilla_cache = [], {}
    for seed in cfg.seeds:
        for mode in cfg.modes:
            runs.append(run_one(cfg, ctx, mode, seed, base, data, vanilla_cache))
    barrier(ctx)
    if any(run.get("train", {}).get("finished") is False for run in runs):
        return {"runs": runs, "stopped": True}
    test_names = list(data[2])
    rows = summarise(runs, test_names)
    table = markdown_table(rows, test_names)
    results = {"config": plain_config(asdict(cfg)), "base_checkpoint": base, "runs": runs, "summary": rows,
               "seconds": time.time() - started, "world_size": ctx.world_size, "device": str(ctx.device)}
    if ctx.is_main:
        write_json(out / "results.json", results)
        (out / "results.md").write_text(table)
        curves = {f"{r['mode']} seed {r['seed']}": read_log(out / "runs" / f"seed{r['seed']}" / _mode_dir(r) /
                                                            "train_log.csv") for r in runs if "train" in r}
        if curves:
            plot_curves(curves, out / "training_curves.png")
        print("\n" + table, flush=True)
        print(f"outputs in {out}/: results.json, results.md"
              + (", training_curves.png" if curves else "") + ", overlays/, runs/", flush=True)
    return results


def _mode_dir(run: dict) -> str:
    return run["mode"].replace("+decoder", "")


def check_resume_target(cfg: ExperimentConfig) -> None:
    if cfg.resume and not (Path(cfg.out) / "runs").is_dir():
        raise ResumeError(f"--resume: {cfg.out}/runs does not exist; nothing to resume (check --out)")



