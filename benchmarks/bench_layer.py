#!/usr/bin/env python
"""Layer benchmark: one LoRA linear, every provider side by side, on SAM's shapes.

Providers (each where it is available on the device):

``linear``  frozen ``nn.Linear`` (``F.linear`` with W and b frozen, x requiring grad): the floor.
``torch``   ``lora_fused`` reference backend (unfused, explicit forward and backward).
``peft``    PEFT's LoRA layer (``get_peft_model`` around one ``nn.Linear``; adapter weights kept
            in the benchmark dtype with ``autocast_adapter_dtype=False``).
``addmm``   the best a knowledgeable user writes unfused (Unsloth's ``matmul_lora`` style): a
            custom ``torch.autograd.Function`` running ``y = F.linear(x, W, b)`` then
            ``y.addmm_(x~·Aᵀ, Bᵀ, alpha=s)`` on the flattened view, with a hand-written backward
            that saves x, xa (and the boolean dropout mask when p > 0).
``triton``  ``lora_fused`` Triton kernels (GPU; the CPU interpreter is skipped: not a speed path).
``cuda``    ``lora_fused._C``: CUDA kernels on GPU, the C++ CPU path on CPU.

Modes: ``forward`` (training forward: grad mode on, the graph built and dropped),
``backward`` (``torch.autograd.grad`` of a prepared graph w.r.t. x, A, B) and ``full``
(forward then backward). Every LoRA provider computes dx, dA and dB; the frozen linear dx.

Shapes: the distinct linears of SAM's image encoder (attn.qkv, attn.proj, mlp.lin1,
mlp.lin2) for ViT-B/L/H, at the token counts of an image of ``--image-size`` pixels:
a global layout of (S/16)² tokens and, for qkv/proj, the windowed layout of 14×14 windows
over the grid padded to a multiple of 14 (1024 px: 4096 and 25·196 = 4900 tokens per image).

Run ``python benchmarks/bench_layer.py --help``; results go to ``--out`` (default
``benchmarks/results/<device>/``; ``results/local/<device>/`` with ``--quick``) as layer.json, layer.md
and layer_<dtype>_r<rank>_p<p>.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import common
import cost_model
from common import DTYPES, parse_list

common.ensure_lora_fused_importable()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_fused  # noqa: E402

PROVIDERS = ("linear", "torch", "peft", "addmm", "triton", "cuda")
LORA_PROVIDERS = tuple(p for p in PROVIDERS if p != "linear")
FUSED_PROVIDERS = ("triton", "cuda")
MODES = ("forward", "backward", "full")
PROVIDER_COLORS = {"linear": "tab:gray", "torch": "tab:blue", "peft": "tab:orange", "addmm": "tab:green",
                   "triton": "tab:purple", "cuda": "tab:red"}
MODE_TITLES = {"forward": "forward", "backward": "backward", "full": "forward + backward"}

SAM_WIDTHS = {"b": 768, "l": 1024, "h": 1280}
LAYERS = ("qkv", "proj", "lin1", "lin2")
LAYER_FEATURES = {"qkv": (1, 3), "proj": (1, 1), "lin1": (1, 4), "lin2": (4, 1)}  # (in, out) in units of width
WINDOWED_LAYERS = ("qkv", "proj")  # attention runs on windows; the MLP after window_unpartition
PATCH, WINDOW = 16, 14
ALPHA_OVER_RANK = 2.0  # scaling s = alpha / r = 2 for every rank (the value does not change timings)


# -- shapes -------------------------------------------------------------------------

def tokens_per_image(image_size: int, layout: str) -> int:
    """Tokens one image gives a linear layer in SAM's encoder at ``image_size`` pixels."""
    grid = image_size // PATCH
    if layout == "global":
        return grid * grid
    padded = math.ceil(grid / WINDOW) * WINDOW
    return (padded // WINDOW) ** 2 * WINDOW * WINDOW


@dataclass(frozen=True)
class LayerShape:
    model: str
    layer: str
    layout: str
    batch: int
    tokens: int  # M = batch × tokens per image
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        layout = "-win" if self.layout == "windowed" else ""
        return f"{self.model.upper()}.{self.layer}{layout} ×{self.batch}"


def sam_shapes(models, layers, layouts, batches, image_size) -> list[LayerShape]:
    shapes = []
    for model, batch, layer, layout in itertools.product(models, batches, layers, layouts):
        if layout == "windowed" and layer not in WINDOWED_LAYERS:
            continue
        width = SAM_WIDTHS[model]
        k_units, n_units = LAYER_FEATURES[layer]
        shapes.append(LayerShape(model, layer, layout, batch, batch * tokens_per_image(image_size, layout),
                                 k_units * width, n_units * width))
    return shapes


def lora_flops(m: int, k: int, n: int, r: int, mode: str) -> int:
    """Useful flops of a LoRA layer (every LoRA provider is credited with the same count)."""
    forward = 2 * m * n * k + 2 * m * k * r + 2 * m * r * n
    backward = 2 * m * n * k + 2 * m * n * r + 2 * m * r * k + 2 * m * r * k + 2 * m * n * r  # dx, gb, dA, dB
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def linear_flops(m: int, k: int, n: int, mode: str) -> int:
    return {"forward": 2 * m * n * k, "backward": 2 * m * n * k, "full": 4 * m * n * k}[mode]


# -- providers ----------------------------------------------------------------------

class AddmmLoRAFunction(torch.autograd.Function):
    """Unfused LoRA with in-place ``addmm_`` (two GEMMs forward) and a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        x2d = x.reshape(-1, x.shape[-1])
        mask = None
        if dropout_p > 0.0:
            x_dropped, mask = torch.native_dropout(x2d, dropout_p, True)
        else:
            x_dropped = x2d
        xa = x_dropped @ lora_A.t()
        y = F.linear(x2d, weight, bias)
        y.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2d, xa, mask, weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, mask, weight, lora_A, lora_B = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        g = grad_y.reshape(-1, grad_y.shape[-1])
        gb = g @ lora_B
        x_dropped = x2d if mask is None else x2d * mask * (1.0 / (1.0 - p))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            if mask is None:
                dx.addmm_(gb, lora_A, alpha=s)
            else:
                dx.addcmul_(gb @ lora_A, mask, value=s / (1.0 - p))
            dx = dx.view(grad_y.shape[:-1] + (x2d.shape[-1],))
        dA = (gb.t() @ x_dropped).mul_(s)
        dB = (g.t() @ xa).mul_(s)
        return dx, None, None, dA, dB, None, None


@dataclass
class Provider:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    trainable: list  # tensors the backward differentiates besides x
    parameters: list  # every parameter-like tensor (kept apart in the saved-bytes count)


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def build_provider(name: str, weight, bias, lora_A, lora_B, scaling: float, dropout: float) -> Provider:
    params = [weight, bias, lora_A, lora_B]
    if name == "linear":
        return Provider(name, lambda x: F.linear(x, weight, bias), [], [weight, bias])
    if name in ("torch", "triton", "cuda"):
        def forward(x, backend=name):
            return lora_fused.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout, True, backend)
        return Provider(name, forward, [lora_A, lora_B], params)
    if name == "addmm":
        return Provider(name, lambda x: AddmmLoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout),
                        [lora_A, lora_B], params)
    if name == "peft":
        import peft

        rank = lora_A.shape[0]
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                         dtype=weight.dtype)
        base.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(bias, requires_grad=False)
        config = peft.LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=dropout, target_modules=["linear"])
        model = peft.get_peft_model(_OneLinear(base), config, autocast_adapter_dtype=False)
        model.train()
        layer = model.base_model.model.linear
        peft_A, peft_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            peft_A.copy_(lora_A)
            peft_B.copy_(lora_B)
        if abs(layer.scaling["default"] - scaling) > 1e-6 * abs(scaling):
            raise RuntimeError(f"PEFT scaling {layer.scaling['default']} != {scaling}")
        return Provider(name, layer, [peft_A, peft_B], [weight, bias, peft_A, peft_B])
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def provider_unavailable_reason(name: str, device: torch.device, explicitly_requested: bool) -> str | None:
    if name in ("linear", "addmm"):
        return None
    return common.lora_unavailable_reason(name, device, explicitly_requested)


def provider_label(name: str, device: torch.device) -> str:
    labels = {"linear": "nn.Linear (frozen)", "torch": "torch ref", "peft": "PEFT", "addmm": "addmm",
              "triton": "triton", "cuda": "cuda (C++ CPU)" if device.type == "cpu" else "cuda"}
    return labels[name]


# -- measuring ----------------------------------------------------------------------

def mode_callable(provider: Provider, mode: str, xs: list, grads: list) -> Callable[[], object]:
    """A no-argument function running ``mode`` once, cycling through the inputs."""
    order = itertools.cycle(range(len(xs)))
    if mode == "forward":
        return lambda: provider.forward(xs[next(order)])
    if mode == "full":
        def full():
            i = next(order)
            y = provider.forward(xs[i])
            return torch.autograd.grad(y, [xs[i], *provider.trainable], grads[i])
        return full
    outputs = [provider.forward(x) for x in xs]

    def backward():
        i = next(order)
        return torch.autograd.grad(outputs[i], [xs[i], *provider.trainable], grads[i], retain_graph=True)
    return backward


def measure_group(providers: dict, modes, xs, grads, device, args) -> dict:
    """For each provider: the bytes saved for backward, then per mode its timing and peak memory.

    On CPU the providers of a group are timed in alternation (one call each per round), so
    that background load on a shared machine falls on all of them alike; on GPU each is
    timed on its own with ``do_bench``.
    """
    results = {name: {"modes": {}} for name in providers}
    live = dict(providers)

    def fail(name, exc, mode_list):
        status = common.failure_status(exc)
        print(f"    {name}/{','.join(mode_list)}: {status}", file=sys.stderr)
        if args.verbose and status != "oom":
            traceback.print_exception(exc)
        for mode in mode_list:
            results[name]["modes"][mode] = {"status": status}

    for name, provider in list(live.items()):
        try:
            saved = common.saved_for_backward(lambda provider=provider: provider.forward(xs[0]), provider.parameters)
            results[name]["saved_activation_bytes"] = saved["activation_bytes"]
            results[name]["saved_param_bytes"] = saved["param_bytes"]
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the run
            fail(name, exc, modes)
            del live[name]
        saved = None
    for mode in modes:
        timings: dict = {}
        if device.type == "cuda":  # one provider's graphs alive at a time
            for name, provider in live.items():
                try:
                    fn = mode_callable(provider, mode, xs, grads)
                    timings[name] = common.time_gpu(fn, args.warmup_ms, args.rep_ms)
                except Exception as exc:  # noqa: BLE001
                    timings[name] = exc
                fn = None
                common.release_memory(device)
        else:
            fns = {}
            for name, provider in live.items():
                try:
                    fns[name] = mode_callable(provider, mode, xs, grads)
                except Exception as exc:  # noqa: BLE001
                    timings[name] = exc
            timings.update(common.time_cpu_interleaved(fns, args.warmup_ms, args.rep_ms))
            fns = None
        common.release_memory(device)
        for name, timing in timings.items():
            if isinstance(timing, BaseException):
                fail(name, timing, [mode])
                continue
            try:
                peak = common.peak_memory_bytes(mode_callable(live[name], mode, xs[:1], grads[:1]), device)
            except Exception as exc:  # noqa: BLE001
                fail(name, exc, [mode])
                continue
            results[name]["modes"][mode] = {"status": "ok", "timing": timing, "peak_mem_bytes": peak}
        common.release_memory(device)
    return results


def make_rows(shape: LayerShape, dtype_name, rank, dropout, provider_name, measured, x_bytes, xa_bytes, modes):
    rows = []
    for mode in modes:
        entry = measured["modes"].get(mode, {"status": "not run"})
        timing = entry.get("timing")
        if provider_name == "linear":
            flops = linear_flops(shape.tokens, shape.in_features, shape.out_features, mode)
        else:
            flops = lora_flops(shape.tokens, shape.in_features, shape.out_features, rank, mode)
        rows.append({
            **asdict(shape), "label": shape.label,
            "rank": rank, "dtype": dtype_name, "dropout": dropout,
            "mode": mode, "provider": provider_name, "status": entry["status"],
            "median_ms": timing.median_ms if timing else None,
            "p20_ms": timing.p20_ms if timing else None,
            "p80_ms": timing.p80_ms if timing else None,
            "reps": timing.reps if timing else None,
            "flops": flops,
            "tflops": flops / (timing.median_ms * 1e-3) / 1e12 if timing else None,
            "peak_mem_bytes": entry.get("peak_mem_bytes"),
            "saved_activation_bytes": measured.get("saved_activation_bytes"),
            "saved_param_bytes": measured.get("saved_param_bytes"),
            "x_bytes": x_bytes, "xa_bytes": xa_bytes,
        })
    return rows


def shape_key(row) -> tuple:
    return (row["model"], row["layer"], row["layout"], row["batch"], row["dtype"], row["mode"])


def group_key(row) -> tuple:
    """Rows measured together: one shape, dtype, mode, rank and dropout (the nn.Linear floor included)."""
    return shape_key(row) + (row["rank"], row["dropout"])


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_linear = t / t(nn.Linear); speedup_vs_peft = t(PEFT) / t, within each measured group."""
    linear = {group_key(r): r["median_ms"] for r in rows if r["provider"] == "linear"}
    peft = {group_key(r): r["median_ms"] for r in rows if r["provider"] == "peft"}
    for row in rows:
        t = row["median_ms"]
        t_linear = linear.get(group_key(row))
        t_peft = peft.get(group_key(row))
        row["ratio_to_linear"] = t / t_linear if t and t_linear else None
        row["speedup_vs_peft"] = t_peft / t if t and t_peft and row["provider"] != "linear" else None


# -- outputs ------------------------------------------------------------------------

def _cell(row) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"].split(":")[0]
    ratio = f" ({row['ratio_to_linear']:.2f}×)" if row.get("ratio_to_linear") else ""
    return f"{common.fmt_ms(row['median_ms'])}{ratio}"


def render_markdown(payload: dict) -> str:
    stamp, settings, rows = payload["stamp"], payload["settings"], payload["rows"]
    device = torch.device(stamp["device_type"])
    providers = [p for p in settings["providers"]]
    lora = [p for p in providers if p != "linear"]
    fused = [p for p in providers if p in FUSED_PROVIDERS]
    out = [f"# LoRA layer benchmark — {stamp['device_name']}", "", common.banner(stamp), "",
           common.stamp_markdown(stamp), ""]
    out += [
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("providers", "skipped")) + ".",
        "",
        f"Cells: median time in ms over {payload['timer']}, and in brackets the ratio to the frozen nn.Linear of the "
        "same shape and dtype, measured in the same group (1.00× is the floor). 20/80 percentiles, TFLOP/s and every other figure are in "
        "layer.json. Inputs are rotated between repetitions "
        f"({settings['rotation']}). `best fused vs PEFT` = PEFT time / fastest lora_fused fused backend time.",
        "",
    ]
    if settings.get("skipped"):
        out += ["Providers not run: " + "; ".join(f"`{k}`: {v}" for k, v in settings["skipped"].items()), ""]
    if payload.get("truncated"):
        out += ["**Truncated**: the time budget ran out before every configuration was measured.", ""]
    out += summary_markdown(payload, device) + [""]
    index = {(shape_key(r), r["rank"], r["dropout"], r["provider"]): r for r in rows}
    configs = sorted({(r["model"], r["layer"], r["layout"], r["batch"], r["tokens"], r["in_features"],
                       r["out_features"], r["rank"], r["dtype"], r["dropout"])
                      for r in rows if r["provider"] != "linear"},
                     key=lambda c: (c[8], c[7], c[9] or 0, "bhl".index(c[0]) if c[0] in "bhl" else 0, c[3],
                                    LAYERS.index(c[1]), c[2]))
    for mode in settings["modes"]:
        out += [f"## {MODE_TITLES[mode]} (`{mode}`)", ""]
        header = ["shape", "M", "K→N", "r", "dtype", "p", provider_label("linear", device)]
        header += [provider_label(p, device) for p in lora]
        header += ["best fused vs PEFT"] if fused and "peft" in lora else []
        table = []
        for model, layer, layout, batch, tokens, k, n, rank, dtype, p in configs:
            key = (model, layer, layout, batch, dtype, mode)
            label = f"{model.upper()}.{layer}{'-win' if layout == 'windowed' else ''} ×{batch}"
            cells = [label, tokens, f"{k}→{n}", rank, dtype, p, _cell(index.get((key, rank, p, "linear")))]
            cells += [_cell(index.get((key, rank, p, prov))) for prov in lora]
            if fused and "peft" in lora:
                speedups = [index[(key, rank, p, f)]["speedup_vs_peft"] for f in fused
                            if (key, rank, p, f) in index and index[(key, rank, p, f)].get("speedup_vs_peft")]
                cells.append(f"{max(speedups):.2f}×" if speedups else "–")
            table.append(cells)
        out += [common.markdown_table(header, table), ""]

    out += ["## Bytes saved for backward per layer (MiB, parameters excluded)", "",
            "`x + xa` is the contract's bound for a fused layer: x (not copied) and xa = x~·Aᵀ in fp32. "
            "The dropout seed adds 8 bytes.", ""]
    header = ["shape", "r", "dtype", "p", "x + xa"] + [provider_label(p, device) for p in providers]
    table = []
    first_mode = settings["modes"][0]
    for model, layer, layout, batch, _tokens, _k, _n, rank, dtype, p in configs:
        key = (model, layer, layout, batch, dtype, first_mode)
        any_row = next((index[(key, rank, p, prov)] for prov in lora if (key, rank, p, prov) in index), None)
        if any_row is None:
            continue
        cells = [f"{model.upper()}.{layer}{'-win' if layout == 'windowed' else ''} ×{batch}", rank, dtype, p,
                 common.fmt_mib(any_row["x_bytes"] + any_row["xa_bytes"])]
        for prov in providers:
            row = index.get((key, rank, p, prov))
            cells.append(common.fmt_mib(row["saved_activation_bytes"]) if row else "–")
        table.append(cells)
    out += [common.markdown_table(header, table), ""]

    if stamp["device_type"] == "cuda" and "full" in settings["modes"]:
        out += ["## Peak memory of one forward + backward (MiB above inputs and parameters)", ""]
        header = ["shape", "r", "dtype", "p"] + [provider_label(p, device) for p in providers]
        table = []
        for model, layer, layout, batch, _tokens, _k, _n, rank, dtype, p in configs:
            key = (model, layer, layout, batch, dtype, "full")
            cells = [f"{model.upper()}.{layer}{'-win' if layout == 'windowed' else ''} ×{batch}", rank, dtype, p]
            for prov in providers:
                row = index.get((key, rank, p, prov))
                cells.append(common.fmt_mib(row.get("peak_mem_bytes")) if row else "–")
            table.append(cells)
        out += [common.markdown_table(header, table), ""]
    else:
        out += ["Peak memory: n/a on CPU (PyTorch keeps no allocator statistics for CPU tensors); "
                "the saved-for-backward bytes above are exact on every device.", ""]
    out += ["## Providers", ""] + [f"- `{name}`: {text}" for name, text in PROVIDER_NOTES.items()] + [""]
    return "\n".join(out)


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summary_markdown(payload: dict, device: torch.device) -> list[str]:
    """Geometric means over every measured configuration, and on GPU the issue's targets."""
    rows = [r for r in payload["rows"] if r["status"] == "ok" and r["provider"] != "linear"]
    providers = [p for p in payload["settings"]["providers"] if p != "linear"]
    out = ["## Summary (geometric means over all measured shapes, ranks, dtypes and dropouts)", ""]
    header = ["provider"] + [f"{m}: ×nn.Linear" for m in payload["settings"]["modes"]]
    header += [f"{m}: speed-up over PEFT" for m in payload["settings"]["modes"]]
    table = []
    for prov in providers:
        mine = [r for r in rows if r["provider"] == prov]
        cells = [provider_label(prov, device)]
        for metric in ("ratio_to_linear", "speedup_vs_peft"):
            for mode in payload["settings"]["modes"]:
                value = _geomean([r[metric] for r in mine if r["mode"] == mode])
                cells.append(f"{value:.2f}×" if value else "–")
        table.append(cells)
    out += [common.markdown_table(header, table), ""]
    if device.type != "cuda":
        return out
    targets = [r for r in rows if r["dtype"] == "bf16" and r["rank"] <= 16]
    out += ["## Targets (issue 6: bf16, r ≤ 16; observed worst case, not asserted)", ""]
    header = ["provider", "forward ≤ 1.10× nn.Linear", "fwd+bwd ≤ 1.25× nn.Linear", "fwd+bwd ≥ 1.3× PEFT",
              "fwd+bwd faster than addmm", "saved ≤ x + xa"]
    table = []
    addmm = {(shape_key(r), r["rank"], r["dropout"]): r["median_ms"] for r in targets if r["provider"] == "addmm"}
    for prov in [p for p in providers if p in FUSED_PROVIDERS]:
        mine = [r for r in targets if r["provider"] == prov]
        if not mine:
            continue
        fwd = [r["ratio_to_linear"] for r in mine if r["mode"] == "forward" and r["ratio_to_linear"]]
        full = [r for r in mine if r["mode"] == "full"]
        full_ratio = [r["ratio_to_linear"] for r in full if r["ratio_to_linear"]]
        speedup = [r["speedup_vs_peft"] for r in full if r["speedup_vs_peft"]]
        vs_addmm = [r["median_ms"] < addmm[k] for r in full if (k := (shape_key(r), r["rank"], r["dropout"])) in addmm]
        saved = [r["saved_activation_bytes"] <= r["x_bytes"] + r["xa_bytes"] + 64 for r in mine]

        def verdict(ok: bool) -> str:
            return "met" if ok else "**missed**"
        table.append([
            provider_label(prov, device),
            f"max {max(fwd):.2f}× ({verdict(max(fwd) <= 1.10)})" if fwd else "–",
            f"max {max(full_ratio):.2f}× ({verdict(max(full_ratio) <= 1.25)})" if full_ratio else "–",
            f"min {min(speedup):.2f}× ({verdict(min(speedup) >= 1.3)})" if speedup else "–",
            f"{sum(vs_addmm)}/{len(vs_addmm)} shapes" if vs_addmm else "–",
            f"{sum(saved)}/{len(saved)}",
        ])
    out += [common.markdown_table(header, table) if table else "No fused backend measured in bf16 at r ≤ 16.", ""]
    return out


PROVIDER_NOTES = {
    "linear": "frozen `nn.Linear` (`F.linear`, W and b frozen, x requires grad): the floor.",
    "torch": "lora_fused's PyTorch reference backend: unfused, explicit forward/backward saving x and xa.",
    "peft": "PEFT's `lora.Linear` via `get_peft_model` on a one-linear model, adapters in the benchmark dtype "
            "(`autocast_adapter_dtype=False`), train mode.",
    "addmm": "custom `torch.autograd.Function`: `F.linear` then `y.addmm_(x~·Aᵀ, Bᵀ, alpha=s)` on the flattened "
             "view; hand-written backward (`dx = g·W` + `addmm_`/`addcmul_`), saves x, xa and, with dropout, "
             "the boolean mask (Unsloth's matmul_lora style).",
    "triton": "lora_fused Triton kernels (GPU only here).",
    "cuda": "lora_fused compiled extension: CUDA kernels on GPU, the C++ CPU path on CPU.",
}


def render_plots(payload: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    stamp = payload["stamp"]
    device = torch.device(stamp["device_type"])
    modes = payload["settings"]["modes"]
    lora = [p for p in payload["settings"]["providers"] if p != "linear"]
    written = []
    combos = sorted({(r["dtype"], r["rank"], r["dropout"]) for r in rows if r["provider"] != "linear"})
    for dtype, rank, p in combos:
        selected = [r for r in rows if r["dtype"] == dtype and r["rank"] == rank and r["dropout"] == p]
        labels = list(dict.fromkeys(r["label"] for r in selected))
        fig, axes = plt.subplots(2, len(modes), figsize=(max(6.0, 0.55 * len(labels) + 2) * len(modes), 8),
                                 squeeze=False)
        for col, mode in enumerate(modes):
            for row_index, (metric, providers, ylabel) in enumerate((
                ("ratio_to_linear", lora, "time / frozen nn.Linear (lower is better)"),
                ("speedup_vs_peft", [q for q in lora if q != "peft"], "speed-up over PEFT (higher is better)"),
            )):
                ax = axes[row_index][col]
                width = 0.8 / max(len(providers), 1)
                for j, prov in enumerate(providers):
                    by_label = {r["label"]: r[metric] for r in selected if r["provider"] == prov and r["mode"] == mode}
                    xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(labels))]
                    ys = [by_label.get(label) or float("nan") for label in labels]
                    ax.bar(xs, ys, width, label=provider_label(prov, device), color=PROVIDER_COLORS[prov])
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
                ax.set_ylabel(ylabel)
                ax.set_title(MODE_TITLES[mode])
                ax.grid(axis="y", alpha=0.3)
                if col == 0:
                    ax.legend(fontsize=8)
        fig.suptitle(f"LoRA layer, {dtype}, rank {rank}, dropout {p} — {stamp['device_name']} "
                     f"({stamp['date_utc'][:10]})")
        fig.tight_layout()
        path = out_dir / f"layer_{dtype}_r{rank}_p{p}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# -- main ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", help=f"comma list from {','.join(PROVIDERS)} (default: all available)")
    parser.add_argument("--models", help="SAM encoders: comma list of b,l,h (GPU default b,l,h; CPU default b)")
    parser.add_argument("--shapes", help=f"layers: comma list of {','.join(LAYERS)} (default all)")
    parser.add_argument("--layouts", default="global,windowed", help="token layouts: global,windowed")
    parser.add_argument("--image-size", type=int, help="image side in pixels (GPU default 1024; CPU default 256)")
    parser.add_argument("--batches", help="images per batch (GPU default 1,4,8; CPU default 1)")
    parser.add_argument("--ranks", help="LoRA ranks (GPU default 4,8,16,64; CPU default 16)")
    parser.add_argument("--dtypes", help="bf16,fp16,fp32 (GPU default all three; CPU default fp32)")
    parser.add_argument("--dropout", help="LoRA dropout probabilities (default 0,0.1)")
    parser.add_argument("--modes", help="forward,backward,full (default all)")
    parser.add_argument("--warmup-ms", type=float, help="warm-up time per measurement")
    parser.add_argument("--rep-ms", type=float, help="timed repetitions' budget per measurement")
    common.add_shared_arguments(
        parser,
        quick_help="small set: GPU ViT-B and ViT-H, batch 4, rank 16, bf16; CPU ViT-B at 128 px, fp32",
        time_budget_help="seconds after which no new configuration is started")
    return parser.parse_args(argv)


def resolve_settings(args, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if args.quick:
        if gpu:
            defaults = dict(models="b,h", batches="4", ranks="16", dtypes="bf16", image_size=1024,
                            warmup_ms=10, rep_ms=40)
        else:
            defaults = dict(models="b", batches="1", ranks="16", dtypes="fp32", image_size=128,
                            warmup_ms=20, rep_ms=60)
    else:
        defaults = dict(models="b,l,h", batches="1,4,8", ranks="4,8,16,64", dtypes="bf16,fp16,fp32",
                        image_size=1024, warmup_ms=25, rep_ms=100) if gpu else \
            dict(models="b", batches="1", ranks="16", dtypes="fp32", image_size=256, warmup_ms=50, rep_ms=250)
    settings = {
        "device": str(device),
        "models": parse_list(args.models or defaults["models"]),
        "layers": parse_list(args.shapes) or list(LAYERS),
        "layouts": parse_list(args.layouts),
        "image_size": args.image_size or defaults["image_size"],
        "batches": parse_list(args.batches or defaults["batches"], int),
        "ranks": parse_list(args.ranks or defaults["ranks"], int),
        "dtypes": parse_list(args.dtypes or defaults["dtypes"]),
        "dropout": parse_list(args.dropout or "0,0.1", float),
        "modes": parse_list(args.modes) or list(MODES),
        "warmup_ms": args.warmup_ms or defaults["warmup_ms"],
        "rep_ms": args.rep_ms or defaults["rep_ms"],
        "scaling": ALPHA_OVER_RANK,
        # Reading allow_tf32 raises once torch's newer fp32_precision API has been used; prefer the latter.
        "fp32_matmul_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None) if gpu else None,
        "quick": args.quick,
    }
    bad = {"models": [m for m in settings["models"] if m not in SAM_WIDTHS],
           "shapes": [s for s in settings["layers"] if s not in LAYERS],
           "layouts": [s for s in settings["layouts"] if s not in ("global", "windowed")],
           "dtypes": [d for d in settings["dtypes"] if d not in DTYPES],
           "modes": [m for m in settings["modes"] if m not in MODES]}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise SystemExit(f"unknown values: {bad}")
    args.warmup_ms, args.rep_ms = settings["warmup_ms"], settings["rep_ms"]
    requested = parse_list(args.providers)
    unknown = [p for p in requested if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; expected some of {PROVIDERS}")
    providers, skipped = [], {}
    for name in requested or list(PROVIDERS):
        reason = provider_unavailable_reason(name, device, explicitly_requested=bool(requested))
        if reason is None:
            providers.append(name)
        else:
            skipped[name] = reason
    if "linear" not in providers:
        providers.insert(0, "linear")  # every ratio is taken to it
    settings["providers"], settings["skipped"] = providers, skipped
    return settings


def run(args) -> dict:
    device = common.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_settings(args, device)
    out_dir = args.out or common.default_out_dir(device, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = common.environment_stamp(device)
    deadline = common.Deadline(args.time_budget)
    torch.manual_seed(args.seed)
    shapes = sam_shapes(settings["models"], settings["layers"], settings["layouts"], settings["batches"],
                        settings["image_size"])
    for name, reason in settings["skipped"].items():
        print(f"[bench_layer] provider {name!r} not run: {reason}", file=sys.stderr)
    print(f"[bench_layer] {stamp['device_name']}: {len(shapes)} shapes × ranks {settings['ranks']} × dtypes "
          f"{settings['dtypes']} × dropout {settings['dropout']} × modes {settings['modes']}; providers "
          f"{settings['providers']}", file=sys.stderr)
    timer = ("triton.testing.do_bench (CUDA events, L2 flushed per repetition)" if device.type == "cuda"
             else "time.perf_counter per call after warm-up, the providers of a group called in alternation")
    payload = {"benchmark": "layer", "stamp": stamp, "settings": settings, "timer": timer,
               "token_counts": {layout: tokens_per_image(settings["image_size"], layout)
                                for layout in settings["layouts"]},
               "truncated": False, "rows": []}
    settings["rotation"] = "cycling through ≥2 inputs totalling ≥2× the last-level cache (max 8)"
    json_path = out_dir / "layer.json"
    for shape in shapes:
        if deadline.passed():
            payload["truncated"] = True
            break
        for dtype_name in settings["dtypes"]:
            dtype = DTYPES[dtype_name]
            m, k, n = shape.tokens, shape.in_features, shape.out_features
            weight = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
            bias = torch.randn(n, device=device, dtype=dtype) * 0.1
            x_bytes = m * k * weight.element_size()
            count = common.rotation_count(x_bytes, device)
            try:
                xs = [torch.randn(shape.batch, m // shape.batch, k, device=device, dtype=dtype).requires_grad_()
                      for _ in range(count)]
                grads = [torch.randn(shape.batch, m // shape.batch, n, device=device, dtype=dtype)
                         for _ in range(count)]
            except Exception as exc:  # noqa: BLE001
                if not common.is_out_of_memory(exc):
                    raise
                print(f"  {shape.label} {dtype_name}: inputs do not fit, skipped", file=sys.stderr)
                continue
            print(f"  {shape.label} M={m} K={k} N={n} {dtype_name}", file=sys.stderr)
            for rank, dropout in itertools.product(settings["ranks"], settings["dropout"]):
                if deadline.passed():
                    payload["truncated"] = True
                    break
                lora_A = (torch.randn(rank, k, device=device, dtype=dtype) / math.sqrt(k)).requires_grad_()
                lora_B = (torch.randn(n, rank, device=device, dtype=dtype) / math.sqrt(rank)).requires_grad_()
                xa_bytes = m * rank * 4  # xa is kept in fp32 by the contract
                providers, measured = {}, {}
                for name in settings["providers"]:
                    try:
                        providers[name] = build_provider(name, weight, bias, lora_A, lora_B, settings["scaling"],
                                                         dropout)
                    except Exception as exc:  # noqa: BLE001
                        status = common.failure_status(exc)
                        print(f"    {name}: {status}", file=sys.stderr)
                        measured[name] = {"modes": {mode: {"status": status} for mode in settings["modes"]}}
                measured.update(measure_group(providers, settings["modes"], xs, grads, device, args))
                providers = None
                for name in settings["providers"]:
                    rows = make_rows(shape, dtype_name, rank, dropout, name, measured[name], x_bytes, xa_bytes,
                                     settings["modes"])
                    for row in rows:  # the cost model beside each measured time
                        line = cost_model.annotate_row(row, cost_model.gpu_for_device_name(stamp["device_name"]))
                        if line:
                            print(line, file=sys.stderr)
                    payload["rows"] += rows
                common.release_memory(device)
            xs = grads = weight = bias = None
            common.release_memory(device)
        add_ratios(payload["rows"])
        common.write_json(json_path, payload)
    add_ratios(payload["rows"])
    common.write_json(json_path, payload)
    (out_dir / "layer.md").write_text(render_markdown(payload))
    if not args.no_plot:
        payload["plots"] = [p.name for p in render_plots(payload, out_dir)]
        common.write_json(json_path, payload)
    print(f"[bench_layer] wrote {json_path}, {out_dir / 'layer.md'} and {len(payload.get('plots', []))} plots",
          file=sys.stderr)
    return payload


def render_only(json_path: Path, plot: bool) -> int:
    payload = json.loads(json_path.read_text())
    add_ratios(payload["rows"])
    (json_path.parent / "layer.md").write_text(render_markdown(payload))
    if plot:
        render_plots(payload, json_path.parent)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_only(args.render, not args.no_plot)
    payload = run(args)
    failed = [r for r in payload["rows"] if r["status"].startswith("error")]
    if failed:
        print(f"[bench_layer] {len(failed)} measurements failed (status 'error: ...' in layer.json)", file=sys.stderr)
    return 1 if failed or not payload["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
