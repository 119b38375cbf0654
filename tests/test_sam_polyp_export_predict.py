"""From a trained run to a plain SAM file and to masks: ``export`` and ``predict``."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.sam_polyp import checkpoint as ckpt
from examples.sam_polyp.cli import main
from examples.sam_polyp.distributed import DistContext
from examples.sam_polyp.experiment import ExperimentConfig, run_experiment
from examples.sam_polyp.export import ExportError, export_run, load_run_model, run_description
from examples.sam_polyp.model import BoxPromptSam, build_sam, build_tiny_sam, configure_mode
from examples.sam_polyp.predict import PredictError, read_boxes_csv
from examples.sam_polyp.train import TrainConfig
from lora_fused import LoRALinear
from parity import assert_parity
from sam_float64 import sam_in_float64

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg-sample"
needs_kvasir = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG sample not found at {KVASIR}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished tiny-SAM run (LoRA + decoder, random base weights, a few steps)."""
    out = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(model="tiny", modes=["lora"], train_decoder=True, lora_dropout=0.1, synthetic_image_size=64,
                           synthetic_train=16, synthetic_val=8, synthetic_test=8, out=str(out), num_overlays=0,
                           train=TrainConfig(steps=4, batch_size=4, lr=5e-3, warmup_steps=1, eval_every=2,
                                             save_every=0, log_every=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the loud warning is expected here
        results = run_experiment(cfg, DistContext())
    return out / "runs" / "seed0" / "lora", results


def _inputs(size=64, count=2):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(count, 3, size, size, generator=gen)
    boxes = torch.tensor([[5.0, 8.0, 40.0, 44.0], [12.0, 3.0, 60.0, 30.0]])[:count]
    return images, boxes


def test_the_table_says_which_step_was_evaluated(lora_run):
    run_dir, results = lora_run
    best = ckpt.best_checkpoint(run_dir)
    assert best is not None and best[1]["step"] in (2, 4)
    run = results["runs"][0]
    assert run["eval_step"] == best[1]["step"] and run["eval_val_dice"] == best[1]["val_dice"]
    table = (run_dir.parents[2] / "results.md").read_text()
    assert f"| {best[1]['step']} |" in table and "evaluated step" in table.splitlines()[0]


def test_export_loads_strictly_into_the_builder_and_matches_the_lora_model(lora_run, tmp_path):
    run_dir, _ = lora_run
    out = tmp_path / "polyp_sam.pth"
    meta = export_run(run_dir, out, log=lambda *a: None)
    assert meta["model"] == "tiny" and json.loads(Path(f"{out}.json").read_text())["step"] == meta["step"]
    plain = build_tiny_sam()
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert build_sam("tiny", out) is not None  # the example's builder (strict as well)

    lora_sam, info = load_run_model(run_dir, log=lambda *a: None)
    assert info["step"] == meta["step"]
    assert any(isinstance(m, LoRALinear) for m in lora_sam.modules())
    lora_sam.eval()
    images, boxes = _inputs()
    with torch.no_grad():
        lora_logits, lora_iou = BoxPromptSam(lora_sam)(images, boxes)
        exported_logits, exported_iou = BoxPromptSam(plain.eval())(images, boxes)
        for m in lora_sam.modules():
            if isinstance(m, LoRALinear):
                m.backend = "torch"  # the reference op runs in float64
        ref_logits, ref_iou = BoxPromptSam(sam_in_float64(lora_sam))(images.double(), boxes.double())
    assert_parity("exported logits", exported_logits, lora_logits, ref_logits)
    assert_parity("exported IoU", exported_iou, lora_iou, ref_iou)


def test_export_refuses_what_it_cannot_export(lora_run, tmp_path):
    with pytest.raises(ExportError, match="no run.json"):
        export_run(tmp_path, tmp_path / "x.pth")
    run_dir, _ = lora_run
    vanilla = tmp_path / "vanilla"
    vanilla.mkdir()
    (vanilla / "run.json").write_text(json.dumps({**json.loads((run_dir / "run.json").read_text()), "mode": "vanilla"}))
    with pytest.raises(ExportError, match="vanilla run: nothing was trained"):
        export_run(vanilla, tmp_path / "x.pth")
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_export_of_a_vit_b_run_loads_with_sam_model_registry(tmp_path):
    """The file an exported ViT-B run writes is what ``sam_model_registry['vit_b'](checkpoint=...)``
    loads with strict=True, and it equals the merged model's weights."""
    from segment_anything import sam_model_registry

    run_dir = tmp_path / "runs" / "seed0" / "lora"
    cfg = ExperimentConfig(model="vit_b", modes=["lora"], rank=2, train_decoder=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = build_sam("vit_b", None, init_seed=0)
    configure_mode(sam, "lora", rank=2, train_decoder=True)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "lora_B" in name or name.startswith("mask_decoder.output_upscaling.0"):
                p.normal_(0, 0.02)  # as if trained: adapters and decoder moved
    ckpt.save_best(run_dir, 7, 0.5, sam)
    (run_dir / "run.json").write_text(json.dumps(run_description(cfg, 1024, "lora", 0, None, {})))
    merged_expected = {}
    for name, module in sam.named_modules():
        if isinstance(module, LoRALinear):
            merged_expected[f"{name}.weight"] = module.weight.detach() + module.adapter.delta_weight()
    decoder_expected = sam.mask_decoder.output_upscaling[0].weight.detach().clone()
    del sam

    out = tmp_path / "sam_vit_b_polyp.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = export_run(run_dir, out, log=lambda *a: None)
    assert meta["load_with"].startswith("segment_anything.sam_model_registry['vit_b']")
    loaded = sam_model_registry["vit_b"](checkpoint=str(out)).state_dict()
    for key, value in merged_expected.items():
        assert torch.allclose(loaded[key], value, atol=1e-6), key
    assert torch.equal(loaded["mask_decoder.output_upscaling.0.weight"], decoder_expected)


# -- predict -----------------------------------------------------------------------------------
def _check_prediction_folder(out: Path, images: list[Path]):
    for image in images:
        mask = np.asarray(Image.open(out / "masks" / f"{image.stem}.png"))
        with Image.open(image) as original:
            assert mask.shape == (original.height, original.width), image.name
        assert set(np.unique(mask)) <= {0, 255}
        assert (out / "overlays" / f"{image.stem}.png").is_file()
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}


@needs_kvasir
def test_predict_on_the_kvasir_sample_from_a_run_and_from_the_exported_file(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    images = sorted((KVASIR / "images").glob("*.jpg"))
    code = main(["predict", "--run", str(run_dir), "--images", str(KVASIR / "images"), "--boxes-from-masks",
                 str(KVASIR / "masks"), "--out", str(tmp_path / "from_run"), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Dice " in printed and "IoU " in printed and "over 5 images" in printed
    from_run = _check_prediction_folder(tmp_path / "from_run", images)
    metrics = json.loads((tmp_path / "from_run" / "metrics.json").read_text())
    assert metrics["scored"] == 5 and 0.0 <= metrics["dice"] <= 1.0

    # the same boxes from a CSV, on the exported file: the same masks (the same merged weights)
    export_run(run_dir, tmp_path / "model.pth", log=lambda *a: None)
    with open(tmp_path / "from_run" / "predictions.csv") as handle:
        rows = [line.split(",")[:5] for line in handle.read().splitlines()[1:]]
    (tmp_path / "boxes.csv").write_text("file,x0,y0,x1,y1\n" + "\n".join(",".join(r) for r in rows) + "\n")
    code = main(["predict", "--checkpoint", str(tmp_path / "model.pth"), "--images", str(KVASIR / "images"),
                 "--boxes", str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "from_file"), "--amp", "none"])
    assert code == 0 and "Dice" not in capsys.readouterr().out  # no masks given, no scores
    from_file = _check_prediction_folder(tmp_path / "from_file", images)
    assert from_run.keys() == from_file.keys()
    for name in from_run:
        assert np.array_equal(from_run[name], from_file[name]), name


@needs_kvasir
def test_predict_scores_each_image_as_evaluate_does(lora_run, tmp_path):
    """predict runs evaluate's batched prediction: the same images, boxes and batches give the
    same masks, hence the same per-image scores (one computation: compared exactly)."""
    from examples.sam_polyp.data import load_image_mask_folders
    from examples.sam_polyp.evaluate import evaluate
    from examples.sam_polyp.predict import image_files, jobs_from_masks, load_model, predict
    from examples.sam_polyp.preprocess import PromptedSegmentation

    run_dir, _ = lora_run
    quiet = lambda *a: None  # noqa: E731
    model, preprocess = load_model(str(run_dir), None, None, None, None, quiet)
    jobs = jobs_from_masks(image_files(KVASIR / "images"), KVASIR / "masks", quiet)
    predicted = predict(model, jobs, tmp_path, preprocess, torch.device("cpu"), batch_size=2, log=quiet)
    dataset = PromptedSegmentation(load_image_mask_folders(KVASIR / "images", KVASIR / "masks"), model.img_size,
                                   preprocess=preprocess)
    evaluated = evaluate(model, dataset, DistContext(), batch_size=2)
    assert len(jobs) == len(dataset) == 5
    assert {Path(row["name"]).stem: (row["dice"], row["iou"]) for row in predicted["per_image"]} == \
        {row["name"]: (row["dice"], row["iou"]) for row in evaluated["per_image"]}


def test_box_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("file,x0,y0,x1,y1\na.jpg,1,2,3\n")
    with pytest.raises(PredictError, match="line 2: expected 5 columns"):
        read_boxes_csv(path)
    path.write_text("a.jpg,10,2,3,4\n")
    with pytest.raises(PredictError, match=r"line 1: need finite x0 <= x1"):
        read_boxes_csv(path)
    path.write_text("a.jpg,1,2,3,4\na.jpg,1,2,3,5\n")
    with pytest.raises(PredictError, match="line 2: a second box for a.jpg"):
        read_boxes_csv(path)
    path.write_text("a.jpg,1,2,x,4\nb.jpg,1,2,3,4\n")
    assert list(read_boxes_csv(path)) == ["b.jpg"]  # a non-numeric first row is a header


@needs_kvasir
def test_predict_refuses_images_without_a_box(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    (tmp_path / "boxes.csv").write_text("cju0qkwl35piu0993l0dewei2.jpg,10,10,100,100\n")
    code = main(["predict", "--run", str(run_dir), "--images", str(KVASIR / "images"),
                 "--boxes", str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "out")])
    assert code == 2 and "4 image(s) have no box" in capsys.readouterr().err
