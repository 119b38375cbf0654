"""Helpers shared by the benchmarks: environment stamp, timing, memory, result files.

Timing follows the field's conventions (Liger-Kernel's benchmark utilities, DESIGN.md §6.9):
warm-up first, then many timed repetitions summarised as the median with the 20th and
80th percentiles. On a GPU the timer is ``triton.testing.do_bench`` (CUDA events, the L2
cache flushed before every repetition), or CUDA events directly when triton is missing.
On CPU it is a ``time.perf_counter`` loop around each call.

Memory figures:
- bytes saved for backward: exact on every device, from
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages; parameters apart);
- peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the
  measured call, on GPU only. PyTorch keeps no allocator statistics for CPU tensors and
  tracemalloc does not see them, so on CPU the peak is reported as ``None`` ("n/a").
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"


def ensure_lora_fused_importable() -> None:
    """Let the scripts run from a checkout that was not pip-installed."""
    try:
        import lora_fused  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))


import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = (0.5, 0.2, 0.8)


def parse_list(text: str | None, cast: Callable = str) -> list:
    """``"a,b,c"`` → ``[cast(a), cast(b), cast(c)]``; None or empty → []."""
    if text is None or text.strip() == "":
        return []
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def lora_unavailable_reason(name: str, device: torch.device, explicitly_requested: bool) -> str | None:
    """Why the LoRA implementation ``name`` (``peft`` or a lora_fused backend) cannot run on
    ``device``, or None. Triton on CPU is skipped unless asked for by name."""
    if name == "peft":
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            return f"peft is not installed ({exc})"
        return None
    if name == "triton" and device.type == "cpu" and not explicitly_requested:
        return "skipped on CPU: Triton runs CPU tensors only through its interpreter, which is not a speed path"
    ensure_lora_fused_importable()
    from lora_fused.backends import unavailable_reason

    return unavailable_reason(name, device)


def add_shared_arguments(parser, quick_help: str, time_budget_help: str) -> None:
    """The flags both benchmark scripts take, with one meaning."""
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--time-budget", type=float, help=time_budget_help)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>/; with --quick "
                        "benchmarks/results/local/<device>/, git-ignored)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only re-write the markdown and plots of an existing result JSON (into its folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing measurements")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    return device


# -- environment stamp --------------------------------------------------------------

def _run(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # noqa: BLE001 - a broken optional package is reported as missing
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module_name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            version = "unknown"
    return str(version)


def environment_stamp(device: torch.device) -> dict:
    """Everything needed to know where and with what a result was measured."""
    ensure_lora_fused_importable()
    import lora_fused

    on_gpu = device.type == "cuda"
    stamp = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if on_gpu else f"CPU: {cpu_model_name()}",
        "cpu_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cuda": torch.version.cuda,
        "cuda_device_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if on_gpu else None,
        "nvidia_driver": (_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
                          if on_gpu else None),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "segment_anything": _version("segment_anything"),
        "lora_fused": getattr(lora_fused, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": _run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--", "lora_fused", "kernels", "csrc", "benchmarks"])),
        "backends": lora_fused.backend_report(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    return stamp


def device_label(device: torch.device) -> str:
    """Folder name under benchmarks/results/: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-intel-xeon-2t``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = cpu_model_name().replace("(R)", "").replace("(TM)", "").split("@")[0]
        name = f"cpu-{model}-{torch.get_num_threads()}t"
    cleaned = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in cleaned:
        cleaned = cleaned.replace("--", "-")
    return cleaned.strip("-")


def banner(stamp: dict) -> str:
    """One line saying which device produced a result; CPU results say so loudly."""
    if stamp["device_type"] == "cpu":
        return (f"**CPU run** ({stamp['device_name']}, {stamp['cpu_threads']} threads). CPU numbers exercise the "
                "commands and compare the C++ CPU path with the reference; they say nothing about GPU speed.")
    return f"GPU run on **{stamp['device_name']}** (CUDA {stamp['cuda']}, driver {stamp['nvidia_driver']})."


def stamp_markdown(stamp: dict) -> str:
    keys = ("date_utc", "device_name", "cpu_threads", "load_average_1m", "cuda", "nvidia_driver", "torch", "triton",
            "peft", "segment_anything", "lora_fused", "python", "git_revision", "git_dirty", "command")
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | `{stamp.get(key)}` |" for key in keys if key in stamp]
    backends = stamp.get("backends", {})
    for name, per_device in backends.items():
        lines.append(f"| backend `{name}` on {stamp['device_type']} | {per_device.get(stamp['device_type'], '?')} |")
    return "\n".join(lines)


# -- timing -------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _summarise(times_ms: list[float]) -> Timing:
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], 1)
    cuts = statistics.quantiles(times_ms, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return Timing(statistics.median(times_ms), cuts[1], cuts[7], len(times_ms))


def time_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 5,
             max_reps: int = 1000) -> Timing:
    """Median and 20/80 percentiles of ``fn``'s wall time, each call timed on its own."""
    start = time.perf_counter()
    runs = 0
    while runs < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        runs += 1
    times_ms: list[float] = []
    budget_start = time.perf_counter()
    def more() -> bool:
        in_budget = (time.perf_counter() - budget_start) * 1e3 < rep_ms
        return len(times_ms) < min_reps or (in_budget and len(times_ms) < max_reps)

    while more():
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    return _summarise(times_ms)


def time_cpu_interleaved(fns: dict, warmup_ms: float, rep_ms: float, min_reps: int = 5,
                         max_reps: int = 1000) -> dict:
    """Time several functions in alternation: each round calls every function once, in an
    order rotated every round, so background load on a shared CPU falls on all of them
    alike. Returns name → Timing, or name → the exception a function raised."""
    results: dict = {}
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            start, runs = time.perf_counter(), 0
            while runs < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
                fn()
                runs += 1
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            results[name] = exc
            del live[name]
    times: dict = {name: [] for name in live}
    budget_ms = rep_ms * max(len(live), 1)
    start, round_index = time.perf_counter(), 0
    while live:
        names = list(live)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            try:
                t0 = time.perf_counter()
                live[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
                del live[name]
        round_index += 1
        counts = [len(times[name]) for name in live]
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if not counts or (min(counts) >= min_reps and (elapsed_ms >= budget_ms or min(counts) >= max_reps)):
            break
    results.update({name: _summarise(times[name]) for name in live})
    return results


def _time_cuda_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    """CUDA-event timing with an L2 flush before each repetition (when triton is missing)."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(5, int(rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_gpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, warmup_ms, rep_ms)
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(float(median), float(p20), float(p80), -1)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float) -> Timing:
    return time_gpu(fn, warmup_ms, rep_ms) if device.type == "cuda" else time_cpu(fn, warmup_ms, rep_ms)


def rotation_count(bytes_per_input: int, device: torch.device, cap: int = 8) -> int:
    """How many distinct inputs to cycle through so that they do not all sit in cache:
    together at least twice the last-level cache (GPU L2; 64 MiB assumed on CPU)."""
    if device.type == "cuda":
        cache_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    else:
        cache_bytes = 64 * 2**20
    return int(min(cap, max(2, math.ceil(2 * cache_bytes / max(bytes_per_input, 1)))))


# -- memory -------------------------------------------------------------------------

def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


def saved_for_backward(run: Callable[[], object], parameters: Iterable[torch.Tensor]) -> dict:
    """Bytes that autograd keeps between forward and backward for ``run()``.

    Counts unique storages (a tensor saved twice, or a view of a saved tensor, counts
    once), with the storages of ``parameters`` reported apart. Returns the counts and
    the output of ``run`` (so the caller decides when the graph is freed).
    """
    param_keys = {_storage_key(p) for p in parameters}
    storages: dict[tuple[str, int], tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes:
            storages[key] = (nbytes, key in param_keys)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    activation = sum(n for n, is_param in storages.values() if not is_param)
    param = sum(n for n, is_param in storages.values() if is_param)
    return {"activation_bytes": activation, "param_bytes": param, "tensors": len(storages), "output": output}


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during one ``fn()`` above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    release_memory(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure_status(exc: BaseException) -> str:
    """The status recorded for a measurement that raised: "oom" or "error: <type>: <message>"."""
    return "oom" if is_out_of_memory(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"


# -- output -------------------------------------------------------------------------

def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def default_out_dir(device: torch.device, quick: bool) -> Path:
    """Full runs write to benchmarks/results/<device>/ (committed); --quick runs to the
    git-ignored benchmarks/results/local/<device>/ so they never overwrite committed results."""
    return (RESULTS_ROOT / "local" if quick else RESULTS_ROOT) / device_label(device)


class Deadline:
    """A wall-clock budget after which a benchmark stops starting new measurements."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")
