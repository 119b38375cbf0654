"""Autotune configurations per architecture, their pruning, and launch-shape heuristics.

Ampere (sm80/86/89) and Hopper (sm90+) get their own lists; the interpreter gets one
small config so the CPU tests stay fast. Configs are pruned by an estimate of shared
memory and accumulator registers, which grow with the padded rank ``R_PAD``: ranks
above 64 leave only the smaller tiles.

``LORA_FUSED_TRITON_AUTOTUNE=0`` restricts every autotuned kernel to one config, the first
its pruner keeps (the lists below are ordered best-first for their architecture), so a
cold GPU run compiles one config per kernel and key instead of benchmarking them all
(a smoke test in a short GPU slot). Read when a new autotune key is first pruned.
"""

from __future__ import annotations

import copy
import functools
import os

import torch
import triton

# Rows a split-M program owns are a multiple of this, so every BLOCK_M below divides them.
ROW_ALIGN_GPU = 128
ROW_ALIGN_INTERPRETER = 32
# Live 32-bit register values per thread (the estimates below) above which a config is taken to spill.
# Calibrated against ptxas -v on sm90 (tests/test_triton_gpu_kept_configs.py compiles every kept config).
MAX_ACCUMULATORS_PER_THREAD = 156
AUTOTUNE_ENV_VAR = "LORA_FUSED_TRITON_AUTOTUNE"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """False when ``LORA_FUSED_TRITON_AUTOTUNE=0``: every kernel then runs the first config its pruner keeps."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() != "0"


def padded_rank(rank: int) -> int:
    """``R_PAD = max(16, next_pow2(rank))``: tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(rank))


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two up to 8192, then one bucket per 8192 rows."""
    if m <= 8192:
        return triton.next_power_of_2(max(m, 1))
    return triton.cdiv(m, 8192) * 8192


def row_align() -> int:
    return ROW_ALIGN_INTERPRETER if interpreting() else ROW_ALIGN_GPU


def _cuda_capability() -> tuple[int, int]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return (8, 0)


def _tile(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


_GEMM_AMPERE = [
    _tile(128, 128, 32, 4, 4),
    _tile(128, 64, 32, 4, 4),
    _tile(64, 128, 32, 4, 4),
    _tile(64, 64, 64, 4, 4),
    _tile(128, 256, 32, 8, 3),
    _tile(128, 128, 64, 8, 3),
    _tile(64, 256, 32, 4, 4),
    _tile(32, 64, 64, 4, 5),
    _tile(32, 64, 32, 2, 5),
    _tile(32, 64, 32, 8, 3),  # R_PAD 256: the xa/gb tile and the rank operand spread over 8 warps
]

_GEMM_HOPPER = [
    _tile(128, 256, 64, 8, 3),
    _tile(256, 128, 64, 8, 3),
    _tile(128, 128, 64, 8, 4),
    _tile(128, 128, 64, 4, 4),
    _tile(64, 256, 64, 4, 4),
    _tile(128, 64, 64, 4, 4),
    _tile(64, 128, 64, 4, 4),
    _tile(64, 64, 64, 4, 4),
    _tile(32, 64, 64, 4, 5),
    _tile(32, 64, 64, 8, 3),  # R_PAD 256: the xa/gb tile and the rank operand spread over 8 warps
]


def gemm_configs() -> list[triton.Config]:
    """Tiles of the forward and dx kernels: BLOCK_M rows, BLOCK_N output columns, BLOCK_K reduction step."""
    if interpreting():
        return [_tile(32, 32, 32, 4, 1, group=2)]
    return _GEMM_HOPPER if _cuda_capability()[0] >= 9 else _GEMM_AMPERE


def gpass_configs() -> list[triton.Config]:
    """g-pass tiles: BLOCK_N is fixed by the launcher (it sizes the gb partial sums)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def lora_a_grad_configs() -> list[triton.Config]:
    """dA tiles: BLOCK_M rows per step (divides the split), BLOCK_K columns of x per program."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk in ((64, 64), (128, 64), (64, 128), (128, 128), (32, 128))
            for w, s in ((4, 3), (8, 3), (4, 4))] + [
        # R_PAD 256 with dropout: the only tile whose stages fit sm80 and whose registers do not spill.
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=3)]


def projection_configs() -> list[triton.Config]:
    """Thin-projection tiles (xa pre-pass, standalone gb): BLOCK_M rows, BLOCK_K reduction step, all R_PAD columns."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk in ((32, 128), (64, 64), (64, 128), (128, 64), (16, 256), (32, 32))
            for w, s in ((4, 3), (4, 4), (8, 3))]


def gpass_block_n(n: int, r_pad: int) -> int:
    """Output-column block of the g-pass (dB, db): wide unless the [BLOCK_N, R_PAD] accumulator gets large."""
    widest = 32 if interpreting() else (256 if r_pad <= 32 else 128 if r_pad <= 64 else 64)
    return max(16, min(widest, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=None)
def _device_limits(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return shared, props.multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a split-M reduction aims for: two waves of SMs (a handful when interpreting)."""
    if device.type != "cuda":
        return 8
    return 2 * _device_limits(device.index if device.index is not None else torch.cuda.current_device())[1]


def split_rows_for(m: int, other_blocks: int, programs: int) -> tuple[int, int]:
    """(splits, rows_per_split) of a deterministic split-M reduction aiming at ``programs`` programs in all."""
    align = row_align()
    wanted = max(1, triton.cdiv(programs, max(other_blocks, 1)))
    splits = max(1, min(wanted, triton.cdiv(m, align)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), align) * align
    return triton.cdiv(m, rows_per_split), rows_per_split


def split_rows(m: int, other_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows_per_split) for a deterministic split-M reduction with ``other_blocks`` column blocks."""
    return split_rows_for(m, other_blocks, target_programs(device))


def _fits(config: triton.Config, shared_bytes: int, budget: int, accumulators: int) -> bool:
    per_thread = accumulators / (config.num_warps * 32)
    return shared_bytes * config.num_stages <= budget and per_thread <= MAX_ACCUMULATORS_PER_THREAD


def _keep_some(configs, kept, footprint, stage_bytes, budget):
    if kept:
        return kept if autotune_enabled() else kept[:1]
    # Nothing fits (fp32 at large ranks): the smallest tile, with as few stages as its buffers need
    # to fit, since a lone config is launched without benchmarking and would fail with OutOfResources.
    smallest = copy.copy(min(configs, key=footprint))
    smallest.num_stages = max(1, min(smallest.num_stages, budget // max(stage_bytes(smallest), 1)))
    return [smallest]


def _shared_budget(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda":
        return 1 << 30
    return _device_limits(tensor.device.index)[0]


def _flag(name, named_args, kwargs):
    return bool(kwargs.get(name, named_args.get(name, False)))


def prune_gemm_configs(configs, named_args, **kwargs):
    """Forward/dx tiles: stage buffers of (x, W[, A or B]) tiles and the [BM, BN] + [BM, R_PAD] accumulators.

    The rank-sized operand is staged in the loop only when its product is accumulated there
    (not ``PRECOMPUTED_XA`` / ``PRECOMPUTED_GB``); the [BM, R_PAD] registers count either way
    (accumulator in the loop, or the loaded xa/gb tile in the epilogue beside the [BM, BN] one).
    """
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    rank_tile_in_loop = not (_flag("PRECOMPUTED_XA", named_args, kwargs) or _flag("PRECOMPUTED_GB", named_args, kwargs))
    tensor = named_args["w_ptr"]
    elt = tensor.element_size()
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (m * k + k * n + (k * r_pad if rank_tile_in_loop else 0)) * elt

    dropout = _flag("HAS_DROPOUT", named_args, kwargs)

    def accumulators(c):
        # [BM, BN] accumulator, [BM, R_PAD] xa/gb, the [R_PAD, BN] B/A tile of the LoRA term (loaded
        # through registers: one per 16-bit element), and with dropout one more [BM, BN] tile of hash
        # temporaries beside the LoRA term.
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return m * n * (2 if dropout else 1) + m * r_pad + r_pad * n * elt / 2

    kept = [c for c in configs if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(configs, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes, budget)


def prune_gpass_configs(configs, named_args, **kwargs):
    """g-pass tiles: [BM, BLOCK_N] of g plus [BM, R_PAD] of xa per stage; the [BLOCK_N, R_PAD] dB accumulator."""
    r_pad, block_n = kwargs["R_PAD"], kwargs["BLOCK_N"]
    tensor = named_args["g_ptr"]
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        return c.kwargs["BLOCK_M"] * (block_n * tensor.element_size() + r_pad * 4)

    def accumulators(c):
        # dB accumulator, the fp32 xa tile, and the g tile (summed in registers for db; sm80 spills without it).
        return (block_n + c.kwargs["BLOCK_M"]) * r_pad + c.kwargs["BLOCK_M"] * block_n * tensor.element_size() / 4

    kept = [c for c in configs if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(configs, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes, budget)


def prune_lora_a_grad_configs(configs, named_args, **kwargs):
    """dA tiles: [BM, BK] of x plus [BM, R_PAD] of gb per stage; [R_PAD, BK] accumulators."""
    r_pad = kwargs["R_PAD"]
    tensor = named_args["x_ptr"]
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        return c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_K"] * tensor.element_size() + r_pad * 4)

    dropout = _flag("HAS_DROPOUT", named_args, kwargs)

    def accumulators(c):
        # [R_PAD, BK] accumulator; with dropout the hashed x tile and two tiles of hash temporaries.
        hashed = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] * (2 + tensor.element_size() / 4) if dropout else 0
        return r_pad * c.kwargs["BLOCK_K"] + hashed

    kept = [c for c in configs if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(configs, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes, budget)


def prune_projection_configs(configs, named_args, **kwargs):
    """Thin-projection tiles: [BM, BK] of the input plus [BK, R_PAD] of the thin matrix per stage; [BM, R_PAD] accumulators."""
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    tensor = named_args["in_ptr"]
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        return (c.kwargs["BLOCK_M"] + r_pad) * c.kwargs["BLOCK_K"] * tensor.element_size()

    dropout = _flag("HAS_DROPOUT", named_args, kwargs)

    def accumulators(c):
        # [BM, R_PAD] accumulator, the [BK, R_PAD] operand (two registers per element: sm80 spills at
        # R_PAD 256 otherwise) and, with dropout, the hashed tile and three tiles of hash temporaries.
        m, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        hashed = m * k * (3 + tensor.element_size() / 4) if dropout else 0
        return m * r_pad + k * r_pad * tensor.element_size() + hashed

    kept = [c for c in configs if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(configs, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes, budget)
