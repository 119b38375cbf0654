"""Backward: one pass over g and x for dx, dA, dB and db, then one fixed-order reduction.

Given ``g = dL/dy [M, N]`` and the saved ``x``, ``xa`` (fp32) and seed, with ``s' = s/(1-p)``::

    dx = g·W + s'·(round(gb)·A) ⊙ mask        gb = g·B
    dA = s'·round(gb)ᵀ·(x ⊙ mask)             dB = s·gᵀ·round(xa)        db = Σ_rows g

Launches (``kernels/plan.py`` lists them with their bytes; benchmarks/cost_model.py prices them):

1. (only when R is not a multiple of 16 and gb is fused) :func:`_pad_rank_kernel` copies B
   [N, R] into a zero-padded [N, R_PAD] buffer: a rank-contiguous row of r < 16 elements is
   not 16-byte aligned, and a load masked by ``rank < R`` cannot be copied asynchronously, so
   the gb loop would wait for every tile (issue 10). N·R_PAD elements, a few hundred KB.
   (R_PAD > 64 instead: the thin projection kernel computes gb [M, R_PAD] once, see below.)
2. :func:`lora_backward_kernel`, grid (row group) × (column block of K), row-group-major
   so that the programs of one row group (which read the same g and x rows) run together.
   A row group is ``rows_per_group`` rows (a multiple of every kept BLOCK_M), chosen by
   :func:`~.configs.backward_row_groups` for the dx tile's BLOCK_N (64; 128 without dx,
   :func:`~.plan.backward_column_block`): as few groups (sets of partials) as fill the SMs
   in the fewest rounds, at most 2·SMs / column blocks. Each program:

   - for each of its group's row blocks: issues the ``x`` tile's load first (DRAM latency hidden
     behind the N loop); ONE loop over N streams the row block's g tiles once and feeds each to
     both ``acc += g·W`` and ``gb += g·B`` (B's tile ``[BLOCK_K, R_PAD]``); rounds gb to the input
     dtype; hashes the dropout mask of its ``[BLOCK_M, BLOCK_N]`` tile ONCE and uses it twice:
     ``dA += round(gb)ᵀ·(x ⊙ mask)`` in registers across the row blocks, and the LoRA term
     ``s'·(round(gb)·A) ⊙ mask`` added to the fp32 dx accumulator after the loop (the reference's
     rounding order: gb rounded unscaled, s' on the fp32 product, one rounding of dx); stores dx;
   - after the row block that closes a chunk of ``DB_ROWS`` rows (or the group): dB/db for the N
     tiles ``t ≡ pid_k (mod column blocks)`` of width BLOCK_K — so the tiles of a group are
     divided evenly among its programs and each (group, tile) partial has one owner —
     ``dBᵀ_t += round(xa)ᵀ·g[chunk rows, t]`` and ``db_t += Σ g[chunk rows, t]``, a
     read-modify-write of the group's partial slice (the group's first chunk only stores: the
     partials are poisoned), then ``tl.debug_barrier()`` (see "dB/db" below);
   - stores its dA partial ``[R_PAD, BLOCK_N]`` for the group (one per group and column block).

   DRAM traffic: g, x, W, A, B, xa once each (g's re-reads by the column blocks of a row block
   and by the dB steps hit L2, see "dB/db"), dx once, and partials of
   ``groups·(N·R_PAD + R_PAD·K + N)`` fp32. Work beyond the GEMM: gb is recomputed by every
   column block (an extra ``R_PAD/BLOCK_N`` of the dx MMA work), dA and dB once. With
   ``compute_dx`` off the same kernel skips W and A: its N loop is the thin gb product.
3. :func:`_reduce_partials_kernel`: one launch whose 1-D grid covers the elements of dA,
   dB and db in turn; each element sums its groups' partials in group order 0, 1, ... and
   applies s (dB) or s' (dA). No atomics: the same inputs give bit-identical gradients for
   a given autotuned config and device. A 1-D grid stays below CUDA's 2**31-1 programs on
   axis 0 at any K (the v1 reduction's axis 1 overflowed past K = 4.19M).

dB/db (issue 10 B7): g is read from DRAM once. A chunk's dB step reads the chunk's g rows, which
the programs of the group have just streamed through their N loops, back from L2: at most
``DB_ROWS`` rows of g per row group in flight since its previous step (``DB_ROWS·N·elt``: 128
rows × 2304 × 2 B = 0.6 MB at ViT-B qkv, r ≤ 16; the 11-22 groups in flight on an H100 hold
6.5-13 MB of its 50 MB). The plan before this one ran dB after the whole row loop, when a
group's 745 rows of g — 75 MB over 22 groups — had left L2: g was read from DRAM twice. The
price is L2 traffic: each step reads and writes the group's fp32 partial slices, in all
``4·R_PAD/DB_ROWS`` of |g| (fp16/bf16); :func:`~.configs.backward_db_rows` makes a chunk
``clamp(8·R_PAD, 128, 1024)`` rows: 1/2 |g| at R_PAD ≤ 128, |g| at 256 — through L2, where
the old plan read |g| from DRAM. The partial slices (``N·R_PAD·4`` bytes per group, 147 KB at
qkv, r ≤ 16) stay in L2. So that the chunk is still there, the chunk is halved (down to one row
block, a multiple of BLOCK_M: static_assert) until the chunks and slices of the groups in flight
take at most a quarter of the GPU's L2 (:data:`~.configs.DB_CHUNK_L2_SHARE`); at wide N and
R_PAD ≥ 64 (fc1 r = 64, LLM MLPs) that is one row block per step, the RMW traffic then
``4·R_PAD/BLOCK_M`` of |g|.

Order: a slice has one owner program, which adds its chunks in row order (deterministic). The
next chunk's load of a slice may run on other threads than the store before it (the compiler
picks each access's layout) and Triton orders global memory only within a thread, so a
``tl.debug_barrier()`` (CTA barrier, which makes the block's global writes visible to the
block) follows each dB step.

Registers and latency: the dB step is a function call (``noinline``), its loop over the chunk's
row blocks not software-pipelined. Inlined into the row loop it raised the kernel's registers by
40-80 though it holds one [R_PAD, BLOCK_K] accumulator (ptxas -v: sm80 32×64/8w with dropout
174 → 255 registers and 12 B spilled, sm90 R_PAD 64 spilling 12-68 B; neither the barrier, the
partial's load nor the dot alone explained it); as a call ptxas allocates it apart (no stack
frame, no spill in any kept variant). Pipelined, it spills even as a call (sm90 R_PAD 64: 28-80 B).
Known risk (unmeasured; second reading of issue 10, B1-B3, from the PTX, no GPU): the step is
latency-bound and may cost more than the second DRAM read of g it replaces. Per owned tile and step
the PTX serialises the partial slice's load, a layout convert (``bar.sync``), the db slice's load
(``bar.sync``), and only then the xa/g loads (ptxas cannot hoist loads above a ``bar.sync``): at
least 2 dependent L2 round trips per tile, plus one per further row block of the chunk (the loop is
not pipelined) — 6 or more per 128-row block at ViT-B qkv on sm90, 15 or more per 128 rows on sm80
(32-row tiles, 4 blocks a chunk), not 3. Estimates at ViT-B qkv, r ≤ 16, M = 16384, bf16: H100/H200
(128×64×64/8w, 3 owned tiles, L2 hit 300-550 cycles) 1.4-1.9 k cycles per tile, 2.2-3.0 µs per row
block against its N loop's 6.3 µs at peak (9-11 µs realistic), ≈ 26-36 µs per SM over the 12 steps,
against the old tail loop's |g|/BW of 22 µs (H100) and 16 µs (H200); A100 (32×64×64/8w) ≈ 85-120 µs
against 37 µs. At R_PAD 32-256 a chunk is 2-32 unpipelined row blocks (the L2 cap above shortens it
at wide N). The cheapest fix — the slices' loads issued before the chunk's g/xa loads and added after
the product, xa loaded once per step when DB_ROWS == BLOCK_M — was tried and not kept: it spills
on sm80 (ptxas -v, triton 3.8: the 128×256×32/8w variant without dx or dropout at r = 16, 96 B),
and its first half alone (xa not hoisted) on sm90 at R_PAD 256 with dx under triton 3.6 (132-156 B;
both on branch triton5-wip). The GPU check must measure it: the backward at ViT-B qkv, fc1 and fc2 shapes,
M = 16384, r ∈ {8, 16, 64, 256}, bf16 on H100/H200 (and A100 when drawn), this plan A/B against the
tail-loop plan at commit 7cdeb53 (dB after the row loop, g read from DRAM twice); if the tail loop
wins, put both under the autotuner (a config flag) rather than pick one. Other knobs:
:func:`~.configs.backward_db_rows` and a prefetch of the next owned tile's g and slice.
Rejected: the dB product inside the N loop on the g tile the program holds (predicated on
ownership) puts a conditional read-modify-write in the main loop, which then no longer
pipelines; dB of the owned tiles in registers across the row loop needs N/col_blocks
accumulator tiles (a count that varies with the shape) beside the dx tile.

R_PAD > 64 (ranks 65..256): a [BLOCK_M, R_PAD] gb accumulator beside the dx tile does not
fit, so :func:`~.projection.thin_projection_kernel` computes gb [M, R_PAD] first (g read
once more) and this kernel loads it (``PRECOMPUTED_GB``); 3 launches.

Registers: the N loop holds the [BLOCK_M, BLOCK_N] dx accumulator, the [BLOCK_M, R_PAD] gb
accumulator and the address state of the g, W and B tiles, beside the dA accumulator and the
early x tile. ptxas -v (triton 3.8, r = 16): on sm90 128×64/8w compiles in 200-214 registers
without spills (R_PAD 64: 255, no spill), 64×128/4w spills 164-348 B and 128×128/8w 324-492 B;
on sm80 only 32×64/8w is spill-free on both stacks (64×64/4w spills 40-430 B). The config lists
(:data:`~.configs._BACKWARD_HOPPER`, ``_AMPERE``) keep what compiles without spills in every
variant (tests/test_triton_gpu_kept_configs.py); wider dx tiles need the address state gone
(tensor descriptors, issue 10 B2) and a GPU measurement.

Open (sm90, the ptxas 12.9 bundled with triton 3.8): ptxas reports C7514, "wgmma.mma_async instructions
are serialized due to non wgmma instructions reading accumulator registers", for this kernel
with and without dx (the forward kernel does not get it). tests/test_triton_gpu_kept_configs.py
prints it per variant. Speed only; a GPU run decides.

Dropout: the mask of a [BLOCK_M, BLOCK_N] tile is :func:`~.dropout.dropout_keep` of one first
index per row (``row·K`` + the tile's first column) plus the in-tile column: the key mix is
hoisted to two per row and tile (one per launch when every index is below 2**32), the
per-element work uint32. (The projection passes ``row·K`` and the column instead; each form
is the one ptxas compiles without spills in every kept variant of its kernel.)

Nothing of size M×N is allocated besides dx; nothing with M rows besides dx and, at
R_PAD > 64, gb.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_fused.debug import poison_
from lora_fused.dropout import dropout_scale, dropout_threshold

from .common import (accumulate_product, accumulate_product_and_thin, cast_to, device_guard, dot_operand, input_precision, interpreted_bf16,
                     rank_product)
from .configs import backward_configs, backward_db_rows_of_launch, backward_row_groups, m_bucket, multiprocessors, padded_rank, prune_backward_configs
from .dropout import dropout_keep, index_below_2_32, seed_as_int32
from .plan import backward_column_block, backward_fuses_gb, backward_pads_b
from .projection import project_rows


@triton.jit
def _lora_term(acc, gb_rounded, a_ptr, ranks, cols, rank_ok, col_ok, stride_ar, stride_ak, lora_scale, keep,
               HAS_DROPOUT: tl.constexpr, INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # acc + s'·(round(gb)·A[:, cols]) ⊙ keep, the product in fp32, s' and the mask on it.
    a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols.to(tl.int64)[None, :] * stride_ak,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    lora = tl.dot(gb_rounded, dot_operand(a, INTERPRETED_BF16), input_precision=INPUT_PRECISION) * lora_scale
    if HAS_DROPOUT:
        lora = lora * keep.to(tl.float32)
    return acc + lora


# Not inlined: inside the row loop it costs the kernel 40-80 registers (spills), as a call none (module docstring).
@triton.jit(noinline=True)
def _add_dB_of_rows(g_ptr, xa_ptr, dB_partial_ptr, db_partial_ptr, group, first_tile, tile_step, N, chunk_start,
                    chunk_end, accumulate, R, stride_gm, stride_gn, stride_xam, stride_xar, input_dtype: tl.constexpr,
                    R_PAD: tl.constexpr, COMPUTE_DB: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # For the N tiles first_tile, first_tile + tile_step, ... (width BLOCK_K): the group's partials
    # dBᵀ[:, t] (+)= round(xa[rows])ᵀ·g[rows, t] and db[t] (+)= Σ_rows g[rows, t] over rows [chunk_start, chunk_end).
    # ``accumulate`` false (the group's first chunk): the partial is not read (it is poisoned), only stored.
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    rank_ok = ranks < R
    for n0 in range(first_tile, N, tile_step):
        outs = n0 + steps
        out_ok = outs < N
        group_outs = group.to(tl.int64) * N + outs
        dB_ptrs = dB_partial_ptr + group_outs[None, :] * R_PAD + ranks[:, None]
        dBt = tl.load(dB_ptrs, mask=out_ok[None, :] & accumulate, other=0.0)
        if COMPUTE_DB:
            db = tl.load(db_partial_ptr + group_outs, mask=out_ok & accumulate, other=0.0)
        # Not software-pipelined (num_stages=1): pipelined it spills. Its tiles are L2 hits, but each row block of a
        # chunk (1 at sm90's 128-row tiles and r <= 16, 2-32 elsewhere) waits a round trip: the known risk in the
        # module docstring ("Registers and latency"), for the GPU check to measure.
        for m0 in tl.range(chunk_start, chunk_end, BLOCK_M, num_stages=1):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            row_ok = rows < chunk_end
            xa = tl.load(xa_ptr + ranks[:, None] * stride_xar + rows[None, :] * stride_xam,
                         mask=rank_ok[:, None] & row_ok[None, :], other=0.0)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + outs[None, :] * stride_gn,
                        mask=row_ok[:, None] & out_ok[None, :], other=0.0)
            dBt = tl.dot(dot_operand(cast_to(xa, input_dtype, INTERPRETED_BF16), INTERPRETED_BF16),
                         dot_operand(g, INTERPRETED_BF16), dBt, input_precision=INPUT_PRECISION)
            if COMPUTE_DB:
                db += tl.sum(g.to(tl.float32), axis=0)
        tl.store(dB_ptrs, dBt, mask=out_ok[None, :])
        if COMPUTE_DB:
            tl.store(db_partial_ptr + group_outs, db, mask=out_ok)


@triton.heuristics({"HAS_DROPOUT": lambda args: args["dropout_threshold"] > 0,
                    "INDEX_BELOW_2_32": lambda args: index_below_2_32(args["M"], args["K"]),
                    "COMPUTE_DX": lambda args: args["dx_ptr"] is not None,
                    "COMPUTE_DB": lambda args: args["db_partial_ptr"] is not None,
                    "PRECOMPUTED_GB": lambda args: args["gb_ptr"] is not None})
@triton.autotune(
    configs=backward_configs(),
    # Everything that changes the best tile: sizes, rank (R_PAD and R % 16, via R), which products run, the
    # dot precision, and the index width of the dropout hash (and, added by the autotuner itself, every
    # tensor's dtype). Not rows_per_group: it takes several values within one M_BUCKET (each would re-tune and
    # miss the shipped tuned/*.json entries), and on a GPU every BLOCK_M divides it (a multiple of 128), so
    # neither pruning nor the best tile's ranking hinges on it beyond what M_BUCKET says.
    key=["N", "K", "R", "R_PAD", "M_BUCKET", "HAS_DROPOUT", "INDEX_BELOW_2_32", "COMPUTE_DX",
         "COMPUTE_DB", "PRECOMPUTED_GB", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_backward_configs},
    cache_results=True,  # best configs persist in the Triton cache directory across processes
)
# Under the autotuner, so that each config's BLOCK_M (and BLOCK_N) reaches it: DB_ROWS is a multiple of BLOCK_M.
@triton.heuristics({"DB_ROWS": lambda args: backward_db_rows_of_launch(args)})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "rows_per_group", "seed", "dropout_threshold"])
def lora_backward_kernel(
    g_ptr, x_ptr, w_ptr, a_ptr, b_ptr, xa_ptr, gb_ptr, dx_ptr, dA_partial_ptr, dB_partial_ptr, db_partial_ptr,
    M, N, K, R, M_BUCKET, rows_per_group,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_dxm, stride_dxk,
    lora_scale, seed, dropout_threshold,
    R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, INDEX_BELOW_2_32: tl.constexpr, COMPUTE_DX: tl.constexpr,
    COMPUTE_DB: tl.constexpr, PRECOMPUTED_GB: tl.constexpr, DB_ROWS: tl.constexpr,
    INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_N spans columns of dx / dA (K); BLOCK_K steps through N (the g·W and g·B reductions, dB's tiles).
    # A dB step fires when a row block ends on a chunk boundary: with BLOCK_M not dividing DB_ROWS a group's first
    # chunk would never be stored and later ones would add onto the poisoned partial (review of issue 10, A1).
    tl.static_assert(DB_ROWS % BLOCK_M == 0, "DB_ROWS must be a multiple of BLOCK_M (configs.backward_db_rows)")
    pid = tl.program_id(0)
    col_blocks = tl.maximum(tl.cdiv(K, BLOCK_N), 1)  # K = 0 still needs programs for dB and db
    group = pid // col_blocks
    pid_k = pid % col_blocks
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    steps = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rank_ok = ranks < R
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    input_dtype = x_ptr.dtype.element_ty

    dA = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < row_end
        tile_ok = row_ok[:, None] & col_ok[None, :]
        # The x tile (DRAM) is issued before the N loop so its latency hides behind it (consumed by dA after).
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_ok, other=0.0)
        g_ptrs = g_ptr + rows[:, None] * stride_gm + steps[None, :] * stride_gn
        if COMPUTE_DX:
            w_ptrs = w_ptr + steps.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PRECOMPUTED_GB:
            gb = tl.load(gb_ptr + rows[:, None] * R_PAD + ranks[None, :], mask=row_ok[:, None], other=0.0)
        else:
            # B is padded to R_PAD columns in memory (or R is R_PAD): no rank mask on its loads.
            b_ptrs = b_ptr + steps.to(tl.int64)[:, None] * stride_bn + ranks[None, :] * stride_br
            if COMPUTE_DX:
                # One pass over g: each g tile feeds both g·W and gb = g·B.
                acc, gb = accumulate_product_and_thin(acc, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), g_ptrs,
                                                      w_ptrs, b_ptrs, BLOCK_K * stride_gn, BLOCK_K * stride_wn,
                                                      BLOCK_K * stride_bn, N, row_ok, col_ok, BLOCK_K,
                                                      INTERPRETED_BF16, INPUT_PRECISION)
                # Padding ranks exactly zero (an inf in g would make them inf·0 = NaN).
                gb = tl.where(rank_ok[None, :], gb, 0.0)
            else:
                gb = rank_product(g_ptrs, b_ptrs, BLOCK_K * stride_gn, BLOCK_K * stride_bn, N, row_ok, rank_ok,
                                  BLOCK_M, R_PAD, BLOCK_K, False, INTERPRETED_BF16, INPUT_PRECISION)
        gb_rounded = dot_operand(cast_to(gb, input_dtype, INTERPRETED_BF16), INTERPRETED_BF16)
        # The mask of this tile, hashed once for both dA and dx; a multiply, as the reference (a dropped inf
        # gives NaN).
        keep = 1.0
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[:, None] * K + pid_k * BLOCK_N, tl.arange(0, BLOCK_N)[None, :],
                                dropout_threshold, INDEX_BELOW_2_32)
        if HAS_DROPOUT:
            x = x * keep.to(x.dtype)
        dA = tl.dot(tl.trans(gb_rounded), dot_operand(x, INTERPRETED_BF16), dA, input_precision=INPUT_PRECISION)
        if PRECOMPUTED_GB and COMPUTE_DX:
            # The LoRA term seeds the accumulator before the loop: gb [BLOCK_M, R_PAD > 64] is then dead across
            # it (held past the loop it spills). Same rounding order; only the fp32 summation order differs.
            acc = _lora_term(acc, gb_rounded, a_ptr, ranks, cols, rank_ok, col_ok, stride_ar, stride_ak, lora_scale,
                             keep, HAS_DROPOUT, INTERPRETED_BF16, INPUT_PRECISION)
            acc = accumulate_product(acc, g_ptrs, w_ptrs, BLOCK_K * stride_gn, BLOCK_K * stride_wn, N, row_ok,
                                     col_ok, BLOCK_K, INTERPRETED_BF16, INPUT_PRECISION, True)


        if COMPUTE_DX:
            if not PRECOMPUTED_GB:
                # The LoRA term after the base GEMM, in the reference's rounding order (gb rounded unscaled, s' on
                # the fp32 product, added to the fp32 accumulator; one rounding of dx).
                acc = _lora_term(acc, gb_rounded, a_ptr, ranks, cols, rank_ok, col_ok, stride_ar, stride_ak,
                                 lora_scale, keep, HAS_DROPOUT, INTERPRETED_BF16, INPUT_PRECISION)
            tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     cast_to(acc, dx_ptr.dtype.element_ty, INTERPRETED_BF16), mask=tile_ok)

        # dB/db of this program's N tiles (pid_k, pid_k + col_blocks, ...: each tile of the group owned by exactly
        # one program) once per chunk of DB_ROWS rows, while the chunk's g rows, just streamed by the N loops of
        # the group's programs, are in L2: g is read from DRAM once. The group's partial slices are
        # read-modified-written, in row order (deterministic); the first chunk only stores (they are poisoned).
        chunk_start = row_start + (m0 - row_start) // DB_ROWS * DB_ROWS
        block_end = tl.minimum(m0 + BLOCK_M, row_end)
        if (block_end - chunk_start == DB_ROWS) | (block_end == row_end):
            _add_dB_of_rows(g_ptr, xa_ptr, dB_partial_ptr, db_partial_ptr, group, pid_k * BLOCK_K,
                            col_blocks * BLOCK_K, N, chunk_start, block_end, chunk_start > row_start, R,
                            stride_gm, stride_gn, stride_xam, stride_xar, input_dtype, R_PAD, COMPUTE_DB,
                            INTERPRETED_BF16, INPUT_PRECISION, BLOCK_M, BLOCK_K)
            # The next chunk's loads of these slices may run on other threads (another layout) than these
            # stores: a CTA barrier orders them (global memory is not ordered across threads otherwise).
            tl.debug_barrier()

    # This group's dA partial for these columns: all R_PAD rows (the reduction reads the first R).
    dA_ptrs = dA_partial_ptr + (group.to(tl.int64) * R_PAD + ranks[:, None]) * K + cols[None, :]
    tl.store(dA_ptrs, dA, mask=col_ok[None, :])


@triton.jit
def _sum_groups(partial_ptr, out_ptr, block, groups, rows, cols, partial_row_stride, partial_group_stride, scale,
                INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # out[i, j] (contiguous [rows, cols]) = scale · Σ_{g = 0, 1, ..., groups-1} partial[g, i, j], in that order.
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows * cols
    ptrs = partial_ptr + (offs // cols) * partial_row_stride + offs % cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, groups):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += partial_group_stride
    tl.store(out_ptr + offs, cast_to(acc * scale, out_ptr.dtype.element_ty, INTERPRETED_BF16), mask=ok)


# N, K, R stay runtime values (a launch would make a size of 1 a constexpr): the sums are memory-bound.
@triton.jit(do_not_specialize=["groups", "N", "K", "R", "dB_scale", "dA_scale"])
def _reduce_partials_kernel(
    dA_partial_ptr, dA_ptr, dB_partial_ptr, dB_ptr, db_partial_ptr, db_ptr,
    groups, N, K, R, dA_scale, dB_scale,
    R_PAD: tl.constexpr, COMPUTE_DB: tl.constexpr, INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    # Programs [0, dA_blocks) sum dA [R, K], the next dB_blocks dB [N, R], the rest (if requested) db [N].
    pid = tl.program_id(0)
    dA_blocks = tl.cdiv(R * K, BLOCK)
    dB_blocks = tl.cdiv(N * R, BLOCK)
    if pid < dA_blocks:
        _sum_groups(dA_partial_ptr, dA_ptr, pid, groups, R, K, K, K.to(tl.int64) * R_PAD, dA_scale,
                    INTERPRETED_BF16, BLOCK)
    elif pid < dA_blocks + dB_blocks:
        _sum_groups(dB_partial_ptr, dB_ptr, pid - dA_blocks, groups, N, R, R_PAD, N.to(tl.int64) * R_PAD, dB_scale,
                    INTERPRETED_BF16, BLOCK)
    else:
        if COMPUTE_DB:
            _sum_groups(db_partial_ptr, db_ptr, pid - dA_blocks - dB_blocks, groups, N, 1, 1, N.to(tl.int64), 1.0,
                        INTERPRETED_BF16, BLOCK)


@triton.jit
def _pad_rank_kernel(src_ptr, dst_ptr, rows, R, stride_sr, stride_sc, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # dst[i, :] = (src[i, :R], zeros): the [rows, R_PAD] copy of B the gb loop reads without a rank mask.
    lines = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ranks = tl.arange(0, R_PAD)
    ok = lines < rows
    values = tl.load(src_ptr + lines[:, None] * stride_sr + ranks[None, :] * stride_sc,
                     mask=ok[:, None] & (ranks < R)[None, :], other=0.0)
    tl.store(dst_ptr + lines[:, None] * R_PAD + ranks[None, :], values, mask=ok[:, None])


REDUCE_BLOCK = 1024
PAD_BLOCK = 64


def _padded_b(lora_B: torch.Tensor, r_pad: int) -> torch.Tensor:
    N, R = lora_B.shape
    padded = poison_(torch.empty(N, r_pad, dtype=lora_B.dtype, device=lora_B.device))
    _pad_rank_kernel[(triton.cdiv(N, PAD_BLOCK),)](lora_B, padded, N, R, lora_B.stride(0), lora_B.stride(1),
                                                   R_PAD=r_pad, BLOCK=PAD_BLOCK)
    return padded


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    compute_dx: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels on validated 2-D inputs with M >= 1; returns (dx, dA, dB, db)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    r_pad = padded_rank(R)
    device, f32 = x.device, torch.float32
    bf16_fixes = interpreted_bf16(x.dtype)
    precision = input_precision(x.dtype)
    threshold, keep_scale, seed32 = dropout_threshold(dropout_p), dropout_scale(dropout_p), seed_as_int32(seed)

    with device_guard(x):
        gb = None
        b_operand = lora_B
        if not backward_fuses_gb(r_pad):
            # gb = g·B, fp32 [M, R_PAD] (padding columns zero), from the thin projection kernel.
            gb = poison_(torch.empty(M, r_pad, dtype=f32, device=device))
            project_rows(grad_y, lora_B, lora_B.stride(0), lora_B.stride(1), R, gb, r_pad,
                         1.0, 0, 0, bf16_fixes, precision)
        elif backward_pads_b(R):
            b_operand = _padded_b(lora_B, r_pad)

        groups, rows_per_group = backward_row_groups(M, triton.cdiv(K, backward_column_block(compute_dx)),
                                                     multiprocessors(device))
        dx = poison_(torch.empty(M, K, dtype=grad_y.dtype, device=device)) if compute_dx else None
        dA_partial = poison_(torch.empty(groups, r_pad, K, dtype=f32, device=device))
        dB_partial = poison_(torch.empty(groups, N, r_pad, dtype=f32, device=device))
        db_partial = poison_(torch.empty(groups, N, dtype=f32, device=device)) if compute_db else None

        def grid(meta):
            return (groups * max(triton.cdiv(K, meta["BLOCK_N"]), 1),)

        lora_backward_kernel[grid](
            grad_y, x, weight, lora_A, b_operand, xa, gb, dx, dA_partial, dB_partial, db_partial,
            M, N, K, R, m_bucket(M), rows_per_group,
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), b_operand.stride(0), b_operand.stride(1),
            xa.stride(0), xa.stride(1), *(dx.stride() if compute_dx else (0, 0)),
            float(scaling) * keep_scale, seed32, threshold,
            R_PAD=r_pad, INTERPRETED_BF16=bf16_fixes, INPUT_PRECISION=precision,
        )

        dA = poison_(torch.empty(R, K, dtype=lora_A.dtype, device=device))
        dB = poison_(torch.empty(N, R, dtype=lora_B.dtype, device=device))
        db = poison_(torch.empty(N, dtype=grad_y.dtype, device=device)) if compute_db else None
        blocks = sum(triton.cdiv(n, REDUCE_BLOCK) for n in (R * K, N * R, N if compute_db else 0))
        _reduce_partials_kernel[(blocks,)](
            dA_partial, dA, dB_partial, dB, db_partial, db,
            groups, N, K, R, float(scaling) * keep_scale, float(scaling),
            R_PAD=r_pad, COMPUTE_DB=compute_db, INTERPRETED_BF16=bf16_fixes, BLOCK=REDUCE_BLOCK,
        )
    return (dx if compute_dx else grad_y.new_empty(0)), dA, dB, (db if compute_db else grad_y.new_empty(0))
