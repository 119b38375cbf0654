"""The compiled extension lora_fused._C (backend "cuda"): its C++ CPU kernels here, its
CUDA kernels wherever a GPU is present (the `gpu` tests skip with a reason otherwise).

Parity follows DESIGN.md §5 (within 2x PyTorch's own same-dtype error against float64).
Without the built extension the module skips, unless LORA_FUSED_REQUIRE_EXTENSION=1 (CI),
where a missing build fails.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import lora_fused
from lora_fused import extension, reference
from lora_fused.dropout import keep_mask
from parity import assert_parity, make_inputs, reference_outputs
from setup_py import function_of_setup_py
from conftest import load_extension_or_skip_module, requires_cuda

load_extension_or_skip_module()

from lora_fused import _C  # noqa: E402

FORWARD = torch.ops.lora_fused.fused_forward.default
BACKWARD = torch.ops.lora_fused.fused_backward.default
OUTPUT_NAMES = ("y", "xa", "dx", "dA", "dB", "db")
SCALING = 1.7


def run_extension(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_y, compute_dx=True):
    """Forward and backward of the extension's ops: (y, xa, dx, dA, dB, db)."""
    seed_t = torch.tensor(seed, dtype=torch.int64)
    y, xa = FORWARD(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t)
    dx, dA, dB, db = BACKWARD(
        grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed_t, compute_dx, bias is not None
    )
    return y, xa, dx, dA, dB, db


def check_parity(M, K, N, r, dtype, bias, dropout_p=0.0, device="cpu", x_transform=None, seed=0):
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device=device, bias=bias, seed=seed)
    if x_transform is not None:
        x = x_transform(x)
    grad_y = make_inputs(M, N, 1, 1, dtype, device=device, seed=seed + 1)[0]
    expected = reference_outputs(
        *(t.double() if t is not None else None for t in (x, weight, b, lora_A, lora_B)),
        SCALING, dropout_p, 1234, grad_y.double(),
    )
    same_dtype = reference_outputs(x, weight, b, lora_A, lora_B, SCALING, dropout_p, 1234, grad_y)
    got = run_extension(x, weight, b, lora_A, lora_B, SCALING, dropout_p, 1234, grad_y)
    assert got[0].dtype == dtype and got[1].dtype == reference.accumulator_dtype(dtype)
    for name, value, same, ref in zip(OUTPUT_NAMES, got, same_dtype, expected):
        if name == "db" and not bias:
            assert value.numel() == 0
            continue
        assert_parity(name, value.cpu(), same.cpu(), ref.cpu())


# ---- CPU kernels ---------------------------------------------------------------------

# M in {1, 7, 130}, K and N not multiples of 16, every rank of the issue, each dtype.
CPU_CASES = [
    (M, K, N, r, dtype, bias)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for r in (1, 3, 4, 16, 64)
    for (M, K, N), bias in zip(((1, 33, 17), (7, 70, 45), (130, 37, 29)), (True, False, True))
]


@pytest.mark.parametrize("M,K,N,r,dtype,bias", CPU_CASES, ids=lambda v: str(v).split(".")[-1])
def test_cpu_parity(M, K, N, r, dtype, bias):
    check_parity(M, K, N, r, dtype, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_cpu_parity_with_dropout(dtype, dropout_p):
    check_parity(130, 70, 45, 16, dtype, True, dropout_p=dropout_p)


def test_cpu_parity_large_rank_and_many_blocks():
    # More rows than one block (and than one thread's share), rank 256.
    check_parity(700, 40, 24, 256, torch.float32, True, dropout_p=0.2)


def test_cpu_strided_x_and_no_dx():
    x, weight, b, lora_A, lora_B = make_inputs(20, 30, 11, 4, torch.float32)
    wide = torch.randn(20, 90)
    x = wide[:, ::3]  # row stride 90, column stride 3
    assert not x.is_contiguous()
    grad_y = torch.randn(20, 11)
    got = run_extension(x, weight, b, lora_A, lora_B, 0.5, 0.3, 7, grad_y, compute_dx=False)
    same_dtype = reference_outputs(x, weight, b, lora_A, lora_B, 0.5, 0.3, 7, grad_y)
    exact = reference_outputs(*(t.double() for t in (x, weight, b, lora_A, lora_B)), 0.5, 0.3, 7, grad_y.double())
    assert got[2].numel() == 0
    for name, value, same, ref in zip(OUTPUT_NAMES, got, same_dtype, exact, strict=True):
        if name != "dx":
            assert_parity(name, value, same, ref)


def test_cpu_empty_batch():
    x, weight, b, lora_A, lora_B = make_inputs(0, 12, 5, 3, torch.float32)
    seed = torch.tensor(0)
    y, xa = FORWARD(x, weight, b, lora_A, lora_B, 1.0, 0.1, seed)
    assert y.shape == (0, 5) and xa.shape == (0, 3)
    dx, dA, dB, db = BACKWARD(torch.empty(0, 5), x, weight, lora_A, lora_B, xa, 1.0, 0.1, seed, True, True)
    assert dx.shape == (0, 12)
    assert torch.equal(dA, torch.zeros(3, 12)) and torch.equal(dB, torch.zeros(5, 3))
    assert torch.equal(db, torch.zeros(5))


def test_lora_linear_backend_cuda_nd_strided_and_empty():
    """The public functional op on backend="cuda" (CPU tensors) matches backend="torch"."""
    torch.manual_seed(0)
    weight = torch.randn(13, 24) / 5
    base = torch.randn(3, 5, 48)
    cases = [torch.randn(2, 5, 24), base[..., ::2], torch.randn(0, 24), torch.randn(4, 3, 2, 24).transpose(0, 2)]
    for x_value in cases:
        grads = {}
        for backend, dtype in (("torch", torch.float64), ("torch", torch.float32), ("cuda", torch.float32)):
            x = x_value.detach().to(dtype).requires_grad_(True)  # a fresh leaf, same strides
            lora_A = (torch.randn(4, 24, generator=torch.Generator().manual_seed(1), dtype=dtype) / 5).requires_grad_()
            lora_B = torch.randn(13, 4, generator=torch.Generator().manual_seed(2), dtype=dtype).requires_grad_(True)
            bias = torch.randn(13, generator=torch.Generator().manual_seed(3), dtype=dtype).requires_grad_(True)
            torch.manual_seed(42)  # the same dropout seed for every run
            y = lora_fused.lora_linear(x, weight.to(dtype), bias, lora_A, lora_B, 0.8, dropout_p=0.25, backend=backend)
            y.backward(torch.ones_like(y) / 3)
            grads[backend, dtype] = (y, x.grad, lora_A.grad, lora_B.grad, bias.grad)
        for name, got, same, exact in zip(("y", "dx", "dA", "dB", "db"), grads["cuda", torch.float32],
                                          grads["torch", torch.float32], grads["torch", torch.float64], strict=True):
            assert_parity(f"{name} for x of shape {tuple(x_value.shape)}", got, same, exact)


# ---- dropout -------------------------------------------------------------------------


def _observed_forward_mask(M, K, p, seed, device="cpu", dtype=torch.float64):
    """With lora_A = I (r = K), xa = x~ itself: its zeros are the dropped elements."""
    x = torch.rand(M, K, dtype=torch.float64).add_(0.5).to(device=device, dtype=dtype)
    eye = torch.eye(K, dtype=dtype, device=device)
    weight = torch.randn(3, K, dtype=dtype, device=device)
    y, xa = FORWARD(x, weight, None, eye, torch.randn(3, K, dtype=dtype, device=device), 1.0, p, torch.tensor(seed))
    return x, xa


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_dropout_mask_equals_reference_and_statistics(p):
    M, K, seed = 300, 64, 987654321
    x, xa = _observed_forward_mask(M, K, p, seed)
    mask = keep_mask(seed, M, K, p)
    assert torch.equal(xa != 0, mask), "the C++ mask differs from lora_fused.dropout.keep_mask"
    torch.testing.assert_close(xa, x * mask / (1 - p), rtol=1e-12, atol=0)
    kept = mask.double().mean().item()
    # Binomial(M*K, 1-p): 5 standard deviations.
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p)) / (M * K)) ** 0.5
    _, xa_other = _observed_forward_mask(M, K, p, seed + 1)
    assert not torch.equal(xa_other != 0, mask), "a different seed must give a different mask"


def test_cpu_dropout_backward_regenerates_forward_mask():
    M, K, p, seed = 50, 32, 0.4, 31337
    x, xa = _observed_forward_mask(M, K, p, seed)
    forward_mask = xa != 0
    # With W = 0 and lora_A = I, dx = s·gb ⊙ keep/(1-p): its zeros are backward's mask.
    eye = torch.eye(K, dtype=torch.float64)
    lora_B = torch.rand(7, K, dtype=torch.float64) + 0.5
    grad_y = torch.rand(M, 7, dtype=torch.float64) + 0.5
    dx, dA, _, _ = BACKWARD(grad_y, x, torch.zeros(7, K, dtype=torch.float64), eye, lora_B, xa, 2.0, p,
                            torch.tensor(seed), True, False)
    assert torch.equal(dx != 0, forward_mask)
    gb = grad_y @ lora_B
    torch.testing.assert_close(dx, 2.0 * gb * forward_mask / (1 - p))
    torch.testing.assert_close(dA, 2.0 * gb.t() @ xa)  # xa is x~ here


def test_dropout_seed_beyond_32_bits_matches_reference():
    """Only the seed's low 32 bits enter the hash, as in lora_fused.dropout."""
    M, K, p, seed = 40, 24, 0.5, (1 << 40) + 99
    _, xa = _observed_forward_mask(M, K, p, seed)
    assert torch.equal(xa != 0, keep_mask(seed, M, K, p))
    _, xa_low = _observed_forward_mask(M, K, p, seed & 0xFFFFFFFF)
    assert torch.equal(xa != 0, xa_low != 0)


# ---- torch.library integration -------------------------------------------------------


def _opcheck_args(dtype=torch.float32, bias=True, p=0.2):
    x, weight, b, lora_A, lora_B = make_inputs(9, 20, 11, 3, dtype, bias=bias)
    return x, weight, b, lora_A, lora_B


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward(bias):
    x, weight, b, lora_A, lora_B = _opcheck_args(bias=bias)
    for p in (0.0, 0.3):
        args = (x.requires_grad_(), weight, b.requires_grad_() if b is not None else None,
                lora_A.requires_grad_(), lora_B.requires_grad_(), 0.5, p, torch.tensor(5))
        torch.library.opcheck(FORWARD, args)


def test_opcheck_backward():
    x, weight, b, lora_A, lora_B = _opcheck_args()
    seed = torch.tensor(5)
    _, xa = FORWARD(x, weight, b, lora_A, lora_B, 0.5, 0.3, seed)
    grad_y = torch.randn(9, 11)
    for compute_dx, compute_db in ((True, True), (False, False)):
        torch.library.opcheck(BACKWARD, (grad_y, x, weight, lora_A, lora_B, xa, 0.5, 0.3, seed, compute_dx, compute_db))


def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    x, weight, b, lora_A, lora_B = make_inputs(6, 20, 11, 4, torch.float32)

    def fn(x, lora_A, lora_B, bias):
        return lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=0.0, backend="cuda").relu()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = {}
    for name, f in (("eager", fn), ("compiled", compiled)):
        leaves = [t.clone().requires_grad_(True) for t in (x, lora_A, lora_B, b)]
        y = f(*leaves)
        y.sum().backward()
        results[name] = [y] + [t.grad for t in leaves]
    for got, ref in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, ref)
    # Inductor too (generates C++ around the extern op): one forward is enough.
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, lora_A, lora_B, b), fn(x, lora_A, lora_B, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, weight, b, lora_A, lora_B = make_inputs(5, 7, 6, 3, torch.float64)
    seed = torch.tensor(11)

    def fn(x, bias, lora_A, lora_B):
        return FORWARD(x, weight, bias, lora_A, lora_B, 0.9, p, seed)[0]

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, b, lora_A, lora_B))
    assert torch.autograd.gradcheck(fn, inputs)


def test_readable_errors():
    x, weight, b, lora_A, lora_B = make_inputs(4, 8, 5, 2, torch.float32)
    seed = torch.tensor(0)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, r\] = \[5, 2\]"):
        FORWARD(x, weight, b, lora_A, lora_B.t().contiguous(), 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match="weight has dtype Half but x has dtype Float"):
        FORWARD(x, weight.half(), b, lora_A, lora_B, 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match="seed must be a 0-dim int64 CPU tensor"):
        FORWARD(x, weight, b, lora_A, lora_B, 1.0, 0.0, torch.tensor(0.5))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        FORWARD(x, weight, b, lora_A, lora_B, 1.0, 1.0, seed)
    with pytest.raises(RuntimeError, match="xa must have dtype Float"):
        BACKWARD(torch.randn(4, 5), x, weight, lora_A, lora_B, torch.randn(4, 2).double(), 1.0, 0.0, seed, True, True)


# ---- build record --------------------------------------------------------------------


def test_cuda_kernels_registered_iff_built_with_cuda():
    has_cuda_kernels = [
        torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in (extension.FORWARD, extension.BACKWARD)
    ]
    assert has_cuda_kernels == [bool(_C.built_with_cuda)] * 2
    assert extension.built_with_cuda() == bool(_C.built_with_cuda)


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: the extension builds CPU-only")
def test_built_with_cuda_when_a_toolkit_is_present():
    """setup.py compiles the CUDA kernels whenever nvcc and a CUDA torch exist; a silently
    CPU-only build fails here (unless it was asked for with LORA_FUSED_SKIP_CUDA=1)."""
    if os.environ.get("LORA_FUSED_SKIP_CUDA", "") not in ("", "0"):
        pytest.skip("LORA_FUSED_SKIP_CUDA is set: a CPU-only build was requested")
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not toolkit:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    assert _C.built_with_cuda, (
        "lora_fused._C was built without its CUDA kernels although nvcc and a CUDA build of torch are present "
        "(are the CUTLASS headers installed? `pip install nvidia-cutlass==4.2.0.0` or CUTLASS_PATH); rebuild with "
        "`pip install -e . --no-build-isolation` (or set LORA_FUSED_SKIP_CUDA=1 deliberately)"
    )


def test_cuda_arch_flags_build_one_architecture_or_several():
    """LORA_FUSED_CUDA_ARCHS="9.0a" (what the GPU check passes on an H100/H200) builds sm_90a only."""
    flags = function_of_setup_py("cuda_arch_flags")
    assert flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert flags("8.0+PTX;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert flags("sm_86 89") == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_89,code=sm_89"]
    with pytest.raises(ValueError, match="no CUDA architecture sm_80 or newer"):
        flags("7.5")
    with pytest.raises(ValueError, match="cannot parse CUDA architecture 'hopper'"):
        flags("hopper")


def test_sm90a_kernel_built_exactly_when_sm_90a_is_compiled():
    """The Hopper TMA + wgmma kernel needs sm_90a SASS: setup.py defines LORA_FUSED_SM90A (and
    _C.built_with_sm90a) for the arch lists that compile it, not for plain 9.0 or sm80 only."""
    flags, sm90a = function_of_setup_py("cuda_arch_flags"), function_of_setup_py("builds_sm90a")
    assert sm90a(flags("8.0+PTX;9.0a")) and sm90a(flags("9.0a"))
    assert not sm90a(flags("9.0")) and not sm90a(flags("8.0;8.6+PTX"))
    assert _C.built_with_sm90a in (0, 1)
    if not _C.built_with_cuda:
        assert _C.built_with_sm90a == 0


def test_cutlass_headers_from_cutlass_path_first(tmp_path, monkeypatch):
    """setup.py takes CUTLASS_PATH/include when it holds cute/tensor.hpp, and ignores one that does not."""
    find = function_of_setup_py("cutlass_include_dir")
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    assert find() != tmp_path / "include"
    (tmp_path / "include" / "cute").mkdir(parents=True)
    (tmp_path / "include" / "cute" / "tensor.hpp").write_text("// stub for the path search\n")
    assert find() == tmp_path / "include"


# ---- CUDA kernels (GPU only) ---------------------------------------------------------

requires_cuda_kernels = pytest.mark.skipif(
    not _C.built_with_cuda, reason="lora_fused._C was built without its CUDA kernels (LORA_FUSED_SKIP_CUDA or no nvcc)"
)

# Shapes crossing the 128-wide tensor-core tiles and 32-deep k-tiles, with K and N both
# multiples of 8 (cp.async path) and not (element-load path), and ranks reaching every
# kernel variant: the sm80 forward/dx with one or several 32-rank LoRA chunks; the thin
# xa, gb, dB|db and dA GEMMs over one to eight 32-rank tiles. tests/test_cuda_gpu.py names
# one case per instantiation.
CUDA_CASES = [
    (M, K, N, r, dtype, bias)
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for (M, K, N, r, bias) in (
        (1, 33, 17, 1, True),
        (7, 64, 48, 3, False),
        (130, 70, 45, 4, True),
        (257, 136, 300, 16, False),
        (130, 264, 136, 16, True),
        (130, 264, 136, 32, True),
        (300, 96, 130, 64, False),
        (300, 96, 130, 64, True),
        (129, 200, 72, 100, False),
        (64, 48, 40, 256, True),
    )
]

@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
@pytest.mark.parametrize("M,K,N,r,dtype,bias", CUDA_CASES, ids=lambda v: str(v).split(".")[-1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cuda_parity(M, K, N, r, dtype, bias, dropout_p):
    check_parity(M, K, N, r, dtype, bias, dropout_p=dropout_p, device="cuda")


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_strided_x(dtype):
    def strided(x):
        wide = torch.randn(x.shape[0], 3 * x.shape[1], device=x.device, dtype=x.dtype)
        wide[:, ::3] = x
        return wide[:, ::3]

    def row_strided(x):  # unit column stride, row stride not a multiple of 8
        wide = torch.randn(x.shape[0], x.shape[1] + 3, device=x.device, dtype=x.dtype)
        wide[:, : x.shape[1]] = x
        return wide[:, : x.shape[1]]

    check_parity(150, 64, 40, 8, dtype, True, dropout_p=0.2, device="cuda", x_transform=strided)
    check_parity(150, 64, 40, 8, dtype, True, dropout_p=0.2, device="cuda", x_transform=row_strided)


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_parity_many_rows(dtype):
    """Over 16384 rows: many split-M reduction slices (34) and row tiles."""
    check_parity(17000, 72, 40, 8, dtype, True, dropout_p=0.1, device="cuda")


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_dropout_mask_matches_cpu(dtype):
    M, K, p, seed = 200, 64, 0.3, 2024
    _, xa = _observed_forward_mask(M, K, p, seed, device="cuda", dtype=dtype)
    assert torch.equal((xa != 0).cpu(), keep_mask(seed, M, K, p))


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
def test_cuda_backward_is_deterministic_and_matches_cpu_kernels():
    x, weight, b, lora_A, lora_B = make_inputs(1000, 72, 56, 16, torch.float32, device="cuda")
    grad_y = torch.randn(1000, 56, device="cuda")
    first = run_extension(x, weight, b, lora_A, lora_B, 0.5, 0.1, 3, grad_y)
    second = run_extension(x, weight, b, lora_A, lora_B, 0.5, 0.1, 3, grad_y)
    cpu = run_extension(*(t.cpu() for t in (x, weight, b, lora_A, lora_B)), 0.5, 0.1, 3, grad_y.cpu())
    for name, a, bb, c in zip(OUTPUT_NAMES, first, second, cpu):
        assert torch.equal(a, bb), f"{name} differs between two identical calls"
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
def test_cuda_lora_linear_and_compile():
    layer_args = make_inputs(33, 40, 24, 8, torch.bfloat16, device="cuda", leading=(3, 11))
    x, weight, b, lora_A, lora_B = layer_args

    def fn(x, lora_A, lora_B):
        return lora_fused.lora_linear(x, weight, b, lora_A, lora_B, 0.5, backend="cuda")

    eager = fn(x, lora_A, lora_B)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, lora_A, lora_B), eager)
    ref = lora_fused.lora_linear(x, weight, b, lora_A, lora_B, 0.5, backend="torch")
    torch.testing.assert_close(eager, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_cuda_kernels
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_opcheck(dtype):
    x, weight, b, lora_A, lora_B = make_inputs(40, 24, 17, 4, dtype, device="cuda")
    seed = torch.tensor(5)
    args = (x.requires_grad_(), weight, b.requires_grad_(), lora_A.requires_grad_(), lora_B.requires_grad_(),
            0.5, 0.2, seed)
    torch.library.opcheck(FORWARD, args)
    _, xa = FORWARD(x.detach(), weight, b.detach(), lora_A.detach(), lora_B.detach(), 0.5, 0.2, seed)
    grad_y = torch.randn(40, 17, device="cuda", dtype=dtype)
    torch.library.opcheck(
        BACKWARD, (grad_y, x.detach(), weight, lora_A.detach(), lora_B.detach(), xa, 0.5, 0.2, seed, True, True)
    )
