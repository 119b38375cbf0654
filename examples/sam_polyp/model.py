"""SAM models for box-prompted segmentation: registry builds, the tiny CPU configuration,
checkpoint loading, and the mode -> trainable-parameters set-up."""

from __future__ import annotations

import sys
from contextlib import nullcontext
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from lora_fused import InjectionReport, inject_lora, mark_trainable, parameter_report

MODEL_TYPES = ("tiny", "vit_b", "vit_l", "vit_h")
MODES = ("vanilla", "lora", "lora-attn", "decoder", "full")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# LoRA targets for ``lora-attn``: the attention input and output projections of every encoder block.
ATTENTION_TARGETS = r"image_encoder\.blocks\.\d+\.attn\.(qkv|proj)"


@dataclass(frozen=True)
class TinySamConfig:
    """A SAM small enough to train on two CPU cores in minutes; same classes, same wiring."""

    img_size: int = 64  # 8x8 tokens: learns box prompts within a few hundred CPU steps
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    window_size: int = 4
    global_attn_indexes: tuple[int, ...] = (1, 3)
    prompt_dim: int = 64
    decoder_depth: int = 2
    decoder_mlp_dim: int = 256
    decoder_heads: int = 4


def build_tiny_sam(config: TinySamConfig = TinySamConfig()) -> Sam:
    grid = config.img_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=4,
            out_chans=config.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=config.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=config.prompt_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


class CheckpointError(ValueError):
    """A ``--checkpoint`` file is missing, unreadable, or does not fit the model."""


def load_sam_weights(sam: nn.Module, path: str | Path, model_type: str) -> None:
    """Load a SAM state dict (the official ``sam_vit_*.pth`` files, or one saved by this
    example) into ``sam``, with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated downloads, HTML error pages saved as .pth, ...
        raise CheckpointError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--checkpoint {path}: expected a state dict of tensors, got {type(state).__name__}")
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if mismatched:
            k = mismatched[0]
            details.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} "
                           f"vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"--checkpoint {path} does not fit --model {model_type}: " + "; ".join(details))
    sam.load_state_dict(state)


def warn_random_weights(model_type: str) -> None:
    fix = ("use --pretrained-tiny (the demo's cached scene pretraining) or --checkpoint" if model_type == "tiny"
           else f"pass --checkpoint sam_{model_type}_*.pth (Meta's release) for real runs")
    message = f"SAM {model_type} has RANDOM weights (no checkpoint given): results say nothing about SAM; {fix}."
    bar = "!" * min(len(message), 100)
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(message, stacklevel=2)


def build_sam(model_type: str, checkpoint: str | Path | None = None, init_seed: int = 0) -> Sam:
    """Build ``tiny`` or a registry SAM; load ``checkpoint`` when given, else warn that the
    weights are random (seeded by ``init_seed`` so that resuming rebuilds the same base)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model must be one of {MODEL_TYPES}, got {model_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        sam = build_tiny_sam() if model_type == "tiny" else sam_model_registry[model_type](checkpoint=None)
    if checkpoint is not None:
        load_sam_weights(sam, checkpoint, model_type)
    else:
        warn_random_weights(model_type)
    return sam.float()


class BoxPromptSam(nn.Module):
    """SAM as ``(images, boxes) -> (low-res mask logits [B,1,h,w], predicted IoU [B,1])``,
    one box per image. ``images`` are normalised and padded (see ``preprocess``), boxes are
    XYXY in the padded input frame. This is the module DDP wraps."""

    def __init__(self, sam: Sam, train_prompt_encoder: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.train_prompt_encoder = train_prompt_encoder  # only the tiny model's pretraining does

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.sam.image_encoder(images)
        prompt_encoder = self.sam.prompt_encoder
        with nullcontext() if self.train_prompt_encoder else torch.no_grad():  # frozen in every mode
            sparse, dense = prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype), masks=None)
            image_pe = prompt_encoder.get_dense_pe()
        logits, iou = [], []
        # MaskDecoder repeats its image embedding once per prompt, so it takes one image at a time.
        for i in range(images.shape[0]):
            mask_logits, iou_pred = self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=False,
            )
            logits.append(mask_logits)
            iou.append(iou_pred)
        return torch.cat(logits), torch.cat(iou)


def _image_encoder_linear(name: str, module: nn.Module) -> bool:
    return name.startswith("image_encoder.") and isinstance(module, nn.Linear)


def configure_mode(sam: Sam, mode: str, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0,
                   train_decoder: bool = False, backend: str = "auto") -> InjectionReport:
    """Freeze/unfreeze ``sam`` for ``mode`` (injecting LoRA for the lora modes) and return the
    parameter report. The prompt encoder is frozen in every mode."""
    if mode not in MODES:
        raise ValueError(f"--modes entries must be among {MODES}, got {mode!r}")
    if mode in ("lora", "lora-attn"):
        targets = _image_encoder_linear if mode == "lora" else ATTENTION_TARGETS
        report = inject_lora(sam, rank=rank, alpha=alpha, dropout=dropout, target_modules=targets, backend=backend)
        if train_decoder:
            mark_trainable(sam, "mask_decoder")
        return parameter_report(sam, report.replaced)
    sam.requires_grad_(False)
    if mode == "decoder":
        mark_trainable(sam, "mask_decoder")
    elif mode == "full":
        sam.image_encoder.requires_grad_(True)
        sam.mask_decoder.requires_grad_(True)
    return parameter_report(sam)


def is_lora_parameter(name: str) -> bool:
    return ".adapters." in name or ".lora_A" in name or ".lora_B" in name
