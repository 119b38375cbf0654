"""Segmentation loss: Dice + focal + boundary-weighted BCE (+ SAM's IoU-prediction MSE).

All terms take logits ``[B,1,S,S]``, a binary target and an optional ``valid`` map that
removes padding pixels from the sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _as_b1hw(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 4 else x.unsqueeze(1)


def _valid_or_ones(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if valid is None else _as_b1hw(valid).to(like.dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of ``1 - (2·Σpt + smooth) / (Σp + Σt + smooth)``, ``p = sigmoid(logits)``."""
    logits, target = _as_b1hw(logits).float(), _as_b1hw(target).float()
    w = _valid_or_ones(valid, logits)
    p = torch.sigmoid(logits) * w
    t = target * w
    inter = (p * t).flatten(1).sum(1)
    total = p.flatten(1).sum(1) + t.flatten(1).sum(1)
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), averaged over valid pixels; ``alpha < 0`` disables
    the class weighting."""
    logits, target = _as_b1hw(logits).float(), _as_b1hw(target).float()
    w = _valid_or_ones(valid, logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return (loss * w).sum() / w.sum().clamp_min(1.0)


def boundary_band(target: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` pixels (Chebyshev distance) of the mask edge, on either side:
    dilation minus erosion with a ``(2·width+1)²`` square."""
    t = _as_b1hw(target).float()
    k = 2 * width + 1
    dilated = F.max_pool2d(t, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-t, k, stride=1, padding=width)
    return (dilated - eroded) > 0


def boundary_weighted_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                          width: int = 3, gain: float = 4.0) -> torch.Tensor:
    """BCE with weight ``1 + gain`` on the boundary band and 1 elsewhere, normalised by the
    weight sum: errors along the polyp's edge cost more."""
    logits, target = _as_b1hw(logits).float(), _as_b1hw(target).float()
    weight = (1.0 + gain * boundary_band(target, width).float()) * _valid_or_ones(valid, logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def achieved_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU per image of the thresholded prediction (no gradient): the IoU head's regression target."""
    logits, target = _as_b1hw(logits).detach(), _as_b1hw(target).bool()
    pred = logits > 0
    if valid is not None:
        v = _as_b1hw(valid).bool()
        pred, target = pred & v, target & v
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    # SAM used focal:dice = 20:1 over a long schedule; on short runs that ratio (with alpha
    # 0.25 down-weighting the minority foreground) collapses predictions to empty masks.
    focal: float = 2.0
    boundary: float = 1.0
    iou: float = 1.0  # trains the IoU head, which only learns when the decoder trains
    boundary_width: int = 3
    boundary_gain: float = 4.0
    focal_alpha: float = -1.0  # no class weighting
    focal_gamma: float = 2.0


class SegmentationLoss:
    def __init__(self, weights: LossWeights = LossWeights()) -> None:
        self.weights = weights

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                 iou_pred: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        terms = {
            "dice": dice_loss(logits, target, valid),
            "focal": focal_loss(logits, target, valid, w.focal_alpha, w.focal_gamma),
            "boundary": boundary_weighted_bce(logits, target, valid, w.boundary_width, w.boundary_gain),
        }
        total = w.dice * terms["dice"] + w.focal * terms["focal"] + w.boundary * terms["boundary"]
        if iou_pred is not None and w.iou > 0:
            terms["iou"] = F.mse_loss(iou_pred.float().flatten(), achieved_iou(logits, target, valid))
            total = total + w.iou * terms["iou"]
        return total, {name: float(value.detach()) for name, value in terms.items()}
