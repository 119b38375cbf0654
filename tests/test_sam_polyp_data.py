"""Data side of the SAM polyp example: folder loaders, validation, synthetic generators."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from examples.sam_polyp.data import (  # noqa: E402
    DataValidationError,
    PolypFolderDataset,
    check_dataset,
    detect_layout,
    load_image_mask_folders,
    load_kvasir_seg,
    load_polyp_benchmark,
    open_polyp_data,
    read_mask_gray,
    validate_dataset,
)
from examples.sam_polyp.synthetic import (  # noqa: E402
    SyntheticPolypDataset,
    SyntheticScenesDataset,
    main,
    make_polyp_splits,
    write_benchmark,
    write_dataset,
)

# CI places a copy of shared/ beside the repository.
KVASIR_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "kvasir-seg-sample"
needs_kvasir_sample = pytest.mark.skipif(
    not (KVASIR_SAMPLE / "images").is_dir(), reason=f"Kvasir-SEG sample not found at {KVASIR_SAMPLE}"
)


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # mode from dtype and shape: L, I;16, RGB, RGBA
    return path


def _random_image(rng, h=30, w=40) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _disk_mask(h=30, w=40) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2).astype(np.uint8) * 255


# --------------------------------------------------------------------------------------
# The real Kvasir-SEG sample


@needs_kvasir_sample
def test_kvasir_sample_loads_and_binarises_jpeg_masks():
    dataset = load_kvasir_seg(KVASIR_SAMPLE)
    assert len(dataset) == 5
    for (image_path, mask_path), index in zip(dataset.pairs, range(len(dataset))):
        sample = dataset[index]
        image, mask = sample["image"], sample["mask"]
        assert sample["name"] == image_path.stem == mask_path.stem
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) == {False, True}
        assert len(np.unique(read_mask_gray(mask_path))) > 2  # the JPEG artifacts binarisation must remove
        assert 0.07 <= mask.mean() <= 0.32, f"{mask_path.name}: polyp area {mask.mean():.3f}"
    assert validate_dataset(dataset) == []


@needs_kvasir_sample
def test_kvasir_sample_through_open_polyp_data():
    assert detect_layout(KVASIR_SAMPLE) == ("folders", KVASIR_SAMPLE)
    train, tests = open_polyp_data(KVASIR_SAMPLE, holdout_fraction=0.4, seed=1)
    (held_name, held_out), = tests.items()
    assert held_name == "kvasir-seg-sample-holdout"
    assert len(train) == 3 and len(held_out) == 2
    assert not set(train.names) & set(held_out.names)
    assert open_polyp_data(KVASIR_SAMPLE, holdout_fraction=0.4, seed=1)[0].names == train.names
    everything, no_tests = open_polyp_data(KVASIR_SAMPLE, holdout_fraction=0)
    assert len(everything) == 5 and no_tests == {}


# --------------------------------------------------------------------------------------
# Generated folders in each layout


def test_benchmark_layout_round_trip(tmp_path):
    splits = make_polyp_splits(image_size=48, num_train=3, num_val=0, num_test=2, seed=0)
    write_benchmark(splits, tmp_path, image_ext=".png")  # lossless, so loading must give the arrays back
    write_dataset(SyntheticPolypDataset(2, 48, seed=9), tmp_path / "TestDataset" / "Kvasir")
    (tmp_path / "TestDataset" / "notes").mkdir()  # a stray folder without images/masks is skipped

    train, tests = load_polyp_benchmark(tmp_path)
    assert len(train) == 3
    assert list(tests) == ["Kvasir", "Synthetic", "Synthetic-shifted"]  # standard names first
    assert [len(t) for t in tests.values()] == [2, 2, 2]
    for generated, loaded in ((splits["train"], train), (splits["test_shifted"], tests["Synthetic-shifted"])):
        for i in range(len(generated)):
            want, got = generated[i], loaded[i]
            assert got["name"] == want["name"]
            np.testing.assert_array_equal(got["mask"], want["mask"])
            np.testing.assert_array_equal(got["image"], want["image"])
    assert all(validate_dataset(d) == [] for d in (train, *tests.values()))

    via_open = open_polyp_data(tmp_path)
    assert via_open[0].pairs == train.pairs and list(via_open[1]) == list(tests)


def test_kvasir_layout_with_jpeg_masks(tmp_path):
    generated = SyntheticPolypDataset(3, (40, 56), seed=4)
    write_dataset(generated, tmp_path / "Kvasir-SEG", mask_ext=".jpg", jpeg_quality=75)
    # An unzipped archive holds one folder; detection descends into it.
    assert detect_layout(tmp_path) == ("folders", tmp_path / "Kvasir-SEG")
    loaded = load_kvasir_seg(tmp_path / "Kvasir-SEG")
    assert len(loaded) == 3
    for i in range(3):
        want, got = generated[i]["mask"], loaded[i]["mask"]
        assert got.dtype == bool and got.shape == (40, 56)
        iou = (want & got).sum() / (want | got).sum()
        assert iou > 0.95


def test_stem_matched_folders_with_mixed_formats(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "frames", tmp_path / "annotations"
    rgb = _random_image(rng)
    grey = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
    rgba = np.dstack([_random_image(rng), np.full((30, 40), 7, np.uint8)])
    grey16 = (grey.astype(np.uint16) * 257)
    _save(rgb, images / "10.png")
    _save(rgb, images / "2.bmp")
    _save(grey, images / "grey.tif")
    _save(rgba, images / "alpha.png")
    _save(grey16, images / "deep.tif")
    _save(rgb, images / ".hidden.png")  # ignored, like macOS "._" files
    (images / "notes.txt").write_text("not an image")
    for stem in ("10", "2", "grey", "deep"):
        _save(_disk_mask(), masks / f"{stem}.png")
    _save(_disk_mask(), masks / "alpha_mask.bmp")  # "<stem>_mask" also matches

    dataset = load_image_mask_folders(images, masks)
    assert dataset.names == ["2", "10", "alpha", "deep", "grey"]  # natural order
    assert validate_dataset(dataset) == []
    samples = {dataset[i]["name"]: dataset[i] for i in range(len(dataset))}
    np.testing.assert_array_equal(samples["10"]["image"], rgb)
    np.testing.assert_array_equal(samples["2"]["image"], rgb)
    np.testing.assert_array_equal(samples["grey"]["image"], np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(samples["deep"]["image"], np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(samples["alpha"]["image"], rgba[..., :3])
    for sample in samples.values():
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (30, 40, 3)
        np.testing.assert_array_equal(sample["mask"], _disk_mask() > 127)


def test_missing_folders_and_unknown_layout_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_kvasir_seg(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"cannot tell the data layout.*'a/', 'b/'"):
        open_polyp_data(tmp_path)
    (tmp_path / "TrainDataset" / "images").mkdir(parents=True)
    (tmp_path / "TestDataset").mkdir()
    with pytest.raises(FileNotFoundError, match="masks/"):
        load_polyp_benchmark(tmp_path)
    (tmp_path / "empty_images").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_mask_folders(tmp_path / "empty_images", tmp_path / "b")


# --------------------------------------------------------------------------------------
# Bad data: every problem reported at once, each naming its file


def _bad_folder(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    images, masks = root / "images", root / "masks"
    _save(_random_image(rng), images / "good.jpg")
    _save(_disk_mask(), masks / "good.png")
    (images / "corrupt.jpg").parent.mkdir(parents=True, exist_ok=True)
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    _save(_disk_mask(), masks / "corrupt.png")
    _save(_random_image(rng, 60, 80), images / "truncated.jpg")
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _save(_disk_mask(60, 80), masks / "truncated.png")
    _save(_random_image(rng), images / "lonely.jpg")  # no mask
    _save(_disk_mask(), masks / "orphan.png")  # no image
    _save(_random_image(rng, 30, 40), images / "wrongsize.jpg")
    _save(_disk_mask(40, 30), masks / "wrongsize.png")
    _save(_random_image(rng), images / "nopolyp.jpg")
    _save(np.zeros((30, 40), np.uint8), masks / "nopolyp.png")
    _save(_random_image(rng), images / "labels01.jpg")
    _save((_disk_mask() > 0).astype(np.uint8), masks / "labels01.png")
    _save(_random_image(rng), images / "badmask.jpg")
    (masks / "badmask.png").write_bytes(b"\x89PNG garbage")
    _save(_random_image(rng), images / "twice.jpg")
    _save(_random_image(rng), images / "twice.png")
    _save(_disk_mask(), masks / "twice.png")
    return images, masks


EXPECTED_PROBLEMS = {
    ("unreadable_image", "corrupt.jpg"),
    ("unreadable_image", "truncated.jpg"),
    ("missing_mask", "lonely.jpg"),
    ("missing_image", "orphan.png"),
    ("size_mismatch", "wrongsize.jpg"),
    ("empty_mask", "nopolyp.png"),
    ("faint_mask", "labels01.png"),
    ("unreadable_mask", "badmask.png"),
    ("duplicate_stem", "twice.jpg"),
}


def test_validation_reports_every_problem_naming_the_file(tmp_path):
    dataset = load_image_mask_folders(*_bad_folder(tmp_path))
    problems = validate_dataset(dataset)
    assert {(p.kind, Path(p.path).name) for p in problems} == EXPECTED_PROBLEMS
    for problem in problems:
        assert Path(problem.path).name in problem.message, problem
    assert {p.severity for p in problems if p.kind == "empty_mask"} == {"warning"}
    assert "rescale it to 0/255" in next(p.message for p in problems if p.kind == "faint_mask")
    assert "40x30" in next(p.message for p in problems if p.kind == "size_mismatch")

    with pytest.raises(DataValidationError) as caught:
        check_dataset(dataset)
    message = str(caught.value)
    assert message.startswith("8 error(s), 1 warning(s) in data set")
    for _, file_name in EXPECTED_PROBLEMS:
        assert file_name in message
    assert len(caught.value.problems) == len(EXPECTED_PROBLEMS)


def test_reading_a_bad_pair_raises_with_both_file_names(tmp_path):
    images, masks = _bad_folder(tmp_path)
    dataset = PolypFolderDataset([(images / "wrongsize.jpg", masks / "wrongsize.png")])
    with pytest.raises(ValueError, match=r"wrongsize\.jpg.*wrongsize\.png"):
        dataset[0]
    with pytest.raises(OSError, match=r"cannot read image file .*corrupt\.jpg"):
        PolypFolderDataset([(images / "corrupt.jpg", masks / "corrupt.png")])[0]


def test_empty_masks_are_kept_or_dropped_not_fatal(tmp_path, caplog):
    rng = np.random.default_rng(2)
    for stem, mask in (("a", _disk_mask()), ("b", np.zeros((30, 40), np.uint8)), ("c", _disk_mask())):
        _save(_random_image(rng), tmp_path / "images" / f"{stem}.png")
        _save(mask, tmp_path / "masks" / f"{stem}.png")
    dataset = load_kvasir_seg(tmp_path)
    assert check_dataset(dataset) is dataset
    assert "b.png is empty" in caplog.text
    assert not dataset[1]["mask"].any()  # an empty mask still loads
    kept = check_dataset(dataset, drop_empty_masks=True)
    assert kept.names == ["a", "c"]


class CountingSamples:
    """A generic data set that counts how often each sample is read."""

    def __init__(self, samples):
        self.samples, self.reads = samples, [0] * len(samples)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.samples[index]


def test_dropping_empty_masks_of_a_generic_dataset_reads_each_sample_once():
    full = np.zeros((8, 8), bool)
    full[2:5, 2:5] = True
    samples = CountingSamples([{"image": np.zeros((8, 8, 3), np.uint8), "mask": mask, "name": name}
                               for name, mask in (("a", full), ("b", np.zeros((8, 8), bool)), ("c", full))])
    kept = check_dataset(samples, drop_empty_masks=True)
    assert list(kept.indices) == [0, 2] and samples.reads == [1, 1, 1]


def test_generic_datasets_are_validated_sample_by_sample():
    assert validate_dataset(SyntheticPolypDataset(3, 32, seed=0)) == []
    bad = [
        {"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 8), bool), "name": "blank"},
        {"image": np.zeros((8, 8), np.uint8), "mask": np.zeros((8, 8), bool), "name": "flat"},
        {"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 9), bool), "name": "skew"},
    ]
    problems = validate_dataset(bad)
    kinds = [(p.kind, p.severity) for p in problems]
    assert kinds == [("empty_mask", "warning"), ("bad_sample", "error"), ("bad_sample", "error")]
    assert "'flat'" in problems[1].message and "'skew'" in problems[2].message


# --------------------------------------------------------------------------------------
# Synthetic generators


def _assert_same(a, b):
    assert a["name"] == b["name"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("make", [
    lambda seed: SyntheticPolypDataset(6, 48, seed),
    lambda seed: SyntheticPolypDataset(6, 48, seed, shifted=True),
    lambda seed: SyntheticScenesDataset(6, 48, seed),
])
def test_generators_are_deterministic_by_seed_and_order_free(make):
    first, again, other = make(3), make(3), make(4)
    in_order = [first[i] for i in range(6)]
    for i in reversed(range(6)):  # access order must not matter (DataLoader workers)
        _assert_same(in_order[i], again[i])
    assert not np.array_equal(in_order[0]["image"], other[0]["image"])
    assert not np.array_equal(in_order[0]["image"], in_order[1]["image"])


def test_polyp_frames_look_plausible():
    dataset = SyntheticPolypDataset(16, (64, 96), seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    fractions = []
    for sample in samples:
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (64, 96, 3)
        assert sample["mask"].dtype == bool and sample["mask"].shape == (64, 96)
        fractions.append(sample["mask"].mean())
    assert min(fractions) > 0.005 and max(fractions) < 0.5
    assert 0.03 < np.mean(fractions) < 0.25
    mean_rgb = np.mean([s["image"].reshape(-1, 3).mean(0) for s in samples], axis=0)
    assert mean_rgb[0] > mean_rgb[1] > 0.8 * mean_rgb[2]  # reddish-pink mucosa
    # the polyp differs from the mucosa right around it, but subtly (no painted-on colour)
    differences = []
    for s in samples:
        ring = _dilate(s["mask"], 4) & ~s["mask"]
        inside, around = s["image"][s["mask"]].mean(0), s["image"][ring].mean(0)
        differences.append(np.abs(inside - around).sum())
    assert 5 < np.mean(differences) < 60


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        out[1:] |= out[:-1].copy()
        out[:-1] |= out[1:].copy()
        out[:, 1:] |= out[:, :-1].copy()
        out[:, :-1] |= out[:, 1:].copy()
    return out


def test_shifted_set_is_statistically_different():
    normal = [SyntheticPolypDataset(24, 48, seed=0)[i]["image"] for i in range(24)]
    shifted = [SyntheticPolypDataset(24, 48, seed=0, shifted=True)[i]["image"] for i in range(24)]

    def chroma(images):  # mean colour with brightness divided out, over the visible field
        pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(float)
        pixels = pixels[pixels.sum(1) > 30]
        return (pixels / pixels.sum(1, keepdims=True)).mean(0)

    assert np.abs(chroma(normal) - chroma(shifted)).sum() > 0.05
    # other casts per "hospital": the shifted set's colour varies more from frame to frame
    spread = lambda images: np.std([chroma([im]) for im in images], axis=0).sum()  # noqa: E731
    assert spread(shifted) > 1.5 * spread(normal)


def test_polyp_splits_are_disjoint():
    splits = make_polyp_splits(image_size=32, num_train=4, num_val=2, num_test=3, seed=0)
    assert list(splits) == ["train", "val", "test", "test_shifted"]
    assert [len(d) for d in splits.values()] == [4, 2, 3, 3]
    assert len({d.seed for d in splits.values()}) == 4
    assert [d.shifted for d in splits.values()] == [False, False, False, True]
    names = [d[i]["name"] for d in splits.values() for i in range(len(d))]
    assert len(set(names)) == len(names)
    images = [d[0]["image"].tobytes() for d in splits.values()]
    assert len(set(images)) == 4
    assert make_polyp_splits(32, 4, 2, 3, seed=1)["train"].seed != splits["train"].seed


def test_scenes_have_one_visible_target():
    dataset = SyntheticScenesDataset(24, 64, seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    fractions = [s["mask"].mean() for s in samples]
    assert min(fractions) >= 0.005 and max(fractions) < 0.9
    for s in samples:
        assert s["image"].shape == (64, 64, 3) and s["mask"].shape == (64, 64) and s["mask"].dtype == bool
    colours = np.array([s["image"].reshape(-1, 3).mean(0) for s in samples])
    assert colours.std(0).min() > 15  # varied, not one palette


def test_generation_is_fast():
    start = time.perf_counter()
    for dataset in (SyntheticPolypDataset(64, 128, seed=0), SyntheticScenesDataset(64, 128, seed=0)):
        for i in range(len(dataset)):
            dataset[i]
    assert time.perf_counter() - start < 8.0  # about 2 s on one core; generous for shared CI


def test_cli_writes_kvasir_layout(tmp_path, capsys):
    main([str(tmp_path / "out"), "--num", "3", "--size", "40", "--seed", "5"])
    assert "wrote kvasir layout" in capsys.readouterr().out
    loaded = load_kvasir_seg(tmp_path / "out")
    assert len(loaded) == 3 and validate_dataset(loaded) == []
    np.testing.assert_array_equal(loaded[0]["mask"], SyntheticPolypDataset(3, 40, seed=5)[0]["mask"])
