"""SAM models for box-prompted segmentation: registry builds, the tiny CPU configuration,
checkpoint loading, and the mode -> trainable-parameters set-up."""

from __future__ import annotations

import sys
import types
from contextlib import nullcontext
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from lora_fused import InjectionReport, inject_lora, mark_trainable, parameter_report

MODEL_TYPES = ("tiny", "vit_b", "vit_l", "vit_h")
# The registry models' encoders (embed dim, depth, heads, global-attention blocks), as
# segment_anything.build_sam builds them at 1024 px; ``--input-size`` rebuilds them at another size.
REGISTRY_ENCODERS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
SAM_INPUT_SIZE = 1024
SAM_PATCH_SIZE = 16
MODES = ("vanilla", "lora", "lora-attn", "lora-all", "decoder", "full")
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


def model_input_size(model_type: str, input_size: int | None = None) -> int:
    """The encoder input side in px: the tiny SAM's own, else ``input_size`` (default 1024)."""
    return TinySamConfig.img_size if model_type == "tiny" else (input_size or SAM_INPUT_SIZE)


def build_registry_sam(model_type: str, input_size: int = SAM_INPUT_SIZE) -> Sam:
    """A ``vit_b/l/h`` SAM with random weights whose encoder takes ``input_size`` px: the
    registry's own builder at 1024, the same classes and settings with a smaller position
    grid otherwise (SAMed trains ViT-B at 512 this way)."""
    if input_size == SAM_INPUT_SIZE:
        return sam_model_registry[model_type](checkpoint=None)
    if input_size % SAM_PATCH_SIZE or input_size < 4 * SAM_PATCH_SIZE:
        raise ValueError(f"--input-size must be a multiple of {SAM_PATCH_SIZE} and >= {4 * SAM_PATCH_SIZE}, "
                         f"got {input_size}")
    embed_dim, depth, heads, global_blocks = REGISTRY_ENCODERS[model_type]
    grid, prompt_dim = input_size // SAM_PATCH_SIZE, 256
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=input_size, patch_size=SAM_PATCH_SIZE, embed_dim=embed_dim, depth=depth, num_heads=heads,
            mlp_ratio=4, out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=14, global_attn_indexes=global_blocks,
        ),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(input_size, input_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def _is_position_tensor(key: str) -> bool:
    return key == "image_encoder.pos_embed" or key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w"))


def resize_position_tensor(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A checkpoint's absolute position embedding ``[1, g, g, C]`` (bicubic) or relative
    position table ``[2g - 1, C]`` (linear) interpolated to another grid, as SAMed adapts
    SAM's 1024 px weights to 512 px."""
    if key == "image_encoder.pos_embed":
        grid = value.permute(0, 3, 1, 2).float()
        resized = F.interpolate(grid, size=tuple(shape[1:3]), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).to(value.dtype)
    table = value.float().t()[None]  # [1, C, L]
    return F.interpolate(table, size=shape[0], mode="linear", align_corners=False)[0].t().to(value.dtype)


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
    resized = [k for k in own.keys() & state.keys() if _is_position_tensor(k) and own[k].shape != state[k].shape
               and own[k].dim() == state[k].dim() and own[k].shape[-1] == state[k].shape[-1]]
    if resized:
        print(f"note: {path}: {len(resized)} position tensors interpolated from the checkpoint's grid to the "
              f"model's {sam.image_encoder.img_size} px input (e.g. image_encoder.pos_embed "
              f"{tuple(state.get('image_encoder.pos_embed', own[resized[0]]).shape)} -> "
              f"{tuple(own.get('image_encoder.pos_embed', own[resized[0]]).shape)})", file=sys.stderr, flush=True)
        state = {**state, **{k: resize_position_tensor(k, state[k], own[k].shape) for k in resized}}
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


def build_sam(model_type: str, checkpoint: str | Path | None = None, init_seed: int = 0,
              input_size: int | None = None) -> Sam:
    """Build ``tiny`` or a registry SAM (at ``input_size`` px, default 1024; position
    embeddings of a 1024 px checkpoint are interpolated); load ``checkpoint`` when given, else
    warn that the weights are random (seeded by ``init_seed`` so that resuming rebuilds the
    same base)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model must be one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == "tiny" and input_size not in (None, TinySamConfig.img_size):
        raise ValueError(f"--input-size is for the registry models; the tiny SAM takes {TinySamConfig.img_size} px")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        sam = build_tiny_sam() if model_type == "tiny" else build_registry_sam(model_type, input_size or SAM_INPUT_SIZE)
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


def enable_gradient_checkpointing(sam: Sam) -> int:
    """Recompute each image-encoder block in backward instead of keeping its activations.

    The blocks keep their names (the forward is wrapped per instance, not the module), so
    checkpoints and LoRA targets are unchanged. ``torch.utils.checkpoint`` restores the RNG
    state for the recomputation, so LoRA dropout (seeded from torch's CPU generator) draws
    the same mask twice: outputs and gradients equal the run without checkpointing."""
    blocks = list(sam.image_encoder.blocks)
    for block in blocks:
        # A bound method of the block itself, so copy.deepcopy re-binds it to the copy's weights.
        block.forward = types.MethodType(_checkpointed_block_forward, block)
    return len(blocks)


def _checkpointed_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plain = partial(type(block).forward, block)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(plain, x, use_reentrant=False)
    return plain(x)


def _image_encoder_linear(name: str, module: nn.Module) -> bool:
    return name.startswith("image_encoder.") and isinstance(module, nn.Linear)


def _encoder_or_decoder_linear(name: str, module: nn.Module) -> bool:
    """``lora-all``: every linear of the image encoder and of the mask decoder (its two-way
    transformer, output hypernetworks and IoU head); the prompt encoder has none."""
    return name.startswith(("image_encoder.", "mask_decoder.")) and isinstance(module, nn.Linear)


LORA_TARGETS = {"lora": _image_encoder_linear, "lora-attn": ATTENTION_TARGETS, "lora-all": _encoder_or_decoder_linear}


def configure_mode(sam: Sam, mode: str, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0,
                   train_decoder: bool = False, backend: str = "auto") -> InjectionReport:
    """Freeze/unfreeze ``sam`` for ``mode`` (injecting LoRA for the lora modes) and return the
    parameter report. The prompt encoder is frozen in every mode."""
    if mode not in MODES:
        raise ValueError(f"--modes entries must be among {MODES}, got {mode!r}")
    if mode in LORA_TARGETS:
        report = inject_lora(sam, rank=rank, alpha=alpha, dropout=dropout, target_modules=LORA_TARGETS[mode],
                             backend=backend)
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
