// The Hopper (sm_90a) kernel of the two large fp16/bf16 products, forward and dx: operands
// by TMA into a multistage shared-memory pipeline (cutlass::PipelineTmaAsync), one producer
// warp, two consumer warpgroups issuing wgmma (CuTe's SM90 GMMA atoms), one wgmma batch in
// flight. One kernel template serves both products:
//
//   C[M, Nc] = round(acc_main + factor(m, c)·acc_lora + bias)
//   acc_main = P·Qᵀ over the long reduction, acc_lora = L·Rᵀ over the rank
//
//   forward: P = x [M, K], Q = W [N, K] (K-major), L = round(xa) [M, r] (the xa pre-pass
//            writes this T-typed copy), R = lora_B [N, r]; factor = s; bias.
//   dx:      P = g [M, N], Q = W viewed [K, N] (MN-major: element (c, n) at W[n·K + c]),
//            L = round(gb) [M, r], R = lora_A viewed [K, r] (MN-major); factor =
//            s·keep(m, c)/(1 − p), the mask hashed once per element of dx from
//            dropout_hash.h, bit-identical to lora_fused/dropout.py, and written as keep bits
//            for sm80_dA (cuda_keep_bits.cuh: two compact registers per thread, a quad
//            transpose by shuffles, one 4-byte store per word), which then hashes nothing; no
//            bias. For r ≤ 32 and K ≤ 1024 (sm90_dx_computes_gb) the kernel computes gb = g·B
//            itself from its g stages ("Fused gb" below); otherwise the tall gb GEMM writes
//            round(gb) first.
//
// The LoRA term by composition: the producer streams the rank tiles (L, R) first, then the
// k-tiles of (P, Q), through the SAME stages and barriers; the consumers accumulate the rank
// tiles into acc_lora and the k-tiles into acc_main (two accumulators: the dx epilogue needs
// acc_lora apart from acc_main to apply the mask; the forward uses the same epilogue with a
// constant factor). That is the reference's rounding order: L enters rounded to T, unscaled;
// s (and the mask) multiply the fp32 product; one rounding at the end. The fused-gb dx runs
// the rank tile last instead (it needs gb, which the k-tiles produce).
//
// Tiles. 128×128 output tile, k-tiles 64 deep (128 bytes of fp16/bf16: one SW128 swizzle
// row). Consumer warpgroup w computes rows [64w, 64w + 64) with SM90_64x128x16 GMMA (F32
// accumulators; A from shared memory, B from shared memory): 64 fp32 per thread per
// accumulator, 128 for both. ptxas gives a 288-thread block at most 168 registers per thread
// (observed: it spills at 168 rather than use more; 65536 / 384, i.e. the 9 warps allocated
// as 3 warpgroups), and the kernel uses 165-168 (tests/test_cuda_ptxas.py: no spills): it is
// at the cap, so any epilogue change must be re-read in ptxas -v.
// 128×256 would halve W's re-reads per row tile but needs 256 accumulators per thread for
// the two accumulators: it does not fit.
//
// Shared memory and pipeline depth. A stage holds one 128×64 tile of each operand: 2 × 16
// KB. At the dense bf16 peak (989 TFLOP/s over 132 SMs: 7.5 TFLOP/s per SM) one stage's
// 2·128·128·64 flops take 0.28 µs, so a block consumes 32 KB per 0.28 µs (117 GB/s per SM,
// from L2 or HBM); covering ~1 µs of load latency needs about 117 KB, 3.6 stages, in flight.
// Five stages (160 KB) keep four in flight while one is consumed (at K = 768: 12 k-tiles
// plus one rank tile per output tile). Plus a 64 × 136 staging tile per consumer warpgroup
// for the epilogue (2 × 17 KB) and the 10 barriers: 196 KB with the 1 KB alignment slack
// (tests/cuda/sm90_layout_check.cu prints it), within sm_90's 227 KB per block
// (static_assert below); a sixth stage would not fit. One block per SM. The fused-gb dx adds
// lora_Bᵀ's 32 × 64 tile (4 KB) to each stage: 5 × 36 KB + 34 KB staging + 80 bytes of
// barriers = 214.1 KB, 215 KB rounded to the storage's 1024-byte alignment, 216 KB (221184
// bytes) with the slack; still five stages within 227 KB (a sixth would need 252 KB).
// Layouts: K-major operands in GMMA::Layout_K_SW128_Atom, MN-major ones (dx's W and lora_A)
// in Layout_MN_SW128_Atom tiled K-first (what TMA's 128-byte swizzle writes and wgmma's
// descriptors read); every stage starts on a 1024-byte boundary (the swizzle's period). TMA
// fills a K-major stage with one 64×128 box, an MN-major one with two 64×64 boxes (the
// 128-byte swizzle spans 64 elements along MN); tests/cuda/sm90_layout_check.cu checks both.
//
// Synchronisation. PipelineTmaAsync: a full barrier per stage (the producer arrives once with
// the stage's transaction bytes, TMA completes them) and an empty barrier per stage (all 256
// consumer threads arrive when their wgmmas on the stage are done). Producer: acquire(empty)
// → TMA both operands (a fused-gb dx k-stage: three, g, W and lora_Bᵀ) onto the full
// barrier → next stage. Consumers: wait(full) → warpgroup_arrive, 4 wgmma (a fused-gb dx
// k-stage: 8, four 64x128 and four 64x32; k = 16 each; fewer on a rank or depth residue
// tile: the 16-deep blocks past r or the depth are skipped by branching around the whole
// batch, one compile-time count per branch, so ptxas keeps each batch in flight), commit →
// warpgroup_wait<1> (the previous batch is done, so its stage is released, while this one
// still runs). After the last tile wait<0> and release
// the last stage. The epilogue writes each warpgroup's rows to its own staging tile, a named
// barrier of that warpgroup's 128 threads publishes them, and the same threads store them
// with 16-byte stores; the producer warp takes no part (it ends after producer_tail, which
// waits until every stage it filled has been released). Each tile starts with zeroed
// accumulators and no batch in flight: the previous tile ended with warpgroup_wait<0>.
//
// Bounds. TMA zero-fills every element of a box outside the tensor it was described with:
// rows past M (or Nc) load as zeros and their outputs are not stored; the k-residue past K
// (or N) and the rank residue past r are zeros in both operands, so they add nothing — the
// rank padding of the rounded-xa/gb workspace and of a padded lora_B copy is never read (the
// descriptors say r columns; only the row stride is padded). The transaction bytes of a stage
// are the full boxes, zero-filled parts included, so every stage completes. TMA needs 16-
// byte aligned bases and row strides (multiples of 8 elements), non-empty dimensions and
// lines that do not overlap (cuda_tma_operand.h): cuda_ops.cpp sends other cases (K % 8 ≠ 0,
// an odd row stride of x or g, an expanded x or g with row stride 0, overlapping as_strided
// rows, K = 0 / N = 0) to the sm80 kernels. sm90_forward_supported/sm90_dx_supported also
// ask the driver to encode each descriptor before CuTe does, because CuTe answers a failed
// encode with assert(false), which would abort the process: an input the driver rejects
// takes the sm80 kernels instead.
//
// Fused gb (dx, r ≤ 32 and K ≤ 1024; the sm80 dx fuses r ≤ 32 at any K). Per k-stage the producer loads g,
// W and lora_Bᵀ's [32 ranks, 64] tile (K-major, TMA zero-fills ranks ≥ r and n ≥ N); each
// consumer warpgroup issues, in ONE batch per stage, the main 64x128x16 wgmma and a 64x32x16
// one on the same g descriptors into a 64×32 fp32 gb accumulator (16 values per thread), so g
// is read from memory by dB and dx only. After the main loop (wait<0>): the blocks of column
// tile 0 write fp32 gb for dA; the producer's LAST stage of the tile carries only lora_A's
// [128 columns, r] tile (MN-major, as for r > 32) into the B buffer, and each warpgroup writes
// round(gb) for its own 64 rows into that stage's A buffer (K-major, ranks [0, 32): those
// past r are exact zeros), fences the generic proxy to the async one (fence.proxy.async),
// syncs its 128 threads on its named barrier, and runs the rank wgmmas (ceil(r/16) ≤ 2 deep,
// one batch, wait<0>) into acc_lora; the epilogue is unchanged. The other warpgroup never
// reads these rows, and the producer cannot refill the stage before both warpgroups release
// it. Transaction bytes: the pipeline's per-stage count is the rank stage's 16 KB; each
// k-stage adds the g and lora_Bᵀ boxes (20 KB) with producer_expect_transaction before its
// TMA. Registers: gb's 16 accumulators live only in the main loop, where acc_lora is not yet
// live (80 accumulators against 128 before), and die (stored) before acc_lora is cleared, so
// the peak is the unchanged epilogue's 128 and nothing needs parking in shared memory: ptxas
// uses 165-166 registers, no spills, no C75xx (tests/test_cuda_ptxas.py also checks in the
// SASS that the 64x32 HGMMAs share the main batches). Cost: each of the K/128 column tiles
// repeats gb's MMAs, 32 of every 160 columns (+25 % of dx's main-loop MMA issue), against one
// read of g fewer (M·N·2 bytes) and the gb GEMM's launch and MMA. The saving does not grow
// with K, the repeated MMA does: in the cost model (M = 4096, r = 16) the fused backward is
// cheaper up to 9 column tiles on the H100 and 6 on the H200, so sm90_dx_computes_gb
// (cuda_kernels.h, the one switch) fuses up to 8 (K ≤ 1024). ViT-B qkv (K = 768): 27.3 µs
// fused against 29.4 separate on the H100, 24.6 against 24.9 on the H200; lin2 (K = 3072, N =
// 768) is past it: fused would be 35.8 against 32.9 (H100), 32.5 against 29.0 (H200). A GPU
// measurement is to confirm where the break-even lies.
//
// Not done (second reading of cuda4, csrc notes for the next GPU session):
//  - In-place scaling (review item B3/4): after the rank tile(s), warpgroup_wait<0> and
//    multiply the accumulator in place by factor(m, c) (s in the forward; s·keep/(1 − p) in
//    dx, the same hash as now), then let the k-tiles accumulate on top: sm80's order
//    (cuda_sm80.cu), within the same rounding contract (the fp32 s·L, one rounding at the
//    end). It costs one wgmma drain per tile (~100-200 cycles against 12+ k-steps of ~512)
//    and frees acc_lora's 64 registers. That alone does not give 128×256 tiles here: one
//    64×256 accumulator per consumer warpgroup is 128 registers, and ptxas caps this
//    288-thread block at 168 (see Tiles), which leaves ~40 for descriptors, addresses and the
//    epilogue — what the current kernel already needs beyond its accumulators. 128×256 needs
//    a full producer warpgroup (384 threads) with setmaxnreg (producer down to 40, consumers
//    up to 232), and shared memory for 48 KB stages: 4 stages (192 KB) leave no room for a
//    64 KB staging tile, so the epilogue would have to stage through a drained pipeline stage
//    or in column halves. Also not done: a ping-pong schedule (the epilogue of one warpgroup
//    overlapping the other's MMA), which needs the same in-place scaling.
//  - Epilogue (review B2): done are shared-typed packed stores, bias bounds only on edge
//    tiles, one bias load per column pair on interior tiles, the host-computed dropout
//    factor and 32-bit hash index; not done are stmatrix (SM90_U32x4_STSM_N), a TMA store of
//    the staging tile, a column pair's bias loaded once for both of its rows (tried: spills
//    at the 168-register cap), and a 1-bit mask written by the forward's xa pre-pass for dx
//    to read instead of re-hashing (the backward's own keep bits, written here for dA, are
//    done: the backward hashes x once).
//  - Fused gb: the K/128 column tiles of a row tile all compute the same gb (only column
//    tile 0 stores it); computing it once per row tile would need the other column tiles to
//    wait for it (a cross-block dependency) or a 128×256 tile (see above). Not measured.
//  - The sm90_*_supported check has the driver encode each descriptor, and CuTe encodes it
//    again when the kernel's Params are built: two host encodes per operand and call.
//  - A 2×1 cluster multicasting the shared operand (review B3: L2→SM bandwidth at 128×128),
//    and the per-call padded lora_B copy when r·2 bytes is not a multiple of 16 (B5).
//  - Nothing here has run on a GPU yet: tests/test_cuda_sm90_gpu.py is the first thing to
//    run on one, then forward/dx timings at (16384, 768, 2304, 16), p = 0 and 0.1, and
//    K = 64 against K = 768 to separate epilogue from main loop.
//
// Tile order: persistent — one block per SM (196 KB of shared memory, 216 KB for the fused-gb
// dx, allow no second), block
// b taking output tiles b, b + gridDim.x, ... of sm80's grouped raster (grouped_tile: 8 row
// tiles per group, column by column), so the 132 tiles in flight at a time share their x/g
// row tiles and W column tiles in L2. Producer and consumers walk the same tiles with one
// pipeline state each, carried across tiles: the producer runs ahead into the next tile's
// rank and k-tiles as soon as stages are released, so an SM's epilogue (staging, stores)
// overlaps its next tile's loads. The staging rows are reused per tile: a second named barrier
// after the stores keeps the next tile's writes from overtaking them.
//
// Only sm_90a has wgmma and TMA: for every other architecture in the build the kernel body is
// a trap, and cuda_ops.cpp calls these launchers only on a compute-capability-9.0 device of a
// build that includes sm_90a (sm90_kernels_built()).
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cuda.h>

#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_keep_bits.cuh"
#include "cuda_sm80_mainloop.cuh"
#include "cuda_tma_operand.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORA_FUSED_SM90A_DEVICE 1
#endif

namespace lora_fused {
namespace cuda {
namespace sm90 {

using namespace cute;
using sm80::grouped_tile;
using sm80::kStagingLd;
using sm80::TileCoord;
using sm80::write_staged_rows;

constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 5;
// dx's fused gb (sm90_dx_computes_gb: r <= 32, K <= 1024): one 32-rank tile, a 64x32 wgmma per warpgroup.
constexpr int kGbRanks = 32;
static_assert(sm90_dx_computes_gb(kGbRanks, kBN) && !sm90_dx_computes_gb(kGbRanks + 1, kBN),
              "the fused gb covers exactly the ranks of one kGbRanks tile");
constexpr int kConsumerThreads = 256;                 // two warpgroups
constexpr int kThreads = kConsumerThreads + 32;       // + the producer warp
constexpr int kProducerThread = kConsumerThreads;     // lane 0 of the producer warp issues all TMA
static_assert(sm80::kBM == kBM && sm80::kBN == kBN, "grouped_tile and the staging rows assume sm80's 128x128 tile");

using Pipeline = cutlass::PipelineTmaAsync<kStages>;

// Shared-memory layouts of one operand's stages (rows × kBK × kStages). K-major: 64-element
// (128-byte) rows in 8-row swizzle atoms. MN-major: 64 rows contiguous per k in 8-k atoms,
// tiled along k first (CUTLASS's order for MN-major TMA boxes).
template <class T, bool kKMajor>
struct StageLayoutOf {
  using type = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kBM>, Int<kBK>, Int<kStages>>{}));
};
template <class T>
struct StageLayoutOf<T, false> {
  using type = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{}, Shape<Int<kBN>, Int<kBK>, Int<kStages>>{},
                                      Step<_2, _1, _3>{}));
};
template <class T, bool kKMajor>
using StageLayout = typename StageLayoutOf<T, kKMajor>::type;
// Element offset, from the start of the K-major stages, of (row, k, stage): where TMA's
// SWIZZLE_128B writes and wgmma's SW128 descriptor reads that element. The layout's
// Swizzle<3,4,3> acts on BYTE addresses (CuTe applies it through a smem_ptr); calling the
// layout on its own would apply it to element offsets. The position-independent form moves
// the swizzle to element bits (Swizzle<3,3,3> for 16-bit T), exact because every stage starts
// on a 1024-byte boundary (the swizzle's period). The fused-gb dx writes round(gb) here and
// tests/cuda/sm90_layout_check.cu compares it with the address CuTe's smem_ptr path gives.
template <class T>
CUTE_HOST_DEVICE int k_major_stage_offset(int row, int k, int stage) {
  return as_position_independent_swizzle_layout(StageLayout<T, true>{})(row, k, stage);
}
// The fused gb's third operand, lora_Bᵀ [r, N] K-major: 32 rank rows × kBK per stage (4 KB,
// a multiple of the swizzle's 1024-byte period, so every stage stays aligned).
template <class T>
using GbStageLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                             Shape<Int<kGbRanks>, Int<kBK>, Int<kStages>>{}));

// The wgmma of a warpgroup: 64 rows × 128 columns × 16 deep, fp32 accumulators, both
// operands from shared memory; two warpgroups stacked along rows make the 128×128 tile.
template <class T, bool kBKMajor>
using TiledMmaOf = decltype(make_tiled_mma(
    SM90::GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kBN>, Int<kBK>>, GMMA::Major::K,
                               kBKMajor ? GMMA::Major::K : GMMA::Major::MN>(),
    Layout<Shape<_2, _1, _1>>{}));
// The fused gb's wgmma: g's rows of the warpgroup (the same A descriptors as the main product)
// times 32 ranks of lora_Bᵀ, 16 deep: a 64x32 fp32 accumulator, 16 values per thread.
template <class T>
using GbTiledMmaOf = decltype(make_tiled_mma(
    SM90::GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kGbRanks>, Int<kBK>>, GMMA::Major::K, GMMA::Major::K>(),
    Layout<Shape<_2, _1, _1>>{}));

// A global operand as TMA sees it: rows × depth, unit stride along depth (K-major) or along
// rows (MN-major), the other stride in elements.
template <bool kKMajor>
using GmemStride = std::conditional_t<kKMajor, Stride<int64_t, _1>, Stride<_1, int64_t>>;

template <class T, bool kKMajor>
auto gmem_operand(const T* ptr, int rows, int depth, int64_t ld) {
  GmemStride<kKMajor> stride{};
  if constexpr (kKMajor) {
    get<0>(stride) = ld;
  } else {
    get<1>(stride) = ld;
  }
  return make_tensor(make_gmem_ptr(ptr), make_layout(make_shape(rows, depth), stride));
}

template <class T, bool kKMajor, class Stages = StageLayout<T, kKMajor>>
auto make_tma(const T* ptr, int rows, int depth, int64_t ld) {
  return make_tma_copy(SM90_TMA_LOAD{}, gmem_operand<T, kKMajor>(ptr, rows, depth, ld),
                       Stages{}(_, _, Int<0>{}));  // one stage, statically: the box
}
template <class T, bool kKMajor, class Stages = StageLayout<T, kKMajor>>
using TmaOf = decltype(make_tma<T, kKMajor, Stages>(nullptr, 1, 1, 8));
template <class T>
using GbTmaOf = TmaOf<T, true, GbStageLayout<T>>;  // boxes of lora_Bᵀ: 32 rank rows × 64 deep

template <class T, bool kBKMajor>
struct Params {
  TmaOf<T, true> tma_p, tma_l;  // A side: P [M, depth], L [M, r] (unused by the fused-gb dx)
  TmaOf<T, kBKMajor> tma_q, tma_r;  // B side: Q [Nc, depth], R [Nc, r]
  GbTmaOf<T> tma_gb;  // fused-gb dx only: lora_Bᵀ [r, depth]
  float* gb;          // fused-gb dx only: gb [M, r] fp32 for dA (the blocks of column tile 0 write it)
  int M, Nc, depth, r;
  const T* bias;  // [Nc] or nullptr
  T* out;         // [M, Nc], leading dimension ld_out
  int64_t ld_out;
  float scaling;
  DropoutSpec drop;   // dx: keep(m, c) of element m·ld_out + c of x; disabled in the forward
  uint32_t* keep_bits;    // dx with dropout: the keep-bit workspace [M][keep_ld] (cuda_keep_bits.cuh), or nullptr
  int64_t keep_ld;        // keep_words_per_row(Nc)
  float kept_factor;  // dx: s·(1/(1 − p)) in fp32, the factor of a kept element (host-computed)
  bool small_index;   // dx: every hash index m·ld_out + c below 2^32 (32-bit index math)
  bool bias_pairs;    // forward: bias 4-byte aligned, so a column pair (c even) is one load
  bool vec_out;
};

// The fused gb's lora_Bᵀ stages (an empty base otherwise: no bytes).
template <class T, bool kFusedGb>
struct GbStages {};
template <class T>
struct GbStages<T, true> {
  alignas(1024) T gb_b[cosize_v<GbStageLayout<T>>];
};

template <class T, bool kBKMajor, bool kFusedGb = false>
struct SharedStorage : GbStages<T, kFusedGb> {
  alignas(1024) T a[cosize_v<StageLayout<T, true>>];
  alignas(1024) T b[cosize_v<StageLayout<T, kBKMajor>>];
  alignas(16) T staging[2][kBM / 2 * kStagingLd<T>];
  alignas(16) typename Pipeline::SharedStorage pipeline;
};
template <class T, bool kBKMajor, bool kFusedGb = false>
constexpr size_t smem_bytes() {
  return sizeof(SharedStorage<T, kBKMajor, kFusedGb>) + 1024;  // slack to align the dynamic base to 1024
}
static_assert(smem_bytes<cute::bfloat16_t, false, true>() <= 227 * 1024, "sm_90 allows 227 KB per block");
static_assert(smem_bytes<cute::bfloat16_t, false>() <= 227 * 1024, "sm_90 allows 227 KB per block");
static_assert(smem_bytes<cute::half_t, true>() <= 227 * 1024, "sm_90 allows 227 KB per block");

// Transaction bytes of a stage: the full boxes, zero-filled parts included. Forward and dx
// without fused gb: two 128 × 64 boxes per stage (L and R, or P and Q). Fused-gb dx: the
// pipeline's per-stage count is the rank stage's one box (lora_A); its k-stages expect the
// g and lora_Bᵀ boxes on top (producer_expect_transaction, before any TMA of the stage).
constexpr uint32_t kStageBytes = (kBM + kBN) * kBK * 2;
constexpr uint32_t kRankStageBytes = kBN * kBK * 2;
constexpr uint32_t kGbKStageExtraBytes = (kBM + kGbRanks) * kBK * 2;
template <bool kFusedGb>
constexpr uint32_t kPipelineStageBytes = kFusedGb ? kRankStageBytes : kStageBytes;

#if defined(LORA_FUSED_SM90A_DEVICE)

// The producer: for each output tile of this block (persistent: tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... in grouped order), the rank tiles of (L, R), then the k-tiles
// of (P, Q), each pair into the next free stage, onto that stage's full barrier; with the
// fused gb (dx, sm90_dx_computes_gb), the k-tiles of (P, Q, lora_Bᵀ) first and then R's one rank tile
// (L is round(gb), which the consumers write into that stage). It runs ahead into the next
// output tile as soon as stages are released, while the consumers store.
template <class T, bool kBKMajor, bool kFusedGb>
__device__ void produce(const Params<T, kBKMajor>& p, SharedStorage<T, kBKMajor, kFusedGb>& smem,
                        Pipeline& pipeline) {
  prefetch_tma_descriptor(p.tma_p.get_tma_descriptor());
  prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
  prefetch_tma_descriptor(p.tma_r.get_tma_descriptor());
  Tensor sA = make_tensor(make_smem_ptr(smem.a), StageLayout<T, true>{});
  Tensor sB = make_tensor(make_smem_ptr(smem.b), StageLayout<T, kBKMajor>{});
  // (box rows, box depth, row tiles, depth tiles) over the whole operands.
  Tensor gP = local_tile(p.tma_p.get_tma_tensor(make_shape(p.M, p.depth)), Shape<Int<kBM>, Int<kBK>>{},
                         make_coord(_, _));
  Tensor gQ = local_tile(p.tma_q.get_tma_tensor(make_shape(p.Nc, p.depth)), Shape<Int<kBN>, Int<kBK>>{},
                         make_coord(_, _));
  Tensor gR = local_tile(p.tma_r.get_tma_tensor(make_shape(p.Nc, p.r)), Shape<Int<kBN>, Int<kBK>>{},
                         make_coord(_, _));
  auto tma_p = p.tma_p.get_slice(0);
  auto tma_q = p.tma_q.get_slice(0);
  auto tma_r = p.tma_r.get_slice(0);
  // (TMA, TMA rows, TMA depth, row tiles, depth tiles) sources, (TMA, TMA rows, TMA depth,
  // stages) destinations.
  Tensor tPg = tma_p.partition_S(gP);
  Tensor tPs = tma_p.partition_D(sA);
  Tensor tQg = tma_q.partition_S(gQ);
  Tensor tQs = tma_q.partition_D(sB);
  Tensor tRg = tma_r.partition_S(gR);
  Tensor tRs = tma_r.partition_D(sB);

  const int rank_tiles = ceil_div(p.r, kBK), k_tiles = ceil_div(p.depth, kBK);
  const int64_t tiles_m = ceil_div(int64_t{p.M}, kBM), tiles_n = ceil_div(int64_t{p.Nc}, kBN);
  auto state = cutlass::make_producer_start_state<Pipeline>();
  auto for_each_tile = [&](auto&& fill_tile) {
    for (int64_t index = blockIdx.x; index < tiles_m * tiles_n; index += gridDim.x) {
      const TileCoord tile = grouped_tile(index, tiles_m, tiles_n);
      fill_tile(static_cast<int>(tile.m), static_cast<int>(tile.n));
    }
  };
  if constexpr (kFusedGb) {
    prefetch_tma_descriptor(p.tma_gb.get_tma_descriptor());
    Tensor sGb = make_tensor(make_smem_ptr(smem.gb_b), GbStageLayout<T>{});
    Tensor gGb = local_tile(p.tma_gb.get_tma_tensor(make_shape(p.r, p.depth)), Shape<Int<kGbRanks>, Int<kBK>>{},
                            make_coord(_, _));  // one row tile: r <= 32
    auto tma_gb = p.tma_gb.get_slice(0);
    Tensor tGg = tma_gb.partition_S(gGb);
    Tensor tGs = tma_gb.partition_D(sGb);
    for_each_tile([&](int m, int n) {
      for (int t = 0; t < k_tiles; ++t) {
        pipeline.producer_acquire(state);  // expects kRankStageBytes
        pipeline.producer_expect_transaction(state, kGbKStageExtraBytes);
        auto* barrier = pipeline.producer_get_barrier(state);
        const int stage = state.index();
        copy(p.tma_p.with(*barrier), tPg(_, _, _, m, t), tPs(_, _, _, stage));
        copy(p.tma_q.with(*barrier), tQg(_, _, _, n, t), tQs(_, _, _, stage));
        copy(p.tma_gb.with(*barrier), tGg(_, _, _, 0, t), tGs(_, _, _, stage));
        ++state;
      }
      pipeline.producer_acquire(state);  // the rank stage: lora_A's tile only
      copy(p.tma_r.with(*pipeline.producer_get_barrier(state)), tRg(_, _, _, n, 0), tRs(_, _, _, state.index()));
      ++state;
    });
  } else {
    prefetch_tma_descriptor(p.tma_l.get_tma_descriptor());
    Tensor gL = local_tile(p.tma_l.get_tma_tensor(make_shape(p.M, p.r)), Shape<Int<kBM>, Int<kBK>>{},
                           make_coord(_, _));
    auto tma_l = p.tma_l.get_slice(0);
    Tensor tLg = tma_l.partition_S(gL);
    Tensor tLs = tma_l.partition_D(sA);
    for_each_tile([&](int m, int n) {
      for (int t = 0; t < rank_tiles + k_tiles; ++t) {
        pipeline.producer_acquire(state);
        auto* barrier = pipeline.producer_get_barrier(state);
        const int stage = state.index();
        if (t < rank_tiles) {
          copy(p.tma_l.with(*barrier), tLg(_, _, _, m, t), tLs(_, _, _, stage));
          copy(p.tma_r.with(*barrier), tRg(_, _, _, n, t), tRs(_, _, _, stage));
        } else {
          copy(p.tma_p.with(*barrier), tPg(_, _, _, m, t - rank_tiles), tPs(_, _, _, stage));
          copy(p.tma_q.with(*barrier), tQg(_, _, _, n, t - rank_tiles), tQs(_, _, _, stage));
        }
        ++state;
      }
    });
  }
  pipeline.producer_tail(state);  // every stage filled has been consumed before the block ends
}

// The consumers' wgmma loop: the products of the pipeline tiles covering `depth`
// (ceil(depth / 64) consecutive stages); `issue(kb, stage)` issues the wgmma(s) of 16-deep
// k-block kb of a stage (one product, or dx's main product and its fused gb), `fence()`
// fences their accumulators. One batch stays in flight across calls: after issuing a tile's
// batch, warpgroup_wait<1> proves the previous batch done, and its stage is released. The
// 16-deep k-blocks wholly past `depth` hold TMA's zeros and are skipped: a rank tile of
// r = 4..16 costs one wgmma per warpgroup instead of four.
template <class Issue, class Fence>
__device__ void consume(Issue&& issue, Fence&& fence, int depth, Pipeline& pipeline,
                        cutlass::PipelineState<kStages>& read, cutlass::PipelineState<kStages>& release,
                        bool& batch_in_flight) {
  constexpr int kBlockDepth = 16;  // one 16-bit wgmma's k
  const int count = ceil_div(depth, kBK);
  for (int t = 0; t < count; ++t) {
    pipeline.consumer_wait(read);
    const int stage = read.index();
    const int k_blocks = ceil_div(depth - t * kBK, kBlockDepth);  // >= 1; at least 4 on all but the last tile
    fence();
    // The branch goes AROUND arrive → wgmmas → commit → wait, each branch with a compile-time
    // count: a wgmma under its own `if` inside the batch makes ptxas unable to count the
    // batch's scoreboard groups (C7519): it fences every wgmma and appends a dummy one, so
    // wait<1> drains the whole batch each k-step (tests/test_cuda_ptxas.py rejects that).
    auto batch = [&](auto blocks) {
      warpgroup_arrive();
      CUTE_UNROLL
      for (int kb = 0; kb < decltype(blocks)::value; ++kb) issue(kb, stage);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
    };
    if (k_blocks >= 4) {
      batch(Int<4>{});
    } else if (k_blocks == 1) {
      batch(Int<1>{});
    } else if (k_blocks == 2) {
      batch(Int<2>{});
    } else {
      batch(Int<3>{});
    }
    fence();
    if (batch_in_flight) {
      pipeline.consumer_release(release);
      ++release;
    }
    batch_in_flight = true;
    ++read;
  }
}

// Whether x's element (m, c), index m·ld_out + c, is kept (the hash of dropout_hash.h, bit for
// bit). With every index below 2^32 the index is formed in 32 bits, so the compiler sees its
// high word is 0 and hoists the hash key mix32(seed) out of the tile. Rows and columns past
// the edge hash harmlessly: neither stored nor (clip_to_columns) put in the keep bits.
template <bool kSmallIndex, class T>
__device__ __forceinline__ bool dx_kept(const Params<T, false>& p, int64_t m, int64_t c) {
  const uint64_t index = kSmallIndex ? uint64_t{static_cast<uint32_t>(m) * static_cast<uint32_t>(p.ld_out) +
                                                static_cast<uint32_t>(c)}
                                     : static_cast<uint64_t>(m * p.ld_out + c);
  return keep_element(p.drop.seed, p.drop.threshold, index);
}

// Rounds this thread's 64 values of the tile into the staging rows. A thread's values i and
// i + 1 (i even) are columns cc and cc + 1 of one row with cc even
// (tests/cuda/sm90_layout_check.cu): each pair is packed into one 32-bit shared store.
// Values i and i + 2 share their columns too, but keeping a pair's bias for both rows made
// the forward spill at the 168-register cap (20 bytes): each pair loads its own.
// kChecked: the tile reaches past Nc (or the bias is not 4-byte aligned), so the forward's
// bias is read per value, only for columns < Nc; otherwise one 32-bit load per column pair.
// kSmallIndex: dx's hash indices all fit 32 bits (Params::small_index). The forward (K-major
// W) has the bias and no dropout; dx has dropout and no bias, and collects each keep flag it
// hashes into `compact` (cuda_keep_bits.cuh's wgmma_slot: two registers per thread).
template <bool kChecked, bool kSmallIndex, class T, bool kBKMajor, class Acc, class Coords, class Staged>
__device__ __forceinline__ void stage_tile(const Params<T, kBKMajor>& p, const Acc& acc_main, const Acc& acc_lora,
                                           const Coords& coords, Staged& tCsC, int64_t m0, int64_t c0,
                                           uint32_t (&compact)[keep_bits::kWgmmaRegs]) {
  static_assert(size(Acc{}) % 2 == 0, "values come in column pairs");
  const bool has_bias = kBKMajor && p.bias != nullptr;
  const bool has_dropout = !kBKMajor && p.drop.enabled;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_main); i += 2) {
    const int64_t m = m0 + get<0>(coords(i)), c = c0 + get<1>(coords(i));
    float value[2];
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      float factor = p.scaling;
      if constexpr (!kBKMajor) {
        if (has_dropout) {
          const bool kept = dx_kept<kSmallIndex>(p, m, c + j);
          factor = kept ? p.kept_factor : 0.f;
          const keep_bits::Slot slot = keep_bits::wgmma_slot(i + j);
          compact[slot.reg] |= uint32_t{kept} << slot.bit;
        }
      }
      value[j] = acc_main(i + j) + factor * acc_lora(i + j);
      if constexpr (kBKMajor && kChecked) {
        if (has_bias && c + j < p.Nc) value[j] += static_cast<float>(T::bitcast(__ldg(&p.bias[c + j].storage)));
      }
    }
    if constexpr (kBKMajor && !kChecked) {  // columns c, c + 1 < Nc, c even, bias 4-byte aligned
      if (has_bias) {
        const uint32_t two = __ldg(reinterpret_cast<const unsigned int*>(p.bias + c));
        value[0] += static_cast<float>(T::bitcast(static_cast<uint16_t>(two & 0xFFFFu)));
        value[1] += static_cast<float>(T::bitcast(static_cast<uint16_t>(two >> 16)));
      }
    }
    const uint32_t packed = uint32_t{T(value[0]).raw()} | (uint32_t{T(value[1]).raw()} << 16);
    *reinterpret_cast<uint32_t*>(&tCsC(i)) = packed;
  }
}

// Fused gb (dx, sm90_dx_computes_gb), after a tile's main loop: the blocks of column tile 0 write gb
// (fp32, for dA); then round(gb) goes into the A buffer of the tile's rank stage (K-major,
// ranks [0, 32): those past r are exact zeros, lora_Bᵀ's rows past r having loaded as
// zeros), whose B buffer holds lora_A's tile; the warpgroup's rows only, so a fence from the
// generic to the async proxy and the warpgroup's named barrier suffice before its wgmmas
// read them. acc_lora = round(gb)·A over ceil(r / 16) k-blocks; the stage is released.
template <class T, class TiledMma, class FragA, class FragB, class GbAcc, class GbCoords, class Acc>
__device__ __forceinline__ void fused_gb_rank_product(const Params<T, false>& p, TiledMma& mma, const FragA& tCrA,
                                                      const FragB& tCrB, const GbAcc& gb_acc,
                                                      const GbCoords& gb_coords, Acc& acc_lora, T* a_stages,
                                                      const TileCoord& tile, int warpgroup, Pipeline& pipeline,
                                                      cutlass::PipelineState<kStages>& read,
                                                      cutlass::PipelineState<kStages>& release) {
  const int64_t m0 = tile.m * kBM;
  if (tile.n == 0) {
    CUTE_UNROLL
    for (int i = 0; i < size(gb_acc); ++i) {
      const int64_t m = m0 + get<0>(gb_coords(i));
      const int j = get<1>(gb_coords(i));
      if (m < p.M && j < p.r) p.gb[m * p.r + j] = gb_acc(i);
    }
  }
  pipeline.consumer_wait(read);  // lora_A's tile has landed
  const int stage = read.index();
  CUTE_UNROLL
  for (int i = 0; i < size(gb_acc); i += 2) {  // values i, i + 1: ranks j, j + 1 of one row, j even
    const uint32_t packed = uint32_t{T(gb_acc(i)).raw()} | (uint32_t{T(gb_acc(i + 1)).raw()} << 16);
    // The offset added to the shared array itself (not through a CuTe smem_ptr), so the
    // store stays a shared-memory STS rather than a generic one.
    const int offset = k_major_stage_offset<T>(get<0>(gb_coords(i)), get<1>(gb_coords(i)), stage);
    *reinterpret_cast<uint32_t*>(a_stages + offset) = packed;
  }
  cutlass::arch::fence_view_async_shared();            // generic writes → wgmma's async proxy
  cutlass::arch::NamedBarrier::sync(128, warpgroup);  // the warpgroup's 64 rows are written
  clear(acc_lora);
  warpgroup_fence_operand(acc_lora);
  auto batch = [&](auto blocks) {
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < decltype(blocks)::value; ++kb) {
      cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), acc_lora);
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
  };
  static_assert(kGbRanks == 32, "the rank product is one or two 16-deep k-blocks");
  if (p.r <= 16) {
    batch(Int<1>{});
  } else {
    batch(Int<2>{});
  }
  warpgroup_fence_operand(acc_lora);
  pipeline.consumer_release(read);
  ++read;
  ++release;
}

// The consumers: for each output tile of this block (the producer's order), both products
// through the pipeline, then the epilogue.
template <class T, bool kBKMajor, bool kFusedGb>
__device__ void consume_and_store(const Params<T, kBKMajor>& p, SharedStorage<T, kBKMajor, kFusedGb>& smem,
                                  Pipeline& pipeline) {
  using TiledMma = TiledMmaOf<T, kBKMajor>;
  TiledMma mma;
  const int thread = threadIdx.x, warpgroup = thread / 128;
  Tensor sA = make_tensor(make_smem_ptr(smem.a), StageLayout<T, true>{});
  Tensor sB = make_tensor(make_smem_ptr(smem.b), StageLayout<T, kBKMajor>{});
  auto wg_mma = mma.get_slice(warpgroup * 128);
  Tensor tCrA = wg_mma.make_fragment_A(wg_mma.partition_A(sA));  // smem descriptors (MMA, M, K, stages)
  Tensor tCrB = wg_mma.make_fragment_B(wg_mma.partition_B(sB));
  Tensor acc_lora = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor acc_main = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor coords = mma.get_slice(thread).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  // The two warpgroups' staging rows as one 128-row tile (staging[1] follows staging[0]):
  // warpgroup w's elements land in staging[w].
  Tensor tCsC = mma.get_slice(thread).partition_C(
      make_tensor(make_smem_ptr(&smem.staging[0][0]),
                  make_layout(Shape<Int<kBM>, Int<kBN>>{}, Stride<Int<kStagingLd<T>>, _1>{})));
  T* staging = smem.staging[warpgroup];
  const int row_base = warpgroup * (kBM / 2);
  mma.accumulate_ = GMMA::ScaleOut::One;
  static_assert(decltype(size<2>(tCrA))::value == kBK / 16, "a 64-deep stage is four 16-deep wgmmas");
  auto issue_main = [&](int kb, int stage) { cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), acc_main); };
  auto issue_lora = [&](int kb, int stage) { cute::gemm(mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), acc_lora); };
  auto fence_main = [&] { warpgroup_fence_operand(acc_main); };
  auto fence_lora = [&] { warpgroup_fence_operand(acc_lora); };

  cutlass::PipelineState<kStages> read{}, release{};
  const int64_t tiles_m = ceil_div(int64_t{p.M}, kBM), tiles_n = ceil_div(int64_t{p.Nc}, kBN);
  for (int64_t index = blockIdx.x; index < tiles_m * tiles_n; index += gridDim.x) {
    const TileCoord tile = grouped_tile(index, tiles_m, tiles_n);
    // Zeroed here, before this tile's first wgmma (the previous tile's are all complete), and
    // every wgmma accumulates (ScaleOut::One): a runtime zeroing flag, or a register defined
    // between warpgroup_arrive and wait, would make ptxas serialise the wgmmas (C7515).
    bool batch_in_flight = false;
    if constexpr (kFusedGb) {
      // g·W and gb = g·B in one batch per k-stage (the same g descriptors), then the rank
      // product from round(gb); acc_lora is live only after the main loop.
      using GbTiledMma = GbTiledMmaOf<T>;
      GbTiledMma gb_mma;
      gb_mma.accumulate_ = GMMA::ScaleOut::One;
      Tensor sGb = make_tensor(make_smem_ptr(smem.gb_b), GbStageLayout<T>{});
      auto wg_gb_mma = gb_mma.get_slice(warpgroup * 128);
      Tensor tGrA = wg_gb_mma.make_fragment_A(wg_gb_mma.partition_A(sA));
      Tensor tGrB = wg_gb_mma.make_fragment_B(wg_gb_mma.partition_B(sGb));
      Tensor gb_acc = partition_fragment_C(gb_mma, Shape<Int<kBM>, Int<kGbRanks>>{});
      Tensor gb_coords =
          gb_mma.get_slice(thread).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kGbRanks>>{}));
      clear(acc_main);
      clear(gb_acc);
      warpgroup_fence_operand(acc_main);
      warpgroup_fence_operand(gb_acc);
      consume(
          [&](int kb, int stage) {
            issue_main(kb, stage);
            cute::gemm(gb_mma, tGrA(_, _, kb, stage), tGrB(_, _, kb, stage), gb_acc);
          },
          [&] {
            fence_main();
            warpgroup_fence_operand(gb_acc);
          },
          p.depth, pipeline, read, release, batch_in_flight);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_main);
      warpgroup_fence_operand(gb_acc);
      pipeline.consumer_release(release);  // the last k-stage
      ++release;                           // == read: the rank stage
      fused_gb_rank_product(p, mma, tCrA, tCrB, gb_acc, gb_coords, acc_lora, smem.a, tile, warpgroup, pipeline,
                            read, release);
    } else {
      clear(acc_lora);
      clear(acc_main);
      warpgroup_fence_operand(acc_lora);
      warpgroup_fence_operand(acc_main);
      consume(issue_lora, fence_lora, p.r, pipeline, read, release, batch_in_flight);
      consume(issue_main, fence_main, p.depth, pipeline, read, release, batch_in_flight);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_lora);
      warpgroup_fence_operand(acc_main);
      pipeline.consumer_release(release);  // the tile's last stage: the producer may refill it
      ++release;                           // == read: the next tile's first stage
    }

    // Epilogue: out = round(acc_main + factor·acc_lora + bias), through this warpgroup's
    // staging rows, then 16-byte stores of them. Only the forward's bias reads memory per
    // element, so only it needs the bounds test, and only on edge tiles.
    const int64_t m0 = tile.m * kBM, c0 = tile.n * kBN;
    uint32_t compact[keep_bits::kWgmmaRegs] = {0u, 0u};  // dx: this thread's keep flags of the tile
    if constexpr (kBKMajor) {  // forward: the bias bounds test on edge tiles only
      if (c0 + kBN <= p.Nc && p.bias_pairs) {
        stage_tile<false, true>(p, acc_main, acc_lora, coords, tCsC, m0, c0, compact);
      } else {
        stage_tile<true, true>(p, acc_main, acc_lora, coords, tCsC, m0, c0, compact);
      }
    } else {  // dx: no bias; the index width chosen once per kernel
      if (p.small_index) {
        stage_tile<false, true>(p, acc_main, acc_lora, coords, tCsC, m0, c0, compact);
      } else {
        stage_tile<false, false>(p, acc_main, acc_lora, coords, tCsC, m0, c0, compact);
      }
      // The tile's keep bits: a row's 4 words come out of its quad (one per lane, q = lane % 4),
      // each stored once; p.keep_bits is uniform, so the whole warp shuffles or none of it.
      if (p.drop.enabled && p.keep_bits != nullptr) {
        const int64_t col = c0 + 32 * (thread & 3);
        CUTE_UNROLL
        for (int h = 0; h < keep_bits::kWgmmaRegs; ++h) {
          const uint32_t word = keep_bits::quad_transpose(compact[h]);
          const int64_t m = m0 + get<0>(coords(2 * h));  // the row of register h (wgmma_slot)
          if (m < p.M && col < p.Nc) {
            p.keep_bits[m * p.keep_ld + col / 32] = keep_bits::clip_to_columns(word, col, p.Nc);
          }
        }
      }
    }
    cutlass::arch::NamedBarrier::sync(128, warpgroup);  // this warpgroup's rows are staged
    write_staged_rows<T, kBM / 2>(staging, thread % 128, 128, p.out, p.ld_out, m0 + row_base, p.M, c0, p.Nc,
                                  p.vec_out);
    cutlass::arch::NamedBarrier::sync(128, warpgroup);  // staging read out before the next tile's writes
  }
}

#endif  // LORA_FUSED_SM90A_DEVICE

template <class T, bool kBKMajor, bool kFusedGb>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(const __grid_constant__ Params<T, kBKMajor> p) {
#if defined(LORA_FUSED_SM90A_DEVICE)
  extern __shared__ unsigned char smem_raw[];
  // Aligned to 1024 bytes by pointer arithmetic on smem_raw (not a round trip through an
  // integer), so the compiler keeps the shared address space: STS/LDS, not generic stores.
  const unsigned misalignment = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) & 1023u;
  unsigned char* base = smem_raw + ((1024u - misalignment) & 1023u);
  auto& smem = *reinterpret_cast<SharedStorage<T, kBKMajor, kFusedGb>*>(base);

  const bool producer = threadIdx.x >= kConsumerThreads;
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = kPipelineStageBytes<kFusedGb>;
  pipe_params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == kProducerThread;
  pipe_params.num_consumers = kConsumerThreads;
  Pipeline pipeline(smem.pipeline, pipe_params, Shape<_1, _1, _1>{});  // warp 0 initialises the barriers
  __syncthreads();  // barriers initialised before anyone waits on them

  if (producer) {
    if (threadIdx.x == kProducerThread) produce(p, smem, pipeline);
  } else {
    consume_and_store(p, smem, pipeline);
  }
#else
  __trap();  // compiled for an architecture without wgmma/TMA: never launched (sm90_kernels_built)
#endif
}

// ---- host side ------------------------------------------------------------------------

// The four operands of each product as TMA describes them (the order of Params: P, Q, L, R).
// One list serves the dispatch check and the descriptors, so they cannot disagree. L is
// round(xa) or round(gb) [M, r] (128-row boxes), except in the fused-gb dx, where it is
// lora_Bᵀ [r, N] (32-row boxes: tma_gb) and round(gb) never leaves the kernel.
struct Operands {
  TmaOperand p, q, l, r;
  bool fused_gb = false;
  int l_box_rows() const { return fused_gb ? kGbRanks : kBM; }
};

Operands forward_operands(const ForwardArgs& a) {
  return {{a.x, a.M, a.K, a.ldx, true, 2},
          {a.weight, a.N, a.K, a.K, true, 2},
          {a.xa_rounded, a.M, a.r, a.rank_ld, true, 2},
          {a.lora_B_tma, a.N, a.r, a.lora_B_tma_ld, true, 2}};
}

Operands dx_operands(const BackwardArgs& a) {
  const bool fused_gb = sm90_dx_computes_gb(a.r, a.K);
  const TmaOperand l = fused_gb ? TmaOperand{a.lora_B_t_tma, a.r, a.N, a.lora_B_t_tma_ld, true, 2}
                                : TmaOperand{a.gb_rounded, a.M, a.r, a.rank_ld, true, 2};
  return {{a.grad_y, a.M, a.N, a.ldg, true, 2},
          {a.weight, a.K, a.N, a.K, false, 2},  // W viewed [K, N]: (c, n) at W[n·K + c]
          l,
          {a.lora_A, a.K, a.r, a.K, false, 2},  // lora_A viewed [K, r]: (c, j) at A[j·K + c]
          fused_gb};
}

// cuTensorMapEncodeTiled from the driver, looked up once per process (nullptr without a
// driver: then nothing is encodable and every call takes the sm80 kernels).
using EncodeTiled = decltype(&cuTensorMapEncodeTiled);
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* pfn = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &pfn, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &pfn, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not this call's launch error
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(pfn);
  }();
  return fn;
}

// Whether the driver accepts the descriptor make_tma will ask CuTe for, with the same
// arguments CuTe passes (copy_traits_sm90_tma.hpp: rank 2, the unit-stride extent first,
// box 64 × box_rows K-major (128, or 32 for lora_Bᵀ) or 64 × 64 MN-major, 128-byte swizzle, L2 promotion 128B, no OOB
// fill). CuTe itself answers a failed encode with assert(false), i.e. abort() of the whole
// process: this check runs first, so a failure means "use the sm80 kernels" instead. The
// driver's encode is a pure host function, deterministic in its arguments.
template <class T>
bool tma_encodable(const TmaOperand& o, int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const CUtensorMapDataType format =
      std::is_same_v<T, cute::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(o.k_major ? o.depth : o.rows),
                              static_cast<cuuint64_t>(o.k_major ? o.rows : o.depth)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(o.ld) * sizeof(T)};
  const cuuint32_t box[2] = {kBK, o.k_major ? static_cast<cuuint32_t>(box_rows) : uint32_t{kBK}};
  const cuuint32_t element_strides[2] = {1, 1};
  CUtensorMap map;
  const CUresult result = encode(&map, format, 2, const_cast<void*>(o.ptr), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS;
}

// The documented constraints (cuda_tma_operand.h) for all four operands; with `encode`, also
// the driver's own answer for each.
template <class T>
bool operands_ok(const Operands& o, bool encode) {
  for (const TmaOperand* operand : {&o.p, &o.q, &o.l, &o.r}) {
    if (!tma_operand_ok(*operand)) return false;
  }
  if (!encode) return true;
  return tma_encodable<T>(o.p, kBM) && tma_encodable<T>(o.q, kBN) && tma_encodable<T>(o.l, o.l_box_rows()) &&
         tma_encodable<T>(o.r, kBN);
}

template <class T, bool kKMajor, class Stages = StageLayout<T, kKMajor>>
auto make_tma(const TmaOperand& o) {
  return make_tma<T, kKMajor, Stages>(static_cast<const T*>(o.ptr), static_cast<int>(o.rows),
                                      static_cast<int>(o.depth), o.ld);
}

// The SM count of a device, queried once per device (a per-call attribute query is host
// overhead on small calls).
cudaError_t sm_count(int* sms) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && (*sms = cached[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device < kMaxDevices) cached[device].store(*sms, std::memory_order_relaxed);
  return err;
}

// LORA_FUSED_SM90_MAX_BLOCKS=n (n ≥ 1; for tests): at most n blocks, so that small shapes
// walk many tiles per block and the pipeline state carried across tiles (stage indices and
// phases wrapping mid-tile, the staging barrier) is exercised. Read per call (a getenv is
// negligible next to a launch), so a test can set it around one call.
int64_t max_blocks_override() {
  const char* value = std::getenv("LORA_FUSED_SM90_MAX_BLOCKS");
  if (value == nullptr || *value == '\0') return 0;
  const long long n = std::strtoll(value, nullptr, 10);
  return n >= 1 ? n : 0;
}

// Persistent: one block per SM (its shared memory allows no more), each walking the output
// tiles blockIdx.x, blockIdx.x + gridDim.x, ...; fewer blocks when there are fewer tiles.
template <class T, bool kBKMajor, bool kFusedGb = false>
cudaError_t run(const Params<T, kBKMajor>& p, cudaStream_t stream) {
  const int64_t tiles = ceil_div(int64_t{p.M}, kBM) * ceil_div(int64_t{p.Nc}, kBN);
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  int64_t blocks = tiles < sms ? tiles : sms;
  const int64_t cap = max_blocks_override();
  if (cap > 0 && cap < blocks) blocks = cap;
  return launch<gemm_kernel<T, kBKMajor, kFusedGb>>(p, blocks, 1, smem_bytes<T, kBKMajor, kFusedGb>(), stream,
                                                    kThreads);
}

// The fields both products fill alike: the sizes, the P, Q, R descriptors (and L's, except
// in the fused-gb dx, whose L is lora_Bᵀ in tma_gb), the output and s. Output [M, Nc] with
// Nc columns per row.
template <class T, bool kBKMajor>
Params<T, kBKMajor> product_params(const Operands& o, int64_t M, int64_t Nc, int64_t depth, int64_t r, void* out,
                                   double scaling) {
  Params<T, kBKMajor> p{};
  p.M = static_cast<int>(M), p.Nc = static_cast<int>(Nc), p.depth = static_cast<int>(depth);
  p.r = static_cast<int>(r);
  p.tma_p = make_tma<T, true>(o.p);
  p.tma_q = make_tma<T, kBKMajor>(o.q);
  if (o.fused_gb) {
    p.tma_gb = make_tma<T, true, GbStageLayout<T>>(o.l);
  } else {
    p.tma_l = make_tma<T, true>(o.l);
  }
  p.tma_r = make_tma<T, kBKMajor>(o.r);
  p.out = static_cast<T*>(out);
  p.ld_out = Nc;
  p.scaling = static_cast<float>(scaling);
  p.vec_out = Nc % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  return p;
}

template <class T>
cudaError_t forward_t(const ForwardArgs& a, cudaStream_t stream) {
  Params<T, true> p = product_params<T, true>(forward_operands(a), a.M, a.N, a.K, a.r, a.y, a.scaling);
  p.bias = static_cast<const T*>(a.bias);
  p.drop = DropoutSpec{};  // the forward's mask is in xa already
  p.keep_bits = nullptr;
  p.keep_ld = 0;
  p.kept_factor = p.scaling;
  p.small_index = true;
  p.bias_pairs = reinterpret_cast<uintptr_t>(a.bias) % 4 == 0;
  return run(p, stream);
}

template <class T>
cudaError_t dx_t(const BackwardArgs& a, cudaStream_t stream) {
  const Operands o = dx_operands(a);
  Params<T, false> p = product_params<T, false>(o, a.M, a.K, a.N, a.r, a.dx, a.scaling);
  p.gb = static_cast<float*>(a.gb);  // written by the fused-gb dx (column tile 0)
  p.bias = nullptr;
  p.drop = a.dropout;  // hash index m·K + c: x's element (m, c)
  p.keep_bits = static_cast<uint32_t*>(a.keep_bits);  // written here, read by sm80_dA
  p.keep_ld = keep_words_per_row(a.K);
  // s·(1/(1 − p)) rounded as the device did it per element before: fp32 s times fp32 scale.
  p.kept_factor = p.scaling * static_cast<float>(a.dropout.scale);
  p.small_index = static_cast<uint64_t>(a.M) * static_cast<uint64_t>(a.K) <= (uint64_t{1} << 32);
  p.bias_pairs = false;
  return o.fused_gb ? run<T, false, true>(p, stream) : run<T, false, false>(p, stream);
}

bool is_half(DType dtype) { return dtype == DType::kHalf || dtype == DType::kBFloat16; }

template <class Args>
bool supported(const Args& a, const Operands& o, bool encode) {
  if (!is_half(a.dtype) || a.M < 1 || a.N < 1 || a.K < 1 || a.r < 1) return false;
  return a.dtype == DType::kBFloat16 ? operands_ok<cute::bfloat16_t>(o, encode) : operands_ok<cute::half_t>(o, encode);
}

}  // namespace sm90

bool sm90_kernels_built() {
#if defined(LORA_FUSED_SM90A)
  return true;
#else
  return false;
#endif
}

// The dispatch check: the documented constraints, then the driver's encode of each descriptor
// (so no input that passes can make CuTe's encode fail and abort).
bool sm90_forward_supported(const ForwardArgs& a) { return sm90::supported(a, sm90::forward_operands(a), true); }

bool sm90_dx_supported(const BackwardArgs& a) { return sm90::supported(a, sm90::dx_operands(a), true); }

cudaError_t sm90_forward(const ForwardArgs& a, cudaStream_t stream) {
  // cuda_ops.cpp called sm90_forward_supported (with the driver's encode check) first.
  if (!sm90_kernels_built() || !sm90::supported(a, sm90::forward_operands(a), false)) return cudaErrorInvalidValue;
  return dispatch_half(a.dtype, [&](auto tag) { return sm90::forward_t<decltype(tag)>(a, stream); });
}

cudaError_t sm90_dx(const BackwardArgs& a, cudaStream_t stream) {
  if (!sm90_kernels_built() || !sm90::supported(a, sm90::dx_operands(a), false)) return cudaErrorInvalidValue;
  return dispatch_half(a.dtype, [&](auto tag) { return sm90::dx_t<decltype(tag)>(a, stream); });
}

}  // namespace cuda
}  // namespace lora_fused
