"""pytest-benchmark cases for the main layer shapes: SAM ViT-B's four linears, rank 16.

    pytest benchmarks --benchmark-only                 # measure; tables grouped by shape and mode
    pytest benchmarks                                  # each case once (smoke; --benchmark-disable)

On a GPU: ViT-B at 1024 px (4096 tokens, batch 1) in bf16; on CPU: 128 px (64 tokens) in
fp32, so the cases stay quick. Speed is never asserted; bench_layer.py is the full benchmark.
"""

import math

import pytest
import torch

import bench_layer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMAGE_SIZE = 1024 if ON_GPU else 128
RANK = 16
SHAPES = {s.layer: s for s in bench_layer.sam_shapes(["b"], bench_layer.LAYERS, ["global"], [1], IMAGE_SIZE)}


def _skip_reason(provider):
    return bench_layer.provider_unavailable_reason(provider, DEVICE, explicitly_requested=False)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", bench_layer.PROVIDERS)
@pytest.mark.parametrize("layer", bench_layer.LAYERS)
def test_layer(benchmark, layer, provider, mode, dropout):
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    if provider == "linear" and dropout > 0:
        pytest.skip("nn.Linear has no LoRA dropout")
    shape = SHAPES[layer]
    torch.manual_seed(0)
    m, k, n = shape.tokens, shape.in_features, shape.out_features
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) / math.sqrt(k)
    bias = torch.randn(n, device=DEVICE, dtype=DTYPE) * 0.1
    lora_A = (torch.randn(RANK, k, device=DEVICE, dtype=DTYPE) / math.sqrt(k)).requires_grad_()
    lora_B = (torch.randn(n, RANK, device=DEVICE, dtype=DTYPE) / math.sqrt(RANK)).requires_grad_()
    xs = [torch.randn(1, m, k, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(2)]
    grads = [torch.randn(1, m, n, device=DEVICE, dtype=DTYPE) for _ in range(2)]
    impl = bench_layer.build_provider(provider, weight, bias, lora_A, lora_B, bench_layer.ALPHA_OVER_RANK, dropout)
    step = bench_layer.mode_callable(impl, mode, xs, grads)

    def run():
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.group = f"{DEVICE.type} ViT-B {layer} M={m} K={k} N={n} r={RANK} {str(DTYPE)[6:]} p={dropout} {mode}"
    benchmark.extra_info.update(provider=provider, m=m, k=k, n=n, rank=RANK, dtype=str(DTYPE), mode=mode,
                                dropout=dropout, device=torch.cuda.get_device_name() if ON_GPU else "CPU")
    benchmark(run)
