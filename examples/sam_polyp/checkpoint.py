"""Training checkpoints holding only what was trained, written atomically, resumable exactly.

Layout of ``<run_dir>/checkpoints``::

    step_000120/adapter/                 LoRA adapter, PEFT format (lora_fused.save_adapter)
    step_000120/trained_weights.safetensors   other trained tensors (mask decoder, full mode)
    step_000120/training_state.pt        optimizer, scheduler, grad scaler, step, RNG states, run signature
    latest                               name of the newest complete step directory
    best/                                adapter + trained weights of the best validation Dice, best.json

A step directory is built under a temporary name and renamed into place, and ``latest`` is
replaced with ``os.replace``, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
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
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
BEST_DIR = "best"
BEST_INFO = "best.json"


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


def _trains_lora(sam: nn.Module) -> bool:
    return any(is_lora_parameter(n) and p.requires_grad for n, p in sam.named_parameters())


def required_parts(sam: nn.Module) -> list[str]:
    """What a checkpoint of ``sam`` (configured for its mode) must hold to restore it."""
    trains_other = any(p.requires_grad and not is_lora_parameter(n) for n, p in sam.named_parameters())
    return ([ADAPTER_DIR] if _trains_lora(sam) else []) + ([WEIGHTS_FILE] if trains_other else [])


def missing_parts(directory: Path, sam: nn.Module, with_state: bool = True) -> list[str]:
    """The parts of a checkpoint directory that are absent (an empty list: complete)."""
    directory = Path(directory)
    present = {ADAPTER_DIR: all((directory / ADAPTER_DIR / f).is_file() for f in ADAPTER_FILES),
               WEIGHTS_FILE: (directory / WEIGHTS_FILE).is_file(), STATE_FILE: (directory / STATE_FILE).is_file()}
    wanted = required_parts(sam) + ([STATE_FILE] if with_state else [])
    return [part for part in wanted if not present[part]]


def _write_weights(directory: Path, sam: nn.Module) -> None:
    if _trains_lora(sam):
        save_adapter, _ = _adapter_io()
        save_adapter(sam, directory / ADAPTER_DIR)
    tensors = trained_tensors(sam)
    if tensors:
        save_file(tensors, str(directory / WEIGHTS_FILE))


def _remove_stale_temporaries(root: Path) -> None:
    """Temporaries a killed save left behind (one writer per run: none is in use now). The
    ``.old-*`` copies are kept: a kill mid-swap can leave the only copy of a step there."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.*.tmp"):
        stale.unlink(missing_ok=True)


def _replace_directory(final: Path, fill) -> None:
    """Build ``final`` under a temporary name with ``fill(tmp)`` and rename it into place;
    an existing ``final`` is moved aside first and dropped once replaced."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=root))
            os.replace(final, aside / final.name)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, sam: nn.Module, training_state: dict, keep_last: int = 2) -> Path:
    """Write ``step_<step>/`` atomically, point ``latest`` at it, prune older ones. ``sam`` is the
    bare model (not the DDP wrapper); ``training_state`` holds optimizer/scheduler/... states."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"

    def fill(tmp: Path) -> None:
        _write_weights(tmp, sam)
        torch.save({**training_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)

    _replace_directory(final, fill)
    with atomic_path(root / LATEST) as tmp:
        tmp.write_text(final.name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, step: int, val_dice: float, sam: nn.Module) -> Path:
    """Keep the weights of the best validation Dice so far in ``checkpoints/best/`` (never
    pruned), with ``best.json`` saying which step and Dice they are."""
    final = Path(run_dir) / "checkpoints" / BEST_DIR

    def fill(tmp: Path) -> None:
        _write_weights(tmp, sam)
        (tmp / BEST_INFO).write_text(json.dumps({"step": step, "val_dice": val_dice}) + "\n")

    _replace_directory(final, fill)
    return final


def best_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """``(directory, {"step", "val_dice"})`` of the run's best-validation weights, if kept."""
    directory = Path(run_dir) / "checkpoints" / BEST_DIR
    info = directory / BEST_INFO
    if not info.is_file():
        return None
    return directory, json.loads(info.read_text())


def discard_stale(run_dir: Path, best: dict | None, log=print) -> None:
    """Before training: a fresh start (``best`` None) removes an earlier run's checkpoints
    from ``run_dir``, so neither its steps nor its best weights are mistaken for this run's;
    a resumed one drops ``best/`` unless it is the best its training state records (a best
    saved after the resumed step is recomputed identically)."""
    root = Path(run_dir) / "checkpoints"
    if best is None:
        if root.is_dir() and any(root.iterdir()):
            log(f"note: starting over in {run_dir}: removing the checkpoints of an earlier run there")
            shutil.rmtree(root)
        return
    kept = best_checkpoint(run_dir)
    if kept is not None and kept[1] != {"step": best["step"], "val_dice": best["val_dice"]}:
        shutil.rmtree(kept[0])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step directory ``latest`` names (None when there is no pointer); it must exist."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    directory = pointer.parent / pointer.read_text().strip()
    if not (directory / STATE_FILE).is_file():
        raise ResumeError(f"{pointer} names {directory}, which has no {STATE_FILE}")
    return directory


def latest_checkpoint_or_none(run_dir: Path) -> Path | None:
    """For messages: the step ``latest`` names, or None (no pointer, or a broken one)."""
    try:
        return latest_checkpoint(run_dir)
    except ResumeError:
        return None


def resume_checkpoint(run_dir: Path, sam: nn.Module, log=print) -> Path | None:
    """The checkpoint to resume ``sam``'s run from, or None when the run has none.

    Normally the step ``latest`` names. When that pointer is gone or names an incomplete step
    (``adapter/`` or the trained weights deleted), the newest complete step is used and
    ``log`` says which; when step folders exist but none is complete, resuming is refused
    rather than silently restarting from the initial weights.
    """
    root = Path(run_dir) / "checkpoints"
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.is_dir() and not missing_parts(named, sam):
        return named
    if named is None and not steps:
        return None
    problem = (f"{pointer} is missing" if named is None else
               f"{pointer} names {named.name}, which does not exist" if not named.is_dir() else
               f"{named} lacks {', '.join(missing_parts(named, sam))}")
    for directory in steps:
        if not missing_parts(directory, sam):
            log(f"note: {problem}; resuming from the newest complete checkpoint, {directory}")
            return directory
    found = "; ".join(f"{d.name} lacks {', '.join(missing_parts(d, sam))}" for d in steps) or "no step folders"
    raise ResumeError(f"--resume: {problem}, and no complete checkpoint is left in {root} ({found}); "
                      "start again without --resume (or with a new --out)")


def load_model_weights(directory: Path, sam: nn.Module) -> None:
    """Put a checkpoint's adapter and trained tensors into ``sam`` (already configured for the
    run's mode, so the LoRA layers exist). Parameters are replaced: build optimizers after.
    A checkpoint missing a part the mode trains is refused, never half-loaded."""
    directory = Path(directory)
    missing = missing_parts(directory, sam, with_state=False)
    if missing:
        raise ResumeError(f"{directory} lacks {', '.join(missing)}, which this run's mode trains")
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
