"""Training checkpoints holding only what was trained, written atomically, resumable exactly.

Layout of ``<run_dir>/checkpoints``::

    step_000120/adapter/                 LoRA adapter, PEFT format (lora_fused.save_adapter)
    step_000120/trained_weights.safetensors   other trained tensors (mask decoder, full mode)
    step_000120/training_state.pt        optimizer, scheduler, grad scaler, step, RNG states, run signature
    latest                               name of the newest complete step directory

A step directory is built under a temporary name and renamed into place, and ``latest`` is
replaced with ``os.replace``, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .model import is_lora_parameter

LATEST = "latest"
STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "trained_weights.safetensors"
ADAPTER_DIR = "adapter"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed: missing, incomplete, or from a different run set-up."""


def _adapter_io():
    try:
        from lora_fused.adapters import load_adapter, save_adapter
    except ImportError as exc:  # adapters.py is a separate piece of lora_fused
        raise ImportError(f"checkpoints of LoRA runs need lora_fused.adapters.save_adapter/load_adapter ({exc})") from exc
    return save_adapter, load_adapter


def rng_state() -> dict:
    legacy = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(legacy[1].astype(np.int64)),
             "numpy_pos": int(legacy[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_tensors(sam: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors that are not LoRA adapter weights (those go to the adapter files)."""
    return {name: p.detach().cpu().contiguous() for name, p in sam.named_parameters()
            if p.requires_grad and not is_lora_parameter(name)}


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, step: int, sam: nn.Module, training_state: dict, keep_last: int = 2) -> Path:
    """Write ``step_<step>/`` atomically, point ``latest`` at it, prune older ones. ``sam`` is the
    bare model (not the DDP wrapper); ``training_state`` holds optimizer/scheduler/... states."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        if any(is_lora_parameter(n) and p.requires_grad for n, p in sam.named_parameters()):
            save_adapter, _ = _adapter_io()
            save_adapter(sam, tmp / ADAPTER_DIR)
        tensors = trained_tensors(sam)
        if tensors:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
        torch.save({**training_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step: move the old copy aside first, drop it once replaced
            aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=root))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(root / LATEST) as tmp:
        tmp.write_text(final.name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    directory = pointer.parent / pointer.read_text().strip()
    if not (directory / STATE_FILE).is_file():
        raise ResumeError(f"{pointer} names {directory}, which has no {STATE_FILE}")
    return directory


def load_model_weights(directory: Path, sam: nn.Module) -> None:
    """Put a checkpoint's adapter and trained tensors into ``sam`` (already configured for the
    run's mode, so the LoRA layers exist). Parameters are replaced: build optimizers after."""
    directory = Path(directory)
    if (directory / ADAPTER_DIR).is_dir():
        _, load_adapter = _adapter_io()
        load_adapter(sam, directory / ADAPTER_DIR)
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        tensors = load_file(str(weights))
        params = dict(sam.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ResumeError(f"{weights} holds tensors the model lacks, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)


def load_training_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(f"cannot read {path}: {exc}") from exc


def check_signature(saved: dict, current: dict, directory: Path) -> None:
    """Refuse to resume a checkpoint taken under a different set-up (model, mode, data, ...)."""
    diffs = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diffs:
        listed = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise ResumeError(f"--resume: {directory} was written by a different run set-up ({listed}); "
                          "use the original flags or a new --out")
