"""Every Triton kernel compiles for Ampere and Hopper (through ptxas) on a machine without a GPU.

The interpreter runs the kernels' semantics but not the GPU lowering, so this compiles each
kernel ahead of time for sm80 and sm90 with the specialisations a real launch gets (unit
last strides, 16-divisible pointers, strides and sizes), in a subprocess with the
interpreter off. It also checks that the K loops are software-pipelined (shared memory
holds more than one stage) and that the tiles fit the architecture's shared memory: every
constexpr variant (fused / pre-computed xa and gb, backward with and without dx, the thin
projection kernel, the partials' reduction, B's padding copy) and, at
ranks 64 and 256, the largest config the pruners keep, in the test's dtype and in fp32.

Run directly: ``python tests/test_triton_gpu_compile.py 90 bf16``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_ak", "stride_yn", "stride_xar", "stride_br", "stride_gn", "stride_dxk"}


def _compile(kernel, pointer_types, constexprs, arch, num_warps, num_stages):
    return _compile_with(kernel, pointer_types, constexprs, arch, num_warps, num_stages, set())


def _compile_with(kernel, pointer_types, constexprs, arch, num_warps, num_stages, not_divisible):
    """Compile as a launch would specialise: pointers, strides and sizes 16-divisible unless in ``not_divisible``.

    Pointers, strides, M, N, K and the rank-sized R / R_OUT (when the rank is a multiple of 16)
    get ``tt.divisibility = 16``; unit strides become constexpr 1.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    constexprs = {**constexprs, **{n: 1 for n in fn.arg_names if n in UNIT_STRIDES and n not in constexprs}}
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in fn.arg_names}
    sizes = ("M", "N", "K", "R", "R_OUT")
    divisible = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
                 if n not in constexprs and n not in not_divisible
                 and (n.endswith("_ptr") or n.startswith("stride_") or n in sizes)}
    source = ASTSource(fn=fn, signature=signature, attrs=divisible,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _kept(prune, tiles, arch, named_args, **kwargs):
    """The configs ``prune`` keeps under ``arch``'s shared-memory budget (what autotuning may launch there)."""
    from lora_fused.kernels import configs
    real_budget = configs._shared_budget
    configs._shared_budget = lambda tensor: SHARED_MEMORY_LIMIT[arch]
    try:
        kept = prune(tiles, named_args, **kwargs)
    finally:
        configs._shared_budget = real_budget
    return kept


def compile_all(arch: int, dtype: str) -> None:
    import torch
    import triton

    from lora_fused.kernels import backward, configs, dropout, forward, plan, projection

    ptr = f"*{dtype}"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    common = {"INTERPRETED_BF16": False, "INPUT_PRECISION": "tf32" if dtype == "fp32" else "ieee"}
    tile = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if dtype == "fp32" else 64}
    forward_types = {**{n: ptr for n in ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr")},
                     "xa_ptr": "*fp32", "scaling": "fp32"}
    backward_types = {**{n: ptr for n in ("g_ptr", "x_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr")},
                      **{n: "*fp32" for n in ("xa_ptr", "gb_ptr", "dA_partial_ptr", "dB_partial_ptr", "db_partial_ptr")},
                      "lora_scale": "fp32"}
    projection_types = {"in_ptr": ptr, "p_ptr": ptr, "out_ptr": "*fp32", "scale": "fp32"}
    dx_flags = {"HAS_DROPOUT": True, "INDEX_BELOW_2_32": True}
    jobs = {
        "forward": (forward.lora_forward_kernel, forward_types,
                    {"R_PAD": 16, "HAS_BIAS": True, "PRECOMPUTED_XA": False, **common, **tile}, 8, 3),
        "forward_precomputed": (forward.lora_forward_kernel, forward_types,
                                {"R_PAD": 16, "HAS_BIAS": True, "PRECOMPUTED_XA": True, **common, **tile}, 8, 3),
        "backward": (backward.lora_backward_kernel, backward_types,
                     {"R_PAD": 16, **dx_flags, "COMPUTE_DX": True, "COMPUTE_DB": True, "PRECOMPUTED_GB": False,
                      "DB_ROWS": configs.backward_db_rows(16, tile["BLOCK_M"]), **common, **tile}, 8, 3),
        "backward_no_dx": (backward.lora_backward_kernel, backward_types,
                           {"R_PAD": 16, **dx_flags, "COMPUTE_DX": False, "COMPUTE_DB": True, "PRECOMPUTED_GB": False,
                            "DB_ROWS": configs.backward_db_rows(16, tile["BLOCK_M"]), **common, **tile}, 8, 3),
        "backward_precomputed": (backward.lora_backward_kernel, backward_types,
                                 {"R_PAD": 16, **dx_flags, "COMPUTE_DX": True, "COMPUTE_DB": False,
                                  "PRECOMPUTED_GB": True, "DB_ROWS": configs.backward_db_rows(16, tile["BLOCK_M"]), **common,
                                  **tile}, 8, 3),
        # As a launch without db or a precomputed gb passes them: None pointers (constexpr), db_partial_ptr
        # reaching the dB step's non-inlined call.
        "backward_none_pointers": (backward.lora_backward_kernel, backward_types,
                                   {"gb_ptr": None, "db_partial_ptr": None, "R_PAD": 16, **dx_flags,
                                    "COMPUTE_DX": True, "COMPUTE_DB": False, "PRECOMPUTED_GB": False,
                                    "DB_ROWS": configs.backward_db_rows(16, tile["BLOCK_M"]), **common, **tile}, 8, 3),
        # xa pre-pass (P = Aᵀ, k contiguous) and standalone gb (P = B, rank contiguous).
        "projection_xa": (projection.thin_projection_kernel, projection_types,
                          {"R_PAD": 16, **dx_flags, "stride_pk": 1, "BLOCK_M": 64, "BLOCK_K": 64, **common},
                          4, 3),
        "projection_gb": (projection.thin_projection_kernel, projection_types,
                          {"R_PAD": 16, **dx_flags, "HAS_DROPOUT": False, "stride_pr": 1, "BLOCK_M": 64,
                           "BLOCK_K": 64, **common},
                          4, 3),
        "reduce_partials": (backward._reduce_partials_kernel,
                            {**{n: "*fp32" for n in ("dA_partial_ptr", "dB_partial_ptr", "db_partial_ptr")},
                             **{n: ptr for n in ("dA_ptr", "dB_ptr", "db_ptr")}, "dA_scale": "fp32", "dB_scale": "fp32"},
                            {"R_PAD": 16, "COMPUTE_DB": True, "INTERPRETED_BF16": False, "BLOCK": 1024}, 4, 1),
        "pad_rank": (backward._pad_rank_kernel, {"src_ptr": ptr, "dst_ptr": ptr}, {"R_PAD": 16, "BLOCK": 64}, 4, 1),
    }
    for name, (kernel, types, constexprs, warps, stages) in jobs.items():
        shared = _compile(kernel, types, constexprs, arch, warps, stages).metadata.shared
        print(name, shared)
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{name}: {shared} B of shared memory on sm{arch}"

    # Large ranks: every config the pruners keep (in this dtype, and in fp32 where nothing fits and the
    # fallback tile is launched without benchmarking) must fit the architecture's shared memory.
    gemm_tiles = configs._GEMM_HOPPER if arch >= 90 else configs._GEMM_AMPERE
    fp32 = {"INTERPRETED_BF16": False, "INPUT_PRECISION": "tf32"}
    rank_jobs = []
    for elt_dtype, elt_name, prec in ((torch_dtype, dtype, common), (torch.float32, "fp32", fp32)):
        p = f"*{elt_name}"
        w = torch.empty(0, dtype=elt_dtype)
        fwd_types = {**{n: p for n in forward_types if n.endswith("_ptr") and n != "xa_ptr"},
                     "xa_ptr": "*fp32", "scaling": "fp32"}
        bw_types = {**{n: p for n in backward_types if backward_types[n] != "*fp32"},
                    **{n: "*fp32" for n in backward_types if backward_types[n] == "*fp32"}, "lora_scale": "fp32"}
        proj_types = {"in_ptr": p, "p_ptr": p, "out_ptr": "*fp32", "scale": "fp32"}
        for r_pad in (64, 256):
            fused = r_pad <= plan.MAX_FUSED_R_PAD
            flags = {"R_PAD": r_pad, **prec}
            fwd = {**flags, "HAS_BIAS": True, "PRECOMPUTED_XA": not fused}
            for c in _kept(configs.prune_gemm_configs, gemm_tiles, arch, {"w_ptr": w}, **fwd):
                rank_jobs.append((f"forward_r{r_pad}_{elt_name}", forward.lora_forward_kernel, fwd_types,
                                  {**fwd, **c.kwargs}, c))
            bwf = {**flags, "HAS_DROPOUT": True, "INDEX_BELOW_2_32": True, "COMPUTE_DX": True, "COMPUTE_DB": True,
                   "PRECOMPUTED_GB": not fused}
            backward_tiles = configs._BACKWARD_HOPPER if arch >= 90 else configs._BACKWARD_AMPERE
            for c in _kept(configs.prune_backward_configs, backward_tiles, arch, {"g_ptr": w}, **bwf):
                rank_jobs.append((f"backward_r{r_pad}_{elt_name}", backward.lora_backward_kernel, bw_types,
                                  {**bwf, "DB_ROWS": configs.backward_db_rows(r_pad, c.kwargs["BLOCK_M"]), **c.kwargs},
                                  c))
            proj = {**flags, "HAS_DROPOUT": True, "INDEX_BELOW_2_32": True, "stride_pk": 1}
            for c in _kept(configs.prune_projection_configs, configs.projection_configs(), arch,
                                   {"in_ptr": w}, **proj):
                rank_jobs.append((f"projection_r{r_pad}_{elt_name}", projection.thin_projection_kernel, proj_types,
                                  {**proj, **c.kwargs}, c))
    # One compile per job: the kept config with the most staged tile elements (the largest shared memory).
    largest = {}
    for name, kernel, types, constexprs, c in rank_jobs:
        size = c.num_stages * (c.kwargs.get("BLOCK_M", 1) * c.kwargs.get("BLOCK_K", 1)
                               + c.kwargs.get("BLOCK_K", 1) * (c.kwargs.get("BLOCK_N", 0) + constexprs["R_PAD"]))
        if name not in largest or size > largest[name][0]:
            largest[name] = (size, kernel, types, constexprs, c)
    for name, (_, kernel, types, constexprs, c) in largest.items():
        shared = _compile(kernel, types, constexprs, arch, c.num_warps, c.num_stages).metadata.shared
        print(name, shared)
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{name} {c}: {shared} B of shared memory on sm{arch}"

    # A real launch turns every int argument equal to 1 that is not in do_not_specialize into a
    # constexpr (the interpreter never does): the kernels must still compile with all of them at 1.
    jobs["keep_mask"] = (dropout._keep_mask_kernel, {"out_ptr": "*i8"}, {"BLOCK": 1024, "INDEX_BELOW_2_32": True}, 4, 1)
    for name in ("forward", "forward_precomputed", "backward", "backward_no_dx", "backward_precomputed",
                 "projection_xa", "projection_gb", "reduce_partials", "pad_rank", "keep_mask"):
        kernel, types, constexprs, warps, stages = jobs[name]
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        ones = {p.name: 1 for p in fn.params if not p.do_not_specialize and p.name not in constexprs
                and p.name not in types and not p.name.endswith("_ptr")}
        print(f"{name}_ones", _compile(kernel, types, {**constexprs, **ones}, arch, warps, stages).metadata.shared)


@pytest.mark.parametrize("arch,dtype", [(90, "bf16"), (80, "fp16")])
def test_kernels_compile_for_gpu_targets(arch, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__, str(arch), dtype], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    shared = {name: int(value) for name, value in (line.split() for line in result.stdout.splitlines())}
    forward_shared = shared["forward"]
    single_stage = (128 * 64 + 64 * 128 + 64 * 16) * 2
    assert forward_shared > single_stage, f"forward K loop is not pipelined ({forward_shared} B shared)"


if __name__ == "__main__":
    compile_all(int(sys.argv[1]), sys.argv[2])
