"""Synthetic data so the example runs with no download: colonoscopy-like polyp frames with
exact masks, a shifted variant standing in for unseen hospitals, and generic shape scenes
standing in for SAM's natural-image pretraining.

Every sample is generated on the fly from its own RNG, seeded by (kind, seed, index), so a
dataset is deterministic whatever the DataLoader worker count or access order. Everything is
vectorised numpy on the whole frame (plus PIL for resizing noise grids and blurring); there is
no per-pixel Python.

Usage as a script writes a data set to disk, in the Kvasir-SEG or the benchmark layout::

    python -m examples.sam_polyp.synthetic OUT_DIR --num 200 --size 256 [--layout benchmark]
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import Sample

# First word of every per-sample seed: keeps the streams of the three generators apart.
_KIND_POLYP, _KIND_SHIFTED, _KIND_SCENE = 1, 2, 3
_SPLIT_NAMES = ("train", "val", "test", "test_shifted")


def _sample_rng(kind: int, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([kind, seed, index]))


def _size_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8x8, got {image_size}")
    return int(h), int(w)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel-centre coordinates with the origin at the frame centre and the shorter half-side = 1,
    so shapes keep their proportions at any resolution; also the pixels per unit."""
    scale = min(h, w) / 2.0
    y = (np.arange(h, dtype=np.float32) + 0.5 - h / 2.0) / scale
    x = (np.arange(w, dtype=np.float32) + 0.5 - w / 2.0) / scale
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return xx, yy, scale


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Band-limited noise with about ``cells`` features across the shorter side, unit std."""
    gy = max(2, round(cells * h / min(h, w)) + 2)
    gx = max(2, round(cells * w / min(h, w)) + 2)
    coarse = Image.fromarray(rng.standard_normal((gy, gx)).astype(np.float32))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _fractal_noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3) -> np.ndarray:
    total = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        total += 0.5**octave * _smooth_noise(rng, h, w, cells * 2**octave)
    return total / (total.std() + 1e-6)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a float [H, W, C] image (a loop over the few kernel taps,
    not over pixels; PIL cannot blur float images)."""
    if sigma_px <= 0.1:
        return image
    radius = max(1, math.ceil(3 * sigma_px))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="reflect" if image.shape[axis] > radius else "edge")
        length = image.shape[axis]
        image = sum(weight * padded.take(np.arange(i, i + length), axis=axis) for i, weight in enumerate(taps))
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _coverage(signed_distance_px: np.ndarray, soft_px: float) -> np.ndarray:
    """Anti-aliased / soft coverage in [0, 1] that crosses 0.5 exactly on the boundary, so the
    exact mask ``signed_distance < 0`` is what the image shows."""
    return np.clip(0.5 - signed_distance_px / (2.0 * soft_px), 0.0, 1.0)


def _local_coords(xx, yy, cx, cy, angle, aspect):
    """Rotate by ``angle`` around (cx, cy) and stretch the second axis by 1/aspect."""
    c, s = math.cos(angle), math.sin(angle)
    u = c * (xx - cx) + s * (yy - cy)
    v = (-s * (xx - cx) + c * (yy - cy)) / aspect
    return u, v


def _fourier_radius(rng: np.random.Generator, theta: np.ndarray, roughness: float) -> np.ndarray:
    """A smooth irregular closed outline r(theta) around 1 (low harmonics dominate)."""
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += rng.uniform(0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return radius


# --------------------------------------------------------------------------------------
# Colonoscopy-like polyp frames

# Colour matrices applied to the finished frame: per-hospital casts for the shifted set.
_SHIFT_STYLES = {
    # narrow-band-imaging look: red suppressed, green/blue carry the contrast
    "nbi": np.array([[0.55, 0.25, 0.05], [0.35, 0.75, 0.05], [0.30, 0.45, 0.45]], np.float32),
    # warm, yellow-orange cast of an older xenon light source
    "warm": np.array([[1.00, 0.10, 0.00], [0.15, 0.95, 0.05], [0.00, 0.05, 0.55]], np.float32),
    # cold, bluish white balance
    "cold": np.array([[0.75, 0.05, 0.05], [0.05, 0.95, 0.10], [0.10, 0.15, 1.25]], np.float32),
    # desaturated, greyish sensor
    "grey": np.array([[0.60, 0.30, 0.10], [0.25, 0.60, 0.15], [0.25, 0.30, 0.45]], np.float32),
}


def _visible_field(xx, yy, h, w, rng) -> np.ndarray:
    """The endoscope's field of view: an octagon with black cut corners, sometimes the black
    inset box in the lower left that Kvasir frames carry."""
    u, v = xx / (w / min(h, w)), yy / (h / min(h, w))  # both in [-1, 1]
    visible = np.ones_like(xx, dtype=bool)
    if rng.random() < 0.75:
        visible &= np.abs(u) + np.abs(v) < rng.uniform(1.45, 1.7)
    if rng.random() < 0.2:
        visible &= ~((u < rng.uniform(-0.7, -0.55)) & (v > rng.uniform(0.45, 0.6)))
    return visible


def _polyp_frame(rng: np.random.Generator, h: int, w: int, shifted: bool) -> tuple[np.ndarray, np.ndarray]:
    xx, yy, scale = _grid(h, w)
    px = 1.0 / scale  # one pixel in grid units

    # Geometry: a height map of mucosal folds around the lumen, noise, and the polyps' domes.
    lumen_x, lumen_y = rng.uniform(-0.8, 0.8, size=2)
    lumen_dist = np.hypot(xx - lumen_x, yy - lumen_y)
    warp = 0.12 * _smooth_noise(rng, h, w, 3)
    fold_freq = rng.uniform(1.2, 2.8)
    folds = (0.5 + 0.5 * np.sin(2 * np.pi * fold_freq * (lumen_dist + warp))) ** 2
    folds *= np.clip(0.5 + 0.6 * _smooth_noise(rng, h, w, 2), 0, 1)  # folds come and go around the lumen
    height = rng.uniform(0.01, 0.035) * folds + 0.008 * _fractal_noise(rng, h, w, 4)

    num_polyps = rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05])
    frame_area = (w / scale) * (h / scale)
    polyp_mask = np.zeros((h, w), bool)
    polyp_alpha = np.zeros((h, w), np.float32)
    polyp_dome = np.zeros((h, w), np.float32)
    for i in range(num_polyps):
        area_fraction = math.exp(rng.uniform(math.log(0.03), math.log(0.28))) / (1 + 1.5 * i)
        radius = math.sqrt(area_fraction * frame_area / math.pi)
        r_center = rng.uniform(0, max(0.05, 0.7 - 0.5 * radius))
        phi = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.65, 1.0)
        u, v = _local_coords(xx, yy, r_center * math.cos(phi), r_center * math.sin(phi), rng.uniform(0, np.pi), aspect)
        theta = np.arctan2(v, u)
        rel = np.hypot(u, v) / (radius * _fourier_radius(rng, theta, rng.uniform(0.3, 0.8)))
        soft_px = rng.uniform(1.0, 3.5) * max(1.0, min(h, w) / 256)
        alpha = _coverage((rel - 1.0) * radius / px, soft_px)
        polyp_mask |= rel < 1.0
        polyp_alpha = np.maximum(polyp_alpha, alpha)
        dome = np.clip(1.0 - rel**2, 0, 1) ** 1.5 * radius * rng.uniform(0.12, 0.3)  # flat at the rim: no outline
        polyp_dome = np.maximum(polyp_dome, dome)
    height = height * (1 - 0.6 * polyp_alpha) + polyp_dome

    # Shading: Lambert-like term from the height gradient with a light near the camera.
    gy, gx = np.gradient(height, px)
    light = rng.uniform(-0.6, 0.6, size=2)
    shade = np.clip((1 + light[0] * gx + light[1] * gy - 0.35 * (gx**2 + gy**2)) / np.sqrt(1 + gx**2 + gy**2), 0.2, 1.4)
    depth_dark = np.exp(-((lumen_dist / rng.uniform(0.15, 0.45)) ** 2)) * rng.uniform(0.6, 0.95)
    radial = np.hypot(xx, yy) / np.hypot(w, h) * 2 * scale
    falloff = 1 - rng.uniform(0.25, 0.55) * radial**2
    illumination = falloff * (1 - depth_dark) * (1 + 0.08 * _smooth_noise(rng, h, w, 2))

    # Albedo: pink-red mucosa with blotches, a vessel network, and the polyps' own tint/texture.
    base = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.42, 0.56), rng.uniform(0.36, 0.5)], np.float32)
    blotch = _smooth_noise(rng, h, w, 5)[..., None]
    albedo = base * (1 + 0.06 * blotch * np.array([0.3, 1.0, 1.0], np.float32))
    vessels = np.exp(-((_fractal_noise(rng, h, w, rng.uniform(5, 10), 3) / 0.1) ** 2))
    vessels *= np.clip(_smooth_noise(rng, h, w, 2) + rng.uniform(-0.2, 1.0), 0, 1) * (1 - 0.85 * polyp_alpha)
    albedo = albedo * (1 - rng.uniform(0.2, 0.5) * vessels[..., None] * np.array([0.3, 0.8, 0.7], np.float32))
    tint = 1 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.09) * np.array([0.3, 1.0, 0.8], np.float32)
    pits = 1 + rng.uniform(0.02, 0.06) * _smooth_noise(rng, h, w, rng.uniform(18, 30))
    albedo = albedo * (1 + polyp_alpha[..., None] * (tint * pits[..., None] - 1))

    image = albedo * (shade * illumination)[..., None]

    # Specular highlights: wet mucosa reflects the light where the surface faces the camera.
    dome_top = polyp_dome / (polyp_dome.max() + 1e-6)
    glint = _smooth_noise(rng, h, w, rng.uniform(12, 22)) + 1.5 * (shade - 1) + 1.5 * dome_top
    threshold = np.quantile(glint, 1 - rng.uniform(0.004, 0.02))
    spots = np.clip((glint - threshold) * 6, 0, 1)[..., None]
    image = image * (1 - spots) + spots * np.array([1.0, 0.98, 0.96], np.float32)

    visible = _visible_field(xx, yy, h, w, rng)
    if shifted:
        style = _SHIFT_STYLES[list(_SHIFT_STYLES)[rng.integers(len(_SHIFT_STYLES))]]
        image = image @ style.T * rng.uniform(0.7, 1.25)
        image = image ** rng.uniform(0.7, 1.4)  # other gamma / exposure
        image = _blur(np.clip(image, 0, 1).astype(np.float32), rng.uniform(0.8, 2.5) * min(h, w) / 256)
        noise_std = rng.uniform(0.03, 0.07)
    else:
        image = _blur(np.clip(image, 0, 1).astype(np.float32), 0.4 * min(h, w) / 256)
        noise_std = 0.008
    image = image + noise_std * rng.standard_normal(image.shape).astype(np.float32)
    image = image * visible[..., None]
    return _to_uint8(image), polyp_mask & visible


class SyntheticPolypDataset(torch.utils.data.Dataset):
    """Colonoscopy-like frames with one to three polyps and exact masks, generated on access.

    ``shifted=True`` draws from another distribution (colour casts including an NBI-like
    look, other gamma and exposure, blur, sensor noise): the stand-in for unseen hospitals.
    """

    def __init__(self, num_samples: int, image_size: int | tuple[int, int] = 256, seed: int = 0, shifted: bool = False):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.image_size = _size_hw(image_size)
        self.seed = seed
        self.shifted = shifted

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        kind = _KIND_SHIFTED if self.shifted else _KIND_POLYP
        image, mask = _polyp_frame(_sample_rng(kind, self.seed, index), *self.image_size, self.shifted)
        prefix = "polyp-shifted" if self.shifted else "polyp"
        return {"image": image, "mask": mask, "name": f"{prefix}-s{self.seed}-{index:05d}"}

    def __repr__(self) -> str:
        return (
            f"SyntheticPolypDataset(num_samples={self.num_samples}, image_size={self.image_size}, "
            f"seed={self.seed}, shifted={self.shifted})"
        )


def make_polyp_splits(
    image_size: int | tuple[int, int] = 256, num_train: int = 200, num_val: int = 50, num_test: int = 100, seed: int = 0
) -> dict[str, SyntheticPolypDataset]:
    """``{"train", "val", "test", "test_shifted"}``; each split has its own seed derived from
    (seed, split), so no frame appears in two splits. ``test_shifted`` has ``num_test`` frames."""
    split_seeds = np.random.SeedSequence([seed, 0x5EED]).generate_state(len(_SPLIT_NAMES))
    sizes = (num_train, num_val, num_test, num_test)
    return {
        name: SyntheticPolypDataset(size, image_size, int(split_seed), shifted=name == "test_shifted")
        for name, size, split_seed in zip(_SPLIT_NAMES, sizes, split_seeds)
    }


# --------------------------------------------------------------------------------------
# Generic scenes for pretraining


def _random_colour(rng) -> np.ndarray:
    return rng.uniform(0, 1, size=3).astype(np.float32)


def _texture(rng, xx, yy, h, w) -> np.ndarray:
    """A fill for a background or a shape: flat, gradient, stripes, checker or noise, [H, W, 3]."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(5)
    if kind == 0:
        t = np.full((h, w), 0.5, np.float32) + 0.05 * _smooth_noise(rng, h, w, 3)
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * (math.cos(angle) * xx + math.sin(angle) * yy) / max(1.0, float(np.abs(xx).max()))
    elif kind == 2:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
        t = (np.sin(2 * np.pi * freq * (math.cos(angle) * xx + math.sin(angle) * yy)) > 0).astype(np.float32)
    elif kind == 3:
        freq = rng.uniform(2, 8)
        t = ((np.floor(freq * xx) + np.floor(freq * yy)) % 2).astype(np.float32)
    else:
        t = 0.5 + 0.25 * _fractal_noise(rng, h, w, rng.uniform(2, 12))
    t = np.clip(t, 0, 1)[..., None]
    return c1 * (1 - t) + c2 * t


def _shape_distance(rng, xx, yy, radius: float) -> np.ndarray:
    """Signed distance-like field (grid units, negative inside) of a random shape of about ``radius``."""
    cx, cy = rng.uniform(-0.85, 0.85, size=2) * np.array([xx.max(), yy.max()])
    u, v = _local_coords(xx, yy, cx, cy, rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0))
    d, theta = np.hypot(u, v), np.arctan2(v, u)
    kind = rng.integers(6)
    if kind == 0:  # ellipse (the aspect of the local frame makes it one)
        return d - radius
    if kind == 1:  # regular polygon
        n = int(rng.integers(3, 9))
        sector = np.mod(theta, 2 * np.pi / n) - np.pi / n
        return d - radius * math.cos(np.pi / n) / np.cos(sector)
    if kind == 2:  # star
        n, depth = int(rng.integers(4, 9)), rng.uniform(0.3, 0.6)
        t = np.mod(theta * n / (2 * np.pi), 1.0)
        return d - radius * (1 - depth + depth * np.abs(2 * t - 1))
    if kind == 3:  # ring
        width = radius * rng.uniform(0.25, 0.5)
        return np.abs(d - (radius - width)) - width
    if kind == 4:  # rectangle
        return np.maximum(np.abs(u) - radius, np.abs(v) - radius * rng.uniform(0.4, 1.0))
    return d - radius * _fourier_radius(rng, theta, 1.0)  # irregular blob


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    xx, yy, scale = _grid(h, w)
    image = _texture(rng, xx, yy, h, w)
    num_shapes = int(rng.integers(2, 8))
    target = int(rng.integers(num_shapes))
    coverages, inside = [], []
    for i in range(num_shapes):
        radius = rng.uniform(0.2, 0.6) if i == target else rng.uniform(0.08, 0.5)
        distance_px = _shape_distance(rng, xx, yy, radius) * scale
        coverages.append(_coverage(distance_px, rng.uniform(0.5, 1.5)))
        inside.append(distance_px < 0)
    # The target's mask is what stays visible; a target mostly hidden by later shapes goes on top.
    occluded = np.zeros((h, w), bool)
    for later in inside[target + 1 :]:
        occluded |= later
    if (inside[target] & ~occluded).sum() < 0.6 * inside[target].sum() or not inside[target].any():
        order = [i for i in range(num_shapes) if i != target] + [target]
        occluded[:] = False
    else:
        order = list(range(num_shapes))
    for i in order:
        alpha = coverages[i][..., None]
        image = image * (1 - alpha) + _texture(rng, xx, yy, h, w) * alpha
    image = _blur(image.astype(np.float32), rng.uniform(0, 1.0) * min(h, w) / 256)
    image = image + rng.uniform(0, 0.03) * rng.standard_normal(image.shape).astype(np.float32)
    return _to_uint8(image), inside[target] & ~occluded


class SyntheticScenesDataset(torch.utils.data.Dataset):
    """Generic scenes for pretraining a tiny SAM: varied shapes (ellipses, polygons, stars,
    rings, rectangles, blobs) with flat, gradient, striped, checkered or noisy fills over
    such backgrounds; each sample's mask is ONE target object's visible region."""

    def __init__(self, num_samples: int, image_size: int | tuple[int, int] = 128, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.image_size = _size_hw(image_size)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = _sample_rng(_KIND_SCENE, self.seed, index)
        for _ in range(8):  # a target can come out empty when it lands mostly off-frame
            image, mask = _scene(rng, *self.image_size)
            if mask.sum() >= 0.005 * mask.size:
                break
        return {"image": image, "mask": mask, "name": f"scene-s{self.seed}-{index:05d}"}

    def __repr__(self) -> str:
        return f"SyntheticScenesDataset(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed})"


# --------------------------------------------------------------------------------------
# Writing to disk


def write_dataset(
    dataset, root: str | os.PathLike, *, image_ext: str = ".jpg", mask_ext: str = ".png", jpeg_quality: int = 95
) -> Path:
    """Write ``dataset``'s samples in the Kvasir-SEG layout, ``root/images/<name><image_ext>`` and
    ``root/masks/<name><mask_ext>`` (masks 0/255 greyscale; PNG by default so they stay exact)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        sample = dataset[index]
        image = Image.fromarray(sample["image"])
        mask = Image.fromarray(sample["mask"].astype(np.uint8) * 255)
        for img, path in ((image, root / "images" / f"{sample['name']}{image_ext}"),
                          (mask, root / "masks" / f"{sample['name']}{mask_ext}")):
            if path.suffix.lower() in (".jpg", ".jpeg"):
                img.save(path, quality=jpeg_quality)
            else:
                img.save(path)
    return root


def write_benchmark(splits: dict, root: str | os.PathLike, **write_kwargs) -> Path:
    """Write ``make_polyp_splits`` output in the benchmark layout: ``TrainDataset`` (train) and
    ``TestDataset/Synthetic`` (test), ``TestDataset/Synthetic-shifted`` (test_shifted)."""
    root = Path(root)
    write_dataset(splits["train"], root / "TrainDataset", **write_kwargs)
    write_dataset(splits["test"], root / "TestDataset" / "Synthetic", **write_kwargs)
    write_dataset(splits["test_shifted"], root / "TestDataset" / "Synthetic-shifted", **write_kwargs)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic polyp data set to disk.")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--layout", choices=("kvasir", "benchmark"), default="kvasir")
    parser.add_argument("--num", type=int, default=100, help="frames (kvasir) or training frames (benchmark)")
    parser.add_argument("--num-test", type=int, default=50, help="frames per test set (benchmark layout)")
    parser.add_argument("--size", type=int, default=256, help="square frame side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shifted", action="store_true", help="shifted distribution (kvasir layout)")
    args = parser.parse_args(argv)
    if args.layout == "kvasir":
        write_dataset(SyntheticPolypDataset(args.num, args.size, args.seed, args.shifted), args.out)
    else:
        write_benchmark(make_polyp_splits(args.size, args.num, 0, args.num_test, args.seed), args.out)
    print(f"wrote {args.layout} layout to {args.out}")


if __name__ == "__main__":
    main()
