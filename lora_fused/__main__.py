"""``python -m lora_fused``: everything a bug report needs about this installation.

The version, the Python / torch / triton / peft stack, the device, what the compiled
extension was built with (compilers, CUDA architectures), and for each backend and device
type whether it runs here or why not. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata

import torch

from . import __version__
from .backends import available_backends, backend_report
from .build_info import extension_info

PACKAGES = ("torch", "triton", "peft", "safetensors", "numpy", "segment-anything", "torchvision")
ENVIRONMENT = ("LORA_FUSED_BACKEND", "TRITON_INTERPRET", "LORA_FUSED_POISON_OUTPUTS", "CUDA_VISIBLE_DEVICES",
               "CUDA_HOME", "OMP_NUM_THREADS", "MKL_CBWR")


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device() -> dict:
    cpu = {"name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "capability": torch.backends.cpu.get_cpu_capability()}
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"cpu": cpu, "cuda_available": torch.cuda.is_available(), "gpus": gpus}


def collect() -> dict:
    """The report as plain values."""
    return {
        "lora_fused": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(), "platform": platform.platform()},
        "packages": {name: _package_version(name) for name in PACKAGES},
        "torch_build": {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                        "torch_cuda_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else None},
        "device": _device(),
        "extension": extension_info(),
        "backends": backend_report(),
        "available_backends": available_backends(),
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
    }


def _listing(values) -> str:
    return ", ".join(values) if values else "none"


def format_report(info: dict) -> str:
    lines = [f"lora_fused {info['lora_fused']['version']} ({info['lora_fused']['path']})",
             f"python {info['python']['version']} on {info['python']['platform']}"]
    width = max(map(len, info["packages"]))
    lines += [f"{name:<{width}} {version or 'not installed'}" for name, version in info["packages"].items()]
    build = info["torch_build"]
    lines.append(f"torch build: CUDA {build['cuda'] or 'none (CPU-only build)'}"
                 + (f", HIP {build['hip']}" if build["hip"] else "") + (f", cuDNN {build['cudnn']}" if build["cudnn"] else ""))
    device = info["device"]
    cpu = device["cpu"]
    lines.append(f"device: CPU {cpu['name']} ({cpu['cores']} cores, torch uses {cpu['torch_threads']} threads, "
                 f"{cpu['capability']})")
    for gpu in device["gpus"]:
        lines.append(f"        GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, "
                     f"{gpu['memory_gib']} GiB")
    if not device["gpus"]:
        lines.append("        no CUDA GPU (torch.cuda.is_available() is False)")
    ext = info["extension"]
    lines.append(f"extension lora_fused._C: {ext['path'] or 'missing'}")
    if "error" in ext:
        lines.append(f"  {ext['error']}")
    else:
        lines.append(f"  compilers: {_listing(ext['compilers'])}")
        lines.append(f"  CUDA kernels: SASS {_listing(ext['cuda_sass'])}; PTX {_listing(ext['cuda_ptx'])}")
    lines.append(f"backends available here: {_listing(info['available_backends'])}")
    for name, per_device in info["backends"].items():
        for device_type, reason in per_device.items():
            lines.append(f"  {name:<7}{device_type:<5} {reason}")
    if info["environment"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["environment"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_fused", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
