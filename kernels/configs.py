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


def _tile(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


# Forward tiles. The walk over a row block's column blocks keeps xa and the x tile's addresses live across
# it: 128×256×32 and 128×128×64 with 8 warps spill on sm80 (ptxas -v, 64-212 B) and are not listed.
_GEMM_AMPERE = [
    _tile(128, 128, 32, 4, 4),
    _tile(128, 64, 32, 4, 4),
    _tile(64, 128, 32, 4, 4),
    _tile(64, 64, 64, 4, 4),
    _tile(64, 256, 32, 4, 4),
    _tile(32, 64, 64, 4, 5),
    _tile(32, 64, 32, 2, 5),
    _tile(32, 64, 32, 8, 3),  # R_PAD 256: the xa/gb tile and the rank operand spread over 8 warps
]

_GEMM_HOPPER = [
    _tile(128, 256, 64, 8, 3),
    _tile(128, 128, 64, 8, 4),
    _tile(128, 128, 64, 4, 4),
    _tile(64, 256, 64, 4, 4),
    _tile(128, 64, 64, 4, 4),
    _tile(64, 128, 64, 4, 4),
    _tile(64, 64, 64, 4, 4),
    _tile(32, 64, 64, 4, 5),
    _tile(32, 64, 64, 8, 3),  # R_PAD 256: the xa/gb tile and the rank operand spread over 8 warps
]


# The one-pass backward holds more state than a GEMM (one N loop feeding g·W and gb = g·B from the same g
# tile, the dA accumulator across its row loop, gb and A for the LoRA term, the dB step): these lists keep
# the tiles that ptxas -v compiles without spills in every variant (ranks 4/16/64/256, ± dropout, ± dx;
# tests/test_triton_gpu_kept_configs.py), at most 3 stages. Wide tiles serve only the variant without dx
# (the pruner drops them with dx); the dx variants run 128×64/8w or 64×64 on sm90, 32×64/8w on sm80,
# 32×16 at R_PAD 256. 128-wide dx tiles spill 112-1100 B with the merged loop (ptxas -v, r = 16),
# mostly address state of the g, W and B tiles; not kept, since no spill report says where the spill
# lands (inside the N loop it would cost every step) and no GPU run has measured it (issue 10, B2).
# Tensor descriptors (issue 10 open item (b), tried 2026-12-02, not adopted): with g, W and padded B read
# through tl.make_tensor_descriptor in the N loop (TMA on sm90; triton 3.8, bf16, ptxas -v, r = 4 and 16,
# the loop still pipelined), 64×128/4w compiles in 220-222 registers without spills at p = 0 but spills
# 184 B with dropout, 128×128/8w spills 24-60 B, 128×256/8w 3-4 KB, and 128×64/8w drops from 203-210 to
# 182-205 registers. No 128-wide dx tile is spill-free in every variant, so the descriptors would buy only
# the p = 0 variant's 64×128/4w, at the price of a second load path (TMA needs 16-byte-aligned row
# strides, a device-side allocator for the descriptors, an interpreter fallback); not kept.
_BACKWARD_AMPERE = [
    _tile(128, 256, 32, 8, 3),
    _tile(128, 128, 32, 4, 3),
    _tile(64, 256, 32, 4, 3),
    _tile(64, 128, 32, 4, 3),
    # dx with fused gb: 64×64/4w spills 40-430 B, 32×64×32 with 2 or 4 warps 28-720 B (triton 3.6 or 3.8), and
    # with 8 warps ptxas 12.9 caps the variant without dx at 64 registers (8 B spill).
    _tile(32, 64, 64, 8, 3),
    _tile(32, 16, 32, 8, 3),  # R_PAD 256 (BLOCK_K 64 spills 12-36 B under triton 3.6 with the x tile issued early)
]
_BACKWARD_HOPPER = [
    _tile(128, 256, 64, 8, 3),
    _tile(128, 128, 64, 4, 3),
    _tile(64, 256, 64, 4, 3),
    _tile(128, 64, 64, 8, 3),  # dx with fused gb: the widest wgmma tile (M 128) ptxas keeps spill-free
    _tile(64, 64, 64, 4, 3),
    _tile(32, 64, 64, 8, 3),
    _tile(32, 16, 64, 8, 2),  # R_PAD 256 (3 stages spill 20 B under triton 3.6's ptxas)
]


def backward_configs() -> list[triton.Config]:
    """Tiles of the one-pass backward: BLOCK_M rows, BLOCK_N dx/dA columns, BLOCK_K step over N (and dB tile)."""
    if interpreting():
        return [_tile(32, 32, 32, 4, 1)]
    return _BACKWARD_HOPPER if _cuda_capability()[0] >= 9 else _BACKWARD_AMPERE


def gemm_configs() -> list[triton.Config]:
    """Tiles of the forward kernel: BLOCK_M rows, BLOCK_N output columns, BLOCK_K reduction step."""
    if interpreting():
        return [_tile(32, 32, 32, 4, 1)]
    return _GEMM_HOPPER if _cuda_capability()[0] >= 9 else _GEMM_AMPERE


def projection_configs() -> list[triton.Config]:
    """Thin-projection tiles (xa pre-pass, standalone gb): BLOCK_M rows, BLOCK_K reduction step, all R_PAD columns."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk in ((32, 128), (64, 64), (64, 128), (128, 64), (16, 256), (32, 32))
            for w, s in ((4, 3), (4, 4), (8, 3))]


@functools.lru_cache(maxsize=None)
def _device_limits(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return shared, props.multi_processor_count


INTERPRETER_MULTIPROCESSORS = 4


def multiprocessors(device: torch.device) -> int:
    """The programs of one wave: the GPU's SM count (a handful when interpreting)."""
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())[1]


@functools.lru_cache(maxsize=4096)
def blocks_per_program(lines: int, blocks: int, sms: int, per_program: float = 0.0) -> int:
    """How many of each line's ``blocks`` one program walks (1..blocks) so that the grid finishes soonest.

    The grid has ``lines · cdiv(blocks, b)`` programs, which run in ``cdiv(programs, sms)`` rounds of
    ``b + per_program`` block-times each (``per_program``: work a program does once whatever b, in
    block-times). Wave quantisation makes several b equally fast; the largest wins (least repeated
    per-program work, fewest partial sums).
    """
    best, best_time = 1, None
    for b in range(1, min(blocks, 512) + 1):
        time = triton.cdiv(lines * triton.cdiv(blocks, b), sms) * (b + per_program)
        if best_time is None or time <= best_time:
            best, best_time = b, time
    return best


def forward_columns_per_program(m: int, n: int, block_m: int, block_n: int, r_pad: int, sms: int) -> int:
    """Output column blocks one forward program walks with one xa (computed once per program: an extra
    ``R_PAD/BLOCK_N`` of a tile's MMA work). All of its row block's when M fills the GPU; at small M
    the row block's columns are split so the grid still fills the SMs."""
    return blocks_per_program(triton.cdiv(max(m, 1), block_m), triton.cdiv(max(n, 1), block_n), sms,
                              r_pad / block_n)


def backward_row_groups(m: int, col_blocks: int, sms: int) -> tuple[int, int]:
    """(groups, rows_per_group) of the one-pass backward, whose grid is groups × ``col_blocks`` programs.

    Every group writes one set of dA/dB/db partials, so groups are as few as the SMs allow, and
    at most ``2·sms / col_blocks`` (two rounds of programs): a round saved by more groups is not
    worth partials that grow with every group (issue 10 B4: 67-128 groups at lin2, partials
    ~50 % of the backward's bytes). ``rows_per_group`` is a multiple of :func:`row_align`;
    tiles whose BLOCK_M does not divide it are pruned.
    """
    align = row_align()
    row_blocks = triton.cdiv(max(m, 1), align)
    col_blocks = max(col_blocks, 1)
    blocks = blocks_per_program(col_blocks, row_blocks, sms)
    max_groups = max(1, 2 * sms // col_blocks)
    rows_per_group = align * max(blocks, triton.cdiv(row_blocks, max_groups))
    return triton.cdiv(m, rows_per_group), rows_per_group


# Rows per dB/db step of the backward (see backward_db_rows): the interpreter's is two of its 32-row blocks, so the
# CPU tests run the read-modify-write of the partials over several chunks and a partial last one.
DB_ROWS_INTERPRETER = 64
DB_ROWS_MIN, DB_ROWS_MAX = 128, 1024
# The dB step reads its chunk of g back from L2 (kernels/backward.py, "dB/db"). Assumption: the chunks of g of the
# row groups in flight plus their fp32 partial slices may take a quarter of L2; the rest streams W, x, A, B and the
# dx stores, and on H100/H200 L2 is two partitions (a line in the far one is a slower hit, and may be held twice).
DB_CHUNK_L2_SHARE = 4
# L2 bytes by compute capability (data sheets), for a device whose properties do not report it: A100 40 MB,
# H100/H200 50 MB. Anything else: 4 MiB, below every datacenter GPU since sm80, so the cap errs towards small chunks.
L2_BYTES_BY_CAPABILITY = {(8, 0): 40 << 20, (9, 0): 50 << 20}
L2_BYTES_UNKNOWN = 4 << 20


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size in bytes (0 off a GPU: no cap on the dB chunk)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    reported = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0)
    return reported or L2_BYTES_BY_CAPABILITY.get(torch.cuda.get_device_capability(index), L2_BYTES_UNKNOWN)


def backward_db_rows(r_pad: int, block_m: int, n: int = 0, element_size: int = 2, groups_in_flight: int = 1,
                     l2: int = 0) -> int:
    """Rows of g per dB/db step of the backward: a multiple of ``block_m`` (the kernel's static_assert).

    Each step read-modify-writes a group's fp32 dB partial slices ([N, R_PAD] per group): L2
    traffic of ``8·R_PAD/DB_ROWS`` bytes per element of g, i.e. ``4·R_PAD/DB_ROWS`` of |g| in
    fp16/bf16, so on a GPU a chunk is ``clamp(8·R_PAD, 128, 1024)`` rows: 1/2 |g| at R_PAD ≤ 128,
    |g| at R_PAD 256 (kernels/backward.py, "dB/db"). The step reads the chunk's g rows back from L2,
    so with ``l2`` bytes of it (0: no cap) the chunk is halved until the chunks of the
    ``groups_in_flight`` groups plus their partial slices fit in ``l2 / DB_CHUNK_L2_SHARE``::

        groups_in_flight · (DB_ROWS·N·element_size + N·(R_PAD + 1)·4) ≤ l2 / DB_CHUNK_L2_SHARE

    but not below ``block_m`` (one row block per step: the cap then cannot hold, the RMW traffic is
    ``4·R_PAD/BLOCK_M`` of |g|). Last, rounded down to a multiple of ``block_m``.
    """
    rows = DB_ROWS_INTERPRETER if interpreting() else min(max(8 * r_pad, DB_ROWS_MIN), DB_ROWS_MAX)
    if l2 and n:
        share = l2 // DB_CHUNK_L2_SHARE // max(groups_in_flight, 1) - n * (r_pad + 1) * 4
        while rows > block_m and rows * n * element_size > share:
            rows //= 2
    return max(block_m, rows // block_m * block_m)


def backward_db_rows_of_launch(args: dict) -> int:
    """:func:`backward_db_rows` for a launch of the backward kernel (its arguments and config).

    Groups in flight: ``min(groups, SMs // column blocks)``, one CTA per SM (the kept tiles' shared
    memory and registers) and the grid row-group-major, so the programs of a group run together.
    """
    g = args["g_ptr"]
    col_blocks = max(triton.cdiv(args["K"], args["BLOCK_N"]), 1)
    groups = triton.cdiv(max(args["M"], 1), args["rows_per_group"])
    in_flight = min(groups, max(1, multiprocessors(g.device) // col_blocks))
    return backward_db_rows(args["R_PAD"], args["BLOCK_M"], args["N"], g.element_size(), in_flight, l2_bytes(g.device))


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
    """Forward tiles: stage buffers of (x, W[, A]) tiles and the [BM, BN] + [BM, R_PAD] accumulators.

    A's tile is staged in the loop only when xa is accumulated there (not ``PRECOMPUTED_XA``);
    the [BM, R_PAD] registers count either way (accumulator in the loop, or the loaded xa tile
    held beside the [BM, BN] one).
    """
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    rank_tile_in_loop = not _flag("PRECOMPUTED_XA", named_args, kwargs)
    tensor = named_args["w_ptr"]
    elt = tensor.element_size()
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (m * k + k * n + (k * r_pad if rank_tile_in_loop else 0)) * elt

    def accumulators(c):
        # [BM, BN] accumulator, [BM, R_PAD] xa, the [R_PAD, BN] tile of B of the LoRA term (loaded
        # through registers: one per 16-bit element). The forward never hashes (the pre-pass does).
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return m * n + m * r_pad + r_pad * n * elt / 2

    kept = [c for c in configs if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(configs, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes, budget)


def prune_backward_configs(configs, named_args, **kwargs):
    """One-pass backward tiles.

    Shared memory: the wider of its two loops' stages — the N loop ([BM, BK] of g, [BK, BN] of W
    with dx, [BK, R_PAD] of B with fused gb: one g tile for both products) and the dB step
    ([BM, BK] of g + the fp32 [R_PAD, BM] xa tile; not pipelined, so counted per stage as an
    upper bound). Registers: the [BM, BN] dx accumulator (with dropout a second [BM, BN]
    of hash temporaries), the x tile beside it in the epilogue, gb [BM, R_PAD], the dA accumulator
    [R_PAD, BN] that lives across the row loop and the [R_PAD, BN] tile of A. A tile whose BLOCK_M
    does not divide ``rows_per_group`` is dropped (its row loop would overrun into masked rows).
    """
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD"))
    gb_loop = not _flag("PRECOMPUTED_GB", named_args, kwargs)
    dx = kwargs.get("COMPUTE_DX", named_args.get("dx_ptr") is not None)
    dropout = _flag("HAS_DROPOUT", named_args, kwargs)
    rows_per_group = named_args.get("rows_per_group", kwargs.get("rows_per_group"))
    tensor = named_args["g_ptr"]
    elt = tensor.element_size()
    budget = _shared_budget(tensor)

    def stage_bytes(c):
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        # The N loop stages g and, as computed, W and/or B; the dB step g and the fp32 xa tile.
        n_loop = (m * k + (k * n if dx else 0) + (k * r_pad if gb_loop else 0)) * elt
        return max(n_loop, m * k * elt + r_pad * m * 4)

    def accumulators(c):
        # With dx and fused gb, the one N loop holds the dx accumulator, gb and the address state of three
        # operands: one more [BM, BN] (calibrated on ptxas -v: 64×128/4w spills 164-348 B on sm90 and
        # 192-256 B on sm80 at r = 16, 128×64/8w compiles without spills on sm90).
        # Without dx, dropout counts two [BM, BN] of hash temporaries (calibrated: sm80 64×128/4w spills 48-60 B
        # at r = 4 and 16 around the dB step's call, ptxas -v). This drops, with dropout and without dx, sm80's
        # 64×128/4w at every rank and sm90's 64×64/4w at R_PAD 64 (which compiled without spills); both still
        # serve the variants without dropout.
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        hash_tiles = (1 if dx else 2) if dropout else 0
        tile = m * n * ((1 if dx else 0) + (1 if dx and gb_loop else 0) + hash_tiles + elt / 4)
        return tile + m * r_pad + r_pad * n * (1 + elt / 2)

    divisible = [c for c in configs if not rows_per_group or rows_per_group % c.kwargs["BLOCK_M"] == 0] or configs
    if gb_loop:
        # The R_PAD 256 tile (BLOCK_N 16) is for the precomputed gb: with the fused gb loop and dropout it spills
        # 28-52 B on sm90 (ptxas -v, r = 4 and 16), and wider tiles fit there anyway.
        divisible = [c for c in divisible if c.kwargs["BLOCK_N"] >= 32] or divisible
    kept = [c for c in divisible if _fits(c, stage_bytes(c), budget, accumulators(c))]
    return _keep_some(divisible, kept, lambda c: stage_bytes(c) * c.num_stages + accumulators(c), stage_bytes,
                      budget)


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
