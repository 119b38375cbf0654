"""SAM preprocessing: resize/pad/normalise, box prompts and their jitter, mapping back."""

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.sam_polyp.model import SAM_PIXEL_MEAN
from examples.sam_polyp.preprocess import (PromptedSegmentation, box_from_mask, box_to_input_frame, collate,
                                           jitter_box, logits_to_original, preprocess_image, preprocess_mask,
                                           prompt_boxes, resized_shape, valid_region)


def test_resized_shape_matches_sam():
    assert resized_shape(480, 640, 128) == (96, 128)
    assert resized_shape(100, 50, 64) == (64, 32)
    assert resized_shape(1024, 1024, 1024) == (1024, 1024)
    assert resized_shape(531, 621, 1024) == (876, 1024)  # SAM: int(531 * 1024/621 + 0.5)


def test_preprocess_image_normalises_and_pads_bottom_right():
    image = np.empty((60, 90, 3), dtype=np.uint8)
    image[:] = np.round(SAM_PIXEL_MEAN).astype(np.uint8)
    pixels, (h, w) = preprocess_image(image, 64)
    assert pixels.shape == (3, 64, 64) and (h, w) == (43, 64)
    assert pixels[:, :h, :w].abs().max() < 0.02  # the mean colour normalises to ~0
    assert pixels[:, h:, :].abs().max() == 0  # zero padding below
    bright = np.full((60, 90, 3), 255, dtype=np.uint8)
    assert preprocess_image(bright, 64)[0][0, 0, 0].item() == pytest.approx((255 - 123.675) / 58.395, rel=1e-4)


def test_preprocess_mask_resizes_and_pads():
    mask = np.zeros((60, 90), dtype=bool)
    mask[:, :45] = True
    out = preprocess_mask(mask, 64)
    assert out.shape == (64, 64) and out.dtype == torch.bool
    assert out[:43, :31].all() and not out[:43, 33:].any() and not out[43:].any()


def test_box_from_mask_and_empty_mask():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    assert box_from_mask(mask).tolist() == [3, 2, 8, 4]
    assert box_from_mask(np.zeros((10, 20), dtype=bool)).tolist() == [0, 0, 19, 9]


def test_jitter_stays_within_fraction_and_image():
    box = np.array([20.0, 30.0, 60.0, 50.0])  # 40 x 20
    for i in range(300):
        j = jitter_box(box, (64, 64), 0.05, np.random.default_rng(i))
        assert np.all(np.abs(j - box) <= np.array([2.0, 1.0, 2.0, 1.0]) + 1e-6)
        assert j[0] <= j[2] and j[1] <= j[3]
    edge = np.array([0.0, 0.0, 63.0, 63.0])
    for i in range(100):
        j = jitter_box(edge, (64, 64), 0.1, np.random.default_rng(i))
        assert j.min() >= 0 and j.max() <= 63
    assert np.array_equal(jitter_box(box, (64, 64), 0.0, np.random.default_rng(0)), box)
    moved = [jitter_box(box, (64, 64), 0.05, np.random.default_rng(i)) for i in range(20)]
    assert not all(np.array_equal(m, moved[0]) for m in moved)


def test_box_to_input_frame_scales_each_axis():
    box = np.array([0.0, 0.0, 90.0, 60.0])
    assert box_to_input_frame(box, (60, 90), 64).tolist() == pytest.approx([0, 0, 64, 43])


def test_logits_back_to_original_size():
    # a low-res logit map (img_size 64 -> 16x16) positive on the left half of the real image
    low = torch.full((1, 16, 16), -10.0)
    low[:, :11, :8] = 10.0  # the real image covers rows :43 of 64, i.e. :~11 of 16
    out = logits_to_original(low, (43, 64), (60, 90), 64)
    assert out.shape == (60, 90)
    pred = out > 0
    assert pred[:55, :40].all() and not pred[:, 50:].any()


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n=4, hw=(48, 64)):
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            mask = np.zeros(hw, dtype=bool)
            mask[5 + i : 20 + i, 10:30] = True
            self.items.append({"image": rng.integers(0, 255, (*hw, 3), dtype=np.uint8), "mask": mask, "name": f"s{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_prompted_dataset_and_deterministic_jittered_prompts():
    ds = PromptedSegmentation(_Samples(), 32)
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["target"].shape == (3, 32, 32)
    assert batch["original_hw"][0] == (48, 64) and batch["input_hw"][0] == (24, 32)
    exact = prompt_boxes(batch, 32)
    assert exact[0].tolist() == pytest.approx([5.0, 2.5, 14.5, 9.5])  # [10, 5, 29, 19] * 0.5
    a = prompt_boxes(batch, 32, jitter=0.1, seed=1, epoch=0)
    assert torch.equal(a, prompt_boxes(batch, 32, jitter=0.1, seed=1, epoch=0))
    assert not torch.equal(a, prompt_boxes(batch, 32, jitter=0.1, seed=1, epoch=1))
    valid = valid_region(batch, 32)
    assert valid[0, :24, :].all() and not valid[0, 24:].any()
    assert ds[0] is ds[0]  # small inputs are cached


def test_image_mask_size_mismatch_names_the_sample():
    samples = _Samples(1)
    samples.items[0]["mask"] = np.zeros((10, 10), dtype=bool)
    with pytest.raises(ValueError, match="s0"):
        PromptedSegmentation(samples, 32)[0]


# -- parity with segment_anything's own preprocessing -------------------------------------
KVASIR_IMAGES = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg-sample" / "images").glob("*.jpg"))


def _sam_pipeline_inputs():
    """Real Kvasir frames (odd sizes) when present, else a random non-square image."""
    from examples.sam_polyp.data import read_image

    if KVASIR_IMAGES:
        return [read_image(p) for p in KVASIR_IMAGES[:2]]
    return [np.random.default_rng(0).integers(0, 256, (531, 621, 3), dtype=np.uint8)]


@pytest.mark.parametrize("size", [64, 256])
def test_preprocess_matches_resize_longest_side_and_sam_preprocess(size):
    """Ours (fp32) and segment_anything's ResizeLongestSide + Sam.preprocess, each against the
    exact float64 antialiased resize: ours within 2x SAM's own error (SAM's PIL resize rounds
    to uint8), and SAM's within one grey level of the exact one (the filters agree)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    from examples.sam_polyp.model import SAM_PIXEL_STD, TinySamConfig, build_tiny_sam
    from parity import assert_parity, max_error

    sam = build_tiny_sam(TinySamConfig(img_size=size))
    for image in _sam_pipeline_inputs():
        ours, (h, w) = preprocess_image(image, size)
        resized = ResizeLongestSide(size).apply_image(image)
        assert resized.shape[:2] == (h, w)
        theirs = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1).float()[None])[0]
        x = torch.from_numpy(image).permute(2, 0, 1).double()[None]
        exact = torch.nn.functional.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (SAM_PIXEL_MEAN, SAM_PIXEL_STD))
        reference = torch.nn.functional.pad((exact - mean) / std, (0, size - w, 0, size - h))
        assert_parity(f"preprocess {image.shape} -> {size}", ours, theirs, reference)
        assert max_error(theirs, reference) < 1.0 / min(SAM_PIXEL_STD)  # under one grey level


def test_boxes_match_resize_longest_side_apply_boxes():
    from segment_anything.utils.transforms import ResizeLongestSide

    box = np.array([13.0, 40.5, 600.0, 511.0])
    for hw, size in [((529, 622), 1024), ((1070, 1348), 64), ((622, 529), 256)]:
        theirs = ResizeLongestSide(size).apply_boxes(box[None], hw)[0]
        assert np.array_equal(box_to_input_frame(box, hw, size), theirs.astype(np.float32))


def test_logits_to_original_matches_sam_postprocess_masks():
    from examples.sam_polyp.model import TinySamConfig, build_tiny_sam

    sam = build_tiny_sam(TinySamConfig(img_size=64))
    low_res = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for original in [(529, 622), (1070, 1348), (40, 30)]:
        input_hw = resized_shape(*original, 64)
        theirs = sam.postprocess_masks(low_res, input_hw, original)[0, 0]
        assert torch.equal(logits_to_original(low_res[0], input_hw, original, 64), theirs)  # the same computation


def test_medsam_preprocessing_is_a_square_resize_scaled_to_unit_range():
    rng = np.random.default_rng(0)
    image = rng.integers(30, 200, size=(60, 90, 3), dtype=np.uint8)
    pixels, (h, w) = preprocess_image(image, 64, "medsam")
    assert pixels.shape == (3, 64, 64) and (h, w) == (64, 64)  # no aspect ratio kept, no padding
    assert pixels.min().item() == 0.0 and pixels.max().item() == pytest.approx(1.0)
    box = np.array([9.0, 6.0, 45.0, 30.0])
    # MedSAM's own box mapping: box / [W, H, W, H] * 1024 (here 64)
    expected = box / np.array([90, 60, 90, 60]) * 64
    assert box_to_input_frame(box, (60, 90), 64, "medsam") == pytest.approx(expected.astype(np.float32))
    mask = np.zeros((60, 90), dtype=bool)
    mask[10:30, 20:50] = True
    assert preprocess_mask(mask, 64, "medsam").shape == (64, 64)


def test_a_too_thin_image_names_the_file():
    class _Thin(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": np.zeros((8, 2000, 3), np.uint8), "mask": np.ones((8, 2000), bool), "name": "thin.png"}

    with pytest.raises(ValueError, match=r"thin.png: a 2000x8 image .* too thin"):
        PromptedSegmentation(_Thin(), 64)[0]
