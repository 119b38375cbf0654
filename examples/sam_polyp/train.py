"""The training loop: AdamW with warm-up + cosine, AMP, gradient accumulation and clipping,
DDP, CSV/TensorBoard logs, atomic checkpoints and exact resume."""

from __future__ import annotations

import csv
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .distributed import DistContext, all_reduce_sum
from .evaluate import autocast_context, evaluate, show_progress
from .losses import LossWeights, SegmentationLoss
from .model import BoxPromptSam
from .preprocess import PromptedSegmentation, collate, prompt_boxes, valid_region


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # global: summed over ranks and accumulation micro-steps
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    # LR multipliers by parameter-name prefix (first match wins), e.g. {"image_encoder.": 0.1}.
    lr_scales: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    clip_grad: float = 1.0  # max global grad norm; <= 0 disables
    amp: str = "auto"  # auto | none | bf16 | fp16
    box_jitter: float = 0.05  # fraction of the box size each side may move in training
    seed: int = 0
    eval_every: int = 0  # validation Dice every N steps (0: only at the end)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    eval_batch_size: int = 8
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if interrupted
    # Stop when validation Dice has not improved for this many evaluations (0: never).
    early_stop_patience: int = 0
    loss: LossWeights = field(default_factory=LossWeights)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPUs that support it, else fp16 on CUDA; full precision on CPU."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device (on CPU use --amp bf16 or none)")
        return torch.float16
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"--amp must be auto, none, bf16 or fp16, got {amp!r}")


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms, 1-D embeddings), and
    the LR scaled by the first matching prefix of ``cfg.lr_scales``."""
    groups: dict[tuple[float, bool], list] = {}
    for name, param in named:
        scale = next((s for prefix, s in cfg.lr_scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((scale, param.dim() >= 2), []).append(param)
    return [{"params": ps, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (scale, decay), ps in groups.items()]


class MicroBatchPlan:
    """This rank's micro-batches from global micro-batch ``start`` to ``stop``.

    Micro-batch ``m`` belongs to epoch ``m // per_epoch``; each epoch is a permutation seeded
    by ``(seed, epoch)``; a global micro-batch of ``micro * world`` images is dealt out
    round-robin to ranks, as ``DistributedSampler`` deals, so one process with the same
    global batch sees the same images per step, and a resumed run picks up at ``start``.
    """

    def __init__(self, num_samples: int, micro: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.per_epoch = num_samples // (micro * world)
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {num_samples} images, fewer than one global micro-batch "
                             f"({micro} x {world} ranks); lower --batch-size")
        self.num_samples, self.micro, self.world, self.rank = num_samples, micro, world, rank
        self.seed, self.start, self.stop = seed, start, stop
        self._perm_epoch, self._perm = -1, None

    def epoch_of(self, m: int) -> int:
        return m // self.per_epoch

    def indices(self, m: int) -> list[int]:
        epoch = self.epoch_of(m)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=gen).tolist(), epoch
        first = (m % self.per_epoch) * self.micro * self.world
        return self._perm[first : first + self.micro * self.world][self.rank :: self.world]

    def __iter__(self):
        for m in range(self.start, self.stop):
            yield self.indices(m)

    def __len__(self) -> int:
        return self.stop - self.start


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss or gradients); the last good checkpoint is kept."""


def _check_finite(loss: float, grad_norm: float, step: int, scaled_fp16: bool, run_dir: Path) -> None:
    # Under fp16 the grad scaler skips steps with inf gradients by design; the loss still counts.
    bad = "loss" if not math.isfinite(loss) else "gradient norm" if not (scaled_fp16 or math.isfinite(grad_norm)) else None
    if bad is None:
        return
    _diverged(f"the {bad} is {loss if bad == 'loss' else grad_norm}", step, run_dir)


def _diverged(what: str, step: int, run_dir: Path) -> None:
    kept = ckpt.latest_checkpoint_or_none(run_dir)
    raise NonFiniteLossError(
        f"training diverged at step {step}: {what} (learning rate too high? try a lower --lr or --clip-grad); "
        + (f"the last good checkpoint is kept: {kept}" if kept else "no checkpoint was written before it"))


class TrainLog:
    """CSV rows on rank 0 (appended on resume), mirrored to TensorBoard when it is installed."""

    FIELDS = ["step", "epoch", "lr", "loss", "dice", "focal", "boundary", "iou", "grad_norm", "val_dice",
              "val_iou", "seconds"]

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path, self.tb = enabled, path, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step > 0 and path.exists():  # keep rows up to the checkpoint, drop the lost tail
            with open(path) as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # tensorboard not installed: CSV only
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def train(model: BoxPromptSam, train_set: PromptedSegmentation, val_set: PromptedSegmentation | None,
          cfg: TrainConfig, run_dir: Path, ctx: DistContext, signature: dict, resume: bool = False,
          decoder_trains: bool = False, desc: str = "train") -> dict:
    """Train the parameters of ``model`` that require grad; returns a summary. ``signature``
    describes the run set-up and guards ``resume`` against mixing runs."""
    run_dir = Path(run_dir)
    sam = model.sam
    micro = cfg.batch_size // (cfg.accum_steps * ctx.world_size)
    if micro * cfg.accum_steps * ctx.world_size != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --accum-steps {cfg.accum_steps} "
                         f"x {ctx.world_size} processes")
    start_step, state = 0, None
    best = {"step": None, "val_dice": -math.inf, "evals_since": 0}
    if resume:
        directory = ckpt.resume_checkpoint(run_dir, sam, log=lambda *a: print(*a, flush=True) if ctx.is_main else None)
        if directory is not None:
            state = ckpt.load_training_state(directory)
            ckpt.check_signature(state["signature"], signature, directory)
            ckpt.load_model_weights(directory, sam)  # before the optimizer: LoRA params are replaced
            start_step = int(state["step"])
            best = dict(state.get("best", best))
    if ctx.is_main:
        ckpt.discard_stale(run_dir, best if state is not None else None, log=print)

    named = [(n, p) for n, p in sam.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    amp_dtype = resolve_amp(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])

    net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.enabled else model
    loss_fn = SegmentationLoss(cfg.loss)
    img_size = model.img_size
    stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    stopped_early_before = state is not None and bool(state.get("early_stopped"))
    if stopped_early_before:  # resuming a run that had stopped early: it is finished
        stop = start_step
    plan = MicroBatchPlan(len(train_set), micro, ctx.world_size, ctx.rank, cfg.seed,
                          start_step * cfg.accum_steps, stop * cfg.accum_steps)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=plan, collate_fn=collate,
                                         num_workers=cfg.num_workers)
    log = TrainLog(run_dir / "train_log.csv", ctx.is_main, start_step)
    model.train()
    batches = iter(loader)
    started = time.time()
    first_loss = last_loss = None
    progress = tqdm(range(start_step, stop), desc=desc, initial=start_step, total=stop,
                    disable=not show_progress(ctx), leave=False)
    early_stopped = False
    for step in progress:
        sums = torch.zeros(5, dtype=torch.float64)  # loss, dice, focal, boundary, iou
        for micro_step in range(cfg.accum_steps):
            m = step * cfg.accum_steps + micro_step
            batch = next(batches)
            images = batch["image"].to(ctx.device, non_blocking=True)
            target = batch["target"].to(ctx.device).unsqueeze(1).float()
            valid = valid_region(batch, img_size).to(ctx.device)
            boxes = prompt_boxes(batch, img_size, cfg.box_jitter, cfg.seed, plan.epoch_of(m)).to(ctx.device)
            sync = net.no_sync() if ctx.enabled and micro_step < cfg.accum_steps - 1 else nullcontext()
            with sync:
                with autocast_context(ctx.device, amp_dtype):
                    low_res, iou_pred = net(images, boxes)
                logits = F.interpolate(low_res.float(), (img_size, img_size), mode="bilinear", align_corners=False)
                loss, parts = loss_fn(logits, target, valid, iou_pred if decoder_trains else None)
                scaler.scale(loss / cfg.accum_steps).backward()
            sums += torch.tensor([float(loss.detach()), parts["dice"], parts["focal"], parts["boundary"],
                                  parts.get("iou", 0.0)], dtype=torch.float64) / cfg.accum_steps
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        sums = all_reduce_sum(ctx, sums) / ctx.world_size  # every rank sees the same loss: all stop together
        _check_finite(float(sums[0]), float(grad_norm), step + 1, scaler.is_enabled(), run_dir)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # the base LR, whatever the group scales
        scheduler.step()
        done = step + 1
        last_loss = float(sums[0])
        first_loss = last_loss if first_loss is None else first_loss
        progress.set_postfix(loss=f"{last_loss:.4f}")
        row = None
        if done % cfg.log_every == 0 or done == stop or done == start_step + 1:
            row = {"step": done, "epoch": plan.epoch_of(done * cfg.accum_steps - 1), "lr": lr, "loss": last_loss,
                   "dice": float(sums[1]), "focal": float(sums[2]), "boundary": float(sums[3]),
                   "iou": float(sums[4]), "grad_norm": float(grad_norm), "seconds": time.time() - started}
        # Validation at fixed steps only, never at an interruption (--stop-after): an interrupted and
        # resumed run must pick the same best checkpoint as a straight one.
        if val_set is not None and (done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0)):
            metrics = evaluate(model, val_set, ctx, cfg.eval_batch_size, amp_dtype, desc="val")
            row = row or {"step": done, "epoch": plan.epoch_of(done * cfg.accum_steps - 1), "lr": lr,
                          "loss": last_loss, "seconds": time.time() - started}
            row.update(val_dice=metrics["dice"], val_iou=metrics["iou"])
            if metrics["dice"] > best["val_dice"]:
                best = {"step": done, "val_dice": metrics["dice"], "evals_since": 0}
                if ctx.is_main:
                    ckpt.save_best(run_dir, done, metrics["dice"], sam)
            else:
                best["evals_since"] += 1
                early_stopped = 0 < cfg.early_stop_patience <= best["evals_since"]
        if row is not None:
            log.write(row)
        if done == stop or early_stopped or (cfg.save_every > 0 and done % cfg.save_every == 0):
            # Never save a diverged model. Every rank checks (the parameters agree across ranks), so all
            # of them stop together instead of the others waiting at the barrier below; one sync.
            if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                _diverged("the trained parameters are not finite (not saved)", done, run_dir)
            if ctx.is_main:
                ckpt.save_checkpoint(run_dir, done, sam, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "signature": signature, "config": plain_config(asdict(cfg)),
                    "best": best, "early_stopped": early_stopped,
                }, cfg.keep_checkpoints)
            if ctx.enabled:
                torch.distributed.barrier()
        if early_stopped:
            stop = done
            break
    progress.close()
    log.close()
    early_stopped = early_stopped or stopped_early_before
    return {"start_step": start_step, "stopped_at": stop, "finished": stop >= cfg.steps or early_stopped,
            "early_stopped": early_stopped, "best_step": best["step"],
            "best_val_dice": best["val_dice"] if best["step"] is not None else None,
            "first_loss": first_loss, "last_loss": last_loss, "seconds": time.time() - started}


def plain_config(value):
    """JSON- and torch.load(weights_only)-safe copy of a config dict: other values become strings."""
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
