"""Per-image Dice and IoU at threshold 0.5, averaged over images, reducible across ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two binary masks. Both empty counts as a perfect match (1, 1): an
    image without a polyp, correctly left empty, is a correct answer."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum().item()
    p, t = pred.sum().item(), target.sum().item()
    if p + t == 0:
        return 1.0, 1.0
    return 2.0 * inter / (p + t), inter / (p + t - inter)


@dataclass
class MetricTotals:
    """Running sums over images (float64), so rank shards add up to the single-process mean."""

    count: float = 0.0
    dice_sum: float = 0.0
    dice_sq_sum: float = 0.0
    iou_sum: float = 0.0
    iou_sq_sum: float = 0.0
    per_image: list[dict] = field(default_factory=list)

    def add(self, name: str, dice: float, iou: float) -> None:
        self.count += 1
        self.dice_sum += dice
        self.dice_sq_sum += dice * dice
        self.iou_sum += iou
        self.iou_sq_sum += iou * iou
        self.per_image.append({"name": name, "dice": dice, "iou": iou})

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.count, self.dice_sum, self.dice_sq_sum, self.iou_sum, self.iou_sq_sum],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor, per_image: list[dict] | None = None) -> "MetricTotals":
        count, dice_sum, dice_sq, iou_sum, iou_sq = (float(v) for v in values.tolist())
        return cls(count, dice_sum, dice_sq, iou_sum, iou_sq, list(per_image or []))

    def summary(self) -> dict:
        n = max(self.count, 1.0)
        dice, iou = self.dice_sum / n, self.iou_sum / n
        return {
            "images": int(self.count),
            "dice": dice,
            "iou": iou,
            "dice_std": math.sqrt(max(self.dice_sq_sum / n - dice * dice, 0.0)),
            "iou_std": math.sqrt(max(self.iou_sq_sum / n - iou * iou, 0.0)),
        }
