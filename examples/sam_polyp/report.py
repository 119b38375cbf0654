"""Outputs: results.json, the markdown table, training curves and overlay images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .atomic import atomic_path


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, payload) -> None:
    """Atomic JSON write (temp file + os.replace): a reader never sees half a results file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list[dict], test_names: list[str]) -> list[dict]:
    """One row per mode: mean ± std over seeds of the mean Dice over test sets, and per test
    set mean Dice/IoU over seeds. ``runs`` are ``{"mode", "seed", "tests": {name: metrics}, ...}``."""
    rows = []
    for mode in dict.fromkeys(run["mode"] for run in runs):
        mine = [run for run in runs if run["mode"] == mode]
        overall = [sum(run["tests"][t]["dice"] for t in test_names) / len(test_names) for run in mine]
        row = {"mode": mode, "seeds": [run["seed"] for run in mine], "dice_mean": mean_std(overall)[0],
               "dice_std": mean_std(overall)[1], "trainable_params": mine[0]["trainable_params"],
               "trainable_percent": mine[0]["trainable_percent"], "tests": {},
               "eval_steps": [run.get("eval_step") for run in mine]}
        for t in test_names:
            dice = mean_std([run["tests"][t]["dice"] for run in mine])
            iou = mean_std([run["tests"][t]["iou"] for run in mine])
            row["tests"][t] = {"dice": dice[0], "dice_std": dice[1], "iou": iou[0], "iou_std": iou[1]}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], test_names: list[str]) -> str:
    """One row per mode; "evaluated step" is the checkpoint each seed was scored at (the best
    validation Dice; "—" for an untrained mode)."""
    header = ["mode", "trainable params (%)", "evaluated step", "mean Dice ± std over seeds"] + \
        [f"{t} Dice / IoU" for t in test_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        steps = [s for s in row.get("eval_steps", []) if s is not None]
        cells = [row["mode"], f"{row['trainable_params']:,} ({row['trainable_percent']:.2f}%)",
                 ", ".join(map(str, steps)) or "—",
                 f"{row['dice_mean']:.3f} ± {row['dice_std']:.3f} (n={len(row['seeds'])})"]
        cells += [f"{row['tests'][t]['dice']:.3f} / {row['tests'][t]['iou']:.3f}" for t in test_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    """Training loss (left) and validation Dice (right) per run, from the CSV logs."""
    plt = _matplotlib()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in curves.items():
        steps = [r["step"] for r in rows if "loss" in r]
        ax_loss.plot(steps, [r["loss"] for r in rows if "loss" in r], label=label)
        val = [(r["step"], r["val_dice"]) for r in rows if "val_dice" in r]
        if val:
            ax_val.plot(*zip(*val), marker="o", label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="loss", yscale="log")
    ax_val.set(xlabel="optimizer step", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_overlay(path: Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str) -> None:
    """Three panels: the image, ground truth (green) over it, prediction (red) over it."""
    plt = _matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    panels = [("image", None, None), ("ground truth", gt, (0.0, 1.0, 0.0)), ("prediction", pred, (1.0, 0.0, 0.0))]
    for ax, (name, mask, colour) in zip(axes, panels):
        shown = image.astype(np.float32) / 255.0
        if mask is not None:
            shown = shown.copy()
            shown[mask.astype(bool)] = 0.5 * shown[mask.astype(bool)] + 0.5 * np.array(colour)
        ax.imshow(shown)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _edge(mask: np.ndarray) -> np.ndarray:
    """The mask's one-pixel boundary (pixels with a 4-neighbour outside the mask)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_image(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None,
                  box: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB: the prediction tinted red, the ground truth's outline green, the box prompt
    yellow — one picture per image, at the image's size."""
    shown = image.astype(np.float32)
    pred = pred.astype(bool)
    shown[pred] = 0.55 * shown[pred] + 0.45 * np.array([255.0, 0.0, 0.0])
    thick = max(1, round(max(image.shape[:2]) / 300))  # lines stay visible on large frames
    if truth is not None:
        edge = _edge(truth.astype(bool))
        for _ in range(thick - 1):
            edge = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
        shown[edge] = (0.0, 255.0, 0.0)
    if box is not None:
        h, w = image.shape[:2]
        x0, y0, x1, y1 = (int(round(v)) for v in np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]))
        yellow = (255.0, 220.0, 0.0)
        shown[y0 : y0 + thick, x0 : x1 + 1] = yellow
        shown[max(y1 - thick + 1, 0) : y1 + 1, x0 : x1 + 1] = yellow
        shown[y0 : y1 + 1, x0 : x0 + thick] = yellow
        shown[y0 : y1 + 1, max(x1 - thick + 1, 0) : x1 + 1] = yellow
    return np.clip(shown, 0, 255).astype(np.uint8)
