"""Every config the pruners keep, compiled ahead of time for sm90 and sm80: no spills, pipelined loops.

Without a GPU, this compiles (``triton.compile`` with a GPU target, through ptxas) every
kernel variant a launch can select at ranks 4, 16, 64 and 256, with and without dropout,
with every config its pruner keeps under the architecture's shared-memory budget, and
reads ptxas's ``-v`` report: a kept config that spills registers fails. The
specialisations are a real launch's: 16-divisible pointers, sizes and strides, except
the rank-sized ones at a rank that is not a multiple of 16 (R, B's row stride, xa's).

At ranks 4 and 16 it also checks, in the TTGIR, that every loop feeding an MMA is
software-pipelined: its tiles arrive by asynchronous copies (cp.async / TMA), no tile is
loaded synchronously inside the loop, and (sm90) the loop never waits for all its wgmmas
(``warp_group_dot_wait {pendings = 0}``), which would drain the pipeline every step. The
exceptions are listed in ``KNOWN_UNPIPELINED`` with their reasons (the backward's dB step,
whose loop over a chunk's row blocks reads L2-resident tiles, is one); the backward must
still have its N loop pipelined beside it.

The compiles run in worker processes with the interpreter off. Run directly for a report:
``python tests/test_triton_gpu_kept_configs.py 90``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

RANKS = (4, 16, 64, 256)
PIPELINE_RANKS = (4, 16)
ARCH_DTYPE = {90: "bf16", 80: "fp16"}
# Rank-sized arguments: 16-divisible only when the rank is.
RANK_SIZED = {"R", "R_OUT", "stride_bn", "stride_xam"}
LARGE_M, LARGE_N, LARGE_K = 16384, 3072, 768  # sizes of the planning decisions


def _variants(arch: int):
    """(label, kernel name, types, constexprs, not_divisible, config, rank) of every kept launch variant."""
    import torch

    from lora_fused.kernels import configs, plan
    from test_triton_gpu_compile import _kept

    dtype = ARCH_DTYPE[arch]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    elt = torch.empty(0, dtype=torch_dtype)
    ptr = f"*{dtype}"
    prec = {"INTERPRETED_BF16": False, "INPUT_PRECISION": "ieee"}
    gemm_tiles = configs._GEMM_HOPPER if arch >= 90 else configs._GEMM_AMPERE
    backward_tiles = configs._BACKWARD_HOPPER if arch >= 90 else configs._BACKWARD_AMPERE
    forward_types = {**{n: ptr for n in ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr")},
                     "xa_ptr": "*fp32", "scaling": "fp32"}
    backward_types = {**{n: ptr for n in ("g_ptr", "x_ptr", "w_ptr", "a_ptr", "b_ptr", "dx_ptr")},
                      **{n: "*fp32" for n in ("xa_ptr", "gb_ptr", "dA_partial_ptr", "dB_partial_ptr", "db_partial_ptr")},
                      "lora_scale": "fp32"}
    proj_types = {"in_ptr": ptr, "p_ptr": ptr, "out_ptr": "*fp32", "scale": "fp32"}
    # Row groups of a large M (several row blocks each): every tile's BLOCK_M divides them.
    _, rows_per_group = configs.backward_row_groups(LARGE_M, -(-LARGE_K // plan.PLAN_BLOCK_N), 132)
    seen = set()
    for r in RANKS:
        r_pad = configs.padded_rank(r)
        odd = set(RANK_SIZED) if r % 16 else set()
        fused_gb = plan.backward_fuses_gb(r_pad)
        jobs = []
        for p in (0.0, 0.1):
            prepass = plan.forward_uses_prepass(LARGE_N, r_pad, p)
            fwd = {"R_PAD": r_pad, "HAS_BIAS": True, "PRECOMPUTED_XA": prepass, **prec}
            jobs += [("forward", "lora_forward_kernel", forward_types, fwd, odd, c)
                     for c in _kept(configs.prune_gemm_configs, gemm_tiles, arch, {"w_ptr": elt}, **fwd)]
            if prepass:  # xa = x~·Aᵀ: P = Aᵀ, k contiguous
                proj = {"R_PAD": r_pad, "HAS_DROPOUT": p > 0, "INDEX_BELOW_2_32": True, "stride_pk": 1, **prec}
                jobs += [("projection_xa", "thin_projection_kernel", proj_types, proj, odd, c)
                         for c in _kept(configs.prune_projection_configs, configs.projection_configs(), arch,
                                        {"in_ptr": elt}, **proj)]
            # B padded to R_PAD columns in memory when the gb loop reads it: its row stride is R_PAD.
            bw_odd = odd - {"stride_bn"} if fused_gb else odd
            for compute_dx in (True, False):
                bw = {"R_PAD": r_pad, "HAS_DROPOUT": p > 0, "INDEX_BELOW_2_32": True, "COMPUTE_DX": compute_dx,
                      "COMPUTE_DB": True, "PRECOMPUTED_GB": not fused_gb, **prec}
                jobs += [("backward", "lora_backward_kernel", backward_types,
                          {**bw, "DB_ROWS": configs.backward_db_rows(r_pad, c.kwargs["BLOCK_M"])}, bw_odd, c)
                         for c in _kept(configs.prune_backward_configs, backward_tiles, arch,
                                        {"g_ptr": elt, "rows_per_group": rows_per_group}, **bw)]
            if not fused_gb:  # gb = g·B: P = B, rank contiguous, row stride r
                proj = {"R_PAD": r_pad, "HAS_DROPOUT": False, "INDEX_BELOW_2_32": True, "stride_pr": 1, **prec}
                jobs += [("projection_gb", "thin_projection_kernel", proj_types, proj,
                          odd | ({"stride_pk"} if r % 16 else set()), c)
                         for c in _kept(configs.prune_projection_configs, configs.projection_configs(), arch,
                                        {"in_ptr": elt}, **proj)]
        for label, kernel, types, constexprs, not_divisible, c in jobs:
            full = {**constexprs, **c.kwargs}
            identity = (kernel, tuple(sorted(full.items())), tuple(sorted(not_divisible)), c.num_warps, c.num_stages)
            if identity in seen:
                continue
            seen.add(identity)
            yield (label, kernel, types, full, sorted(not_divisible), c.num_warps, c.num_stages, r)


_KERNELS = {}


def _kernel(name):
    if not _KERNELS:
        from lora_fused.kernels import backward, forward, projection

        for module in (forward, backward, projection):
            for key, value in vars(module).items():
                if key.endswith("_kernel"):
                    _KERNELS[key] = value
    return _KERNELS[name]


SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def loops_feeding_mmas(ttgir: str) -> list[list[str]]:
    """The bodies (lines) of the innermost ``scf.for`` loops of a TTGIR module whose body issues an MMA.

    Innermost: a loop around other loops (the backward's walk over a row group's row blocks, the
    forward's walk over a row block's column blocks) issues its own MMAs once per inner loop —
    an epilogue's, whose operands load synchronously by design; the inner loops are the main loops.
    """
    lines = ttgir.splitlines()
    loops = []
    for i, line in enumerate(lines):
        if " scf.for " not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        if any(" scf.for " in b for b in body):
            continue
        if any(re.search(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b", b) for b in body):
            loops.append(body)
    return loops


def pipeline_problems(body: list[str], arch: int) -> list[str]:
    problems = []
    if not any("async_copy_global_to_local" in b or "async_tma_copy" in b or "async_copy_global_to_shared" in b
               for b in body):
        problems.append("no asynchronous copy in the loop")
    sync = [b.strip()[:120] for b in body if re.search(r"= tt\.load .*tensor<", b)]
    if sync:
        problems.append(f"synchronous tile load(s) in the loop: {sync[0]}")
    if arch >= 90 and any("warp_group_dot_wait" in b and "pendings = 0" in b for b in body):
        problems.append("warp_group_dot_wait {pendings = 0} inside the loop (the wgmma pipeline drains every step)")
    return problems


# Loops known not to pipeline, with the reason; anything else that does not pipeline fails.
KNOWN_UNPIPELINED = {
    "projection_xa+dropout": "the hashed x tile is masked in registers before the MMA (synchronous load)",
    "backward_dB_step": "the dB/db step's loop over a chunk's row blocks (L2 hits; one row block at sm90's "
                        "128-row tiles and r <= 16, up to 32 elsewhere) runs unpipelined (num_stages=1): pipelined "
                        "it spills; its latency is the known risk of kernels/backward.py, 'Registers and latency'",
}


def _known_gap(label, constexprs, rank, loop_number, loops):
    if label == "projection_xa" and constexprs.get("HAS_DROPOUT"):
        return "projection_xa+dropout"
    if label == "backward" and loop_number == loops - 1:
        # The backward's last innermost MMA loop in source order is the dB step's (after the N loop, if any).
        return "backward_dB_step"
    return None


def compile_and_report(job, arch):
    """(label, config text, spill bytes, problems list) for one variant."""
    from test_triton_gpu_compile import _compile_with

    label, kernel_name, types, constexprs, not_divisible, warps, stages, rank = job
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = _compile_with(_kernel(kernel_name), types, constexprs, arch, warps, stages, set(not_divisible))
    spills = [int(a) + int(b) for a, b in SPILL.findall(log.getvalue())]
    if not spills:
        raise RuntimeError(f"{label}: no ptxas -v report captured (TRITON_DUMP_PTXAS_LOG / TRITON_ALWAYS_COMPILE)")
    problems, known = [], set()
    if rank in PIPELINE_RANKS:
        loops = loops_feeding_mmas(compiled.asm["ttgir"])
        if label == "backward" and len(loops) < 2:
            problems.append(f"{len(loops)} innermost MMA loops, expected the N loop and the dB step's")
        for number, body in enumerate(loops):
            found = pipeline_problems(body, arch)
            gap = _known_gap(label, constexprs, rank, number, len(loops))
            if found and gap:
                known.add(gap)
            else:
                problems += [f"loop {number}: {p}" for p in found]
    tile = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK") or k == "R_PAD")
    config = f"r={rank} {tile} warps={warps} stages={stages} " + " ".join(
        f"{k}={v}" for k, v in constexprs.items() if k in ("HAS_DROPOUT", "PRECOMPUTED_XA", "PRECOMPUTED_GB", "COMPUTE_DX"))
    registers = max(int(n) for n in REGISTERS.findall(log.getvalue()))
    # Reported, not failed: ptxas serialising wgmmas (C7514) costs speed, not correctness (see kernels/backward.py).
    serialized = " wgmma-serialized(C7514)" if "C7514" in log.getvalue() else ""
    return label, config + f" regs={registers}{serialized}", max(spills), problems, sorted(known)


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def report(arch: int, workers: int = 2) -> list[tuple]:
    jobs = list(_variants(arch))
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
        return list(pool.map(compile_and_report, jobs, [arch] * len(jobs), chunksize=4))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_kept_configs_do_not_spill_and_loops_are_pipelined(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__, str(arch)], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]


if __name__ == "__main__":
    target = int(sys.argv[1])
    rows = report(target)
    failures, known_seen = [], set()
    for label, config, spill, problems, known in rows:
        line = f"{label:16s} {config}: spill {spill} B" + (f"; {'; '.join(problems)}" if problems else "")
        line += f" (known: {', '.join(known)})" if known else ""
        known_seen.update(known)
        print(line)
        if spill or problems:
            failures.append(line)
    for gap in sorted(known_seen):
        print(f"known unpipelined loop [{gap}]: {KNOWN_UNPIPELINED[gap]}")
    print(f"sm{target}: {len(rows)} kept variants compiled, {len(failures)} with spills or unpipelined loops")
    sys.exit(1 if failures else 0)
