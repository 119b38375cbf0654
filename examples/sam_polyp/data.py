"""Polyp segmentation data on disk: loaders for the usual folder layouts, and validation.

A sample is a dict ``{"image": uint8 [H, W, 3] RGB, "mask": bool [H, W], "name": str}``,
raw and unprocessed: SAM preprocessing (resize, normalise, pad, box prompts) belongs to the
training side.

Layouts understood (see :func:`open_polyp_data`):

- the standard polyp benchmark split (PraNet and successors)::

      TrainDataset/{images,masks}/
      TestDataset/<Kvasir|CVC-ClinicDB|CVC-ColonDB|ETIS-LaribPolypDB|CVC-300>/{images,masks}/

- the original Kvasir-SEG folder: ``images/*.jpg`` and ``masks/*.jpg``;
- any pair of image / mask folders, matched by file stem (:func:`load_image_mask_folders`).

Empty masks (no polyp in the frame) are legal data, not a crash: :func:`validate_dataset`
reports them as warnings and the dataset keeps them. A box-prompted model cannot be
prompted on them (there is no box), so :func:`check_dataset` with
``drop_empty_masks=True`` removes them; the SAM example does this for training and for
box-prompted evaluation and logs which files it left out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# JPEG masks carry compression artifacts around the boundary (16-18 grey levels in Kvasir-SEG).
MASK_THRESHOLD = 127
BENCHMARK_TEST_SETS = ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300")
# Folder names seen in the wild for the two halves of a data set (CVC-ClinicDB ships
# "Original" / "Ground Truth"), most common first.
IMAGE_DIR_NAMES = ("images", "image", "imgs", "img", "Original", "original")
MASK_DIR_NAMES = ("masks", "mask", "gts", "gt", "GT", "Ground Truth", "GroundTruth", "ground_truth", "labels")
# Mask files are sometimes named "<stem>_mask.png" etc.; tried after an exact stem match fails.
_MASK_STEM_SUFFIXES = ("_mask", "-mask", "_Mask", "_seg", "_segmentation", "_gt", "_GT", "_label")
# A mask covering almost the whole frame is more likely inverted than a real polyp.
_FULL_MASK_FRACTION = 0.95


class Sample(TypedDict):
    image: np.ndarray  # uint8 [H, W, 3] RGB
    mask: np.ndarray  # bool [H, W]
    name: str


class UnreadableFileError(OSError):
    """An image or mask file exists but cannot be decoded."""


# --------------------------------------------------------------------------------------
# Reading files


# Bit depths a 16-bit container may hold (10-bit endoscopy sensors, 12/14-bit raw exports).
_BIT_DEPTHS = (8, 10, 12, 14, 16)


def _to_uint8(img: Image.Image, path: Path | None = None) -> Image.Image:
    """Bring 16-bit and float images to 8 bits; PIL's own convert() clips them instead of scaling.

    Integer images are scaled by their actual bit depth — the smallest of 8/10/12/14/16 bits
    that holds the image's maximum — not by the container's 16 bits (10-bit values divided by
    257 come out nearly black); when that is not 16 bits a warning says so.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode == "F":
            if peak <= 1.0:
                arr = arr * 255.0
            elif peak > 255.0:
                arr = arr * (255.0 / peak)
        elif peak > 255.0:
            bits = next((b for b in _BIT_DEPTHS if peak <= 2 ** b - 1), None)
            full = 2.0 ** bits - 1 if bits is not None else peak
            if bits != 16:
                logger.warning("%s: %s values up to %d read as %s (scaled by 255/%d)", path or "image", img.mode,
                               int(peak), f"{bits}-bit" if bits else "their maximum", int(full))
            arr = arr * (255.0 / full)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


def _open_decoded(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not mid-training
            return _to_uint8(img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableFileError(f"cannot read {what} file {path}: {err}") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 [H, W, 3] RGB (grey is replicated, an alpha channel dropped)."""
    img = _open_decoded(Path(path), "image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_mask_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as uint8 [H, W] grey levels (RGB masks via PIL's luma conversion)."""
    img = _open_decoded(Path(path), "mask")
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask file as bool [H, W]: foreground where grey > 127."""
    return read_mask_gray(path) > MASK_THRESHOLD


def pixel_hash(image: np.ndarray) -> str:
    """SHA-256 of an image's shape and uint8 pixels."""
    digest = hashlib.sha256(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageFacts:
    """What the checks before training need of one image file: its size (the input-size check)
    and its pixel hash (the train/test overlap check)."""

    hw: tuple[int, int]
    pixel_hash: str


# Facts per file version (path, size, modification time): validation decodes each image once and
# the later checks read from here; a file changed on disk is decoded again.
_IMAGE_FACTS: dict[tuple[str, int, int], ImageFacts] = {}


def image_facts(path: str | os.PathLike) -> ImageFacts:
    """:class:`ImageFacts` of an image file, decoded on the first call for this version of the
    file and remembered; raises as :func:`read_image` does, naming the file."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    facts = _IMAGE_FACTS.get(key)
    if facts is None:
        image = read_image(path)
        facts = _IMAGE_FACTS[key] = ImageFacts(image.shape[:2], pixel_hash(image))
    return facts


# --------------------------------------------------------------------------------------
# Problems found in a data set


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with one file.

    kind: ``unreadable_image``, ``unreadable_mask``, ``missing_mask``, ``missing_image``,
    ``size_mismatch``, ``duplicate_stem``, ``faint_mask``, ``bad_sample``, ``bad_size`` (errors) or
    ``empty_mask``, ``full_mask`` (warnings). ``index``: the sample (pair) it belongs to, where
    it belongs to one.
    """

    kind: str
    path: str
    message: str
    severity: Severity = "error"
    index: int | None = None

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


_MAX_LISTED = 25  # problems spelled out in an error message; the rest are counted


class DataValidationError(ValueError):
    """A data set has problems that stop training; ``problems`` lists every one of them."""

    def __init__(self, problems: Sequence[DataProblem], dataset_name: str = ""):
        self.problems = list(problems)
        errors = sum(p.severity == "error" for p in self.problems)
        where = f" in data set {dataset_name!r}" if dataset_name else ""
        lines = [f"{errors} error(s), {len(self.problems) - errors} warning(s){where}:"]
        shown = sorted(self.problems, key=lambda p: p.severity != "error")[:_MAX_LISTED]  # errors first
        lines += [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more of the same kinds")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------
# The folder-backed dataset


def _natural_key(text: str) -> list:
    """Sort "2.png" before "10.png" (CVC data sets use bare frame numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


class PolypFolderDataset(torch.utils.data.Dataset):
    """Image/mask file pairs; ``dataset[i]`` reads and returns a :class:`Sample`.

    ``pairing_problems`` holds what went wrong while pairing files (an image without a mask,
    a mask without an image, two files with one stem); :func:`validate_dataset` reports them
    together with the per-file checks.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
        *,
        name: str = "",
        pairing_problems: Sequence[DataProblem] = (),
    ):
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.name = name
        self.pairing_problems = list(pairing_problems)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        return {"image": image, "mask": mask, "name": image_path.stem}

    def __repr__(self) -> str:
        return f"PolypFolderDataset(name={self.name!r}, pairs={len(self.pairs)})"

    @property
    def names(self) -> list[str]:
        return [image.stem for image, _ in self.pairs]

    def subset(self, indices: Sequence[int], *, name: str | None = None, keep_pairing_problems: bool = True):
        """A dataset over ``self.pairs[i] for i in indices``."""
        return PolypFolderDataset(
            [self.pairs[i] for i in indices],
            name=self.name if name is None else name,
            pairing_problems=self.pairing_problems if keep_pairing_problems else (),
        )

    def holdout(self, fraction: float, seed: int = 0) -> tuple[PolypFolderDataset, PolypFolderDataset]:
        """Split into (rest, held_out) with ``round(fraction * len)`` held-out pairs, deterministic by seed.

        Pairing problems stay with ``rest`` so that validating both parts reports them once.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
        if len(self) < 2:
            if self.pairing_problems:  # e.g. an empty masks/ folder: say which masks are missing
                raise DataValidationError(self.pairing_problems, self.name)
            raise ValueError(f"cannot hold out part of {self!r}: it has fewer than 2 pairs")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        count = min(max(1, round(fraction * len(self))), len(self) - 1)
        held, rest = sorted(order[:count]), sorted(order[count:])
        return self.subset(rest), self.subset(held, name=f"{self.name}-holdout", keep_pairing_problems=False)


# --------------------------------------------------------------------------------------
# Loaders


def _image_files(folder: Path) -> list[Path]:
    # Skip hidden files, including macOS "._name.jpg" resource forks that look like images.
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    ]


def _by_stem(files: list[Path], problems: list[DataProblem], what: str) -> dict[str, Path]:
    table: dict[str, list[Path]] = {}
    for path in files:
        table.setdefault(path.stem, []).append(path)
    unique = {}
    for stem, paths in table.items():
        if len(paths) > 1:
            names = ", ".join(sorted(p.name for p in paths))
            message = f"{len(paths)} {what} files share the stem {stem!r} in {paths[0].parent}: {names}"
            problems.append(DataProblem("duplicate_stem", str(paths[0]), message))
        else:
            unique[stem] = paths[0]
    return unique


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")


def load_image_mask_folders(
    images_dir: str | os.PathLike, masks_dir: str | os.PathLike, *, name: str | None = None
) -> PolypFolderDataset:
    """Pair every image in ``images_dir`` with the mask in ``masks_dir`` that has the same stem.

    A mask named ``<stem>_mask``, ``<stem>_segmentation`` etc. also matches. Unpaired files
    and duplicate stems do not raise here: they are kept in ``pairing_problems`` so that
    :func:`validate_dataset` can report them with everything else.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    _require_dir(images_dir, "image")
    _require_dir(masks_dir, "mask")
    image_files, mask_files = _image_files(images_dir), _image_files(masks_dir)
    if not image_files:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {images_dir}")

    problems: list[DataProblem] = []
    images = _by_stem(image_files, problems, "image")
    masks = _by_stem(mask_files, problems, "mask")
    for stem in list(masks):
        for suffix in _MASK_STEM_SUFFIXES:
            base = stem[: -len(suffix)] if stem.endswith(suffix) else None
            if base and base in images and base not in masks:
                masks[base] = masks.pop(stem)
                break

    # A duplicated stem is reported once, not again as an image without mask (or vice versa).
    ambiguous = {Path(p.path).stem for p in problems if p.kind == "duplicate_stem"}
    images = {stem: path for stem, path in images.items() if stem not in ambiguous}
    masks = {stem: path for stem, path in masks.items() if stem not in ambiguous}
    pairs = []
    for stem in sorted(images, key=_natural_key):
        if stem in masks:
            pairs.append((images[stem], masks.pop(stem)))
        else:
            message = f"image {images[stem]} has no mask named {stem}.* in {masks_dir}"
            problems.append(DataProblem("missing_mask", str(images[stem]), message))
    for stem in sorted(masks, key=_natural_key):
        message = f"mask {masks[stem]} has no image named {stem}.* in {images_dir}"
        problems.append(DataProblem("missing_image", str(masks[stem]), message))
    name = name if name is not None else images_dir.parent.name
    return PolypFolderDataset(pairs, name=name, pairing_problems=problems)


def _find_subdir(root: Path, candidates: Sequence[str]) -> Path | None:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    return None


def _image_mask_dirs(root: Path) -> tuple[Path, Path] | None:
    images, masks = _find_subdir(root, IMAGE_DIR_NAMES), _find_subdir(root, MASK_DIR_NAMES)
    return (images, masks) if images and masks else None


def load_kvasir_seg(root: str | os.PathLike) -> PolypFolderDataset:
    """The original Kvasir-SEG folder: ``root/images/*.jpg`` with ``root/masks/*.jpg``."""
    root = Path(root)
    _require_dir(root, "Kvasir-SEG")
    _require_dir(root / "images", "Kvasir-SEG image")
    _require_dir(root / "masks", "Kvasir-SEG mask")
    return load_image_mask_folders(root / "images", root / "masks", name=root.name)


def load_polyp_benchmark(root: str | os.PathLike) -> tuple[PolypFolderDataset, dict[str, PolypFolderDataset]]:
    """The standard split: ``(train, {test_set_name: dataset})`` for whichever test sets are present.

    The five standard test sets come first, in their usual order; other folders under
    ``TestDataset`` that hold images and masks follow alphabetically.
    """
    root = Path(root)
    train_root, test_root = root / "TrainDataset", root / "TestDataset"
    _require_dir(train_root, "benchmark TrainDataset")
    _require_dir(test_root, "benchmark TestDataset")
    train_dirs = _image_mask_dirs(train_root)
    if train_dirs is None:
        raise FileNotFoundError(f"{train_root} must contain an images/ and a masks/ folder")
    train = load_image_mask_folders(*train_dirs, name="TrainDataset")

    found = sorted(p for p in test_root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    standard = {name: i for i, name in enumerate(BENCHMARK_TEST_SETS)}
    found.sort(key=lambda p: (standard.get(p.name, len(standard)), p.name))
    tests = {}
    for folder in found:
        dirs = _image_mask_dirs(folder)
        if dirs is None:
            logger.warning("skipping %s: it has no images/ and masks/ folders", folder)
            continue
        tests[folder.name] = load_image_mask_folders(*dirs, name=folder.name)
    if not tests:
        raise FileNotFoundError(
            f"no test set under {test_root}: expected folders such as {', '.join(BENCHMARK_TEST_SETS)}, "
            "each with images/ and masks/"
        )
    return train, tests


def detect_layout(path: str | os.PathLike) -> tuple[str, Path]:
    """``("benchmark" | "folders", root)`` for a data folder, descending into a lone subfolder
    (an unzipped ``Kvasir-SEG.zip`` gives ``<dir>/Kvasir-SEG/{images,masks}``)."""
    root = Path(path)
    _require_dir(root, "data")
    for _ in range(2):
        if (root / "TrainDataset").is_dir() or (root / "TestDataset").is_dir():
            return "benchmark", root
        if _image_mask_dirs(root) is not None:
            return "folders", root
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
        if len(subdirs) != 1:
            break
        root = subdirs[0]
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir())[:20]
    raise ValueError(
        f"cannot tell the data layout of {path}: expected TrainDataset/ + TestDataset/ (benchmark split) "
        f"or images/ + masks/ (Kvasir-SEG style); found {listing or 'an empty folder'}"
    )


def open_polyp_data(
    path: str | os.PathLike, *, holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[PolypFolderDataset, dict[str, PolypFolderDataset]]:
    """Open a polyp data folder of any supported layout as ``(train, {test_name: test})``.

    The benchmark split is returned as it is. A single image/mask collection (Kvasir-SEG and
    the like) has no test split of its own, so ``holdout_fraction`` of it (deterministic by
    ``seed``) becomes one test set named ``"<folder>-holdout"``; ``holdout_fraction=0``
    returns everything as training data and no test set.
    """
    layout, root = detect_layout(path)
    if layout == "benchmark":
        return load_polyp_benchmark(root)
    dataset = load_image_mask_folders(*_image_mask_dirs(root), name=root.name)
    if holdout_fraction == 0:
        return dataset, {}
    train, held_out = dataset.holdout(holdout_fraction, seed)
    return train, {held_out.name: held_out}


# --------------------------------------------------------------------------------------
# Validation


def _check_mask_content(gray_or_bool: np.ndarray, path: str) -> list[DataProblem]:
    mask = gray_or_bool > MASK_THRESHOLD if gray_or_bool.dtype != bool else gray_or_bool
    if mask.any():
        if mask.mean() > _FULL_MASK_FRACTION:
            return [
                DataProblem(
                    "full_mask",
                    path,
                    f"mask {path} covers {mask.mean():.0%} of the frame: is it inverted (polyp must be white)?",
                    "warning",
                )
            ]
        return []
    if gray_or_bool.dtype != bool and gray_or_bool.max() > 0:
        return [
            DataProblem(
                "faint_mask",
                path,
                f"mask {path} has no pixel above {MASK_THRESHOLD} (max {gray_or_bool.max()}): "
                "if it stores labels as 0/1, rescale it to 0/255",
            )
        ]
    return [DataProblem("empty_mask", path, f"mask {path} is empty (no polyp in this frame)", "warning")]


def _check_pair(image_path: Path, mask_path: Path) -> list[DataProblem]:
    problems = []
    image_hw = mask_hw = None
    try:
        image_hw = image_facts(image_path).hw
    except FileNotFoundError:
        problems.append(DataProblem("missing_image", str(image_path), f"image file not found: {image_path}"))
    except UnreadableFileError as err:
        problems.append(DataProblem("unreadable_image", str(image_path), str(err)))
    try:
        gray = read_mask_gray(mask_path)
        mask_hw = gray.shape
        problems += _check_mask_content(gray, str(mask_path))
    except FileNotFoundError:
        message = f"mask file not found: {mask_path} (for image {image_path})"
        problems.append(DataProblem("missing_mask", str(mask_path), message))
    except UnreadableFileError as err:
        problems.append(DataProblem("unreadable_mask", str(mask_path), str(err)))
    if image_hw is not None and mask_hw is not None and image_hw != mask_hw:
        (ih, iw), (mh, mw) = image_hw, mask_hw
        problems.append(
            DataProblem(
                "size_mismatch",
                str(image_path),
                f"image {image_path} is {iw}x{ih} but its mask {mask_path} is {mw}x{mh} (width x height)",
            )
        )
    return problems


def _check_sample(sample, index: int) -> list[DataProblem]:
    name = str(sample.get("name", f"#{index}")) if isinstance(sample, dict) else f"#{index}"
    image, mask = (sample.get("image"), sample.get("mask")) if isinstance(sample, dict) else (None, None)
    where = f"sample {name!r} (index {index})"
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        return [DataProblem("bad_sample", name, f"{where}: image must be a uint8 [H, W, 3] array, got {got}")]
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.shape != image.shape[:2]:
        got = f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {getattr(mask, 'shape', '')}"
        return [DataProblem("bad_sample", name, f"{where}: mask must be a bool {image.shape[:2]} array, got {got}")]
    return _check_mask_content(mask, where)


def validate_dataset(dataset, *, num_threads: int | None = None) -> list[DataProblem]:
    """Every problem in ``dataset``, errors and warnings, in dataset order; [] when clean.

    For a :class:`PolypFolderDataset` each file is decoded (in a few threads: PIL releases
    the GIL while decoding) and pairing problems are included; any other dataset of samples
    is iterated and each sample's arrays are checked.
    """
    if isinstance(dataset, PolypFolderDataset):
        threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            per_sample = list(pool.map(lambda pair: _check_pair(*pair), dataset.pairs))
        problems = list(dataset.pairing_problems)
    else:
        per_sample = [_check_sample(dataset[index], index) for index in range(len(dataset))]
        problems = []
    return problems + [replace(p, index=index) for index, found in enumerate(per_sample) for p in found]


def check_dataset(dataset, *, drop_empty_masks: bool = False, name: str | None = None):
    """Validate before training: raise :class:`DataValidationError` listing all problems if any is
    an error; otherwise log the warnings and return the dataset (without its empty-mask samples
    when ``drop_empty_masks``, e.g. for box-prompted training where no box can be drawn)."""
    label = name if name is not None else getattr(dataset, "name", "")
    problems = validate_dataset(dataset)
    if any(p.severity == "error" for p in problems):
        raise DataValidationError(problems, label)
    for problem in problems:
        logger.warning("%s", problem)
    if not drop_empty_masks:
        return dataset
    drop = {p.index for p in problems if p.kind == "empty_mask"}  # from validation: no sample is read again
    if not drop:
        return dataset
    keep = [i for i in range(len(dataset)) if i not in drop]
    if not keep:
        raise ValueError(f"every mask in data set {label!r} is empty: nothing to train or evaluate on")
    logger.warning("data set %r: left out %d sample(s) with an empty mask", label, len(drop))
    if isinstance(dataset, PolypFolderDataset):
        return dataset.subset(keep)
    return torch.utils.data.Subset(dataset, keep)


def check_input_sizes(datasets: dict, long_side: int, preprocess: str = "sam") -> None:
    """Every image of the folder-backed ``datasets`` can be resized to a ``long_side`` px model
    input; otherwise one error names every file that cannot. Sizes come from :func:`image_facts`
    (remembered from validation); unreadable files are left to validation to report."""
    from .preprocess import resized_shape

    problems = []
    for name, dataset in datasets.items():
        for image_path, _ in getattr(dataset, "pairs", []):
            try:
                resized_shape(*image_facts(image_path).hw, long_side, preprocess)
            except OSError:  # missing or unreadable: validate_dataset names it
                continue
            except ValueError as err:
                problems.append(DataProblem("bad_size", str(image_path), f"image {image_path} ({name}): {err}"))
    if problems:
        raise DataValidationError(problems)
