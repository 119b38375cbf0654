"""The GPU check's first stage: every backend × dtype × dropout on a few odd shapes, forward and
backward against the float64 reference (DESIGN.md §5), in seconds.

benchmarks/gpu_check.sh runs this file first with ``LORA_FUSED_TRITON_AUTOTUNE=0`` (one config
per Triton kernel, no autotuning), so a cold GPU machine learns within a minute whether any
backend computes a wrong result. Here, without a GPU, the same matrix runs on the CPU backends
(the Triton kernels under TRITON_INTERPRET=1, the C++ CPU path) at smaller shapes, so the file
and the check's dry run are exercised in CI. The full parity suites live in
test_triton_parity.py and test_cuda_ext.py.
"""

from __future__ import annotations

import pytest
import torch

import lora_fused
from lora_fused.backends import resolve_backend
from parity import assert_parity, make_inputs, reference_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALING = 1.7
OUTPUT_NAMES = ("y", "xa", "dx", "dA", "dB", "db")

# (M, K, N, r): odd sizes (K, N not multiples of 16, M = 1 and a partial row tile); on a GPU
# also one ViT-B-sized qkv slice, so real tiles and the pipelined main loops run.
SHAPES = [(1, 33, 17, 3), (37, 70, 45, 16)]
if DEVICE == "cuda":
    SHAPES += [(1000, 768, 2304, 4), (4099, 768, 768, 16)]


def _shape_id(shape):
    return "M{}-K{}-N{}-r{}".format(*shape)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_float64_reference(backend, dtype, shape, dropout_p):
    if backend not in lora_fused.available_backends(DEVICE):
        pytest.skip(f"backend {backend!r} unavailable on {DEVICE}: {lora_fused.backend_report()[backend][DEVICE]}")
    M, K, N, r = shape
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device=DEVICE, seed=M + r)
    grad_y = make_inputs(M, N, 1, 1, dtype, device=DEVICE, seed=M + r + 1)[0]
    seed = torch.tensor(4321, dtype=torch.int64)

    op = resolve_backend(backend, DEVICE)
    y, xa = op.forward(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)
    dx, dA, dB, db = op.backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed, True, True)
    got = (y, xa, dx, dA, dB, db)

    exact = reference_outputs(*(t.double() for t in (x, weight, bias, lora_A, lora_B)), SCALING, dropout_p,
                              4321, grad_y.double())
    same_dtype = reference_outputs(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, 4321, grad_y)
    for name, value, torch_value, exact_value in zip(OUTPUT_NAMES, got, same_dtype, exact, strict=True):
        assert value.shape == exact_value.shape, (name, value.shape, exact_value.shape)
        assert_parity(f"{backend} {name}", value.cpu(), torch_value.cpu(), exact_value.cpu())
