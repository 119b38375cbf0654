"""Losses, metrics and the results table of the SAM polyp example, on hand-computed cases."""

import math

import pytest
import torch

from examples.sam_polyp.losses import (LossWeights, SegmentationLoss, boundary_band, boundary_weighted_bce,
                                       dice_loss, focal_loss)
from examples.sam_polyp.metrics import MetricTotals, dice_iou
from examples.sam_polyp.report import markdown_table, mean_std, summarise


def test_dice_iou_hand_cases():
    pred = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    gt = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert dice_iou(pred, gt) == pytest.approx((2 * 1 / 4, 1 / 3))
    assert dice_iou(gt, gt) == (1.0, 1.0)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)  # no polyp, none predicted: correct
    assert dice_iou(empty, torch.ones(2, 2, dtype=torch.bool)) == (0.0, 0.0)
    assert dice_iou(torch.ones(2, 2, dtype=torch.bool), empty) == (0.0, 0.0)


def test_metric_totals_average_over_images_and_add_up_across_shards():
    everything, shard_a, shard_b = MetricTotals(), MetricTotals(), MetricTotals()
    values = [("a", 1.0, 1.0), ("b", 0.5, 1 / 3), ("c", 0.0, 0.0)]
    for i, row in enumerate(values):
        everything.add(*row)
        (shard_a if i % 2 == 0 else shard_b).add(*row)
    summary = everything.summary()
    assert summary["dice"] == pytest.approx(0.5) and summary["iou"] == pytest.approx((1 + 1 / 3) / 3)
    assert summary["dice_std"] == pytest.approx(math.sqrt(((0.5) ** 2 + 0 + 0.5 ** 2) / 3))
    merged = MetricTotals.from_tensor(shard_a.as_tensor() + shard_b.as_tensor()).summary()
    assert merged["dice"] == pytest.approx(summary["dice"]) and merged["images"] == 3


def test_dice_loss_hand_case():
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1  # 4 pixels
    # intersection 0.5*4 = 2, sums 8 + 4 = 12, smooth 1: 1 - (4 + 1) / (12 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 5 / 13)
    perfect = torch.where(target > 0, 30.0, -30.0)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_hand_case():
    logits = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    # each pixel: ce = ln 2, (1 - p_t)^2 = 1/4; alpha 0.25 for the positive, 0.75 for the negative
    expected = (0.25 + 0.75) * 0.25 * math.log(2) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected)
    assert focal_loss(logits, target, alpha=-1).item() == pytest.approx(0.25 * math.log(2))


def test_boundary_band_and_weighted_bce_hand_case():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :, :2] = 1  # left half
    band = boundary_band(target, width=1)[0, 0]
    # dilation covers columns 0-2, erosion keeps column 0 (the image border does not erode)
    assert band[:, 1].all() and band[:, 2].all() and not band[:, 0].any() and not band[:, 3].any()
    # confident and right off the band (ce ~ 0), undecided (ce = ln 2) on it; band weight 1 + 4
    logits = torch.where(target > 0, 40.0, -40.0)
    logits[..., :, 1:3] = 0.0
    expected = (8 * 5 * math.log(2)) / (8 * 5 + 8 * 1)
    assert boundary_weighted_bce(logits, target, width=1, gain=4.0).item() == pytest.approx(expected, rel=1e-6)
    assert boundary_weighted_bce(logits, target, width=1, gain=0.0).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_padding_is_excluded_and_weights_combine():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :6, :5] = True
    target = target * valid.unsqueeze(1)
    noisy = logits.clone()
    noisy[~valid.unsqueeze(1).expand_as(noisy)] = 123.0  # garbage on padding must not matter
    loss = SegmentationLoss(LossWeights(dice=1.0, focal=2.0, boundary=3.0, iou=0.0))
    a, parts_a = loss(logits, target, valid)
    b, parts_b = loss(noisy, target, valid)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() == pytest.approx(parts_a["dice"] + 2 * parts_a["focal"] + 3 * parts_a["boundary"], rel=1e-6)
    only_dice, _ = SegmentationLoss(LossWeights(dice=1.0, focal=0.0, boundary=0.0, iou=0.0))(logits, target, valid)
    assert only_dice.item() == pytest.approx(dice_loss(logits, target, valid).item())


def test_iou_term_regresses_the_achieved_iou():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    logits = torch.where(target > 0, 5.0, -5.0)  # perfect mask: achieved IoU 1
    total, parts = SegmentationLoss(LossWeights(dice=0, focal=0, boundary=0, iou=1.0))(
        logits, target, iou_pred=torch.tensor([[0.25]]))
    assert parts["iou"] == pytest.approx(0.75 ** 2) and total.item() == pytest.approx(0.75 ** 2)


def test_summary_table_mean_and_std_over_seeds():
    runs = [{"mode": m, "seed": s, "trainable_params": 10, "trainable_percent": 1.0,
             "tests": {"A": {"dice": d, "iou": d / 2}, "B": {"dice": d + 0.1, "iou": d}},
             "eval_step": None if m == "vanilla" else 100 + s}
            for m, s, d in [("vanilla", 0, 0.2), ("vanilla", 1, 0.2), ("lora", 0, 0.6), ("lora", 1, 0.8)]]
    rows = summarise(runs, ["A", "B"])
    lora = rows[1]
    assert lora["mode"] == "lora" and lora["dice_mean"] == pytest.approx(0.75)
    assert lora["dice_std"] == pytest.approx(mean_std([0.65, 0.85])[1]) and lora["dice_std"] == pytest.approx(0.1414, abs=1e-4)
    table = markdown_table(rows, ["A", "B"])
    assert "| lora | 10 (1.00%) | 100, 101 | 0.750 ± 0.141 (n=2) | 0.700 / 0.350 | 0.800 / 0.700 |" in table
    assert table.splitlines()[0].startswith("| mode |")
