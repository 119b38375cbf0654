"""SAM building, checkpoint errors, the box-prompt wrapper and the trainable sets per mode."""

import copy

import pytest
import torch

from examples.sam_polyp import cli
from examples.sam_polyp.model import (BoxPromptSam, CheckpointError, TinySamConfig, build_sam, build_tiny_sam,
                                      configure_mode, load_sam_weights)
from lora_fused import LoRALinear
from parity import assert_parity
from sam_float64 import sam_in_float64

SMALL = TinySamConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                      global_attn_indexes=(1,), prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2)


def _trainable(sam):
    return {n for n, p in sam.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["vanilla", "lora", "lora-attn", "lora-all", "decoder", "full"])
def test_modes_train_what_they_say(mode):
    torch.manual_seed(0)
    sam = build_tiny_sam(SMALL)
    total_before = sum(p.numel() for p in sam.parameters())
    report = configure_mode(sam, mode)
    names = _trainable(sam)
    assert not any(n.startswith("prompt_encoder.") for n in names)  # frozen in every mode
    lora_layers = [n for n, m in sam.named_modules() if isinstance(m, LoRALinear)]
    if mode == "vanilla":
        assert not names and report.trainable_params == 0
    elif mode == "lora":
        # every image-encoder linear (qkv, proj, lin1, lin2 per block), nothing outside it
        assert len(lora_layers) == 4 * SMALL.depth and all(n.startswith("image_encoder.") for n in lora_layers)
        assert names and all("lora_" in n for n in names)
        # rank 4 x (in + out) per layer: qkv E->3E, proj E->E, lin1 E->4E, lin2 4E->E
        expected = SMALL.depth * 4 * SMALL.embed_dim * (4 + 2 + 5 + 5)
        assert report.trainable_params == expected and report.total_params == total_before + expected
    elif mode == "lora-attn":
        assert sorted(n.split(".")[-1] for n in lora_layers) == sorted(["proj", "qkv"] * SMALL.depth)
    elif mode == "lora-all":
        decoder_linears = [n for n, m in sam.named_modules() if n.startswith("mask_decoder.")
                           and type(m).__name__ in ("Linear", "LoRALinear")]
        assert len(lora_layers) == 4 * SMALL.depth + len(decoder_linears) and decoder_linears
        assert set(decoder_linears) <= set(lora_layers)  # every decoder linear, nothing else trains
        assert names and all("lora_" in n for n in names)
    elif mode == "decoder":
        assert names and all(n.startswith("mask_decoder.") for n in names)
        assert report.trainable_params == sum(p.numel() for p in sam.mask_decoder.parameters())
    else:
        assert {n.split(".")[0] for n in names} == {"image_encoder", "mask_decoder"}
    assert report.trainable_percent == pytest.approx(100 * report.trainable_params / report.total_params)


def test_lora_with_train_decoder_adds_the_decoder():
    sam = build_tiny_sam(SMALL)
    report = configure_mode(sam, "lora", train_decoder=True)
    names = _trainable(sam)
    assert any(n.startswith("mask_decoder.") for n in names) and any("lora_" in n for n in names)
    assert report.trainable_params == sum(p.numel() for p in sam.parameters() if p.requires_grad)


def test_box_prompt_sam_batches_images_independently():
    torch.manual_seed(0)
    model = BoxPromptSam(build_tiny_sam(SMALL)).eval()
    images = torch.randn(3, 3, 64, 64)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 60.0, 50.0], [0.0, 0.0, 63.0, 63.0]])
    with torch.no_grad():
        logits, iou = model(images, boxes)
        single, _ = model(images[1:2], boxes[1:2])
        exact, _ = BoxPromptSam(sam_in_float64(model.sam)).eval()(images[1:2].double(), boxes[1:2].double())
    assert logits.shape == (3, 1, 32, 32) and iou.shape == (3, 1)
    # Batched and single runs block their BLAS calls differently: DESIGN.md §5's rule, not a tolerance.
    assert_parity("image 1 in a batch of 3 vs alone", logits[1:2], single, exact)


def test_missing_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path):
    sam = build_tiny_sam()
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        load_sam_weights(sam, tmp_path / "nope.pth", "tiny")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="corrupt.pth: cannot be read"):
        load_sam_weights(sam, corrupt, "tiny")
    partial = tmp_path / "partial.pth"
    state = build_tiny_sam(SMALL).state_dict()
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match="partial.pth does not fit --model tiny: .*shape mismatches"):
        load_sam_weights(sam, partial, "tiny")


def test_checkpoint_round_trip_and_random_weight_warning(tmp_path):
    torch.manual_seed(1)
    source = build_tiny_sam()
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = build_sam("tiny", path)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.warns(UserWarning, match="RANDOM weights"):
        build_sam("tiny")


def test_cli_reports_a_bad_checkpoint_path(tmp_path, capsys):
    code = cli.main(["train", "--checkpoint", str(tmp_path / "missing_sam.pth"), "--out", str(tmp_path / "o"),
                     "--num-train", "8", "--num-val", "2", "--num-test", "2", "--modes", "vanilla"])
    assert code == 2
    assert "missing_sam.pth: no such file" in capsys.readouterr().err


# -- --input-size: registry models at another input size ------------------------------------
def test_registry_sam_at_512_has_the_registry_layout_with_a_smaller_position_grid():
    from segment_anything import sam_model_registry

    from examples.sam_polyp.model import build_registry_sam

    with torch.device("meta"):  # layouts only: no 90 M random values
        full = sam_model_registry["vit_b"]().state_dict()
        half = build_registry_sam("vit_b", 512).state_dict()
        same = build_registry_sam("vit_b", 1024).state_dict()
    assert {k: v.shape for k, v in same.items()} == {k: v.shape for k, v in full.items()}
    assert half.keys() == full.keys()
    differ = sorted(k for k in full if full[k].shape != half[k].shape)
    assert set(differ) == {"image_encoder.pos_embed"} | {f"image_encoder.blocks.{b}.attn.rel_pos_{a}"
                                                         for b in (2, 5, 8, 11) for a in "hw"}
    assert half["image_encoder.pos_embed"].shape == (1, 32, 32, 768)
    assert half["image_encoder.blocks.2.attn.rel_pos_h"].shape == (63, 64)  # 2 * 32 - 1 positions
    assert half["image_encoder.blocks.0.attn.rel_pos_h"].shape == full["image_encoder.blocks.0.attn.rel_pos_h"].shape


def test_a_checkpoint_loads_at_a_smaller_input_size_with_interpolated_positions(tmp_path, capsys):
    torch.manual_seed(0)
    big = build_tiny_sam(SMALL)  # 64 px: 8x8 position grid, global-attention tables of 15
    path = tmp_path / "big.pth"
    torch.save(big.state_dict(), path)
    small = build_tiny_sam(TinySamConfig(**{**SMALL.__dict__, "img_size": 32}))
    load_sam_weights(small, path, "tiny")
    assert "position tensors interpolated" in capsys.readouterr().err
    state, own = big.state_dict(), small.state_dict()
    assert own["image_encoder.pos_embed"].shape == (1, 4, 4, SMALL.embed_dim)
    assert own["image_encoder.blocks.1.attn.rel_pos_h"].shape == (7, SMALL.embed_dim // SMALL.num_heads)
    for key in own:  # everything else is the checkpoint's, unchanged
        if "pos_embed" not in key and "rel_pos" not in key:
            assert torch.equal(own[key], state[key]), key
    # a constant embedding stays constant: interpolation, not noise
    const = {**state, "image_encoder.pos_embed": torch.full_like(state["image_encoder.pos_embed"], 0.25)}
    torch.save(const, path)
    load_sam_weights(small, path, "tiny")
    assert torch.allclose(small.image_encoder.pos_embed, torch.tensor(0.25))


def test_input_size_is_refused_for_the_tiny_model_and_checked_at_parse_time(capsys):
    with pytest.raises(ValueError, match="--input-size is for the registry models"):
        build_sam("tiny", input_size=128)
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "vit_b", "--input-size", "500"])
    assert "multiple of 16" in capsys.readouterr().err


# -- gradient checkpointing ------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients_with_dropout():
    from examples.sam_polyp.model import enable_gradient_checkpointing

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 60.0, 30.0]])
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        sam = build_tiny_sam(SMALL)
        configure_mode(sam, "lora", rank=4, alpha=4.0, dropout=0.25, train_decoder=True, backend="torch")
        with torch.no_grad():  # non-zero B: the LoRA branch (and its dropout) shapes the output
            for name, p in sam.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if checkpointed:
            assert enable_gradient_checkpointing(sam) == SMALL.depth
            twin = copy.deepcopy(sam)  # a copy's blocks must run the copy's weights, not the original's
            assert all(b.forward.__self__ is b for b in twin.image_encoder.blocks)
        model = BoxPromptSam(sam).train()
        torch.manual_seed(42)  # the dropout seeds of this forward
        logits, iou = model(images, boxes)
        (logits.square().mean() + iou.sum()).backward()
        grads = {n: p.grad.clone() for n, p in sam.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    (plain, plain_grads), (ckpt_out, ckpt_grads) = results
    assert torch.equal(plain, ckpt_out)
    assert plain_grads.keys() == ckpt_grads.keys() and any("lora_A" in n for n in plain_grads)
    for name in plain_grads:
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name
