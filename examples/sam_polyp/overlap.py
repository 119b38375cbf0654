"""Train/test overlap check: no test image may also be a training (or validation) image.

Images are compared by a hash of their decoded pixels (and size), so a file copied under
another name, or re-encoded losslessly (JPEG → PNG), is caught as well as an identical file.
The polyp benchmark split is the case in point: its TrainDataset holds 900 of Kvasir-SEG's
1000 images, so the original Kvasir-SEG folder is no test set for a model trained on it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from .data import image_facts, pixel_hash

_MAX_LISTED = 10  # overlapping pairs spelled out in the error; the rest are counted


class DataOverlapError(ValueError):
    """Test images that are also training images: the evaluation would not be a test."""


def image_hashes(dataset) -> list[tuple[str, str]]:
    """``(hash, where)`` for every image of ``dataset``: file paths for a folder data set (from
    :func:`image_facts`, remembered from validation; any image not seen yet is decoded in a few
    threads, PIL releasing the GIL), sample names for any other."""
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        paths = [image for image, _ in pairs]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            hashes = list(pool.map(lambda path: image_facts(path).pixel_hash, paths))
        return list(zip(hashes, map(str, paths)))
    return [(pixel_hash(sample["image"]), str(sample.get("name", i)))
            for i, sample in ((i, dataset[i]) for i in range(len(dataset)))]


def check_no_overlap(learned: dict, tests: dict) -> None:
    """Raise :class:`DataOverlapError` naming every test image whose pixels equal an image of
    the ``learned`` data sets (training, validation). Both are ``{name: dataset}``."""
    if not learned or not tests:
        return
    seen: dict[str, str] = {}
    for name, dataset in learned.items():
        for digest, where in image_hashes(dataset):
            seen.setdefault(digest, f"{where} ({name})")
    clashes = [(f"{where} ({name})", seen[digest]) for name, dataset in tests.items()
               for digest, where in image_hashes(dataset) if digest in seen]
    if not clashes:
        return
    listed = "\n".join(f"  - test {test} == {train}" for test, train in clashes[:_MAX_LISTED])
    more = f"\n  ... and {len(clashes) - _MAX_LISTED} more" if len(clashes) > _MAX_LISTED else ""
    raise DataOverlapError(
        f"{len(clashes)} test image(s) are also training/validation images (same pixels), so their scores "
        f"would not measure generalisation:\n{listed}{more}\nRemove them from the test folder, or test on a "
        "set the model never saw (with the benchmark split: its TestDataset folders, not the original Kvasir-SEG, "
        "900 of whose images are in TrainDataset).")
