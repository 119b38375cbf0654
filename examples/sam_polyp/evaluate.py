"""Evaluation: per-image Dice/IoU at the original mask size, sharded over ranks and reduced."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .distributed import DistContext, all_gather_objects, all_reduce_sum
from .metrics import MetricTotals, dice_iou
from .preprocess import PromptedSegmentation, collate, logits_to_original, prompt_boxes


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def show_progress(ctx: DistContext) -> bool:
    import sys

    return ctx.is_main and sys.stderr.isatty()


@torch.no_grad()
def predict_masks(model, batch: dict, img_size: int, device: torch.device, amp_dtype=None) -> list[torch.Tensor]:
    """Binary predictions (probability > 0.5) at each image's original size, exact box prompts."""
    boxes = prompt_boxes(batch, img_size).to(device)
    with autocast_context(device, amp_dtype):
        logits, _ = model(batch["image"].to(device), boxes)
    return [logits_to_original(logits[i], batch["input_hw"][i], batch["original_hw"][i], img_size).cpu() > 0
            for i in range(len(logits))]


@torch.no_grad()
def evaluate(model, dataset: PromptedSegmentation, ctx: DistContext, batch_size: int = 8, amp_dtype=None,
             desc: str = "eval", overlay_dir: Path | None = None, num_overlays: int = 0) -> dict:
    """Dice/IoU over ``dataset``; each rank takes every ``world_size``-th image (no padding
    duplicates), sums are all-reduced, so the result equals the single-process one."""
    was_training = model.training
    model.eval()
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    totals = MetricTotals()
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for chunk in tqdm(batches, desc=desc, disable=not show_progress(ctx), leave=False):
        items = [dataset[i] for i in chunk]
        batch = collate(items)
        preds = predict_masks(model, batch, dataset.img_size, ctx.device, amp_dtype)
        for item, pred in zip(items, preds):
            dice, iou = dice_iou(pred, item["mask"])
            totals.add(item["name"], dice, iou)
            if overlay_dir is not None and item["index"] < num_overlays:
                from .report import save_overlay

                image = dataset.base[item["index"]]["image"]
                save_overlay(overlay_dir / f"{item['index']:03d}_{_safe(item['name'])}.png", image,
                             item["mask"].numpy(), pred.numpy(), f"{item['name']}  Dice {dice:.3f}  IoU {iou:.3f}")
    reduced = MetricTotals.from_tensor(all_reduce_sum(ctx, totals.as_tensor()))
    per_image = [row for part in all_gather_objects(ctx, totals.per_image) for row in part]
    reduced.per_image = sorted(per_image, key=lambda row: row["name"])
    model.train(was_training)
    return {**reduced.summary(), "per_image": reduced.per_image}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
