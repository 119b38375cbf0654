"""Scene pretraining for the tiny SAM: the CPU stand-in for SAM's natural-image training.

All parts train (prompt encoder included) on generic synthetic shapes with box prompts, so
the model learns "segment the object in the box" without ever seeing a polyp. The weights
are cached by a hash of every setting and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_path
from .distributed import DistContext, barrier
from .losses import LossWeights
from .model import BoxPromptSam, TinySamConfig, build_tiny_sam
from .preprocess import PromptedSegmentation
from .train import TrainConfig, train

CACHE_ENV = "SAM_POLYP_CACHE"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PretrainConfig:
    num_scenes: int = 480
    num_val: int = 48
    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    # The encoder learns 10x slower than the prompt encoder and decoder (SAM fine-tuned its
    # MAE encoder with layer-wise LR decay for the same reason): at the full LR the tiny encoder
    # collapsed to a content-blind positional map (its output varied ~50x less across images
    # than across positions) and the decoder learnt only a box-shaped prior, leaving nothing
    # for encoder LoRA to adapt.
    encoder_lr_scale: float = 0.1
    # Loose boxes (each side moves up to 20% of the box size) make the box alone a poor
    # guide to the mask, so the model has to look at the image inside it.
    box_jitter: float = 0.2
    seed: int = 0
    tiny: TinySamConfig = field(default_factory=TinySamConfig)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, REPO_ROOT / ".cache" / "sam_polyp"))


def cache_path(config: PretrainConfig, directory: Path | None = None) -> Path:
    key = hashlib.sha256(json.dumps({"v": 1, **asdict(config)}, sort_keys=True, default=str).encode()).hexdigest()
    return (directory or cache_dir()) / f"tiny_sam_scenes_{key[:12]}.pt"


def pretrained_tiny_checkpoint(config: PretrainConfig = PretrainConfig(), ctx: DistContext | None = None,
                               directory: Path | None = None, log=print) -> Path:
    """Path of the cached scene-pretrained tiny SAM, pretraining it first if it is missing
    (on rank 0 only; other ranks wait)."""
    ctx = ctx or DistContext()
    path = cache_path(config, directory)
    if not path.exists() and ctx.is_main:
        log(f"pretraining the tiny SAM on synthetic scenes ({config.steps} steps, cached as {path}) ...")
        _pretrain(config, path, DistContext(device=ctx.device), log)
    barrier(ctx)
    if not path.exists():
        raise FileNotFoundError(f"the pretrained tiny SAM {path} is missing after pretraining")
    return path


def _pretrain(config: PretrainConfig, path: Path, ctx: DistContext, log) -> None:
    from .synthetic import SyntheticScenesDataset

    size = config.tiny.img_size
    scenes = PromptedSegmentation(SyntheticScenesDataset(config.num_scenes, size, config.seed), size)
    val = PromptedSegmentation(SyntheticScenesDataset(config.num_val, size, config.seed + 1), size)
    torch.manual_seed(config.seed)
    sam = build_tiny_sam(config.tiny)
    sam.requires_grad_(True)
    model = BoxPromptSam(sam, train_prompt_encoder=True).to(ctx.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=path.parent))
    settings = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=30,
                           seed=config.seed, eval_every=max(1, config.steps // 4), box_jitter=config.box_jitter,
                           lr_scales={"image_encoder.": config.encoder_lr_scale}, loss=LossWeights())
    try:
        summary = train(model, scenes, val, settings, run_dir, ctx, {"pretrain": asdict(config)},
                        decoder_trains=True, desc="pretrain")
        shutil.copyfile(run_dir / "train_log.csv", path.with_suffix(".log.csv"))
        with atomic_path(path) as tmp:
            torch.save(sam.state_dict(), tmp)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    log(f"pretraining done in {summary['seconds']:.0f}s: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
