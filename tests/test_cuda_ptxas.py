"""Compile-level evidence for the CUDA kernels, which no machine here can run (issue 11
point 4): every kernel of every architecture the extension was built for, as ptxas reports
it for the PTX that nvcc kept during the build (setup.py: --keep-dir build/nvcc), has no
spills, no stack frame, and static shared memory within the static limit. Dynamic shared
memory is bounded by static_asserts in the .cu files (they fail the build).

Runs ptxas only (seconds), not the nvcc front end again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_fused import extension
from lora_fused.backends import BackendUnavailableError

ROOT = Path(__file__).resolve().parent.parent
KEEP_DIR = ROOT / "build" / "nvcc"
CUDA_SOURCES = sorted(p.stem for p in (ROOT / "csrc").glob("*.cu"))
STATIC_SMEM_LIMIT = 48 * 1024  # bytes of static __shared__ per block, every architecture


def _reason_not_built_with_cuda() -> str | None:
    try:
        extension.load()
    except BackendUnavailableError as exc:
        return f"lora_fused._C does not load here: {exc}"
    from lora_fused import _C

    return None if _C.built_with_cuda else "lora_fused._C was built without its CUDA kernels: no PTX to check"


def _ptxas() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "ptxas"
    return str(candidate) if candidate.is_file() else shutil.which("ptxas")


def _kept_ptx() -> dict[str, list[Path]]:
    """{arch (e.g. "80", "90a"): the kept PTX files of that architecture}."""
    found: dict[str, list[Path]] = {}
    for path in sorted(KEEP_DIR.glob("*.compute_*.ptx")):
        arch = path.name.rsplit(".compute_", 1)[1].removesuffix(".ptx")
        found.setdefault(arch, []).append(path)
    return found


if _reason_not_built_with_cuda() is not None:
    pytest.skip(_reason_not_built_with_cuda(), allow_module_level=True)
if _ptxas() is None:
    pytest.skip("no ptxas (CUDA toolkit) on this machine", allow_module_level=True)
if not _kept_ptx():
    if os.environ.get("LORA_FUSED_REQUIRE_EXTENSION", "") not in ("", "0"):
        raise RuntimeError(f"the CUDA build kept no PTX under {KEEP_DIR}; rebuild with `make build` "
                           "(which sets LORA_FUSED_NVCC_KEEP=1)")
    pytest.skip(f"no PTX kept under {KEEP_DIR}: build with LORA_FUSED_NVCC_KEEP=1 (make build does)",
                allow_module_level=True)

FUNCTION = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads\n(?:ptxas info\s*: )?Used (\d+) registers(.*)")
STATIC_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_output(ptx: Path, arch: str) -> str:
    """What `ptxas -v` prints (stderr) for one PTX file."""
    result = subprocess.run([_ptxas(), "-v", f"-arch=sm_{arch}", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"ptxas failed on {ptx.name}:\n{result.stderr[-4000:]}"
    return result.stderr


def ptxas_report(ptx: Path, arch: str, output: str | None = None) -> dict[str, dict[str, int]]:
    """{kernel: {stack, spill_stores, spill_loads, registers, smem}} from `ptxas -v`."""
    report = {}
    for name, stack, stores, loads, registers, rest in FUNCTION.findall(output or ptxas_output(ptx, arch)):
        smem = STATIC_SMEM.search(rest)
        report[name] = {"stack": int(stack), "spill_stores": int(stores), "spill_loads": int(loads),
                        "registers": int(registers), "smem": int(smem.group(1)) if smem else 0}
    return report


KEPT = _kept_ptx()


@pytest.mark.parametrize("arch", sorted(KEPT))
def test_every_source_was_compiled_for_each_architecture(arch):
    assert sorted(p.name.split(".compute_")[0] for p in KEPT[arch]) == CUDA_SOURCES


@pytest.mark.parametrize("ptx", [p for paths in KEPT.values() for p in paths], ids=lambda p: p.name)
def test_no_spills_and_shared_memory_within_limits(ptx):
    arch = ptx.name.rsplit(".compute_", 1)[1].removesuffix(".ptx")
    report = ptxas_report(ptx, arch)
    entries = re.findall(r"^(?:\.visible\s+)?\.entry\s+(\S+?)\(", ptx.read_text(), flags=re.MULTILINE)
    assert entries, f"{ptx.name} defines no kernel"
    missing = sorted(set(entries) - set(report))
    assert not missing, f"ptxas reported nothing for the kernels {missing}"
    problems = [
        f"{name}: {facts}"
        for name, facts in report.items()
        if facts["spill_stores"] or facts["spill_loads"] or facts["stack"] or facts["smem"] > STATIC_SMEM_LIMIT
    ]
    assert not problems, f"sm_{arch} kernels that spill or overuse shared memory:\n" + "\n".join(problems)


# ---- the Hopper kernel (csrc/cuda_sm90.cu) --------------------------------------------
#
# gemm_kernel<T, kBKMajor, kFusedGb> for T in {half, bfloat16}: the forward (K-major W), dx
# (MN-major W, gb from the tall GEMM: r > 32 or K > 1024) and dx computing gb itself (r <= 32,
# K <= 1024): six instantiations in the sm_90a PTX. 288 threads (two consumer warpgroups and a
# producer warp) under __launch_bounds__(288, 1) get at most 168 registers each from ptxas (it spills rather than
# exceed 168: 65536 / 384, the 9 warps allocated as 3 warpgroups); the consumers need two
# 64-value fp32 accumulators (the main product and the LoRA term), so fewer than 128 would
# mean the accumulators were not kept in registers.
SM90_KERNEL = re.compile(r"_ZN10lora_fused4cuda4sm9011gemm_kernel\S*")
SM90_FUSED_GB = re.compile(r"gemm_kernel\S*ELb0ELb1E")  # <T, false, true>: dx with fused gb
SM90_PTX = [p for p in KEPT.get("90a", []) if p.name.startswith("cuda_sm90.")]
# ptxas's wgmma diagnostics (C75xx: "wgmma.mma_async instructions are serialized ..." C7515,
# "warpgroup.arrive is injected ... to allow use of registers in GMMA" C7519, and the rest of
# that family) all mean a batch no longer stays in flight: any such line for cuda_sm90 fails.
WGMMA_DIAGNOSTIC = re.compile(r"\(C75\d\d\)|wgmma|warpgroup|\bGMMA\b", re.IGNORECASE)
# The dummy HGMMA ptxas appends to a batch it cannot count (C7519): it writes RZ.
DUMMY_HGMMA = re.compile(r"HGMMA\.\S+\s+RZ\s*,")


def wgmma_diagnostics(ptxas_stderr: str) -> list[str]:
    """The lines of `ptxas -v` output that report serialised or fenced wgmma batches."""
    return [line for line in ptxas_stderr.splitlines() if WGMMA_DIAGNOSTIC.search(line)]


def test_wgmma_diagnostics_are_recognised():
    """The matcher catches the two diagnostics seen on this kernel (C7515, C7519), and not
    ptxas's ordinary -v lines."""
    seen = (
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 26599 by compiler to allow use "
        "of registers in GMMA in function '_ZN10lora_fused4cuda4sm9011gemm_kernelIN7cutlass10bfloat16_tELb0EEEvNS1_6ParamsIT_XT0_EEE'\n"
        "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "the presence of Extern calls in the function '_ZN10lora_fused4cuda4sm9011gemm_kernelI'\n"
        "ptxas info    : Used 168 registers, used 16 barriers\n"
        "ptxas info    : Compiling entry function '_ZN10lora_fused4cuda4sm9011gemm_kernelI' for 'sm_90a'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert len(wgmma_diagnostics(seen)) == 2
    assert DUMMY_HGMMA.search("/*22f0*/ HGMMA.64x8x16.F16 RZ, gdesc[URZ], RZ, !UPT, gsb0 ;")
    assert not DUMMY_HGMMA.search("/*2300*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;")


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy in triton's wheel."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (Path(home) / "bin" / "cuobjdump",):
        if candidate.is_file():
            return str(candidate)
    try:
        import triton

        wheel = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if wheel.is_file():
            return str(wheel)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def _sm90_entries(ptx: Path) -> dict[str, str]:
    """{kernel: its PTX body} of the sm90 gemm_kernel instantiations in one PTX file."""
    text = ptx.read_text()
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\.visible\s+\.entry\s+(\S+?)\(", text, re.MULTILINE)]
    bodies = {}
    for index, (start, name) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(text)
        if SM90_KERNEL.fullmatch(name):
            bodies[name] = text[start:end]
    return bodies


@pytest.mark.skipif(not SM90_PTX, reason="the build did not compile sm_90a (LORA_FUSED_CUDA_ARCHS without 9.0a)")
def test_sm90_kernels_registers_wgmma_and_tma():
    (ptx,) = SM90_PTX
    bodies = _sm90_entries(ptx)
    assert len(bodies) == 6, f"expected gemm_kernel<half|bfloat16, forward|dx|dx+gb>, found {sorted(bodies)}"
    assert sum(bool(SM90_FUSED_GB.search(name)) for name in bodies) == 2, sorted(bodies)
    for name, body in bodies.items():
        assert "wgmma.mma_async" in body, f"{name}: no wgmma in its PTX"
        assert "cp.async.bulk.tensor" in body, f"{name}: no TMA load in its PTX"
        assert "setmaxnreg" not in body, f"{name}: register budget argued without setmaxnreg"
        fused = bool(SM90_FUSED_GB.search(name))
        # The fused gb: 64x32 wgmmas, and round(gb) written by the consumers is fenced into
        # the async proxy before the rank wgmmas read it.
        assert ("m64n32k16" in body) == fused, f"{name}: 64x32 gb wgmma {'missing' if fused else 'unexpected'}"
        assert not fused or "fence.proxy.async.shared::cta" in body, f"{name}: no proxy fence before the rank wgmma"
    output = ptxas_output(ptx, "90a")
    report = ptxas_report(ptx, "90a", output)
    for name in bodies:
        facts = report[name]
        assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0 and facts["stack"] == 0, (name, facts)
        assert 128 <= facts["registers"] <= 168, (name, facts)
    diagnostics = wgmma_diagnostics(output)
    assert not diagnostics, "ptxas serialises or fences the sm90 kernel's wgmma batches (none stays in " \
        "flight):\n" + "\n".join(diagnostics[:20])


def _sm90_sass(tmp_path: Path) -> str:
    """The sm_90a SASS of cuda_sm90.cu (ptxas, then cuobjdump -sass); skips without cuobjdump."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton wheel) to disassemble the cubin")
    (ptx,) = SM90_PTX
    cubin = tmp_path / "cuda_sm90.cubin"
    subprocess.run([_ptxas(), "-arch=sm_90a", str(ptx), "-o", str(cubin)], check=True, capture_output=True)
    return subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not SM90_PTX, reason="the build did not compile sm_90a (LORA_FUSED_CUDA_ARCHS without 9.0a)")
def test_sm90_sass_has_no_dummy_wgmma(tmp_path):
    """In the SASS, no HGMMA writing RZ: the dummy group ptxas appends when it cannot count a
    batch, turning warpgroup_wait<1> into a full drain (review of cuda4, item B1)."""
    sass = _sm90_sass(tmp_path)
    assert "HGMMA" in sass, "no HGMMA in the sm_90a SASS"
    dummies = [line.strip() for line in sass.splitlines() if DUMMY_HGMMA.search(line)]
    assert not dummies, "dummy HGMMA groups in the sm90 kernel:\n" + "\n".join(dummies[:10])


def _sass_functions(sass: str) -> dict[str, str]:
    """{function name: its SASS} from `cuobjdump -sass` output."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def wgmma_batches(function_sass: str) -> list[list[str]]:
    """The HGMMA shapes of each batch: from WARPGROUP.ARRIVE to the HGMMA that ends the
    batch (the one that sets the scoreboard, gsb0)."""
    batches, current = [], None
    for line in function_sass.splitlines():
        if "WARPGROUP.ARRIVE" in line:
            current = []
        elif (match := re.search(r"HGMMA\.(\d+x\d+x\d+)", line)) and current is not None:
            current.append(match.group(1))
            if "gsb0" in line:
                batches.append(current)
                current = None
    return batches


def test_wgmma_batches_are_recognised():
    sass = ("WARPGROUP.ARRIVE ;\nHGMMA.64x128x16.F32.BF16 R88, gdesc[UR4].tnspB, R88 ;\n"
            "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;\nWARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
            "WARPGROUP.ARRIVE ;\nHGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspB, R24, gsb0 ;\n")
    assert wgmma_batches(sass) == [["64x128x16", "64x32x16"], ["64x128x16"]]


@pytest.mark.skipif(not SM90_PTX, reason="the build did not compile sm_90a (LORA_FUSED_CUDA_ARCHS without 9.0a)")
def test_sm90_fused_gb_wgmma_shares_the_main_batch(tmp_path):
    """In the fused-gb dx's SASS, gb's 64x32 HGMMAs are issued in the same batches as the main
    64x128 ones (a full k-stage: four of each, one scoreboard group), never in batches of
    their own: g's stage is read once per k-step and no extra drain is added (issue 11)."""
    sass = _sm90_sass(tmp_path)
    fused = {name: body for name, body in _sass_functions(sass).items() if SM90_FUSED_GB.search(name)}
    assert len(fused) == 2, sorted(_sass_functions(sass))
    for name, body in fused.items():
        batches = wgmma_batches(body)
        gb_batches = [b for b in batches if "64x32x16" in b]
        assert gb_batches, f"{name}: no gb wgmma batch"
        assert all(b.count("64x32x16") == b.count("64x128x16") for b in gb_batches), (name, gb_batches)
        assert ["64x128x16", "64x32x16"] * 4 in gb_batches, f"{name}: no full k-stage batch: {gb_batches}"


@pytest.mark.skipif(not SM90_PTX, reason="the build did not compile sm_90a (LORA_FUSED_CUDA_ARCHS without 9.0a)")
def test_sm90_kernel_is_a_trap_on_other_architectures():
    """The other architectures' PTX of cuda_sm90.cu holds the kernel symbol (the host code
    launches it only on sm_90) but no wgmma: a stub that traps."""
    for arch, paths in KEPT.items():
        if arch == "90a":
            continue
        for ptx in (p for p in paths if p.name.startswith("cuda_sm90.")):
            text = ptx.read_text()
            assert "wgmma" not in text and "trap;" in text, f"{ptx.name}: expected the trapping stub"


# ---- fp32 on TF32 (csrc/cuda_sm80_mainloop.cuh) ----------------------------------------
#
# Every A and B register of every TF32 mma.sync is written by cvt.rna.tf32.f32 and nothing
# else: raw fp32 bits reaching the MMA lose their low 13 bits by truncation, an error the GPU
# parity tests cannot tell from rounding (there the rounding of xa/gb dominates the budget).
# The fp32 kernels with an MN-major B operand — dx_kernel<float> (W read as stored) and
# cuda_sm80_thin's wide_kernel<float, false> (dA's x) — are present, use no
# transposing ldmatrix (it moves 16-bit values only): their B fragments come from 32-bit
# shared-memory loads, and each MMA operand register gets exactly one cvt.rna. TF32 has no
# keep-bit wide kernel (its dx writes no keep bits; its dA hashes).
TF32_MMA = re.compile(r"mma\.sync\.aligned\.m16n8k8\.row\.col\.f32\.tf32\.tf32\.f32\s*"
                      r"\{[^}]*\},\s*\{([^}]*)\},\s*\{([^}]*)\}")
TF32_ROUNDING = "cvt.rna.tf32.f32"
# An instruction and its destination (a register or a {vector} of them), optionally predicated.
WRITTEN = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+(\{[^}]*\}|%\w+)", re.MULTILINE)
FP32_MN_MAJOR_KERNELS = {"cuda_sm80": re.compile(r"\S*dx_kernelIfE\S*"),
                         "cuda_sm80_thin": re.compile(r"\S*wide_kernelIfLb0E\S*")}
WIDE_KEEP_BITS_FLOAT = re.compile(r"\S*wide_kernelIfLb1E\S*")


def ptx_entries(text: str) -> dict[str, str]:
    """{kernel: its PTX, from its .entry line to the next} of one PTX file's text."""
    pieces = re.split(r"^(?:\.visible\s+)?\.entry\s+(\S+?)\(", text, flags=re.MULTILINE)
    return dict(zip(pieces[1::2], pieces[2::2]))


def unrounded_tf32_operands(body: str) -> list[str]:
    """The TF32 MMA operand registers of one kernel that something other than cvt.rna writes."""
    operands = {reg.strip() for a, b in TF32_MMA.findall(body) for reg in f"{a},{b}".split(",")}
    writers: dict[str, set[str]] = {}
    for instruction, destination in WRITTEN.findall(body):
        for reg in re.findall(r"%\w+", destination):
            writers.setdefault(reg, set()).add(instruction)
    return sorted(f"{reg} (written by {sorted(writers.get(reg, {'nothing'}))})"
                  for reg in operands if writers.get(reg) != {TF32_ROUNDING})


def test_unrounded_tf32_operands_are_recognised():
    body = ("\tld.shared.f32 %f1, [%r9];\n\tcvt.rna.tf32.f32 %r1, %f1;\n\tmov.b32 %r2, %f1;\n"
            "\t@%p1 cvt.rna.tf32.f32 %r3, %f1;\n\tld.shared.v4.u32 {%r4, %r5, %r6, %r7}, [%r9];\n"
            "\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f2, %f3, %f4, %f5}, "
            "{%r1, %r3, %r1, %r3}, {%r2, %r4}, {%f2, %f3, %f4, %f5};\n")
    assert [problem.split()[0] for problem in unrounded_tf32_operands(body)] == ["%r2", "%r4"]
    assert unrounded_tf32_operands(body.replace("{%r2, %r4}", "{%r1, %r3}")) == []


@pytest.mark.parametrize("ptx", [p for paths in KEPT.values() for p in paths if p.name.startswith("cuda_sm80")],
                         ids=lambda p: p.name)
def test_tf32_mma_operands_are_rounded_and_fp32_mn_major_operands_read_as_stored(ptx):
    kernels = ptx_entries(ptx.read_text())
    on_tf32 = {name: body for name, body in kernels.items() if TF32_MMA.search(body)}
    assert on_tf32, f"{ptx.name}: no TF32 mma.sync (the fp32 instantiations are missing)"
    problems = {name: unrounded_tf32_operands(body) for name, body in on_tf32.items()}
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, f"{ptx.name}: TF32 MMA operands not rounded by cvt.rna: {problems}"
    source = ptx.name.split(".compute_")[0]
    (kernel,) = [name for name in kernels if FP32_MN_MAJOR_KERNELS[source].fullmatch(name)]
    assert kernel in on_tf32, f"{kernel}: no TF32 mma.sync"
    body = on_tf32[kernel]
    assert not re.search(r"ldmatrix\S*\.trans", body), f"{kernel}: a transposing ldmatrix in an fp32 kernel"
    assert re.search(r"ld\.shared\.[fub]32\s", body), f"{kernel}: no 32-bit shared-memory loads for its B fragments"
    operands = {reg.strip() for a, b in TF32_MMA.findall(body) for reg in f"{a},{b}".split(",")}
    assert body.count(TF32_ROUNDING) == len(operands), (
        f"{kernel}: {body.count(TF32_ROUNDING)} cvt.rna for {len(operands)} MMA operand registers")
    assert not [name for name in kernels if WIDE_KEEP_BITS_FLOAT.fullmatch(name)], "a keep-bit wide kernel for fp32"
