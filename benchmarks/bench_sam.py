#!/usr/bin/env python
"""End-to-end benchmark: one training step of SAM's image encoder with LoRA.

Variants, on the same randomly initialised ``segment_anything`` ``ImageEncoderViT``:

``full``          full fine-tuning: every parameter trainable.
``peft``          PEFT ``get_peft_model`` with LoRA on every linear of the encoder's blocks
                  (attn.qkv, attn.proj, mlp.lin1, mlp.lin2), adapters kept in fp32 (PEFT's default).
``lora-<name>``   ``lora_fused.inject_lora`` on the same linears with backend ``<name>``
                  (torch = the reference; cuda = the compiled extension, C++ on CPU; triton on GPU).

Each step is forward under bf16 autocast, a loss (mean square of the encoder output),
backward, and an AdamW step over the trainable parameters; the time of whole steps gives
images/s. Reported per variant and batch: step time (median, 20/80 percentiles), images/s,
peak memory (GPU: ``torch.cuda.max_memory_allocated`` over the timed steps, weights and
optimizer state included; n/a on CPU), the activation bytes saved for backward by one
forward (exact on every device), and on GPU the largest batch that fits (grown until
CUDA reports out-of-memory, which is caught).

Presets: ``b``/``l``/``h`` are SAM's ViT-B/L/H at ``--image-size`` (default 1024);
``cpu-small`` is ViT-B's width with 2 blocks (one windowed, one global) at 256 px;
``tiny`` is a 64-wide, 2-block encoder at 64 px for smoke tests. On CPU the default is
``cpu-small`` (``tiny`` with ``--quick``), and every output is labelled CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import common
from common import parse_list

common.ensure_lora_fused_importable()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import lora_fused  # noqa: E402

PRESETS = {
    "b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), image_size=1024,
              window_size=14),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), image_size=1024,
              window_size=14),
    "h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), image_size=1024,
              window_size=14),
    "cpu-small": dict(embed_dim=768, depth=2, num_heads=12, global_attn_indexes=(1,), image_size=256, window_size=14),
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), image_size=64, window_size=2,
                 out_chans=32),
}
TARGET_MODULES = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(lin1|lin2))"  # regex, same rules in PEFT and lora_fused
LORA_BACKENDS = ("torch", "triton", "cuda")
VARIANTS = ("full", "peft") + tuple(f"lora-{b}" for b in LORA_BACKENDS)


def build_encoder(preset: str, image_size: int | None, device: torch.device, seed: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    config = dict(PRESETS[preset])
    size = image_size or config.pop("image_size")
    config.pop("image_size", None)
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=size, patch_size=16, mlp_ratio=4.0, out_chans=config.pop("out_chans", 256), qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, **config,
    )
    return encoder.to(device)


def apply_variant(encoder: nn.Module, variant: str, rank: int, alpha: float, dropout: float) -> nn.Module:
    """The model a variant trains; LoRA targets the same linears in PEFT and lora_fused."""
    if variant == "full":
        encoder.requires_grad_(True)
        return encoder
    if variant == "peft":
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES)
        return peft.get_peft_model(encoder, config)
    backend = variant.removeprefix("lora-")
    report = lora_fused.inject_lora(encoder, rank=rank, alpha=alpha, dropout=dropout,
                                    target_modules=TARGET_MODULES, backend=backend)
    if not report.replaced:
        raise RuntimeError("inject_lora replaced no layer")
    return encoder


def variant_unavailable_reason(variant: str, device: torch.device, explicitly_requested: bool) -> str | None:
    if variant == "full":
        return None
    return common.lora_unavailable_reason(variant.removeprefix("lora-"), device, explicitly_requested)


class Trainer:
    """A model, its AdamW optimiser and one training step."""

    def __init__(self, model: nn.Module, device: torch.device, autocast: bool):
        self.model, self.device, self.autocast = model, device, autocast
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-5)
        model.train()

    def forward_loss(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(images)
        return out.float().square().mean()

    def step(self, images: torch.Tensor) -> None:
        self.forward_loss(images).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def random_images(batch: int, image_size: int, device: torch.device, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, image_size, image_size, device=device) for _ in range(count)]


def time_steps(trainer: Trainer, images: list[torch.Tensor], warmup: int, steps: int) -> common.Timing:
    for i in range(warmup):
        trainer.step(images[i % len(images)])
    trainer.synchronize()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.step(images[i % len(images)])
        trainer.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return common._summarise(times)


def saved_activation_bytes(trainer: Trainer, images: torch.Tensor) -> int:
    params = list(trainer.model.parameters())
    saved = common.saved_for_backward(lambda: trainer.forward_loss(images), params)
    return saved["activation_bytes"]


def fits(trainer: Trainer, batch: int, image_size: int, device: torch.device) -> bool:
    """Whether two training steps at ``batch`` run without CUDA running out of memory."""
    images = None
    try:
        images = random_images(batch, image_size, device, count=1)
        for _ in range(2):
            trainer.step(images[0])
        trainer.synchronize()
        return True
    except Exception as exc:  # noqa: BLE001
        if not common.is_out_of_memory(exc):
            raise
        trainer.optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        images = None
        common.release_memory(device)


def largest_batch(trainer: Trainer, start: int, limit: int, image_size: int, device: torch.device,
                  deadline: common.Deadline) -> dict:
    """Double from ``start`` until out of memory, then bisect. Returns the largest batch that fit."""
    low, high, trials = 0, None, 0
    batch = max(start, 1)
    while batch <= limit and not deadline.passed():
        trials += 1
        if fits(trainer, batch, image_size, device):
            low, batch = batch, batch * 2
        else:
            high = batch
            break
    if high is None:
        return {"largest_fitting_batch": low, "first_oom_batch": None, "trials": trials,
                "note": "limit reached" if batch > limit else "time budget reached"}
    while high - low > 1 and not deadline.passed():
        trials += 1
        middle = (low + high) // 2
        if fits(trainer, middle, image_size, device):
            low = middle
        else:
            high = middle
    return {"largest_fitting_batch": low, "first_oom_batch": high, "trials": trials,
            "note": "exact" if high - low == 1 else "time budget reached before bisection ended"}


def measure_interleaved(runs, settings, args, device, payload, deadline, json_path) -> None:
    """CPU timing: every variant's model is built up front and, per batch size, their steps
    alternate (one step each per round, the order rotated every round), so that background
    load on a shared machine falls on all variants alike."""
    trainers = {}
    for variant, dropout in runs:
        try:
            encoder = build_encoder(settings["model"], settings["image_size"], device, args.seed)
            model = apply_variant(encoder, variant, args.rank, args.alpha, dropout or 0.0)
            trainers[(variant, dropout)] = Trainer(model, device, autocast=not args.no_autocast)
        except Exception as exc:  # noqa: BLE001
            status = common.failure_status(exc)
            print(f"  {variant} p={dropout}: {status}", file=sys.stderr)
            payload["rows"] += [{"variant": variant, "dropout": dropout, "batch": b, "status": status}
                                for b in settings["batches"]]
    for batch in settings["batches"]:
        if deadline.passed():
            payload["truncated"] = True
            break
        images = random_images(batch, settings["image_size"], device)
        rows, live = {}, {}
        for key, trainer in trainers.items():
            trainable, total = lora_fused.inject.count_parameters(trainer.model)
            rows[key] = {"variant": key[0], "dropout": key[1], "batch": batch, "trainable_params": trainable,
                         "total_params": total, "status": "ok"}
            try:
                rows[key]["saved_activation_bytes"] = saved_activation_bytes(trainer, images[0])
                for i in range(settings["warmup_steps"]):
                    trainer.step(images[i % len(images)])
                live[key] = trainer
            except Exception as exc:  # noqa: BLE001
                rows[key]["status"] = common.failure_status(exc)
        times: dict = {key: [] for key in live}
        for step in range(settings["steps"]):
            keys = list(live)
            shift = step % max(len(keys), 1)
            for key in keys[shift:] + keys[:shift]:
                try:
                    t0 = time.perf_counter()
                    live[key].step(images[step % len(images)])
                    times[key].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:  # noqa: BLE001
                    rows[key]["status"] = common.failure_status(exc)
                    del live[key]
        for key in live:
            timing = common._summarise(times[key])
            rows[key].update(step_ms=timing.median_ms, step_p20_ms=timing.p20_ms, step_p80_ms=timing.p80_ms,
                             images_per_s=batch / (timing.median_ms * 1e-3), peak_mem_bytes=None)
            print(f"  {key[0]} p={key[1]} batch {batch}: {timing.median_ms:.1f} ms/step, "
                  f"{rows[key]['images_per_s']:.2f} images/s", file=sys.stderr)
        payload["rows"] += list(rows.values())
        add_comparisons(payload["rows"])
        common.write_json(json_path, payload)


# -- outputs ------------------------------------------------------------------------

def add_comparisons(rows: list[dict]) -> None:
    peft = {(r["batch"], r["dropout"]): r for r in rows if r["variant"] == "peft" and r["status"] == "ok"}
    for row in rows:
        ref = peft.get((row["batch"], row["dropout"]))
        ok = row["status"] == "ok" and ref is not None
        row["speedup_vs_peft"] = row["images_per_s"] / ref["images_per_s"] if ok else None
        row["peak_mem_vs_peft"] = (row["peak_mem_bytes"] / ref["peak_mem_bytes"]
                                   if ok and row["peak_mem_bytes"] and ref["peak_mem_bytes"] else None)
        row["saved_vs_peft"] = (row["saved_activation_bytes"] / ref["saved_activation_bytes"]
                                if ok and ref["saved_activation_bytes"] else None)


def render_markdown(payload: dict) -> str:
    stamp, settings = payload["stamp"], payload["settings"]
    out = [f"# SAM image-encoder training step with LoRA — {stamp['device_name']}", "", common.banner(stamp), "",
           common.stamp_markdown(stamp), "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("skipped",)) + ".", ""]
    if settings.get("skipped"):
        out += ["Variants not run: " + "; ".join(f"`{k}`: {v}" for k, v in settings["skipped"].items()), ""]
    if payload.get("truncated"):
        out += ["**Truncated**: the time budget ran out before every configuration was measured.", ""]
    if stamp["device_type"] == "cpu":
        out += ["On CPU all variants' models are built first and their steps alternate (one step each per round), "
                "so background load falls on all alike.", ""]
    out += [f"Step = forward ({settings['precision']}) + backward + AdamW step. `vs PEFT` compares with PEFT at the same batch "
            "and dropout (images/s ratio; memory ratio). Saved = activation bytes kept for backward by one forward "
            "(parameters excluded).", ""]
    header = ["variant", "dropout", "batch", "trainable params", "step ms (p20–p80)", "images/s", "vs PEFT",
              "peak MiB", "peak vs PEFT", "saved MiB", "saved vs PEFT"]
    table = []
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(payload["rows"], key=lambda r: (order.get(r["variant"], 99), r["dropout"] or 0, r["batch"])):
        if r["status"] != "ok":
            table.append([r["variant"], r["dropout"], r["batch"], r.get("trainable_params", "–"), r["status"]]
                         + ["–"] * 6)
            continue
        table.append([
            r["variant"], r["dropout"], r["batch"], f"{r['trainable_params']:,}",
            f"{common.fmt_ms(r['step_ms'])} ({common.fmt_ms(r['step_p20_ms'])}–{common.fmt_ms(r['step_p80_ms'])})",
            f"{r['images_per_s']:.2f}",
            f"{r['speedup_vs_peft']:.2f}×" if r.get("speedup_vs_peft") else "–",
            common.fmt_mib(r["peak_mem_bytes"]),
            f"{r['peak_mem_vs_peft']:.2f}×" if r.get("peak_mem_vs_peft") else "–",
            common.fmt_mib(r["saved_activation_bytes"]),
            f"{r['saved_vs_peft']:.2f}×" if r.get("saved_vs_peft") else "–",
        ])
    out += [common.markdown_table(header, table), ""]
    fused = [r for r in payload["rows"] if r["status"] == "ok" and r["variant"] in ("lora-triton", "lora-cuda")
             and r.get("speedup_vs_peft")]
    if stamp["device_type"] == "cuda" and fused:
        out += ["## Target (issue 6: LoRA step ≥ 1.2× PEFT's images/s at no more peak memory; not asserted)", ""]
        table = []
        for variant in dict.fromkeys(r["variant"] for r in fused):
            mine = [r for r in fused if r["variant"] == variant]
            speed = min(r["speedup_vs_peft"] for r in mine)
            memory = max((r["peak_mem_vs_peft"] for r in mine if r.get("peak_mem_vs_peft")), default=None)
            table.append([variant, f"min {speed:.2f}× ({'met' if speed >= 1.2 else '**missed**'})",
                          f"max {memory:.2f}× ({'met' if memory <= 1.0 else '**missed**'})" if memory else "–"])
        out += [common.markdown_table(["variant", "images/s vs PEFT", "peak memory vs PEFT"], table), ""]
    if payload.get("max_batch"):
        out += ["## Largest batch that fits", ""]
        out += [common.markdown_table(
            ["variant", "dropout", "largest batch", "first OOM batch", "note"],
            [[m["variant"], m["dropout"], m.get("largest_fitting_batch", "–"), m.get("first_oom_batch", "–"),
              m.get("note", m.get("status", ""))] for m in payload["max_batch"]]), ""]
    elif stamp["device_type"] == "cpu":
        out += ["Peak memory and the largest batch: n/a on CPU (no allocator statistics for CPU tensors; "
                "no out-of-memory signal to search with).", ""]
    return "\n".join(out)


def render_plot(payload: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    stamp = payload["stamp"]
    series = list(dict.fromkeys((r["variant"], r["dropout"]) for r in rows))
    batches = sorted({r["batch"] for r in rows})
    metrics = [("images_per_s", "images/s (higher is better)")]
    if stamp["device_type"] == "cuda":
        metrics.append(("peak_mem_bytes", "peak memory, GiB"))
    else:
        metrics.append(("saved_activation_bytes", "activations saved for backward, MiB"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    width = 0.8 / max(len(series), 1)
    for ax, (metric, label) in zip(axes[0], metrics):
        scale = 2**30 if metric == "peak_mem_bytes" else 2**20 if metric == "saved_activation_bytes" else 1
        for j, (variant, dropout) in enumerate(series):
            values = {r["batch"]: r[metric] for r in rows if r["variant"] == variant and r["dropout"] == dropout}
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(batches))]
            ys = [(values.get(b) or float("nan")) / scale for b in batches]
            name = variant if dropout is None else f"{variant} p={dropout}"
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    where = stamp["device_name"]
    fig.suptitle(f"SAM encoder ({payload['settings']['model']}) LoRA r={payload['settings']['rank']} training step"
                 f" — {where} ({stamp['date_utc'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- main ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS),
                        help="encoder preset (GPU default b; CPU default cpu-small)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the preset's)")
    parser.add_argument("--variants", help=f"comma list from {','.join(VARIANTS)} (default: all available)")
    parser.add_argument("--batches", help="batch sizes (GPU default 1,2,4,8; CPU default 1,2)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--dropout", help="LoRA dropout probabilities (default 0,0.1)")
    parser.add_argument("--no-autocast", action="store_true", help="run in fp32 instead of bf16 autocast")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (GPU default 3, CPU 1)")
    parser.add_argument("--steps", type=int, help="timed steps (GPU default 10, CPU 3)")
    parser.add_argument("--max-batch", dest="max_batch", action="store_true", default=None,
                        help="search the largest batch that fits (GPU only; default on unless --quick)")
    parser.add_argument("--no-max-batch", dest="max_batch", action="store_false")
    parser.add_argument("--max-batch-limit", type=int, default=256)
    common.add_shared_arguments(
        parser,
        quick_help="GPU: batches 1,4 and fewer steps; CPU: the tiny preset, batch 1",
        time_budget_help="seconds after which no new measurement is started")
    return parser.parse_args(argv)


def run(args) -> dict:
    device = common.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    model = args.model or ("b" if gpu else ("tiny" if args.quick else "cpu-small"))
    image_size = args.image_size or PRESETS[model]["image_size"]
    default_batches = ("1,4" if args.quick else "1,2,4,8") if gpu else ("1" if args.quick else "1,2")
    settings = {
        "device": str(device), "model": model, "image_size": image_size,
        "batches": parse_list(args.batches or default_batches, int),
        "rank": args.rank, "alpha": args.alpha,
        "dropout": parse_list(args.dropout or "0,0.1", float),
        "precision": "fp32" if args.no_autocast else "bf16 autocast (fp32 weights)",
        "optimizer": "AdamW(lr=1e-5) over trainable parameters",
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3) if gpu else 1,
        "steps": args.steps or ((5 if args.quick else 10) if gpu else (2 if args.quick else 3)),
        "max_batch_search": bool(gpu and (args.max_batch if args.max_batch is not None else not args.quick)),
        "target_modules": TARGET_MODULES,
    }
    requested = parse_list(args.variants)
    unknown = [v for v in requested if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {VARIANTS}")
    try:
        import segment_anything  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"segment_anything is not installed ({exc}); install it (pip install segment-anything) "
                         "to run the end-to-end benchmark") from exc
    variants, skipped = [], {}
    for variant in requested or list(VARIANTS):
        reason = variant_unavailable_reason(variant, device, explicitly_requested=bool(requested))
        (skipped.__setitem__(variant, reason) if reason else variants.append(variant))
    settings["variants"], settings["skipped"] = variants, skipped
    for name, reason in skipped.items():
        print(f"[bench_sam] variant {name!r} not run: {reason}", file=sys.stderr)

    out_dir = args.out or common.default_out_dir(device, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = common.environment_stamp(device)
    deadline = common.Deadline(args.time_budget)
    payload = {"benchmark": "sam", "stamp": stamp, "settings": settings, "truncated": False, "rows": [],
               "max_batch": []}
    json_path = out_dir / "sam.json"
    print(f"[bench_sam] {stamp['device_name']}: preset {model} at {image_size}px, variants {variants}, batches "
          f"{settings['batches']}, dropout {settings['dropout']}", file=sys.stderr)

    runs = [(v, p) for v in variants for p in ([None] if v == "full" else settings["dropout"])]
    trainers_fit: dict = {}
    if not gpu:
        measure_interleaved(runs, settings, args, device, payload, deadline, json_path)
        runs = []  # measured above
    for variant, dropout in runs:
        if deadline.passed():
            payload["truncated"] = True
            break
        trainer = None
        try:
            encoder = build_encoder(model, image_size, device, args.seed)
            trainer = Trainer(apply_variant(encoder, variant, args.rank, args.alpha, dropout or 0.0), device,
                              autocast=not args.no_autocast)
            trainable, total = lora_fused.inject.count_parameters(trainer.model)
        except Exception as exc:  # noqa: BLE001
            status = common.failure_status(exc)
            print(f"  {variant} p={dropout}: {status}", file=sys.stderr)
            if args.verbose:
                traceback.print_exc()
            payload["rows"] += [{"variant": variant, "dropout": dropout, "batch": b, "status": status}
                                for b in settings["batches"]]
            continue
        largest_ok = 0
        for batch in settings["batches"]:
            if deadline.passed():
                payload["truncated"] = True
                break
            row = {"variant": variant, "dropout": dropout, "batch": batch, "trainable_params": trainable,
                   "total_params": total, "status": "ok"}
            try:
                images = random_images(batch, image_size, device)
                row["saved_activation_bytes"] = saved_activation_bytes(trainer, images[0])
                common.release_memory(device)
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                timing = time_steps(trainer, images, settings["warmup_steps"], settings["steps"])
                row.update(step_ms=timing.median_ms, step_p20_ms=timing.p20_ms, step_p80_ms=timing.p80_ms,
                           images_per_s=batch / (timing.median_ms * 1e-3),
                           peak_mem_bytes=int(torch.cuda.max_memory_allocated(device)) if gpu else None)
                largest_ok = max(largest_ok, batch)
                print(f"  {variant} p={dropout} batch {batch}: {timing.median_ms:.1f} ms/step, "
                      f"{row['images_per_s']:.2f} images/s", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001
                row["status"] = common.failure_status(exc)
                print(f"  {variant} p={dropout} batch {batch}: {row['status']}", file=sys.stderr)
                if args.verbose and row["status"] != "oom":
                    traceback.print_exc()
                trainer.optimizer.zero_grad(set_to_none=True)
            finally:
                images = None
                common.release_memory(device)
            payload["rows"].append(row)
        if settings["max_batch_search"]:
            trainers_fit[(variant, dropout)] = largest_ok
        trainer = encoder = None
        common.release_memory(device)
        add_comparisons(payload["rows"])
        common.write_json(json_path, payload)

    for (variant, dropout), largest_ok in trainers_fit.items():
        if deadline.passed():
            payload["truncated"] = True
            break
        entry = {"variant": variant, "dropout": dropout}
        try:
            encoder = build_encoder(model, image_size, device, args.seed)
            trainer = Trainer(apply_variant(encoder, variant, args.rank, args.alpha, dropout or 0.0), device,
                              autocast=not args.no_autocast)
            entry.update(largest_batch(trainer, max(largest_ok, 1), args.max_batch_limit, image_size, device, deadline))
            print(f"  {variant} p={dropout}: largest batch {entry['largest_fitting_batch']}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            entry["status"] = common.failure_status(exc)
            print(f"  {variant} p={dropout} max batch: {entry['status']}", file=sys.stderr)
        trainer = encoder = None
        common.release_memory(device)
        payload["max_batch"].append(entry)
        common.write_json(json_path, payload)

    add_comparisons(payload["rows"])
    common.write_json(json_path, payload)
    (out_dir / "sam.md").write_text(render_markdown(payload))
    if not args.no_plot:
        payload["plots"] = [render_plot(payload, out_dir / "sam.png").name]
        common.write_json(json_path, payload)
    print(f"[bench_sam] wrote {json_path} and {out_dir / 'sam.md'}", file=sys.stderr)
    return payload


def render_only(json_path: Path, plot: bool) -> int:
    payload = json.loads(json_path.read_text())
    add_comparisons(payload["rows"])
    (json_path.parent / "sam.md").write_text(render_markdown(payload))
    if plot:
        render_plot(payload, json_path.parent / "sam.png")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_only(args.render, not args.no_plot)
    payload = run(args)
    failed = [r for r in payload["rows"] if r["status"].startswith("error")]
    failed += [m for m in payload["max_batch"] if m.get("status", "").startswith("error")]
    if failed:
        print(f"[bench_sam] {len(failed)} measurements failed (status 'error: ...' in sam.json)", file=sys.stderr)
    return 1 if failed or not payload["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
