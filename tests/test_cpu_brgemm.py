"""The bf16/fp16 route of the C++ CPU path (csrc/cpu_brgemm.cpp): oneDNN's brgemm tiles where
the CPU has the dtype's dot-product instructions, the fp32 GEMMs on widened copies elsewhere.

On a CPU with avx512_bf16 (the AMD EPYC these were written on) the route must be on, so the
bf16 parity cases below run it; every case that the route refuses (odd reductions, strided
x, transposed grad_y, oneDNN disabled, a failing start-up probe) must give the same parity
through the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_extension_or_skip_module
from parity import assert_parity, make_inputs, reference_outputs
from test_cpu_path import NAMES, SCALING, SEED, check_against_reference, run_ops

load_extension_or_skip_module()

ROUTE_REASON = torch.ops.lora_fused.cpu_brgemm_unavailable_reason


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


HAS_BF16_INSTRUCTIONS = "avx512_bf16" in cpu_flags()
needs_route = pytest.mark.skipif(not HAS_BF16_INSTRUCTIONS or ROUTE_REASON(torch.bfloat16) != "",
                                 reason="the brgemm route needs avx512_bf16 and a working oneDNN brgemm: "
                                        f"{ROUTE_REASON(torch.bfloat16) or 'no avx512_bf16 flag in /proc/cpuinfo'}")


def test_route_status_follows_the_cpu():
    assert "bfloat16 and float16 only" in ROUTE_REASON(torch.float32)
    assert "bfloat16 and float16 only" in ROUTE_REASON(torch.float64)
    if HAS_BF16_INSTRUCTIONS and sys.platform == "linux":
        assert ROUTE_REASON(torch.bfloat16) == "", "this CPU has avx512_bf16: the bf16 route must be on"
    elif not HAS_BF16_INSTRUCTIONS:
        assert ROUTE_REASON(torch.bfloat16) != ""
    if "avx512_fp16" not in cpu_flags():
        assert "avx512_fp16" in ROUTE_REASON(torch.float16)


def test_disabling_onednn_switches_the_route_off_and_back():
    before = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = False
        assert "oneDNN is disabled" in ROUTE_REASON(torch.bfloat16)
        x, weight, bias, lora_A, lora_B = make_inputs(70, 64, 66, 4, torch.bfloat16, seed=30)
        grad_y = make_inputs(70, 66, 1, 1, torch.bfloat16, seed=31)[0]
        check_against_reference(x, weight, bias, lora_A, lora_B, 0.2, grad_y)
    finally:
        torch.backends.mkldnn.enabled = before
    if HAS_BF16_INSTRUCTIONS:
        assert ROUTE_REASON(torch.bfloat16) == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
# The forward packs W for the first five shapes and x (yᵀ tiles stored transposed) for the
# last two, by forward_packs_x's cost rule in csrc/cpu_brgemm.cpp (x packed when N ≫ M).
@pytest.mark.parametrize("M, K, N, r", [
    (130, 768, 96, 16),      # xa, the fp32 output, over ViT-B's K: sliced sums keep it within the parity rule
    (67, 3072, 64, 3),       # K = 3072, odd M (padded pair in dA/dB), odd rank (padded xa_r / gb_r)
    (200, 130, 2 * 64 + 6, 1),  # a short last column block of every packed operand, rank 1
    (1, 2, 2, 1),            # the smallest even problem
    (65, 64, 64, 64),        # one full tile plus one row; rank 64 (one full packed block)
    (40, 768, 1000, 16),     # x packed: xa from packed x, K = 768
    (7, 130, 300, 67),       # x packed: short row and column blocks, odd rank above one block
])
def test_parity_on_the_route(dtype, p, M, K, N, r):
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, dtype, seed=M + K)
    grad_y = make_inputs(M, N, 1, 1, dtype, seed=N)[0]
    check_against_reference(x, weight, bias, lora_A, lora_B, p, grad_y)


@needs_route
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_route_without_bias_dx_or_db(p):
    x, weight, _, lora_A, lora_B = make_inputs(90, 96, 70, 5, torch.bfloat16, bias=False, seed=32)
    grad_y = make_inputs(90, 70, 1, 1, torch.bfloat16, seed=33)[0]
    got = run_ops(x, weight, None, lora_A, lora_B, p, grad_y, compute_dx=False, compute_db=False)
    same = reference_outputs(x, weight, None, lora_A, lora_B, SCALING, p, SEED, grad_y)
    exact = reference_outputs(*(t.double() for t in (x, weight)), None, lora_A.double(), lora_B.double(), SCALING, p,
                              SEED, grad_y.double())
    for name, value, same_value, exact_value in zip(NAMES, got, same, exact, strict=True):
        if name in ("dx", "db"):
            assert value.numel() == 0, name
        else:
            assert_parity(name, value, same_value, exact_value)


@pytest.mark.parametrize("case", ["odd K", "odd N", "x column stride 2", "grad_y transposed", "weight transposed view"])
def test_operands_the_route_refuses_fall_back_with_parity(case):
    M, K, N, r = 75, (45 if case == "odd K" else 48), (33 if case == "odd N" else 40), 4
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.bfloat16, seed=34)
    grad_y = make_inputs(M, N, 1, 1, torch.bfloat16, seed=35)[0]
    if case == "x column stride 2":
        x = make_inputs(M, 2 * K, 1, 1, torch.bfloat16, seed=36)[0][:, ::2]
    if case == "grad_y transposed":
        grad_y = grad_y.t().contiguous().t()
    if case == "weight transposed view":  # served by the route: packing reads any strides
        weight = weight.t().contiguous().t()
    for p in (0.0, 0.2):
        check_against_reference(x, weight, bias, lora_A, lora_B, p, grad_y)


@needs_route
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_route_bits_do_not_depend_on_the_thread_count(p):
    x, weight, bias, lora_A, lora_B = make_inputs(300, 192, 160, 8, torch.bfloat16, seed=37)
    grad_y = make_inputs(300, 160, 1, 1, torch.bfloat16, seed=38)[0]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
        again = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
        torch.set_num_threads(2)
        two = run_ops(x, weight, bias, lora_A, lora_B, p, grad_y)
    finally:
        torch.set_num_threads(previous)
    for name, a, b, c in zip(NAMES, one, again, two, strict=True):
        assert torch.equal(a, b), f"{name} differs between two calls"
        assert torch.equal(a, c), f"{name} differs between 1 and 2 threads"


@needs_route
def test_a_failing_probe_falls_back_in_a_fresh_process():
    """oneDNN limited to AVX2 (an Intel CPU without AVX-512, as far as brgemm can tell):
    torch's brgemm refuses, the probe says why, and the op still meets parity."""
    script = (
        "import sys, torch; sys.path.insert(0, 'tests'); "
        "from test_cpu_path import check_against_reference; from parity import make_inputs; "
        "reason = torch.ops.lora_fused.cpu_brgemm_unavailable_reason(torch.bfloat16); "
        "assert reason.startswith('the start-up probe of cpublas::brgemm failed'), reason; "
        "x, w, b, A, B = make_inputs(40, 32, 24, 4, torch.bfloat16, seed=39); "
        "g = make_inputs(40, 24, 1, 1, torch.bfloat16, seed=40)[0]; "
        "check_against_reference(x, w, b, A, B, 0.1, g); print('fallback ok')"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]


def _weight_writes(dtype):
    """Every way a user changes a frozen weight in place: (name, function(layer, new values))."""
    def in_place_op(layer, new):
        with torch.no_grad():
            layer.weight.copy_(new)  # bumps weight._version

    def through_data(layer, new):
        layer.weight.data.copy_(new)  # a fresh version counter: weight._version stays

    def data_assignment(layer, new):
        layer.weight.data = new.clone()  # new storage

    def load_state_dict(layer, new):
        layer.load_state_dict({"weight": new}, strict=False)

    def numpy_alias(layer, new):
        layer.weight.detach().numpy()[...] = new.numpy()  # no version bump, same data_ptr

    writes = [in_place_op, through_data, data_assignment, load_state_dict]
    if dtype == torch.float32:
        writes.append(numpy_alias)
    return [pytest.param(dtype, write, id=f"{str(dtype)[6:]}-{write.__name__}") for write in writes]


@pytest.mark.parametrize("dtype, write", _weight_writes(torch.float32) + _weight_writes(torch.bfloat16))
def test_output_follows_every_write_to_the_frozen_weight(dtype, write):
    """Nothing derived from W (the bf16 route's VNNI packing of W) outlives a call: after each
    kind of write the layer computes with the new W, forward and backward. csrc/cpu_brgemm.cpp
    says why W is not cached; this keeps any future cache honest."""
    import lora_fused

    M, K, N, r = 70, 64, 48, 4
    layer = lora_fused.LoRALinear(K, N, rank=r, alpha=2.0, backend="cuda").to(dtype)
    x, weight, _, lora_A, lora_B = make_inputs(M, K, N, r, dtype, seed=21)
    grad_y = make_inputs(M, N, 1, 1, dtype, seed=22)[0]
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
    for step in range(2):
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        y.backward(grad_y)
        got = (y.detach(), x_in.grad, layer.lora_A.grad, layer.lora_B.grad)
        with torch.no_grad():
            exact = reference_outputs(x.double(), layer.weight.double(), layer.bias.double(),
                                      layer.lora_A.double(), layer.lora_B.double(), layer.scaling, 0.0, 0,
                                      grad_y.double())
            same = reference_outputs(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 0.0, 0,
                                     grad_y)
        for name, value, index in (("y", got[0], 0), ("dx", got[1], 2), ("dA", got[2], 3), ("dB", got[3], 4)):
            assert_parity(f"{name} after {step} write(s)", value, same[index], exact[index])
        layer.lora_A.grad = layer.lora_B.grad = None
        new = make_inputs(M, K, N, r, dtype, seed=23 + step)[1]
        assert not torch.equal(new, layer.weight)
        write(layer, new)
        assert torch.equal(layer.weight, new), "the write did not reach the weight"
