"""Parity of the Triton backend with the float64 reference (DESIGN.md §5), on every shape class.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)
with one small config; with a GPU the same matrix runs on CUDA with the autotuned
configs, and the CUDA-only tests below add bf16 at real sizes and autotuning.

bf16 under the interpreter: the interpreter's tl.dot on bf16 multiplies raw bit
patterns (triton#11584) and its fp32->bf16 cast truncates, so the kernels widen bf16 dot
operands to fp32 and round casts to nearest-even themselves *only when interpreting*
(the INTERPRETED_BF16 constexpr). The bf16 cases here therefore check the kernels' bf16
loads, stores and index arithmetic on CPU; native bf16 MMAs are checked by the CUDA tests.
"""

from __future__ import annotations

import pytest
import torch
import triton

import lora_fused
from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import ops as triton_ops
from lora_fused.kernels import plan as triton_plan
from parity import assert_op_parity, assert_parity, make_inputs, reference_outputs
from conftest import requires_cuda

INTERPRETING = triton_configs.interpreting()
DEVICE = "cpu" if INTERPRETING else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1",
)

SCALING = 1.7
OUTPUT_NAMES = ("y", "xa", "dx", "dA", "dB", "db")

# (M, K, N, rank, bias, dtype): every rank of the issue in fp32 and fp16, with M in {1, 7, 130},
# K and N not multiples of 16 (and larger than the interpreter's 32-wide blocks).
RANK_CASES = [
    (130, 70, 45, 1, True, torch.float32),
    (7, 70, 45, 3, False, torch.float32),
    (1, 33, 17, 4, True, torch.float32),
    (130, 70, 45, 16, False, torch.float32),
    (7, 70, 45, 64, True, torch.float32),
    (7, 70, 45, 1, False, torch.float16),
    (130, 70, 45, 3, True, torch.float16),
    (130, 33, 45, 4, False, torch.float16),
    (1, 70, 45, 16, True, torch.float16),
    (130, 70, 45, 64, False, torch.float16),
    (130, 70, 45, 16, True, torch.bfloat16),
    (7, 33, 17, 3, False, torch.bfloat16),
    (7, 50, 45, 256, True, torch.float32),
]


def _case_id(case):
    M, K, N, r, bias, dtype = case
    return f"M{M}-K{K}-N{N}-r{r}-{'bias' if bias else 'nobias'}-{str(dtype).split('.')[-1]}"


def _random_like(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _double(t):
    return None if t is None else t.double()


def check_op_parity(M, K, N, r, bias, dtype, dropout_p=0.0, seed=1234, device=DEVICE):
    """Forward and all gradients of the Triton ops vs the float64 reference, under DESIGN.md §5's budget."""
    x, weight, b, lora_A, lora_B = make_inputs(M, K, N, r, dtype, device=device, bias=bias, seed=M * 1000 + r)
    grad_y = _random_like((M, N), dtype, device, seed=7)
    seed_t = torch.tensor(seed, dtype=torch.int64)

    y, xa = triton_ops.triton_forward(x, weight, b, lora_A, lora_B, SCALING, dropout_p, seed_t)
    dx, dA, dB, db = triton_ops.triton_backward(
        grad_y, x, weight, lora_A, lora_B, xa, SCALING, dropout_p, seed_t, True, bias)
    got = (y, xa, dx, dA, dB, db)

    assert_op_parity(got, x, weight, b, lora_A, lora_B, SCALING, dropout_p, seed, grad_y,
                     absent=() if bias else ("db",), same_dtype=True)


@pytest.mark.parametrize("case", RANK_CASES, ids=_case_id)
def test_op_parity(case):
    check_op_parity(*case)


@pytest.mark.parametrize("dtype,M,r,p", [
    (torch.float32, 130, 16, 0.3),
    (torch.float16, 7, 4, 0.5),
    (torch.bfloat16, 130, 3, 0.2),
    (torch.float16, 130, 64, 0.4),  # largest rank with gb fused into the dx kernel
    (torch.float32, 7, 256, 0.2),  # gb from the thin projection kernel
])
def test_op_parity_with_dropout(dtype, M, r, p):
    # The reference draws lora_fused.dropout.keep_mask, so this also checks the kernels' mask in both passes.
    check_op_parity(M, 70, 45, r, True, dtype, dropout_p=p, seed=99)


def _run_layer(x, weight, bias, lora_A, lora_B, grad_y, backend, dropout_p=0.0):
    x = x.detach().requires_grad_()
    lora_A = lora_A.detach().requires_grad_()
    lora_B = lora_B.detach().requires_grad_()
    if bias is not None:
        bias = bias.detach().requires_grad_()
    torch.manual_seed(5)  # the functional draws its dropout seed from the default generator
    y = lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p=dropout_p, backend=backend)
    y.backward(grad_y)
    return y, x.grad, lora_A.grad, lora_B.grad, (bias.grad if bias is not None else None)


def _check_layer_parity(x, weight, bias, lora_A, lora_B, dropout_p=0.0):
    N = weight.shape[0]
    grad_y = _random_like((*x.shape[:-1], N), x.dtype, x.device, seed=3)
    got = _run_layer(x, weight, bias, lora_A, lora_B, grad_y, "triton", dropout_p)
    same_dtype = _run_layer(x, weight, bias, lora_A, lora_B, grad_y, "torch", dropout_p)
    exact = _run_layer(*(_double(t) for t in (x, weight, bias, lora_A, lora_B, grad_y)), "torch", dropout_p)
    for name, value, torch_value, exact_value in zip(("y", "dx", "dA", "dB", "db"), got, same_dtype, exact, strict=True):
        if value is None:
            continue
        assert value.shape == torch_value.shape, (name, value.shape, torch_value.shape)
        assert_parity(name, value, torch_value, exact_value)


def test_layer_nd_input():
    x, weight, bias, lora_A, lora_B = make_inputs(0, 37, 45, 4, torch.float32, device=DEVICE, leading=(2, 3, 11))
    _check_layer_parity(x, weight, bias, lora_A, lora_B, dropout_p=0.25)


@pytest.mark.parametrize("layout", ["row_strided", "last_dim_strided", "transposed", "nd_sliced"])
def test_layer_strided_input(layout):
    M, K, N, r = 40, 37, 45, 3
    base, weight, bias, lora_A, lora_B = make_inputs(2 * M, 2 * K, N, r, torch.float16, device=DEVICE)
    weight, lora_A = weight[:, :K], lora_A[:, :K]  # strided parameters too (unit last stride)
    if layout == "row_strided":
        x = base[::2, 5:5 + K]
    elif layout == "last_dim_strided":
        x = base[:M, ::2][:, :K]
    elif layout == "transposed":
        x = base[:K, :M].t()
    else:
        x = base[:M, :K].reshape(4, 10, K)[:, 1:8, :]
    assert not x.is_contiguous()
    _check_layer_parity(x, weight, bias, lora_A, lora_B)


def test_unit_stride_input_is_not_copied(monkeypatch):
    seen = {}
    real = triton_ops.lora_forward

    def recording_forward(x, *args):
        seen["ptr"], seen["stride"] = x.data_ptr(), x.stride()
        return real(x, *args)

    monkeypatch.setattr(triton_ops, "lora_forward", recording_forward)
    base, weight, bias, lora_A, lora_B = make_inputs(20, 50, 17, 4, torch.float32, device=DEVICE)
    x = base[::2, 3:36]
    triton_ops.triton_forward(x, weight[:, :33], bias, lora_A[:, :33], lora_B, 1.0, 0.0,
                              torch.tensor(0, dtype=torch.int64))
    assert seen == {"ptr": x.data_ptr(), "stride": (100, 1)}


def test_empty_batch():
    x, weight, bias, lora_A, lora_B = make_inputs(0, 20, 17, 4, torch.float32, device=DEVICE)
    seed = torch.tensor(3, dtype=torch.int64)
    y, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.1, seed)
    assert y.shape == (0, 17) and xa.shape == (0, 4) and xa.dtype == torch.float32
    dx, dA, dB, db = triton_ops.triton_backward(torch.empty(0, 17, device=DEVICE), x, weight, lora_A, lora_B, xa,
                                                SCALING, 0.1, seed, True, True)
    assert dx.shape == (0, 20)
    assert torch.equal(dA, torch.zeros_like(lora_A)) and torch.equal(dB, torch.zeros_like(lora_B))
    assert torch.equal(db, torch.zeros(17, device=DEVICE))
    # Through the functional API with a zero-sized leading dimension, gradients are zeros too.
    x_nd = torch.randn(2, 0, 20, device=DEVICE, requires_grad=True)
    lora_A.requires_grad_()
    out = lora_fused.lora_linear(x_nd, weight, bias, lora_A, lora_B, SCALING, backend="triton")
    out.sum().backward()
    assert out.shape == (2, 0, 17) and torch.equal(lora_A.grad, torch.zeros_like(lora_A))


def test_gradients_are_deterministic():
    x, weight, bias, lora_A, lora_B = make_inputs(130, 70, 45, 16, torch.float32, device=DEVICE)
    grad_y = _random_like((130, 45), torch.float32, DEVICE, seed=11)
    seed = torch.tensor(21, dtype=torch.int64)
    y, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.3, seed)
    first = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.3, seed, True, True)
    second = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.3, seed, True, True)
    for name, a, b in zip(("dx", "dA", "dB", "db"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical backward calls"


@pytest.mark.parametrize("compute_dx,r", [(True, 16), (False, 4), (True, 256)])
def test_backward_allocates_no_per_column_block_buffers(monkeypatch, compute_dx, r):
    # gb = g·B is accumulated inside the backward kernel (or, at R_PAD > 64, by a thin projection kernel),
    # not as per-column-block partials: the only buffers with M rows are dx and, at R_PAD > 64, one fp32
    # gb [M, R_PAD] (the rest: per-row-group partials of dB, db, dA, padded B and the outputs, sized by N, K, R).
    M, K, N = 130, 33, 300  # N spans many column blocks
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, r, torch.float16, device=DEVICE)
    grad_y = _random_like((M, N), torch.float16, DEVICE, seed=2)
    seed = torch.tensor(1, dtype=torch.int64)
    _, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, SCALING, 0.1, seed)
    shapes = []
    real_empty = torch.empty

    def recording_empty(*size, **kwargs):
        out = real_empty(*size, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "empty", recording_empty)
    triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, 0.1, seed, compute_dx, True)
    r_pad = triton_configs.padded_rank(r)
    with_rows = sorted(s for s in shapes if M in s)
    expected = ([(M, r_pad)] if r_pad > 64 else []) + ([(M, K)] if compute_dx else [])
    assert with_rows == sorted(expected), shapes


# (M, K, N, r, compute_dx, p) for the backward's row groups and dB/db chunks. Under the interpreter (4 "SMs",
# 32-row blocks, 32-wide tiles, dB chunks of 64 rows) M = 260 makes 2-3 row groups of 96 or 160 rows: each group
# read-modify-writes its dB/db partials over several chunks, its last chunk (and the last group) partial.
# N = 140 has 5 N tiles for 3 column blocks (K = 70: a program owns two), N = 45 two (a program owns none).
ROW_GROUP_CASES = [
    (260, 70, 140, 4, True, 0.0),
    (260, 70, 45, 16, True, 0.2),
    (260, 130, 140, 1, False, 0.0),
    (260, 70, 140, 17, True, 0.3),
    (260, 70, 140, 65, True, 0.1),  # gb from the thin projection kernel
    (260, 70, 45, 5, False, 0.2),
    (260, 0, 45, 4, True, 0.0),  # K = 0: one column-block program per group does dB/db alone
    (260, 70, 0, 16, True, 0.2),  # N = 0: no dB tiles, dx and dA zero
]


@pytest.mark.parametrize("M,K,N,r,compute_dx,p", ROW_GROUP_CASES)
def test_backward_row_groups_and_dB_chunks(M, K, N, r, compute_dx, p):
    # Each program walks several row blocks (dA accumulated across them in registers, dB/db added to the group's
    # partials chunk by chunk), and the groups' partials are summed by the reduction; poisoned partials
    # (tests/conftest.py) make a chunk that reads before the group's first store fail.
    groups, rows_per_group = triton_configs.backward_row_groups(
        M, triton.cdiv(K, triton_plan.backward_column_block(compute_dx)),
        triton_configs.multiprocessors(torch.device(DEVICE)))
    if INTERPRETING:
        block_m = triton_configs.backward_configs()[0].kwargs["BLOCK_M"]
        db_rows = triton_configs.backward_db_rows(triton_configs.padded_rank(r), block_m)
        assert groups > 1 and rows_per_group > db_rows > block_m and M % rows_per_group, (groups, rows_per_group)
    _assert_backward_parity(M, K, N, r, compute_dx, p)


# Chunk boundaries the cases above miss (review of issue 10, C3). Interpreter: 32-row blocks, 4 "SMs".
# M = 260: groups of 160 and 100 rows; DB_ROWS 32 (one row block a chunk) makes 160 an exact multiple of the chunk
# (both triggers at once), DB_ROWS 96 (three blocks, not a power of two) chunks of 96 + 64 and 96 + 4.
# M = 100: groups of 64 and 36 rows, each a single chunk at DB_ROWS 96 (the partial only stored, never read).
@pytest.mark.skipif(not INTERPRETING, reason="sets the interpreter's dB chunk")
@pytest.mark.parametrize("db_rows,M", [(32, 260), (96, 260), (96, 100)])
def test_backward_dB_chunk_boundaries(monkeypatch, db_rows, M):
    monkeypatch.setattr(triton_configs, "DB_ROWS_INTERPRETER", db_rows)
    block_m = triton_configs.backward_configs()[0].kwargs["BLOCK_M"]
    assert triton_configs.backward_db_rows(16, block_m) == db_rows
    _assert_backward_parity(M, 70, 140, 16, True, 0.2)


def _assert_backward_parity(M, K, N, r, compute_dx, p):
    # K or N = 0: inputs drawn at size 1 and sliced to 0 (make_inputs scales by K**-0.5).
    x, weight, b, lora_A, lora_B = make_inputs(M, max(K, 1), max(N, 1), r, torch.float16, device=DEVICE, seed=3)
    x, weight, b, lora_A, lora_B = x[:, :K], weight[:N, :K], b[:N], lora_A[:, :K], lora_B[:N]
    grad_y = _random_like((M, N), torch.float16, DEVICE, seed=8)
    seed = torch.tensor(4, dtype=torch.int64)
    _, xa = triton_ops.triton_forward(x, weight, b, lora_A, lora_B, SCALING, p, seed)
    got = triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, SCALING, p, seed, compute_dx, True)
    same = reference_outputs(x, weight, b, lora_A, lora_B, SCALING, p, 4, grad_y)
    exact = reference_outputs(*(_double(t) for t in (x, weight, b, lora_A, lora_B)), SCALING, p, 4, grad_y.double())
    for name, value, torch_value, exact_value in zip(OUTPUT_NAMES[2:], got, same[2:], exact[2:], strict=True):
        if name == "dx" and not compute_dx:
            assert value.numel() == 0
            continue
        assert value.shape == torch_value.shape, (name, value.shape, torch_value.shape)
        assert_parity(name, value, torch_value, exact_value)


def test_only_requested_gradients():
    x, weight, _, lora_A, lora_B = make_inputs(7, 20, 17, 4, torch.float16, device=DEVICE)
    seed = torch.tensor(0, dtype=torch.int64)
    _, xa = triton_ops.triton_forward(x, weight, None, lora_A, lora_B, SCALING, 0.0, seed)
    dx, dA, dB, db = triton_ops.triton_backward(torch.ones(7, 17, dtype=torch.float16, device=DEVICE), x, weight,
                                                lora_A, lora_B, xa, SCALING, 0.0, seed, False, False)
    assert dx.numel() == 0 and db.numel() == 0
    assert dA.shape == lora_A.shape and dB.shape == lora_B.shape and torch.isfinite(dA).all()


@pytest.mark.parametrize("change,error,match", [
    ({"dtype": torch.float64}, TypeError, "float64"),
    ({"rank": 257}, ValueError, "ranks 1..256"),
    ({"b_dtype": torch.float16}, TypeError, "share x's dtype"),
    ({"bias_len": 5}, ValueError, "bias must be"),
])
def test_clear_errors(change, error, match):
    dtype = change.get("dtype", torch.float32)
    x, weight, bias, lora_A, lora_B = make_inputs(3, 20, 17, change.get("rank", 4), dtype, device=DEVICE)
    if "b_dtype" in change:
        lora_B = lora_B.to(change["b_dtype"])
    if "bias_len" in change:
        bias = bias[: change["bias_len"]]
    with pytest.raises(error, match=match):
        triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, 1.0, 0.0, torch.tensor(0, dtype=torch.int64))


def test_torch_compile_fullgraph():
    x, weight, bias, lora_A, lora_B = make_inputs(7, 20, 17, 4, torch.float32, device=DEVICE)

    def layer(x, lora_A, lora_B, dropout_p):
        return lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p=dropout_p,
                                      backend="triton")

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
        y = fn(*leaves, 0.0)
        y.square().sum().backward()
        results.append((y, *(t.grad for t in leaves)))
    for name, eager, comp in zip(("y", "dx", "dA", "dB"), *results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6, msg=name)
    # The dropout path (seed drawn inside the graph) compiles without graph breaks as well.
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
    compiled(*leaves, 0.4).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_opcheck():
    x, weight, bias, lora_A, lora_B = make_inputs(7, 20, 17, 4, torch.float32, device=DEVICE)
    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(triton_ops.triton_forward,
                          (x.requires_grad_(), weight, bias, lora_A.requires_grad_(), lora_B, 1.5, 0.2, seed))
    _, xa = triton_ops.triton_forward(x.detach(), weight, bias, lora_A.detach(), lora_B, 1.5, 0.2, seed)
    grad_y = _random_like((7, 17), torch.float32, DEVICE, seed=4)
    torch.library.opcheck(triton_ops.triton_backward,
                          (grad_y, x.detach(), weight, lora_A.detach(), lora_B, xa, 1.5, 0.2, seed, True, True))


def test_large_rank_configs_are_pruned_to_fit():
    # The GPU config lists keep only tiles whose accumulators fit when R_PAD is 256, and never none.
    weight = torch.empty(8, 8, dtype=torch.float16)
    for tiles in (triton_configs._GEMM_AMPERE, triton_configs._GEMM_HOPPER):
        small = triton_configs.prune_gemm_configs(tiles, {"w_ptr": weight}, R_PAD=16)
        large = triton_configs.prune_gemm_configs(tiles, {"w_ptr": weight}, R_PAD=256)
        assert 0 < len(large) < len(small)
        for config in large:
            accumulators = config.kwargs["BLOCK_M"] * (config.kwargs["BLOCK_N"] + 256)
            assert accumulators / (32 * config.num_warps) <= triton_configs.MAX_ACCUMULATORS_PER_THREAD


# ---- CUDA: native bf16 MMAs, autotuned configs, realistic sizes --------------------------------

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,N,r", [(4096, 768, 2304, 16), (1000, 768, 768, 4), (333, 1280, 5120, 64),
                                     (129, 1000, 300, 256), (1, 768, 768, 8)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_parity_autotuned(dtype, M, K, N, r, dropout_p):
    check_op_parity(M, K, N, r, True, dtype, dropout_p=dropout_p, device="cuda")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", RANK_CASES, ids=_case_id)
def test_cuda_parity_small_shapes(case):
    check_op_parity(*case, device="cuda")


@requires_cuda
@pytest.mark.gpu
def test_cuda_tf32_follows_torch_setting():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            check_op_parity(512, 768, 768, 16, True, torch.float32, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@requires_cuda
@pytest.mark.gpu
def test_cuda_gradients_are_deterministic():
    x, weight, bias, lora_A, lora_B = make_inputs(8192, 768, 2304, 16, torch.bfloat16, device="cuda")
    grad_y = _random_like((8192, 2304), torch.bfloat16, "cuda", seed=1)
    seed = torch.tensor(5, dtype=torch.int64)
    _, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.1, seed)
    runs = [triton_ops.triton_backward(grad_y, x, weight, lora_A, lora_B, xa, 2.0, 0.1, seed, True, True)
            for _ in range(3)]
    for name, *values in zip(("dx", "dA", "dB", "db"), *runs, strict=True):
        assert all(torch.equal(values[0], v) for v in values[1:]), name


def test_tf32_setting_is_read_through_either_torch_api():
    # Reading allow_tf32 raises once torch's new fp32_precision API has been used, so the kernels read the
    # setting through fp32_precision where it exists. A subprocess keeps the global settings of this one.
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch\n"
        "from lora_fused.kernels import common\n"
        "common.interpreting = lambda: False\n"
        "got = [common.input_precision(torch.float32)]\n"
        "torch.backends.fp32_precision = 'tf32'\n"
        "got.append(common.input_precision(torch.float32))\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "got.append(common.input_precision(torch.float32))\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "got.append(common.input_precision(torch.float32))\n"
        "got.append(common.input_precision(torch.float16))\n"
        "print(' '.join(got))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=repo, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ieee", "tf32", "ieee", "tf32", "ieee"]
