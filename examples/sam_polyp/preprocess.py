"""SAM preprocessing: resize, normalise, pad to a square; box prompts from masks
(jittered for training); predictions back to mask size.

Two conventions (``--preprocess``):

- ``sam`` (Meta's SAM): resize the longest side to the encoder size keeping the aspect
  ratio (``ResizeLongestSide``), normalise with SAM's pixel mean/std and zero-pad
  bottom/right (``Sam.preprocess``);
- ``medsam`` (MedSAM checkpoints): resize to a square (aspect ratio not kept), scale each
  image to [0, 1] by its own min and max; no padding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .model import SAM_PIXEL_MEAN, SAM_PIXEL_STD

PREPROCESS_MODES = ("sam", "medsam")


def resized_shape(height: int, width: int, long_side: int, preprocess: str = "sam") -> tuple[int, int]:
    """The ``(h, w)`` an image takes in the model input before padding. ``sam``: SAM's
    ``ResizeLongestSide.get_preprocess_shape`` (the longest side becomes ``long_side``);
    ``medsam``: the full square. An image so thin that a side would round to 0 px is an error."""
    if preprocess == "medsam":
        return long_side, long_side
    if preprocess != "sam":
        raise ValueError(f"--preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    scale = long_side / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(h, w) < 1:
        raise ValueError(f"a {width}x{height} image (width x height) is too thin for a {long_side} px input: "
                         f"its short side would be {min(h, w)} px after resizing")
    return h, w


def preprocess_image(image: np.ndarray, img_size: int, preprocess: str = "sam") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 ``[H,W,3]`` RGB -> float ``[3,S,S]`` model input and the resized ``(h, w)`` before
    padding (see the module docstring for the two conventions)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {image.shape}")
    h, w = resized_shape(image.shape[0], image.shape[1], img_size, preprocess)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    if preprocess == "medsam":  # MedSAM: cubic resize with anti-aliasing, then min-max to [0, 1]
        x = F.interpolate(x, (h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        low, high = x.min(), x.max()
        return (x - low) / torch.clamp(high - low, min=1e-8), (h, w)
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, img_size - w, 0, img_size - h)), (h, w)


def preprocess_mask(mask: np.ndarray, img_size: int, preprocess: str = "sam") -> torch.Tensor:
    """bool ``[H,W]`` -> bool ``[S,S]`` in the padded input frame (area-weighted resize, >= 0.5)."""
    h, w = resized_shape(mask.shape[0], mask.shape[1], img_size, preprocess)
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0] >= 0.5
    return F.pad(m, (0, img_size - w, 0, img_size - h))


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY pixel box ``[x0, y0, x1, y1]`` (inclusive, as SAM's own box prompts) around
    the mask; the whole image when the mask is empty (a prompt must still be given)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.array([0, 0, mask.shape[1] - 1, mask.shape[0] - 1], dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def jitter_box(box: np.ndarray, image_hw: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Move each side by up to ``fraction`` of the box's width/height, uniformly, staying
    inside the image and keeping ``x0 <= x1``, ``y0 <= y1``."""
    if fraction <= 0:
        return box.astype(np.float32)
    x0, y0, x1, y1 = box.astype(np.float64)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    dx0, dx1 = rng.uniform(-fraction, fraction, 2) * bw
    dy0, dy1 = rng.uniform(-fraction, fraction, 2) * bh
    h, w = image_hw
    nx0, nx1 = np.clip([x0 + dx0, x1 + dx1], 0, w - 1)
    ny0, ny1 = np.clip([y0 + dy0, y1 + dy1], 0, h - 1)
    return np.array([min(nx0, nx1), min(ny0, ny1), max(nx0, nx1), max(ny0, ny1)], dtype=np.float32)


def box_to_input_frame(box: np.ndarray, original_hw: tuple[int, int], img_size: int,
                       preprocess: str = "sam") -> np.ndarray:
    """Scale an XYXY box from original pixels to the resized (padded) model input frame."""
    return scale_box(box, original_hw, resized_shape(*original_hw, img_size, preprocess))


def scale_box(box: np.ndarray, original_hw: tuple[int, int], input_hw: tuple[int, int]) -> np.ndarray:
    """``ResizeLongestSide.apply_boxes`` for any resize: each axis scaled by new / old size."""
    (h, w), (nh, nw) = original_hw, input_hw
    return (np.asarray(box, dtype=np.float64) * np.array([nw / w, nh / h, nw / w, nh / h])).astype(np.float32)


def logits_to_original(low_res: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int],
                       img_size: int) -> torch.Tensor:
    """``Sam.postprocess_masks`` for one image: low-res logits ``[1,h,w]`` -> ``[H,W]`` logits
    at the original mask size (upsample to the input frame, drop the padding, resize)."""
    x = F.interpolate(low_res[None].float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(x, tuple(original_hw), mode="bilinear", align_corners=False)[0, 0]


class PromptedSegmentation(Dataset):
    """A polyp/scene dataset (samples ``{"image", "mask", "name"}``) turned into SAM inputs.

    Items hold the normalised padded image, the padded target mask, the exact box in the
    original frame, and the sizes needed to map predictions back. Boxes are jittered later,
    in the training loop, from a per-sample seed so that DDP and resumed runs see the same
    prompts. Small inputs are cached: the demo reads each sample many times.
    """

    def __init__(self, base: Dataset, img_size: int, cache: bool | None = None, preprocess: str = "sam") -> None:
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        self.base = base
        self.img_size = img_size
        self.preprocess = preprocess
        self.cache_enabled = img_size <= 256 if cache is None else cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if index in self._cache:
            return self._cache[index]
        sample = self.base[index]
        image, mask = sample["image"], np.asarray(sample["mask"], dtype=bool)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{sample.get('name', index)}: image {image.shape[:2]} and mask {mask.shape} differ in size")
        try:
            pixels, input_hw = preprocess_image(image, self.img_size, self.preprocess)
            target = preprocess_mask(mask, self.img_size, self.preprocess)
        except ValueError as exc:
            raise ValueError(f"{sample.get('name', index)}: {exc}") from exc
        item = {
            "image": pixels,
            "target": target,
            "mask": torch.from_numpy(mask.copy()),
            "box": box_from_mask(mask),
            "original_hw": tuple(mask.shape),
            "input_hw": input_hw,
            "index": index,
            "name": str(sample.get("name", index)),
        }
        if self.cache_enabled:
            self._cache[index] = item
        return item


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "box": np.stack([it["box"] for it in items]),
        "original_hw": [it["original_hw"] for it in items],
        "input_hw": [it["input_hw"] for it in items],
        "index": [it["index"] for it in items],
        "name": [it["name"] for it in items],
    }


def prompt_boxes(batch: dict, img_size: int, jitter: float = 0.0, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """Boxes for a collated batch in the model input frame; jittered from a generator keyed on
    ``(seed, epoch, sample index)`` when ``jitter > 0`` (only then is ``batch["index"]`` read),
    exact otherwise."""
    boxes = []
    for i, (box, hw, input_hw) in enumerate(zip(batch["box"], batch["original_hw"], batch["input_hw"])):
        if jitter > 0:
            box = jitter_box(box, hw, jitter, np.random.default_rng([seed, epoch, batch["index"][i]]))
        boxes.append(scale_box(box, hw, input_hw))
    return torch.from_numpy(np.stack(boxes))


def valid_region(batch: dict, img_size: int) -> torch.Tensor:
    """bool ``[B,S,S]``: True on real image pixels, False on padding (excluded from the loss)."""
    valid = torch.zeros(len(batch["input_hw"]), img_size, img_size, dtype=torch.bool)
    for i, (h, w) in enumerate(batch["input_hw"]):
        valid[i, :h, :w] = True
    return valid
