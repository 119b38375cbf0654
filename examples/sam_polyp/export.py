"""Export a trained run as one plain SAM state dict: ``python -m examples.sam_polyp export``.

The run's model is rebuilt from ``run.json`` (model type, base checkpoint, input size, mode,
LoRA settings), its best-validation weights are loaded (the last checkpoint when the run had
no validation set), every LoRA adapter is folded into its weight and plain ``nn.Linear``
modules are put back (``lora_fused.merge_and_unload``). The file then holds exactly the keys
of a SAM of the run's type, so ``sam_model_registry[type](checkpoint=FILE)`` loads it with
``strict=True`` (at the default 1024 px input; for a run with ``--input-size``, or the tiny
SAM, the example's ``build_sam`` does). A sidecar ``FILE.json`` records the model type, input
size and preprocessing, which ``predict --checkpoint FILE`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .atomic import atomic_path
from .model import SAM_INPUT_SIZE, build_sam, configure_mode
from .report import write_json

RUN_FILE = "run.json"


def run_description(cfg, input_size: int, mode: str, seed: int, base: str | None, signature: dict) -> dict:
    """``run.json`` of one (seed, mode) run of an ``ExperimentConfig``: what export and
    predict need to rebuild its model."""
    return {"model": cfg.model, "base": base, "input_size": input_size, "preprocess": cfg.preprocess, "mode": mode,
            "seed": seed, "rank": cfg.rank, "alpha": cfg.alpha, "lora_dropout": cfg.lora_dropout,
            "train_decoder": cfg.train_decoder, "signature": signature}


class ExportError(ValueError):
    """A run directory cannot be exported (not a run, untrained, or incomplete)."""


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ExportError(f"--run {run_dir}: no {RUN_FILE} (expected a run folder such as "
                          f"<out>/runs/seed0/lora, written by `train` or `demo`)")
    return json.loads(path.read_text())


def load_run_model(run_dir: str | Path, log=print) -> tuple[torch.nn.Module, dict]:
    """The run's SAM with its trained weights (LoRA layers still in place) and a description:
    ``run.json`` plus ``checkpoint`` (the folder loaded), ``step`` and ``val_dice``."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run["mode"] == "vanilla":
        raise ExportError(f"--run {run_dir} is a vanilla run: nothing was trained; its weights are the base "
                          f"checkpoint {run['base']}")
    input_size = run["input_size"] if run["model"] != "tiny" else None
    torch.manual_seed(run["seed"])
    sam = build_sam(run["model"], run["base"], init_seed=run["seed"], input_size=input_size)
    configure_mode(sam, run["mode"], run["rank"], run["alpha"], run["lora_dropout"], run["train_decoder"])
    best = ckpt.best_checkpoint(run_dir)
    if best is not None:
        directory, step, val_dice = best[0], best[1]["step"], best[1]["val_dice"]
    else:
        directory = ckpt.latest_checkpoint(run_dir)
        if directory is None:
            raise ExportError(f"--run {run_dir} has no checkpoint (checkpoints/best or checkpoints/latest): "
                              "did its training finish?")
        step, val_dice = int(ckpt.load_training_state(directory)["step"]), None
    ckpt.load_model_weights(directory, sam)
    log(f"loaded {directory} (step {step}" + (f", val Dice {val_dice:.3f})" if val_dice is not None else ")"))
    return sam.eval(), {**run, "checkpoint": str(directory), "step": step, "val_dice": val_dice}


def merged_sam(run_dir: str | Path, log=print) -> tuple[torch.nn.Module, dict]:
    """The run's SAM with every adapter merged and plain ``nn.Linear`` layers back."""
    from lora_fused import LoRALinear, merge_and_unload

    sam, info = load_run_model(run_dir, log)
    if any(isinstance(m, LoRALinear) for m in sam.modules()):  # decoder/full runs have no adapters
        sam = merge_and_unload(sam)
    sam.requires_grad_(False)
    return sam, info


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(f"{checkpoint}.json")


def export_run(run_dir: str | Path, out: str | Path, log=print) -> dict:
    """Write the run's merged SAM state dict to ``out`` (atomically) and its sidecar JSON."""
    out = Path(out)
    sam, info = merged_sam(run_dir, log)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in sam.state_dict().items()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    if info["model"] == "tiny":
        load = f"examples.sam_polyp.model.build_sam('tiny', '{out}')"
    elif info["input_size"] == SAM_INPUT_SIZE:
        load = f"segment_anything.sam_model_registry['{info['model']}'](checkpoint='{out}')"
    else:
        load = f"examples.sam_polyp.model.build_sam('{info['model']}', '{out}', input_size={info['input_size']})"
    meta = {"model": info["model"], "input_size": info["input_size"], "preprocess": info["preprocess"],
            "run": str(run_dir), "mode": info["mode"], "step": info["step"], "val_dice": info["val_dice"],
            "load_with": load}
    write_json(sidecar_path(out), meta)
    log(f"wrote {out} ({len(state)} tensors, {sum(t.numel() for t in state.values()):,} values; adapters merged) "
        f"and {sidecar_path(out).name}\nload it with {load}")
    return meta
