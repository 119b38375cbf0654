"""Command line: ``python -m examples.sam_polyp {demo,train,pretrain}``."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .distributed import init_distributed, shutdown
from .experiment import ExperimentConfig, check_resume_target, run_experiment
from .losses import LossWeights
from .model import MODEL_TYPES, MODES, CheckpointError
from .pretrain import PretrainConfig, pretrained_tiny_checkpoint
from .train import TrainConfig

# The demo: tiny SAM pretrained on scenes, then vanilla vs encoder-only LoRA (rank 4, alpha 1,
# every image-encoder linear; prompt encoder and mask decoder frozen) on synthetic polyps, on CPU.
# LoRA's update is scaled by alpha/rank = 0.25, hence an LR above full fine-tuning's.
DEMO_STEPS = 150
DEMO_LR = 1e-2


def _add_common(p: argparse.ArgumentParser, demo: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default="outputs/sam_polyp_demo" if demo else "outputs/sam_polyp",
                   help="output directory (results.json, results.md, plots, overlays, runs/)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2] if demo else [0], help="one run per seed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # The tiny model's matrices are too small for intra-op threads to pay off, and on a shared
    # machine extra threads spin against other processes: the demo runs on one.
    g.add_argument("--threads", type=int, default=1 if demo else None,
                   help="torch CPU threads (demo: 1; train: torch's default)")
    g.add_argument("--resume", action="store_true", help="continue the runs in --out from their latest checkpoints")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"), help="lora_fused kernel backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.sam_polyp",
                                     description="SAM polyp segmentation with fused LoRA (lora_fused).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded default: tiny SAM, synthetic polyps, CPU, a few minutes")
    _add_common(demo, demo=True)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help="LoRA training steps per seed")

    pre = sub.add_parser("pretrain", help="print the path of the cached scene-pretrained tiny SAM, pretraining it first if missing")
    pre.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pre.add_argument("--threads", type=int, default=None)

    t = sub.add_parser("train", help="the full CLI: any model, mode, data; train and evaluate")
    _add_common(t, demo=False)
    g = t.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_TYPES, default="tiny")
    g.add_argument("--checkpoint", default=None, help="SAM weights (e.g. sam_vit_b_01ec64.pth)")
    g.add_argument("--pretrained-tiny", action="store_true",
                   help="with --model tiny: start from the cached scene pretraining (built on first use)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=["vanilla", "lora"])
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--alpha", type=float, default=1.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--train-decoder", action="store_true", help="lora modes: also train the mask decoder")
    g = t.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' or a folder: the benchmark split, Kvasir-SEG, or images/ + masks/")
    g.add_argument("--test-data", nargs="*", default=[], help="extra folders evaluated as test sets")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.1, help="part of --data's training set held out")
    g.add_argument("--image-size", type=int, default=128, help="synthetic data: image side in pixels")
    g.add_argument("--num-train", type=int, default=240)
    g.add_argument("--num-val", type=int, default=32)
    g.add_argument("--num-test", type=int, default=64)
    g = t.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks, all accumulation steps)")
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    g.add_argument("--box-jitter", type=float, default=0.05)
    g.add_argument("--dice-weight", type=float, default=LossWeights.dice)
    g.add_argument("--focal-weight", type=float, default=LossWeights.focal)
    g.add_argument("--boundary-weight", type=float, default=LossWeights.boundary)
    g.add_argument("--iou-weight", type=float, default=LossWeights.iou)
    g.add_argument("--boundary-width", type=int, default=LossWeights.boundary_width)
    g.add_argument("--boundary-gain", type=float, default=LossWeights.boundary_gain)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--save-every", type=int, default=100)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--num-overlays", type=int, default=4)
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step with a checkpoint, as if interrupted (for --resume)")
    return parser


def demo_config(args) -> ExperimentConfig:
    return ExperimentConfig(
        # decoder: a context row (the mask decoder alone, ~27% of this tiny model; frozen in lora).
        model="tiny", pretrained_tiny=True, modes=["vanilla", "lora", "decoder"], seeds=args.seeds, backend=args.backend,
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
        resume=args.resume, num_overlays=args.num_overlays,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
                          weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, clip_grad=args.clip_grad,
                          amp=args.amp, box_jitter=args.box_jitter, eval_every=args.eval_every,
                          save_every=args.save_every, num_workers=args.num_workers,
                          eval_batch_size=args.eval_batch_size, stop_after=args.stop_after, loss=loss))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        if os.environ.get("SAM_POLYP_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(f"total time {time.time() - started:.0f}s", flush=True)
    return 0
