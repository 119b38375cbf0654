"""Build of lora_fused and its compiled extension lora_fused._C.

The C++ CPU kernels are always built; the CUDA kernels too whenever nvcc (CUDA_HOME) and
a CUDA build of torch are present. torch is not a build requirement: build against the
installed torch with

    pip install -e . --no-build-isolation        # or: python setup.py build_ext --inplace

Environment knobs:
    LORA_FUSED_SKIP_CUDA=1     build the CPU kernels only
    LORA_FUSED_CUDA_ARCHS      architectures, e.g. "8.0;9.0a", "9.0a" (just an H100/H200),
                               "8.6" or "80 90a+PTX" (falls back to TORCH_CUDA_ARCH_LIST;
                               default "8.0+PTX;9.0a"). SASS for sm_80 also runs on sm_86 and
                               sm_89; sm_90a is Hopper's arch-specific target; "+PTX" adds
                               PTX that later GPUs can JIT.
    MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
    CUTLASS_PATH               a CUTLASS checkout (its include/ holds cute/ and cutlass/);
                               by default the headers of the nvidia-cutlass wheel
                               (requirements-dev.txt) under cutlass_library/source/include.
                               The CUDA kernels need them: without them the build is CPU-only
                               and says why, like a missing toolkit (and
                               tests/test_cuda_ext.py fails where a toolkit is present).

Build time of the extension (measured 2026-12-02 with `time make build`; pip rebuilds every
source each time, so each run is a full build; MAX_JOBS=2 on the shared 2-core machine): CPU + CUDA for the default "8.0+PTX;9.0a" 4 min 15 s wall, 4 min 35 s of CPU time
(load 2-4.7), with the sm90 TMA + wgmma kernel (cuda_sm90.cu: 4 sm_90a instantiations,
forward and dx in fp16 and bf16, plus trapping stubs for the other architectures); 9 min 17 s
wall (6 min 07 s CPU) when another nvcc job shared the two cores. Before the sm90 kernel:
3 min 59 s wall, 2 min 37 s CPU (load ~3.5). With the TF32 wide kernel (branch tf32c:
wide_kernel<float, false>, rank_transpose<float>, the two fp32 reduces, per architecture):
8 min 39 s wall, 4 min 54 s CPU (load 4.3-6.2: other engineers' builds on the two cores);
4 min 28 s wall, 4 min 15 s CPU in a quieter rebuild.
The CUDA kernels: cuda_sm80.cu (forward, dx: fp16, bf16 and fp32 on TF32), cuda_sm80_thin.cu
(tall, rank transpose, 2 reduces: fp16, bf16 and fp32 on TF32; wide: dB|db in fp16/bf16,
dA hashing the mask in all three, and dA reading dx's keep bits in fp16/bf16 only), cuda_sm90.cu
(sm_90a only), cuda_simt.cu (fp32/fp64 only).
Each architecture listed adds its share, so a GPU machine builds just its own ("9.0a"). When
the list compiles sm_90a SASS, LORA_FUSED_SM90A is defined and the extension dispatches the
fp16/bf16 forward and dx to the sm90 kernel on compute-capability-9.0 devices
(lora_fused._C.built_with_sm90a). With
LORA_FUSED_NVCC_KEEP=1 (set by `make build`) nvcc keeps its intermediates (PTX included,
~200 MB) under build/nvcc, which tests/test_cuda_ptxas.py reads to check every kernel's
ptxas report (no spills, shared memory within limits).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0+PTX;9.0a"
NVCC_KEEP_DIR = ROOT / "build" / "nvcc"  # nvcc intermediates, read by tests/test_cuda_ptxas.py
CPU_SOURCES = ["csrc/module.cpp", "csrc/checks.cpp", "csrc/cpu_ops.cpp", "csrc/cpu_brgemm.cpp", "csrc/cpu_thin.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cpp", "csrc/cuda_simt.cu", "csrc/cuda_sm80.cu", "csrc/cuda_sm80_thin.cu",
                "csrc/cuda_sm90.cu"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_arch_flags(spec: str) -> list[str]:
    """Map "8.0;8.6;9.0+PTX" (or "80 86 90+PTX", "sm_90") to nvcc -gencode flags."""
    flags = []
    for item in filter(None, re.split(r"[;,\s]+", spec.strip())):
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?(a)?(\+PTX)?", item, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot parse CUDA architecture {item!r} in {spec!r}; expected e.g. '8.0' or '9.0+PTX'")
        major, minor, suffix, ptx = match.groups()
        number = f"{major}{minor}" if minor is not None else major
        if int(number) < 80:
            print(f"lora_fused: skipping CUDA architecture {item!r}: the kernels need sm_80 or newer (bf16 MMA, cp.async)")
            continue
        number += suffix or ""
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise ValueError(f"no CUDA architecture sm_80 or newer in {spec!r}")
    return flags


def builds_sm90a(flags: list[str]) -> bool:
    """Whether the -gencode flags compile Hopper's arch-specific sm_90a code, which the TMA +
    wgmma kernel (csrc/cuda_sm90.cu) needs; the extension then uses it on sm_90 devices."""
    return any("code=sm_90a" in flag for flag in flags)


def _cuda_reason_to_skip(torch_module, cuda_home) -> str | None:
    if _env_flag("LORA_FUSED_SKIP_CUDA"):
        return "LORA_FUSED_SKIP_CUDA is set"
    if torch_module.version.cuda is None:
        return f"torch {torch_module.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if cutlass_include_dir() is None:
        return CUTLASS_MISSING
    return None


CUTLASS_MISSING = ("no CUTLASS/CuTe headers (cute/tensor.hpp): install them with `pip install "
                   "nvidia-cutlass==4.2.0.0` (in requirements-dev.txt) or point CUTLASS_PATH at a CUTLASS checkout")


def cutlass_include_dir() -> Path | None:
    """The directory holding the cute/ and cutlass/ headers: $CUTLASS_PATH/include, else
    the nvidia-cutlass wheel's copy; None when neither exists."""
    import importlib.util

    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(Path(os.environ["CUTLASS_PATH"]) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "source" / "include")
    return next((include for include in candidates if (include / "cute" / "tensor.hpp").is_file()), None)


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit with headers before torch guesses it.

    torch derives CUDA_HOME from the nvcc on PATH; a wrapper script such as
    /usr/local/bin/nvcc would make that /usr/local, which has no CUDA headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file() and (home / "bin" / "nvcc").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


def _drop_intermediates_of_removed_sources() -> None:
    """Delete kept nvcc files of .cu sources no longer built (a deleted kernel file would
    otherwise leave PTX that tests/test_cuda_ptxas.py checks); ninja rebuilds only changed
    sources, so the files of current ones stay."""
    current = {Path(source).stem for source in CUDA_SOURCES if source.endswith(".cu")}
    for path in NVCC_KEEP_DIR.iterdir():
        if path.is_file() and path.name.split(".", 1)[0] not in current:
            path.unlink()


def extensions_and_cmdclass():
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("lora_fused: torch is not importable, so lora_fused._C is not built "
              "(install torch first and build with --no-build-isolation)")
        return [], {}

    # at::parallel_for (ATen is built with OpenMP) runs in parallel only in code compiled with
    # OpenMP: without the flag every row/tile loop of the C++ CPU kernels ran on one thread.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp]  # torch adds the C++ standard it needs (C++20 for torch >= 2.10)
    skip_reason = _cuda_reason_to_skip(torch, CUDA_HOME)
    if skip_reason is None:
        archs = os.environ.get("LORA_FUSED_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        # The PTX nvcc keeps is what tests/test_cuda_ptxas.py reads (spills, shared memory); it
        # is ~200 MB, so only builds that ask for it (make build: LORA_FUSED_NVCC_KEEP=1) keep it.
        keep_flags = []
        if os.environ.get("LORA_FUSED_NVCC_KEEP", "") not in ("", "0"):
            NVCC_KEEP_DIR.mkdir(parents=True, exist_ok=True)
            _drop_intermediates_of_removed_sources()
            keep_flags = ["--keep", f"--keep-dir={NVCC_KEEP_DIR}"]
        cutlass = cutlass_include_dir()
        assert cutlass is not None  # _cuda_reason_to_skip checked it
        # CuTe needs relaxed constexpr and cutlass's half/bfloat16 operators, which torch's
        # default -D__CUDA_NO_HALF_OPERATORS__ (and friends) would hide.
        arch_flags = cuda_arch_flags(archs)
        # LORA_FUSED_SM90A: the sm_90a kernel was compiled, so cuda_ops.cpp may dispatch to it
        # (and lora_fused._C.built_with_sm90a says so).
        sm90a = ["-DLORA_FUSED_SM90A=1"] if builds_sm90a(arch_flags) else []
        nvcc_flags = ["-O3", "-lineinfo", "-DLORA_FUSED_WITH_CUDA=1", *sm90a, *arch_flags,
                      "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "-U__CUDA_NO_HALF2_OPERATORS__", *keep_flags]
        print(f"lora_fused: building CPU and CUDA kernels (archs {archs}, CUDA_HOME {CUDA_HOME}, CUTLASS {cutlass})")
        extension = CUDAExtension(
            "lora_fused._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=[str(cutlass)],
            extra_compile_args={"cxx": cxx_flags + ["-DLORA_FUSED_WITH_CUDA=1", *sm90a], "nvcc": nvcc_flags},
            extra_link_args=openmp,
        )
    else:
        print(f"lora_fused: building the CPU kernels only ({skip_reason})")
        extension = CppExtension("lora_fused._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=openmp)
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    # lora_fused/kernels is a symlink to the top-level kernels/ (the Triton code): it is
    # installed inside the lora_fused namespace, never as a top-level `kernels` module.
    packages=["lora_fused", "lora_fused.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
