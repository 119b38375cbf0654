"""Segment new images with a trained model: ``python -m examples.sam_polyp predict``.

The model is a training run (``--run``, its best-validation weights, adapters merged) or an
exported / official SAM state dict (``--checkpoint``, with the sidecar JSON that ``export``
writes, or ``--model``/``--input-size``/``--preprocess``). Each image gets one box prompt,
from ``--boxes FILE.csv`` (``file name, x0, y0, x1, y1`` in pixels, one row per image, a
header row allowed) or from its ground-truth mask (``--boxes-from-masks DIR``, the tight box
around the mask, as in evaluation). Writes ``<out>/masks/<stem>.png`` (0/255, the image's
size), ``<out>/overlays/<stem>.png`` and ``<out>/predictions.csv``; with masks, per-image
and mean Dice/IoU as well.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_path
from .data import IMAGE_EXTENSIONS, DataValidationError, load_image_mask_folders, read_image, read_mask
from .evaluate import predict_masks
from .export import merged_sam, sidecar_path
from .metrics import MetricTotals, dice_iou
from .model import BoxPromptSam, build_sam, model_input_size
from .preprocess import box_from_mask, preprocess_image
from .report import overlay_image, write_json


class PredictError(ValueError):
    """Bad prediction inputs: images, boxes, masks or model settings."""


@dataclass
class Job:
    """One image to segment: its file, its XYXY box in pixels, its mask file (if known)."""

    image: Path
    box: np.ndarray | None
    mask: Path | None = None


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PredictError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise PredictError(f"--images {folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def read_boxes_csv(path: Path) -> dict[str, np.ndarray]:
    """``{file name or stem: box}`` from ``file, x0, y0, x1, y1`` rows; errors name the line."""
    if not path.is_file():
        raise PredictError(f"--boxes {path}: no such file")
    boxes: dict[str, np.ndarray] = {}
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) != 5:
                raise PredictError(f"--boxes {path}, line {line}: expected 5 columns (file, x0, y0, x1, y1), "
                                   f"got {len(cells)}")
            try:
                box = np.array([float(c) for c in cells[1:]], dtype=np.float32)
            except ValueError:
                if line == 1:  # a header row
                    continue
                raise PredictError(f"--boxes {path}, line {line}: coordinates must be numbers, got {cells[1:]}")
            if not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
                raise PredictError(f"--boxes {path}, line {line}: need finite x0 <= x1 and y0 <= y1, got {box.tolist()}")
            if cells[0] in boxes:
                raise PredictError(f"--boxes {path}, line {line}: a second box for {cells[0]} (one box per image)")
            boxes[cells[0]] = box
    if not boxes:
        raise PredictError(f"--boxes {path}: no box rows")
    return boxes


def jobs_from_csv(images: list[Path], boxes_csv: Path, masks_dir: Path | None) -> list[Job]:
    boxes = read_boxes_csv(boxes_csv)
    by_key = {key: img for img in images for key in (img.name, img.stem)}
    unknown = sorted(k for k in boxes if k not in by_key)
    if unknown:
        raise PredictError(f"--boxes {boxes_csv} names {len(unknown)} file(s) not in the image folder: {unknown[:5]}")
    found = {by_key[k]: box for k, box in boxes.items()}
    unboxed = [img.name for img in images if img not in found]
    if unboxed:
        raise PredictError(f"{len(unboxed)} image(s) have no box in {boxes_csv}: {unboxed[:5]} (one row each)")
    masks = _mask_files(images, masks_dir) if masks_dir is not None else {}
    return [Job(img, found[img], masks.get(img)) for img in images]


def _mask_files(images: list[Path], masks_dir: Path) -> dict[Path, Path]:
    paired = load_image_mask_folders(images[0].parent, masks_dir)
    problems = [p for p in paired.pairing_problems if p.kind != "missing_image"]  # extra masks are harmless
    if problems:
        raise DataValidationError(problems, str(masks_dir))
    return dict(paired.pairs)


def jobs_from_masks(images: list[Path], masks_dir: Path, log) -> list[Job]:
    jobs = []
    for image, mask_path in _mask_files(images, masks_dir).items():
        mask = read_mask(mask_path)
        if not mask.any():
            log(f"note: {mask_path} is empty: no box can be drawn, {image.name} is skipped")
            continue
        jobs.append(Job(image, box_from_mask(mask), mask_path))
    if not jobs:
        raise PredictError(f"--boxes-from-masks {masks_dir}: every mask is empty, no box to prompt with")
    return jobs


def load_model(run: str | None, checkpoint: str | None, model_type: str | None, input_size: int | None,
               preprocess: str | None, log) -> tuple[BoxPromptSam, str]:
    """``(model, preprocess)`` from a run folder or a SAM state dict (+ its sidecar)."""
    if run is not None:
        sam, info = merged_sam(run, log)
        return BoxPromptSam(sam), preprocess or info["preprocess"]
    meta_path = sidecar_path(checkpoint)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    model_type = model_type or meta.get("model")
    if model_type is None:
        raise PredictError(f"--checkpoint {checkpoint} has no sidecar {meta_path.name}: say which SAM it is with --model")
    input_size = input_size or meta.get("input_size")
    sam = build_sam(model_type, checkpoint, input_size=model_input_size(model_type, input_size)
                    if model_type != "tiny" else None)
    sam.requires_grad_(False)
    return BoxPromptSam(sam.eval()), preprocess or meta.get("preprocess", "sam")


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


@torch.no_grad()
def predict(model: BoxPromptSam, jobs: list[Job], out: Path, preprocess: str, device: torch.device,
            amp_dtype=None, batch_size: int = 4, log=print) -> dict:
    """Segment every job, write masks, overlays and ``predictions.csv``; returns the metrics
    (``None`` values without masks)."""
    model.to(device).eval()
    size = model.img_size
    totals = MetricTotals()
    rows = []
    for first in tqdm(range(0, len(jobs), batch_size), desc="predict", unit="batch"):
        chunk = jobs[first : first + batch_size]
        pictures = [read_image(job.image) for job in chunk]
        batch = _prompted_batch(pictures, [job.box for job in chunk], size, preprocess)
        for job, picture, pred in zip(chunk, pictures, predict_masks(model, batch, size, device, amp_dtype)):
            pred = pred.numpy()
            truth = read_mask(job.mask) if job.mask is not None else None
            if truth is not None and truth.shape != pred.shape:
                raise PredictError(f"mask {job.mask} is {truth.shape[1]}x{truth.shape[0]} but image {job.image} is "
                                   f"{pred.shape[1]}x{pred.shape[0]}")
            save_png(out / "masks" / f"{job.image.stem}.png", pred.astype(np.uint8) * 255)
            save_png(out / "overlays" / f"{job.image.stem}.png", overlay_image(picture, pred, truth, job.box))
            row = {"image": job.image.name, "x0": job.box[0], "y0": job.box[1], "x1": job.box[2], "y1": job.box[3],
                   "foreground": float(pred.mean()), "dice": "", "iou": ""}
            if truth is not None:
                dice, iou = dice_iou(torch.from_numpy(pred), torch.from_numpy(truth))
                totals.add(job.image.name, dice, iou)
                row.update(dice=dice, iou=iou)
            rows.append(row)
    with atomic_path(out / "predictions.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = totals.summary() if totals.count else {"images": 0, "dice": None, "iou": None}
    metrics = {"images": len(jobs), "scored": summary["images"], "dice": summary["dice"], "iou": summary["iou"],
               "per_image": totals.per_image}
    write_json(out / "metrics.json", metrics)
    log(f"wrote {len(jobs)} masks to {out / 'masks'}, overlays to {out / 'overlays'}")
    if totals.count:
        log(f"Dice {summary['dice']:.3f}  IoU {summary['iou']:.3f}  (mean over {summary['images']} images with masks)")
    return metrics


def _prompted_batch(pictures: list[np.ndarray], boxes: list[np.ndarray], size: int, preprocess: str) -> dict:
    """Images and their pixel boxes as the collated batch that :func:`predict_masks` takes."""
    inputs = [preprocess_image(picture, size, preprocess) for picture in pictures]
    return {"image": torch.stack([x for x, _ in inputs]), "box": np.stack(boxes),
            "original_hw": [picture.shape[:2] for picture in pictures], "input_hw": [hw for _, hw in inputs]}


def run_predict(args, device: torch.device, amp_dtype, log=print) -> dict:
    images = image_files(Path(args.images))
    if args.boxes is not None:
        jobs = jobs_from_csv(images, Path(args.boxes), Path(args.masks) if args.masks else None)
    else:
        jobs = jobs_from_masks(images, Path(args.boxes_from_masks), log)
    model, preprocess = load_model(args.run, args.checkpoint, args.model, args.input_size, args.preprocess, log)
    return predict(model, jobs, Path(args.out), preprocess, device, amp_dtype, args.batch_size, log)
