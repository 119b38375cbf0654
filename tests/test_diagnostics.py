"""``python -m lora_fused`` (the bug-report command) and the reading of the extension binary."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import lora_fused
from lora_fused import build_info

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_module(*args):
    result = subprocess.run([sys.executable, "-m", "lora_fused", *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_report_names_version_stack_device_extension_and_every_backend():
    text = run_module()
    assert text.startswith(f"lora_fused {lora_fused.__version__} (")
    for expected in ("torch ", "triton ", "peft ", "torch build: CUDA", "device: CPU", "extension lora_fused._C:",
                     "backends available here: "):
        assert expected in text, expected
    for backend in ("torch", "triton", "cuda"):
        for device in ("cpu", "cuda"):
            assert any(line.split()[:2] == [backend, device] for line in text.splitlines()), (backend, device)


def test_the_json_report_holds_the_same_facts():
    info = json.loads(run_module("--json"))
    assert info["lora_fused"]["version"] == lora_fused.__version__
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    assert "torch" in info["available_backends"]
    assert info["backends"]["torch"]["cpu"] == "ok"
    assert info["device"]["cpu"]["cores"] >= 1


def test_the_built_extension_names_its_compiler():
    info = build_info.extension_info()
    if info["path"] is None:
        pytest.skip(info["error"])
    assert "error" not in info, info
    assert any("GCC" in c or "clang" in c for c in info["compilers"]), info["compilers"]


def _fatbin(entries):
    """A fat binary container holding ``entries`` [(kind, arch)] with 8-byte payloads."""
    body = b"".join(struct.pack("<HHIQIIHHI", kind, 0x101, 64, 8, 0, 0, 0, 1, arch).ljust(64, b"\0") + b"\0" * 8
                    for kind, arch in entries)
    return struct.pack("<IHHQ", build_info.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_fatbin_entries_give_sass_and_ptx_architectures():
    section = _fatbin([(2, 80), (2, 90)]) + b"\0" * 8 + _fatbin([(1, 90), (2, 86)])
    assert build_info.cuda_architectures_in_fatbin(section) == {"sass": ["sm_80", "sm_86", "sm_90"],
                                                                "ptx": ["compute_90"]}
    assert build_info.cuda_architectures_in_fatbin(b"") == {"sass": [], "ptx": []}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_architectures_of_a_library_nvcc_built(tmp_path):
    source = tmp_path / "kernel.cu"
    source.write_text("__global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n"
                      "void launch(float* x) { add_one<<<1, 32>>>(x); }\n")
    library = tmp_path / "kernel.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_80,code=sm_80",
                    "-gencode=arch=compute_90,code=[sm_90,compute_90]", str(source), "-o", str(library)],
                   check=True, capture_output=True, timeout=300)
    info = build_info.inspect_binary(library)
    assert info["cuda_sass"] == ["sm_80", "sm_90"] and info["cuda_ptx"] == ["compute_90"]
    assert info["compilers"]


def test_a_file_that_is_not_elf_is_reported_not_inspected(tmp_path):
    path = tmp_path / "not_elf.so"
    path.write_bytes(b"MZ" + b"\0" * 100)
    assert "not inspected" in build_info.inspect_binary(path)["error"]
