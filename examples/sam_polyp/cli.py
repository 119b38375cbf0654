"""Command line: ``python -m examples.sam_polyp {demo,train,pretrain,export,predict}``.

Every number is checked when the arguments are parsed (``--batch-size 0`` is a usage error,
not a traceback after training)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from .distributed import init_distributed, shutdown
from .experiment import ExperimentConfig, check_resume_target, run_experiment
from .losses import LossWeights
from .model import MODEL_TYPES, MODES, SAM_PATCH_SIZE, CheckpointError
from .preprocess import PREPROCESS_MODES
from .pretrain import PretrainConfig, pretrained_tiny_checkpoint
from .train import TrainConfig

# The demo: tiny SAM pretrained on scenes, then vanilla vs encoder-only LoRA (rank 4, alpha 1,
# every image-encoder linear; prompt encoder and mask decoder frozen) on synthetic polyps, on CPU.
# LoRA's update is scaled by alpha/rank = 0.25, hence an LR above full fine-tuning's.
DEMO_STEPS = 150
DEMO_LR = 1e-2


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int/float) within [low, high] (open where asked), finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (lo, hi) if x)}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0, low_open=True)
non_negative_float = _number(float, 0)
fraction = _number(float, 0, 1, high_open=True)


def _add_common(p: argparse.ArgumentParser, demo: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default="outputs/sam_polyp_demo" if demo else "outputs/sam_polyp",
                   help="output directory (results.json, results.md, plots, overlays, runs/)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2] if demo else [0], help="one run per seed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # The tiny model's matrices are too small for intra-op threads to pay off, and on a shared
    # machine extra threads spin against other processes: the demo runs on one.
    g.add_argument("--threads", type=positive_int, default=1 if demo else None,
                   help="torch CPU threads (demo: 1; train: torch's default)")
    g.add_argument("--resume", action="store_true", help="continue the runs in --out from their latest checkpoints")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"), help="lora_fused kernel backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.sam_polyp",
                                     description="SAM polyp segmentation with fused LoRA (lora_fused).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded default: tiny SAM, synthetic polyps, CPU, a few minutes")
    _add_common(demo, demo=True)
    demo.add_argument("--steps", type=positive_int, default=DEMO_STEPS, help="LoRA training steps per seed")

    pre = sub.add_parser("pretrain", help="print the path of the cached scene-pretrained tiny SAM, pretraining it first if missing")
    pre.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pre.add_argument("--threads", type=positive_int, default=None)

    exp = sub.add_parser("export", help="one plain SAM state dict from a run: adapters merged, trained decoder "
                                        "included (merged on the CPU, where the state dict is written from)")
    exp.add_argument("--run", required=True, help="a run folder, e.g. outputs/sam_polyp_demo/runs/seed0/lora")
    exp.add_argument("--out", required=True, help="the .pth file to write (plus FILE.json describing it)")
    exp.add_argument("--threads", type=positive_int, default=None)

    pred = sub.add_parser("predict", help="segment a folder of images with box prompts; Dice/IoU when masks are given")
    source = pred.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder (its best-validation weights, adapters merged)")
    source.add_argument("--checkpoint", help="a SAM state dict, e.g. one written by export (reads FILE.json)")
    pred.add_argument("--model", choices=MODEL_TYPES, default=None, help="with --checkpoint and no FILE.json")
    pred.add_argument("--input-size", type=positive_int, default=None, help="encoder input px (default: FILE.json or 1024)")
    pred.add_argument("--preprocess", choices=PREPROCESS_MODES, default=None, help="default: the run's / FILE.json's, else sam")
    pred.add_argument("--images", required=True, help="folder of images")
    boxes = pred.add_mutually_exclusive_group(required=True)
    boxes.add_argument("--boxes", help="CSV: file name, x0, y0, x1, y1 (pixels; one row per image)")
    boxes.add_argument("--boxes-from-masks", metavar="DIR", help="masks folder: tight box around each mask; scores Dice/IoU")
    pred.add_argument("--masks", default=None, help="with --boxes: masks folder to score Dice/IoU against")
    pred.add_argument("--out", required=True, help="output folder: masks/, overlays/, predictions.csv, metrics.json")
    pred.add_argument("--batch-size", type=positive_int, default=4)
    pred.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pred.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    pred.add_argument("--threads", type=positive_int, default=None)

    t = sub.add_parser("train", help="the full CLI: any model, mode, data; train and evaluate")
    _add_common(t, demo=False)
    g = t.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_TYPES, default="tiny")
    g.add_argument("--checkpoint", default=None, help="SAM weights (e.g. sam_vit_b_01ec64.pth)")
    g.add_argument("--pretrained-tiny", action="store_true",
                   help="with --model tiny: start from the cached scene pretraining (built on first use)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=["vanilla", "lora"])
    g.add_argument("--rank", type=positive_int, default=4)
    g.add_argument("--alpha", type=positive_float, default=1.0)
    g.add_argument("--lora-dropout", type=fraction, default=0.0)
    g.add_argument("--train-decoder", action="store_true", help="lora modes: also train the mask decoder")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="vit_b/l/h: encoder input in px, a multiple of 16 (default 1024; e.g. 512 to train on a CPU); "
                        "position embeddings are interpolated from the checkpoint")
    g.add_argument("--preprocess", choices=PREPROCESS_MODES, default="sam",
                   help="sam: longest side resized, SAM mean/std, padded; medsam: square resize, [0, 1] (MedSAM weights)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute encoder blocks in backward: less memory, same results, ~30%% more time")
    g = t.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' or a folder: the benchmark split, Kvasir-SEG, or images/ + masks/")
    g.add_argument("--test-data", nargs="*", default=[], help="extra folders evaluated as test sets")
    g.add_argument("--data-seed", type=non_negative_int, default=0)
    g.add_argument("--val-fraction", type=fraction, default=0.1, help="part of --data's training set held out")
    g.add_argument("--image-size", type=_number(int, 16), default=128, help="synthetic data: image side in pixels")
    g.add_argument("--num-train", type=positive_int, default=240)
    g.add_argument("--num-val", type=non_negative_int, default=32)
    g.add_argument("--num-test", type=positive_int, default=64)
    g = t.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=300, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=8, help="global batch (all ranks, all accumulation steps)")
    g.add_argument("--accum-steps", type=positive_int, default=1)
    g.add_argument("--lr", type=positive_float, default=1e-3)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    g.add_argument("--warmup-steps", type=non_negative_int, default=20)
    g.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="max gradient norm (0: no clipping)")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    g.add_argument("--box-jitter", type=_number(float, 0, 1), default=0.05)
    g.add_argument("--dice-weight", type=non_negative_float, default=LossWeights.dice)
    g.add_argument("--focal-weight", type=non_negative_float, default=LossWeights.focal)
    g.add_argument("--boundary-weight", type=non_negative_float, default=LossWeights.boundary)
    g.add_argument("--iou-weight", type=non_negative_float, default=LossWeights.iou)
    g.add_argument("--boundary-width", type=positive_int, default=LossWeights.boundary_width)
    g.add_argument("--boundary-gain", type=non_negative_float, default=LossWeights.boundary_gain)
    g.add_argument("--eval-every", type=non_negative_int, default=50,
                   help="validation Dice every N steps and at the end (0: at the end only); the best is evaluated")
    g.add_argument("--early-stop-patience", type=non_negative_int, default=0,
                   help="stop when validation Dice has not improved for N evaluations (0: never)")
    g.add_argument("--save-every", type=non_negative_int, default=100)
    g.add_argument("--num-workers", type=non_negative_int, default=0)
    g.add_argument("--eval-batch-size", type=positive_int, default=8)
    g.add_argument("--num-overlays", type=non_negative_int, default=4)
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop after this step with a checkpoint, as if interrupted (for --resume)")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Checks that involve several flags, still at parse time."""
    if args.command == "train":
        if args.batch_size % args.accum_steps:
            parser.error(f"--batch-size {args.batch_size} must be a multiple of --accum-steps {args.accum_steps}")
        if args.input_size is not None and (args.model == "tiny" or args.input_size % SAM_PATCH_SIZE
                                            or args.input_size < 4 * SAM_PATCH_SIZE):
            parser.error(f"--input-size is for --model vit_b/l/h, a multiple of {SAM_PATCH_SIZE} >= "
                         f"{4 * SAM_PATCH_SIZE}; got {args.input_size} with --model {args.model}")
    if args.command == "predict" and args.masks is not None and args.boxes is None:
        parser.error("--masks goes with --boxes (--boxes-from-masks scores against its own masks)")


def demo_config(args) -> ExperimentConfig:
    return ExperimentConfig(
        # lora: encoder LoRA (3.3% of the parameters); lora-all: LoRA on the mask decoder's linears too
        # (6.3%); decoder: the mask decoder alone (~27% of this tiny model). The README says what
        # the rows show: most of what separates encoder LoRA from decoder tuning lives in the decoder.
        model="tiny", pretrained_tiny=True, modes=["vanilla", "lora", "lora-all", "decoder"], seeds=args.seeds,
        backend=args.backend,
        train_decoder=False, out=args.out, resume=args.resume,
        train=TrainConfig(steps=args.steps, batch_size=8, lr=DEMO_LR, warmup_steps=15, eval_every=50,
                          save_every=0, log_every=5))


def train_config(args) -> ExperimentConfig:
    loss = LossWeights(dice=args.dice_weight, focal=args.focal_weight, boundary=args.boundary_weight,
                       iou=args.iou_weight, boundary_width=args.boundary_width, boundary_gain=args.boundary_gain)
    return ExperimentConfig(
        model=args.model, checkpoint=args.checkpoint, pretrained_tiny=args.pretrained_tiny, modes=args.modes,
        seeds=args.seeds, rank=args.rank, alpha=args.alpha, lora_dropout=args.lora_dropout,
        train_decoder=args.train_decoder, backend=args.backend, data=args.data, test_data=args.test_data,
        data_seed=args.data_seed, val_fraction=args.val_fraction, synthetic_image_size=args.image_size,
        synthetic_train=args.num_train, synthetic_val=args.num_val, synthetic_test=args.num_test, out=args.out,
        resume=args.resume, num_overlays=args.num_overlays, input_size=args.input_size, preprocess=args.preprocess,
        grad_checkpointing=args.grad_checkpointing,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                          weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, clip_grad=args.clip_grad,
                          amp=args.amp, box_jitter=args.box_jitter, eval_every=args.eval_every,
                          save_every=args.save_every, num_workers=args.num_workers,
                          eval_batch_size=args.eval_batch_size, stop_after=args.stop_after,
                          early_stop_patience=args.early_stop_patience, loss=loss))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command in ("export", "predict"):
        return _run_single_process(args)
    ctx = init_distributed(args.device)
    started = time.time()
    try:
        if args.command == "pretrain":
            print(pretrained_tiny_checkpoint(PretrainConfig(), ctx))
            return 0
        cfg = demo_config(args) if args.command == "demo" else train_config(args)
        if cfg.model != "tiny" and cfg.checkpoint is None and ctx.is_main:
            print(f"note: --model {cfg.model} without --checkpoint trains from random weights", file=sys.stderr)
        if cfg.resume:
            check_resume_target(cfg)
        run_experiment(cfg, ctx)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as exc:
        return _report_error(exc)
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(f"total time {time.time() - started:.0f}s", flush=True)
    return 0


def _report_error(exc: Exception) -> int:
    if os.environ.get("SAM_POLYP_TRACEBACK"):
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _run_single_process(args) -> int:
    """export and predict: one process, no torchrun."""
    from .export import export_run
    from .predict import run_predict
    from .train import resolve_amp

    try:
        if args.command == "export":
            export_run(args.run, args.out)
            return 0
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        run_predict(args, device, resolve_amp(args.amp, device))
        return 0
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as exc:
        return _report_error(exc)
