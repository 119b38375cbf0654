"""GPU-only checks of the Triton backend for what a review of GPU code fears (all skip without CUDA).

- every config that pruning keeps is launched once for parity, not only the autotune winner;
- a backward with several row groups of several row blocks each, several column blocks and dB
  tiles per program (the reduction of per-group partials), with and without dx;
- ``compute_dx=False``; a non-default stream; CUDA-graph capture of forward + backward;
- the dropout mask past 2**31 elements in one launch (the int64 bound).

The numerical edges (rounding order, GradScaler-size gradients, inf, empty and K < 8
dimensions) run on CUDA too, from tests/test_triton_numerics.py; determinism and tf32 from
tests/test_triton_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from lora_fused.dropout import dropout_threshold, element_hash
from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import ops as triton_ops
from lora_fused.kernels import tuning
from lora_fused.kernels.dropout import triton_keep_mask
from parity import assert_parity, make_inputs, reference_outputs

pytestmark = [requires_cuda, pytest.mark.gpu]
SCALING = 1.7


def _random(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)


def _check_parity(M, K, N, r, dtype, dropout_p, compute_dx=True, bias=True):
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device="cuda", bias=bias, seed=M + r)
    grad_y = _random((M, N), dtype, 7)
    seed = torch.tensor(77, dtype=torch.int64)
    y, xa = triton_ops.triton_forward(x, weight, b, lora_A, lora_B, SCALING, dropout_p, seed)
    grads = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed,
                                       compute_dx, bias)
    got = (y, xa, *grads)
    same = reference_outputs(x, weight, b, lora_A, lora_B, SCALING, dropout_p, 77, grad_y)
    exact = reference_outputs(*(None if t is None else t.double() for t in (x, weight, b, lora_A, lora_B)),
                              SCALING, dropout_p, 77, grad_y.double())
    for name, value, torch_value, exact_value in zip(("y", "xa", "dx", "dA", "dB", "db"), got, same, exact,
                                                     strict=True):
        if (name == "dx" and not compute_dx) or (name == "db" and not bias):
            assert value.numel() == 0, name
            continue
        assert_parity(name, value, torch_value, exact_value)


# (M, K, N, r, dtype, p): the fused and pre-pass forwards, fused and projected gb, every kernel launched.
CONFIG_SHAPES = [
    (1000, 768, 768, 4, torch.bfloat16, 0.0),
    (333, 1000, 300, 16, torch.bfloat16, 0.1),
    (129, 512, 640, 256, torch.float16, 0.0),
]


@pytest.mark.parametrize("kernel", sorted(tuning.autotuned_kernels()))
@pytest.mark.parametrize("shape", CONFIG_SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-r{s[3]}-p{s[5]}")
def test_every_kept_config_is_correct(monkeypatch, kernel, shape):
    monkeypatch.setenv(triton_configs.AUTOTUNE_ENV_VAR, "1")
    tuner = tuning.autotuned_kernels()[kernel]
    prune = tuner.early_config_prune
    kept_counts = []
    index = 0
    while True:
        def pick(configs, named_args, _index=index, **kwargs):
            kept = prune(configs, named_args, **kwargs)
            kept_counts.append(len(kept))
            return [kept[min(_index, len(kept) - 1)]]

        monkeypatch.setattr(tuner, "early_config_prune", pick)
        saved_cache = dict(tuner.cache)
        tuner.cache.clear()
        try:
            _check_parity(*shape)
        finally:
            tuner.cache.clear()
            tuner.cache.update(saved_cache)
        index += 1
        if not kept_counts or index >= max(kept_counts):
            break
    if not kept_counts:
        pytest.skip(f"{kernel} is not launched at this shape")


@pytest.mark.parametrize("compute_dx", [True, False])
def test_backward_reduction_spans_several_row_and_column_tiles(compute_dx):
    # M = 40000 on a GPU of ~100-140 SMs: about a hundred row groups of several 128-row blocks; K = 200 two
    # or more column blocks; N = 300 several dB tiles per program.
    M, K, N = 40000, 200, 300
    groups, rows_per_group = triton_configs.backward_row_groups(M, 2, triton_configs.multiprocessors(
        torch.device("cuda")))
    assert groups > 1 and rows_per_group > triton_configs.row_align(), (groups, rows_per_group)
    _check_parity(M, K, N, 4, torch.bfloat16, 0.1, compute_dx=compute_dx)


@pytest.mark.parametrize("r", [4, 128])
def test_backward_without_dx(r):
    _check_parity(1000, 200, 300, r, torch.float16, 0.2, compute_dx=False)


def _layer_step(x, weight, bias, lora_A, lora_B, grad_y, seed):
    y, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.1, seed)
    return (y, *triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.1, seed, True, True))


def test_non_default_stream_gives_the_same_results():
    inputs = make_inputs(700, 384, 512, 8, torch.bfloat16, device="cuda")
    grad_y = _random((700, 512), torch.bfloat16, 3)
    seed = torch.tensor(9, dtype=torch.int64)
    expected = _layer_step(*inputs, grad_y, seed)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _layer_step(*inputs, grad_y, seed)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_cuda_graph_capture_of_forward_and_backward():
    x, weight, bias, lora_A, lora_B = make_inputs(512, 256, 384, 16, torch.bfloat16, device="cuda")
    grad_y = _random((512, 384), torch.bfloat16, 4)
    seed = torch.tensor(5, dtype=torch.int64)
    _layer_step(x, weight, bias, lora_A, lora_B, grad_y, seed)  # autotune before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _layer_step(x, weight, bias, lora_A, lora_B, grad_y, seed)
    new_x, new_grad = _random(x.shape, x.dtype, 11), _random(grad_y.shape, grad_y.dtype, 12)
    x.copy_(new_x)
    grad_y.copy_(new_grad)
    graph.replay()
    torch.cuda.synchronize()
    expected = _layer_step(new_x, weight, bias, lora_A, lora_B, new_grad, seed)
    for a, b in zip(captured, expected, strict=True):
        assert torch.equal(a, b)


def test_dropout_mask_past_2_pow_31_elements_in_one_launch():
    cols = 1000
    rows = (2**31) // cols + 3
    mask = triton_keep_mask(17, rows, cols, 0.3, "cuda")
    tail = mask[-4:].cpu()
    index = torch.arange((rows - 4) * cols, rows * cols, dtype=torch.int64).view(4, cols)
    assert torch.equal(tail, (element_hash(17, index) >> 8) >= dropout_threshold(0.3))
