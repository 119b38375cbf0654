"""Autotuned configs on disk: dump what this process's autotuners chose, seed them from a file.

A cold GPU process autotunes every kernel on its first launch at each new key (minutes
at SAM shapes). Configs tuned on a GPU ship with the package as
``kernels/tuned/<normalised GPU name>.json`` and seed the autotuners the first time a
kernel launches on a GPU of that name (:func:`seed_shipped_configs`), so a training run
does not stall on its first step. A key that the file lacks is still autotuned.

Writing one (on the GPU, after a run that launched the kernels at the shapes of interest)::

    python -m lora_fused.kernels.tuning tune FILE      # runs ViT-B/L/H shapes, then dumps
    python -m lora_fused.kernels.tuning dump FILE      # dumps whatever this process tuned (nothing when fresh)

or, inside a process that ran the kernels: ``lora_fused.kernels.tuning.dump_tuned_configs(FILE)``;
or set ``LORA_FUSED_TRITON_TUNED_OUT=FILE`` and every process that tunes a kernel merges its
choices into FILE when it exits (benchmarks/gpu_check.sh does this).
Entries are keyed by kernel name and the autotuner's key (the ``key=[...]`` argument
values plus every tensor argument's dtype), so a seeded entry is used only at exactly
the shapes, ranks and flags it was tuned for.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner

from .configs import autotune_enabled

FORMAT_VERSION = 1
TUNED_OUT_ENV_VAR = "LORA_FUSED_TRITON_TUNED_OUT"
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_seeded_devices: set[int] = set()


def autotuned_kernels() -> dict[str, Autotuner]:
    """Every autotuned kernel of the backend, by name (the Autotuner under any heuristics wrapper)."""
    from . import backward, forward, projection

    wrapped = {
        "forward": forward.lora_forward_kernel,
        "projection": projection.thin_projection_kernel,
        "backward": backward.lora_backward_kernel,
    }
    found = {}
    for name, kernel in wrapped.items():
        while not isinstance(kernel, Autotuner):
            kernel = kernel.fn
        found[name] = kernel
    return found


def normalised_gpu_name(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'``: the shipped file's stem."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _config_from_json(entry: dict) -> triton.Config:
    return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]))


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"autotune key value {value!r} of type {type(value).__name__} cannot be stored")


def tuned_entries() -> list[dict]:
    """The configs this process's autotuners chose: ``[{"kernel", "key", "config"}, ...]``."""
    entries = []
    for name, tuner in autotuned_kernels().items():
        for key, config in tuner.cache.items():
            entries.append({"kernel": name, "key": [_plain(v) for v in key], "config": _config_to_json(config)})
    return entries


def dump_tuned_configs(path: str | os.PathLike, gpu_name: str | None = None, merge: bool = False) -> int:
    """Write this process's tuned configs to ``path`` as JSON (atomically); returns how many it holds.

    ``merge``: keep the entries already in ``path`` (same format) whose kernel and key this
    process did not tune.
    """
    if gpu_name is None:
        gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    entries = tuned_entries()
    if merge and Path(path).is_file():
        mine = {(e["kernel"], tuple(e["key"])) for e in entries}
        previous = json.loads(Path(path).read_text())
        if previous.get("format") == FORMAT_VERSION:
            entries += [e for e in previous.get("entries", []) if (e["kernel"], tuple(e["key"])) not in mine]
    document = {"format": FORMAT_VERSION, "gpu": gpu_name, "triton": triton.__version__,
                "torch": torch.__version__, "entries": entries}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(entries)


def dump_at_exit() -> int:
    """The exit hook of ``LORA_FUSED_TRITON_TUNED_OUT``: merge this process's tuned configs into that file."""
    path = os.environ.get(TUNED_OUT_ENV_VAR, "")
    # With autotuning off the caches hold the first kept config, untuned: not worth shipping.
    if not path or not autotune_enabled() or not tuned_entries():
        return 0
    return dump_tuned_configs(path, merge=True)


if os.environ.get(TUNED_OUT_ENV_VAR):
    atexit.register(dump_at_exit)


def seed_from_file(path: str | os.PathLike) -> int:
    """Seed the autotuners' caches from a file written by :func:`dump_tuned_configs`; returns entries used.

    Keys already tuned in this process are kept. A file that cannot be read, or is of another
    format, raises ``ValueError`` naming the file. A file written under another Triton version
    is skipped whole, and an entry naming a kernel this version lacks, or a config that is not
    one of that kernel's configs here (the config lists and kernels change between versions;
    a seeded config skips pruning and benchmarking), is skipped, each with a warning.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuned-config file {path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise ValueError(f"tuned-config file {path}: expected format {FORMAT_VERSION}, got {document.get('format')!r}"
                         if isinstance(document, dict) else f"tuned-config file {path}: not a JSON object")
    if document.get("triton") != triton.__version__:
        warnings.warn(f"tuned-config file {path}: written under triton {document.get('triton')}, this is "
                      f"{triton.__version__}; not used (the kernels will autotune)", stacklevel=2)
        return 0
    tuners = autotuned_kernels()
    known_configs = {name: [_config_to_json(config) for config in tuner.configs] for name, tuner in tuners.items()}
    used = 0
    for entry in document.get("entries", []):
        tuner = tuners.get(entry.get("kernel"))
        if tuner is None:
            warnings.warn(f"tuned-config file {path}: unknown kernel {entry.get('kernel')!r} skipped "
                          f"(known: {sorted(tuners)})", stacklevel=2)
            continue
        if entry.get("config") not in known_configs[entry["kernel"]]:
            warnings.warn(f"tuned-config file {path}: {entry.get('kernel')} config {entry.get('config')} is not "
                          "one of this version's configs; skipped", stacklevel=2)
            continue
        key = tuple(entry["key"])
        if key not in tuner.cache:
            tuner.cache[key] = _config_from_json(entry["config"])
            used += 1
    return used


def shipped_file(gpu_name: str) -> Path:
    return TUNED_DIR / f"{normalised_gpu_name(gpu_name)}.json"


def seed_shipped_configs(device: torch.device) -> int:
    """Once per device and process: seed from ``kernels/tuned/<gpu>.json`` if one ships; returns entries used."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _seeded_devices:
        return 0
    _seeded_devices.add(index)
    path = shipped_file(torch.cuda.get_device_name(index))
    if not path.is_file():
        return 0
    try:
        return seed_from_file(path)
    except ValueError as exc:  # a damaged shipped file must not stop the op: the kernels autotune instead
        warnings.warn(f"{exc}; the kernels will autotune", stacklevel=2)
        return 0


# SAM image encoders' linears (tokens of one 1024² image, K, N): qkv, proj, mlp lin1, lin2.
VIT_SHAPES = {
    "vit_b": [(4096, 768, 2304), (4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768)],
    "vit_l": [(4096, 1024, 3072), (4096, 1024, 1024), (4096, 1024, 4096), (4096, 4096, 1024)],
    "vit_h": [(4096, 1280, 3840), (4096, 1280, 1280), (4096, 1280, 5120), (4096, 5120, 1280)],
}


def tune(models=("vit_b",), ranks=(4, 16), dropouts=(0.0, 0.1), batch=(1, 4), dtype=torch.bfloat16) -> None:
    """Launch forward and backward once at every listed shape (autotuning each new key)."""
    from .ops import triton_backward, triton_forward

    seed = torch.tensor(0, dtype=torch.int64)
    for model in models:
        for images in batch:
            for tokens, K, N in VIT_SHAPES[model]:
                M = tokens * images
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                w = torch.randn(N, K, device="cuda", dtype=dtype)
                b = torch.randn(N, device="cuda", dtype=dtype)
                g = torch.randn(M, N, device="cuda", dtype=dtype)
                for r in ranks:
                    A = torch.randn(r, K, device="cuda", dtype=dtype)
                    B = torch.randn(N, r, device="cuda", dtype=dtype)
                    for p in dropouts:
                        _, xa = triton_forward(x, w, b, A, B, 1.0, p, seed)
                        triton_backward(g, x, w, A, B, xa, 1.0, p, seed, True, True)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_fused.kernels.tuning", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dump = sub.add_parser("dump", help="write the configs this process tuned (none in a fresh process)")
    dump.add_argument("file")
    run = sub.add_parser("tune", help="autotune at SAM ViT shapes (bf16), then write the chosen configs")
    run.add_argument("file")
    run.add_argument("--models", nargs="+", default=["vit_b"], choices=sorted(VIT_SHAPES))
    run.add_argument("--ranks", nargs="+", type=int, default=[4, 16])
    args = parser.parse_args(argv)
    if args.command == "tune":
        if not torch.cuda.is_available():
            parser.error("tune needs a CUDA GPU")
        tune(models=args.models, ranks=args.ranks)
    count = dump_tuned_configs(args.file)
    print(f"wrote {count} tuned configs to {args.file}")


if __name__ == "__main__":
    main()
