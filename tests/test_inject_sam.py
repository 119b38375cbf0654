"""inject_lora on a real segment_anything SAM (a small ViT config so it runs in seconds on CPU)."""

import re

import pytest
import torch
import torch.nn as nn

from lora_fused import (
    LoRALinear,
    inject_lora,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    parameter_report,
    unmerge_lora,
)
from parity import assert_all_parity

segment_anything = pytest.importorskip("segment_anything")
from sam_float64 import sam_in_float64  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

IMG, PATCH, EMBED_OUT = 64, 8, 32


def small_sam(seed=0) -> Sam:
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2, out_chans=EMBED_OUT,
                              use_rel_pos=True, rel_pos_zero_init=False, window_size=4, global_attn_indexes=(1,))
    prompt = PromptEncoder(embed_dim=EMBED_OUT, image_embedding_size=(IMG // PATCH, IMG // PATCH),
                           input_image_size=(IMG, IMG), mask_in_chans=8)
    decoder = MaskDecoder(transformer_dim=EMBED_OUT, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_OUT, num_heads=2, mlp_dim=64))
    return Sam(encoder, prompt, decoder).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7)) * 255


def run_sam(sam: Sam, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings and low-res mask logits for one point prompt per image."""
    points = torch.tensor([[[20.0, 30.0]], [[40.0, 12.0]]], dtype=images.dtype)
    batch = [{"image": img, "original_size": (IMG, IMG), "point_coords": pts[None],
              "point_labels": torch.ones(1, 1, dtype=images.dtype)}
             for img, pts in zip(images, points, strict=True)]
    with torch.no_grad():
        embeddings = sam.image_encoder(sam.preprocess(images))
        outputs = sam(batch, multimask_output=False)
    return embeddings, torch.cat([out["low_res_logits"] for out in outputs])


def plain_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    return {prefix + name: m for name, m in module.named_modules() if type(m) is nn.Linear}


def lora_names(model: nn.Module) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))


def assert_same_outputs(actual, expected, float64_outputs):
    """Two computations of one SAM function (DESIGN.md §5's rule on embeddings and logits)."""
    assert_all_parity(("embeddings", "logits"), actual, expected, float64_outputs)


def run_sam_float64(sam: Sam, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return run_sam(sam_in_float64(sam), images.double())


def test_inject_into_image_encoder(images):
    sam = small_sam()
    expected, exact = run_sam(sam, images), run_sam_float64(sam, images)
    encoder_linears = plain_linears(sam.image_encoder, "image_encoder.")
    decoder_linears = plain_linears(sam.mask_decoder, "mask_decoder.")
    assert len(encoder_linears) == 2 * 4  # per block: attn.qkv, attn.proj, mlp.lin1, mlp.lin2
    rank = 4
    lora_params = sum(rank * (m.in_features + m.out_features) for m in encoder_linears.values())
    total_before = sum(p.numel() for p in sam.parameters())

    report = inject_lora(sam, rank=rank, alpha=8, target_modules=r"image_encoder\..*")

    assert sorted(report.replaced) == sorted(encoder_linears)
    assert lora_names(sam) == sorted(encoder_linears)
    assert not plain_linears(sam.image_encoder)  # no nn.Linear left in the encoder
    assert plain_linears(sam.mask_decoder, "mask_decoder.").keys() == decoder_linears.keys()
    for name, linear in encoder_linears.items():  # base weights reused, not copied
        assert sam.get_submodule(name).weight is linear.weight
    assert report.trainable_params == lora_params
    assert report.total_params == total_before + lora_params
    assert report.trainable_percent == pytest.approx(100 * lora_params / (total_before + lora_params))
    assert f"{lora_params:,}" in str(report) and "8 linear layers" in str(report)
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapters.default.lora_{p}" for n in encoder_linears for p in "AB"}

    assert not any(sam.get_submodule(n).training for n in encoder_linears)  # eval model stays in eval mode
    # B = 0: the injected model computes the base model's function (through the fused op).
    assert_same_outputs(run_sam(sam, images), expected, exact)


def test_mark_trainable_mask_decoder_and_gradients(images):
    sam = small_sam()
    report = inject_lora(sam, rank=2, target_modules=r"image_encoder\..*")
    decoder_tensors = list(sam.mask_decoder.parameters())
    assert mark_trainable(sam, "mask_decoder") == len(decoder_tensors)
    after = parameter_report(sam)
    assert after.trainable_params == report.trainable_params + sum(p.numel() for p in decoder_tensors)
    assert after.total_params == report.total_params
    with pytest.raises(ValueError, match="no parameter matches"):
        mark_trainable(sam, "no_such_module")

    sam.train()
    embeddings = sam.image_encoder(sam.preprocess(images[:1]))
    point = (torch.tensor([[[20.0, 30.0]]]), torch.ones(1, 1))
    sparse, dense = sam.prompt_encoder(points=point, boxes=None, masks=None)
    logits, iou = sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    (logits.square().mean() + iou.square().mean()).backward()
    qkv = sam.image_encoder.blocks[0].attn.qkv
    assert qkv.lora_B.grad is not None and qkv.lora_B.grad.abs().sum() > 0
    assert qkv.weight.grad is None and qkv.bias.grad is None
    assert all(p.grad is not None for p in decoder_tensors if p.requires_grad)
    assert all(p.grad is None for p in sam.prompt_encoder.parameters())


def test_merge_unmerge_round_trip(images):
    sam = small_sam()
    weights = {name: m.weight.detach().clone() for name, m in plain_linears(sam).items()}
    report = inject_lora(sam, rank=3, alpha=6)  # every nn.Linear, decoder included
    assert sorted(report.replaced) == sorted(weights)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in report.replaced:
            sam.get_submodule(name).lora_B.copy_(torch.randn(sam.get_submodule(name).lora_B.shape, generator=gen) * 0.1)
    lora_outputs, exact = run_sam(sam, images), run_sam_float64(sam, images)
    assert not torch.allclose(lora_outputs[0], run_sam(small_sam(), images)[0], atol=1e-3)

    assert merge_lora(sam) == len(weights)
    assert all(sam.get_submodule(n).merged_adapter == "default" for n in weights)
    assert not torch.allclose(sam.image_encoder.blocks[0].attn.qkv.weight, weights["image_encoder.blocks.0.attn.qkv"])
    merged_outputs = run_sam(sam, images)  # plain F.linear with merged weights: the PyTorch baseline
    assert_same_outputs(lora_outputs, merged_outputs, exact)

    assert unmerge_lora(sam) == len(weights)
    for name, weight in weights.items():
        # merge/unmerge compute fl(fl(W + Δ) - Δ) with the same Δ: two roundings, each at most
        # half an ulp of a value no larger than |W| + |Δ|.
        layer = sam.get_submodule(name)
        delta = layer.adapter.delta_weight().detach()
        bound = torch.finfo(weight.dtype).eps * (weight.abs() + delta.abs())
        assert ((layer.weight - weight).abs() <= bound).all(), name
    assert_same_outputs(run_sam(sam, images), merged_outputs, exact)


def test_merge_and_unload_gives_a_plain_sam_that_a_fresh_sam_loads_strictly(images):
    sam = small_sam()
    plain_keys = list(small_sam().state_dict())
    inject_lora(sam, rank=3, alpha=6, target_modules=r"image_encoder\..*", modules_to_save=["mask_decoder"])
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in (p for p in sam.parameters() if p.requires_grad):  # LoRA B and the decoder "trained"
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    lora_outputs, exact = run_sam(sam, images), run_sam_float64(sam, images)

    assert merge_and_unload(sam) is sam and not lora_names(sam)
    assert list(sam.state_dict()) == plain_keys
    fresh = small_sam(seed=1)
    fresh.load_state_dict(sam.state_dict(), strict=True)
    exported = run_sam(fresh, images)  # plain F.linear with merged weights: the PyTorch baseline
    assert_same_outputs(lora_outputs, exported, exact)


def _expected(sam: Sam, keep) -> list[str]:
    return sorted(name for name, m in sam.named_modules() if type(m) is nn.Linear and keep(name, m))


@pytest.mark.parametrize("selector, exclude, keep", [
    (["qkv"], None, lambda n, m: n.endswith(".qkv")),
    (["lin1", "mlp.lin2"], None, lambda n, m: n.endswith(".lin1") or n.endswith(".mlp.lin2")),
    (r"image_encoder\.blocks\.\d+\.attn\.(qkv|proj)", None, lambda n, m: re.search(r"attn\.(qkv|proj)$", n)
     and n.startswith("image_encoder.")),
    (lambda name, m: m.out_features >= 128, None, lambda n, m: m.out_features >= 128),
    (None, r"(mask_decoder|prompt_encoder)\..*", lambda n, m: n.startswith("image_encoder.")),
    (r"image_encoder\..*", ["proj"], lambda n, m: n.startswith("image_encoder.") and not n.endswith(".proj")),
    (None, lambda name, m: "mask_decoder" in name, lambda n, m: not n.startswith("mask_decoder.")),
], ids=["suffix", "suffix-dotted", "regex", "callable", "exclude-regex", "exclude-suffix", "exclude-callable"])
def test_target_and_exclude_modules(selector, exclude, keep):
    sam = small_sam()
    expected = _expected(sam, keep)
    assert 0 < len(expected) < len(_expected(sam, lambda n, m: True))  # the selection really selects
    report = inject_lora(sam, rank=2, target_modules=selector, exclude_modules=exclude)
    assert sorted(report.replaced) == expected == lora_names(sam)


def test_target_matching_nothing_is_an_error():
    sam = small_sam()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(sam, target_modules=["no_such_layer"])
    assert not lora_names(sam)
