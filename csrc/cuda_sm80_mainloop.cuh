// The sm80 tensor-core mainloop of the fp16/bf16 kernels (and of fp32 on TF32, below),
// on CuTe (CUTLASS 3.x): a multistage cp.async pipeline into swizzled shared memory,
// shared-to-register copies (ldmatrix; 32-bit loads for fp32 MN-major), mma.sync m16n8k16
// (TF32: m16n8k8), fp32 accumulators. The same SASS serves sm_86/sm_89, and the sm_90a
// build compiles it too (mma.sync and cp.async exist on Hopper).
//
// Tiles. A block computes a 128×128 tile of C = A·Bᵀ with 8 warps: the TiledMMA is 2×4
// m16n8k16 atoms (one warp each) permuted to a 32×64×16 tile, so each warp's B reads are
// 16 columns wide (ldmatrix.x4), repeated 4×2 over the block tile: 64 fp32 accumulators
// per thread. (4 warps of 64×64 need 128 accumulators and reach 255 registers with this
// file's 64-bit bounds arithmetic: ptxas spilled.) k-tiles are 32 deep: a 128-row operand
// stage is 8 KB, and four stages of A and B (64 KB) leave room for a one-stage LoRA tile
// pair (16 KB) within sm_86/sm_89's 99 KB per block. The rank-thin products use the same
// BlockMma with a 32-rank side (TallBlock / WideBlock below, argued in cuda_sm80_thin.cu);
// occupancy per kernel is argued where each kernel is declared.
//
// Pipeline depth. Four stages keep three k-tiles in flight while one is consumed: at
// K = 768 that is 24 k-tiles, and the loads of tile t+3 overlap the MMAs of tile t
// (an A100 needs about 2-3 tiles in flight to cover DRAM latency at this tile size).
//
// Synchronisation. Group g of cp.async always holds k-tile g (possibly empty, so the
// count stays exact); waiting until at most kStages-2 groups are pending means tile kt
// has landed, and the __syncthreads after the wait also proves every warp finished
// tile kt-1, whose stage the next load then overwrites. Between the wait and that barrier
// a thread may rewrite the chunks it copied itself (transform_stage: the dropout mask on
// x), since its own cp.async groups are complete and no other thread reads the stage yet.
//
// Bounds. Every 16-byte chunk is predicated on its row and its 8 k-columns: chunks
// outside the operand are zero-filled (cp.async with src-size 0 reads nothing). The
// vector path needs the contiguous extent and the leading dimension to be multiples of
// a chunk (8 elements, 4 for fp32) and 16-byte aligned bases; otherwise the same tiles are filled with
// element loads (slower, same results). Zeros in the k-residue add nothing to C.
//
// Hopper: the forward and dx GEMMs of fp16/bf16 run on cuda_sm90.cu's TMA + wgmma kernel
// on sm_90 devices whenever TMA can load their operands (cuda_ops.cpp); these kernels serve
// there for misaligned operands (K or a row stride not a multiple of 8 elements, bases off
// 16 bytes), for fp32 on TF32, and for the rank-thin GEMMs (xa, gb, dB|db, dA), which are
// bound by reading x or g once. What remains for Hopper (issue 11): gb fused into the sm90
// dx (as the sm80 dx does), and TMA/wgmma versions of the thin GEMMs.
//
// fp32 on TF32 (issue 11 point 3; cuda_ops.cpp picks it when PyTorch allows TF32 matmuls):
// the same tiles in bytes — a 16-byte chunk is 4 floats (kChunkOf), a k-tile 16 deep
// (kBKOf: 64-byte rows, so four stages stay 64 KB and the K-major swizzle, re-based on
// 4-element chunks, keeps the same bank pattern) — with SM80_16x8x8_F32TF32TF32F32_TN. cp.async
// lands plain fp32 in shared memory; K-major operands reach tfloat32_t fragments through
// ldmatrix (U32x4: K-major rows of 4 floats), MN-major ones (dx's W, read as stored) through
// 32-bit shared-memory loads, one per fragment value (ldmatrix.trans moves 16-bit values
// only), and round_operands_to_tf32 rounds each register with cvt.rna.tf32.f32 before the
// mma: round to nearest (ties away), at most 2^-11 relative error per operand. Raw fp32 bits
// handed to a .tf32 mma are not rounded by it (at best their low 13 mantissa bits are
// dropped: up to 2^-10, biased toward zero), which could exceed the 2x of PyTorch's own TF32
// matmul error that DESIGN.md §5 allows. Accumulation, xa/gb, s, mask and the final rounding
// stay fp32. cuda_sm80_thin.cu's wide GEMM (dB|db, dA) reads its MN-major g / x as dx reads W.
//
// The fp32 MN-major layout and its banks. A k-line is 32 floats (128 bytes, all 32 banks)
// of consecutive rows, 8 lines per atom; element (n, k) of an atom sits at n + 32·k, and the
// swizzle XORs bits 1-2 of the chunk index (n bits 3-4) with k bits 0-1 (Swizzle<2, 3, 2>),
// so its bank is n mod 8 + 8·((n / 8 mod 4) XOR (k mod 4)). Reads: one 32-bit load of an
// m16n8k8 B fragment value gives lane l the element (n0 + l / 4, k0 + l mod 4) (n0 a
// multiple of 8, k0 of 4): banks l / 4 + 8·(c XOR l mod 4), 32 distinct, no conflict (the
// 16-bit layout's Swizzle<3, 2, 3> re-based on 4-float chunks would pair lanes 2-way: chunk
// bit 0 would carry both l / 16 and k bit 0). Writes: 8 consecutive threads' 16-byte
// cp.async chunks are the 8 chunks of one k-line, permuted by the XOR: 8 distinct 16-byte
// bank groups, as for any swizzle confined to a 128-byte k-line (the write check in
// tests/cuda/sm80_layout_check.cu guards that confinement; its read check the swizzle). Cost: a
// warp's 32 columns of B per 8-deep k-block are 8 such loads, one 128-byte wavefront each:
// the same 1 KB and 8 wavefronts as 2 ldmatrix.x4 would be, in 4x the load instructions.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"

namespace lora_fused {
namespace cuda {
namespace sm80 {

using namespace cute;

constexpr int kBM = 128, kBN = 128, kStages = 4, kThreads = 256;

// Per element type T (what global and shared memory hold): a 16-byte cp.async chunk is
// kChunkOf<T> elements, and a k-tile is kBKOf<T> deep, 64 bytes per row, so every stage,
// swizzle and bank pattern below is the same in bytes for fp16/bf16 (8, 32) and fp32 (4, 16).
template <class T>
constexpr int kChunkOf = 16 / static_cast<int>(sizeof(T));
template <class T>
constexpr int kBKOf = 64 / static_cast<int>(sizeof(T));

// The MMA of an element type: m16n8k16 for fp16/bf16; for fp32 the TF32 m16n8k8 (fp32 in
// memory and shared memory, rounded to TF32 in registers: round_operands_to_tf32), its
// operands typed as CuTe's tfloat32_t. TileK is the TiledMMA's k-extent (one atom).
template <class T>
struct MmaOp;
template <>
struct MmaOp<cute::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
  using value = cute::half_t;
  using TileK = _16;
};
template <>
struct MmaOp<cute::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
  using value = cute::bfloat16_t;
  using TileK = _16;
};
template <>
struct MmaOp<float> {
  using type = SM80_16x8x8_F32TF32TF32F32_TN;
  using value = cute::tfloat32_t;
  using TileK = _8;
};

template <class T>
using TiledMmaFor = decltype(make_tiled_mma(typename MmaOp<T>::type{}, Layout<Shape<_2, _4, _1>>{},
                                            Tile<_32, _64, typename MmaOp<T>::TileK>{}));
static_assert(kThreads == 8 * 32, "2x4 MMA atoms of one warp each");

// Shared-memory layouts (rows, k, stages). K-major: rows of kBK values (64 bytes) in
// 8-row atoms; the swizzle XORs a row's four 16-byte chunk indices with row bits 1-2, so
// ldmatrix's 8 row reads of one chunk column hit 8 distinct bank groups. MN-major: 128
// bytes of contiguous rows per k in 8-k atoms; 16-bit: the 8 chunk indices XORed with the
// k index, read with ldmatrix.trans; fp32: chunk index bits 1-2 XORed with k bits 0-1, read
// with 32-bit loads (the bank argument above). All keep each chunk contiguous and 16-byte
// aligned (one cp.async each; tests/cuda/sm80_layout_check.cu). The swizzle's base is the
// chunk: log2(kChunk) element bits.
template <class T>
constexpr int kChunkBits = sizeof(T) == 2 ? 3 : 2;
template <class T, int kRows, int kDepth>
using KMajorSmem = decltype(tile_to_shape(
    composition(Swizzle<2, kChunkBits<T>, 3>{}, Layout<Shape<_8, Int<kBKOf<T>>>, Stride<Int<kBKOf<T>>, _1>>{}),
    Shape<Int<kRows>, Int<kBKOf<T>>, Int<kDepth>>{}));
// The MN-major swizzle and shared-to-register atom are picked by element width for exactly
// two widths: 16-bit (8-element chunks, ldmatrix.trans) and 32-bit (32-row atoms, one 32-bit
// load per value); any other width fails here instead of getting the 32-bit choice.
template <class T>
constexpr bool kMNMajorWidthSupported = sizeof(T) == 2 || sizeof(T) == 4;
template <class T>
using MNMajorSwizzle = std::conditional_t<sizeof(T) == 2, Swizzle<3, kChunkBits<T>, 3>, Swizzle<2, 3, 2>>;
template <class T, int kRows, int kDepth>
using MNMajorSmem = decltype(tile_to_shape(
    composition(MNMajorSwizzle<T>{}, Layout<Shape<Int<8 * kChunkOf<T>>, _8>, Stride<_1, Int<8 * kChunkOf<T>>>>{}),
    Shape<Int<kRows>, Int<kBKOf<T>>, Int<kDepth>>{}));

template <class T, bool kKMajor, int kRows, int kDepth>
struct OperandSmemOf {  // a specialisation, so only the chosen layout is formed
  using type = KMajorSmem<T, kRows, kDepth>;
};
template <class T, int kRows, int kDepth>
struct OperandSmemOf<T, false, kRows, kDepth> {
  static_assert(kMNMajorWidthSupported<T>, "MN-major stages: 16- or 32-bit elements only");
  using type = MNMajorSmem<T, kRows, kDepth>;
};
template <class T, bool kKMajor, int kRows, int kDepth>
using OperandSmem = typename OperandSmemOf<T, kKMajor, kRows, kDepth>::type;

// Shared memory into MMA fragments: ldmatrix rows of 16 bytes for a K-major operand (any
// element width: for TF32 each row is 4 values), ldmatrix.trans for a 16-bit MN-major one,
// and for an fp32 MN-major one a 32-bit load per fragment value (ldmatrix cannot transpose
// 32-bit elements; CuTe's UniversalCopy, as CUTLASS's own MN-major TF32 configurations).
template <bool kKMajor, class T>
struct S2RAtomOf {
  static_assert(kMNMajorWidthSupported<T>, "shared-to-register atoms: 16- or 32-bit elements only");
  using V = typename MmaOp<T>::value;
  using MNMajor = std::conditional_t<sizeof(T) == 2, Copy_Atom<SM75_U16x8_LDSM_T, V>, Copy_Atom<UniversalCopy<uint32_t>, V>>;
  using type = std::conditional_t<kKMajor, Copy_Atom<SM75_U32x4_LDSM_N, V>, MNMajor>;
};
template <bool kKMajor, class T>
using S2RAtom = typename S2RAtomOf<kKMajor, T>::type;

// fp32 -> TF32 rounding of a register fragment just loaded from shared memory: cvt.rna
// (to nearest, ties away from zero; Inf and NaN stay), so each operand carries at most
// half a TF32 ulp (2^-11 relative) of error, instead of the up to one ulp of letting
// mma.sync ignore the low 13 bits. A no-op for fp16/bf16.
template <class T, class Fragment>
__device__ __forceinline__ void round_operands_to_tf32(Fragment&& fragment) {
  if constexpr (std::is_same_v<T, float>) {
    CUTE_UNROLL
    for (int i = 0; i < size(fragment); ++i) {
      uint32_t bits;
      asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(__uint_as_float(fragment(i).raw())));
      fragment(i) = cute::tfloat32_t::bitcast(bits);
    }
  }
}

// A view of one GEMM operand in global memory: element (row, k) at
// ptr[row * ld + k] (K-major) or ptr[k * ld + row] (MN-major), `rows` × `depth` of them.
template <class T>
struct Operand {
  const T* ptr;
  int64_t ld, rows, depth;
  bool vec;  // 16-byte chunks along the contiguous dimension are legal
};

// True when an operand may be read in aligned 16-byte chunks along its contiguous dimension.
// Called as vector_loadable<T>(ptr, ...): chunks are 16 bytes of T.
template <class T>
inline bool vector_loadable(const void* ptr, int64_t ld, int64_t contiguous_extent) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % kChunkOf<T> == 0 && contiguous_extent % kChunkOf<T> == 0;
}

// Calls f(rr, kk) for each 16-byte chunk thread threadIdx.x copies into a kRows × kBKOf<T>
// stage: (rr, kk) is the chunk's first element, the chunk runs along k (K-major) or along
// rows (MN-major). load_stage and transform_stage share this map, so a thread that waited
// for its own cp.async groups may rewrite exactly the chunks it copied, before the barrier.
template <class T, bool kKMajor, int kRows, class F>
__host__ __device__ __forceinline__ void for_each_chunk_of_thread(int thread, F&& f) {
  constexpr int kBK = kBKOf<T>, kChunk = kChunkOf<T>;
  constexpr int kChunksPerLine = (kKMajor ? kBK : kRows) / kChunk;
  constexpr int kChunks = kRows * kBK / kChunk;
  static_assert(kChunks % kThreads == 0 || kChunks < kThreads, "chunks spread evenly, or one per thread at most");
  constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = thread + i * kThreads;
    if (kChunks < kThreads && c >= kChunks) return;
    // K-major: a line is one row's kBK values; MN-major: one k's kRows values.
    const int line = c / kChunksPerLine, first = (c % kChunksPerLine) * kChunk;
    f(kKMajor ? line : first, kKMajor ? first : line);
  }
}

template <class T, bool kKMajor, int kRows, class F>
__device__ __forceinline__ void for_each_own_chunk(F&& f) {
  for_each_chunk_of_thread<T, kKMajor, kRows>(threadIdx.x, f);
}

// Fills stage `stage` of `smem` (layout L: rows × kBKOf<T> × stages) with rows [row0, row0 +
// kRows) and k-columns [k0, k0 + kBKOf<T>) of `op`, zero outside it.
template <bool kKMajor, int kRows, class T, class L>
__device__ __forceinline__ void load_stage(T* smem, L layout, int stage, const Operand<T>& op, int64_t row0,
                                           int64_t k0) {
  constexpr int kChunk = kChunkOf<T>;
  for_each_own_chunk<T, kKMajor, kRows>([&](int rr, int kk) {
    T* dst = smem + layout(rr, kk, stage);
    const int64_t row = row0 + rr, k = k0 + kk;
    const int64_t offset = kKMajor ? row * op.ld + k : k * op.ld + row;
    if (op.vec) {
      const bool inside = row < op.rows && k < op.depth;
      cp_async_16(dst, inside ? op.ptr + offset : op.ptr, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        const bool inside = kKMajor ? (row < op.rows && k + e < op.depth) : (row + e < op.rows && k < op.depth);
        dst[e] = inside ? op.ptr[offset + e] : T(0.f);
      }
    }
  });
}

// Rewrites, in place, the chunks of stage `stage` this thread loaded with load_stage:
// element (row0 + rr, k0 + kk) becomes T(f(v, row, k)). Call it after cp_async_wait_group
// has covered the stage and before the barrier that publishes it (BlockMma::pipeline's
// `landed` hook): no other thread touches these chunks in between. A chunk is one aligned
// 16-byte unit of shared memory (tests/cuda/sm80_layout_check.cu), so it is read and
// written back with one 16-byte access each, converted in registers.
template <bool kKMajor, int kRows, class T, class L, class F>
__device__ __forceinline__ void transform_stage(T* smem, L layout, int stage, int64_t row0, int64_t k0, F&& f) {
  constexpr int kChunk = kChunkOf<T>;
  static_assert(kChunk * sizeof(T) == sizeof(uint4), "a chunk is one 16-byte unit");
  for_each_own_chunk<T, kKMajor, kRows>([&](int rr, int kk) {
    uint4* chunk = reinterpret_cast<uint4*>(smem + layout(rr, kk, stage));
    uint4 bits = *chunk;
    T* values = reinterpret_cast<T*>(&bits);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const int64_t row = row0 + rr + (kKMajor ? 0 : e), k = k0 + kk + (kKMajor ? e : 0);
      values[e] = T(f(static_cast<float>(values[e]), row, k));
    }
    *chunk = bits;
  });
}

// The warp-level half of the mainloop: partitions of shared memory and register fragments
// for one block tile, and the MMAs over one shared-memory stage. The defaults are the
// 128×128 tile of the two large GEMMs; cuda_sm80_thin.cu instantiates the rank-thin tiles.
struct NoTransform {
  __device__ void operator()(int, int64_t) const {}
};
struct NoExtraMma {
  __device__ void operator()(int) const {}
};

template <class T, bool kBKMajor, int kRowsA = kBM, int kRowsB = kBN, class MmaT = TiledMmaFor<T>>
struct BlockMma {
  using Mma = MmaT;
  static constexpr int kTileRowsA = kRowsA, kTileRowsB = kRowsB;
  static constexpr int kBK = kBKOf<T>;
  using LayoutA = KMajorSmem<T, kRowsA, kStages>;
  using LayoutB = OperandSmem<T, kBKMajor, kRowsB, kStages>;
  using LayoutLoraA = KMajorSmem<T, kRowsA, 1>;
  using LayoutLoraB = OperandSmem<T, kBKMajor, kRowsB, 1>;
  static constexpr size_t kPipelineBytes = (cosize_v<LayoutA> + cosize_v<LayoutB>) * sizeof(T);
  static constexpr size_t kLoraBytes = (cosize_v<LayoutLoraA> + cosize_v<LayoutLoraB>) * sizeof(T);

  // Issues the loads of the first kStages - 1 k-tiles (one cp.async group per tile, empty
  // past k_tiles, so group g always holds tile g).
  template <class Load>
  __device__ static void prologue(int64_t k_tiles, Load&& load) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load(s, static_cast<int64_t>(s));
      cp_async_commit_group();
    }
  }

  // Builds this thread's views over shared-memory operands (a_s: layout la, rows × kBK ×
  // stages; b_s likewise) — the ldmatrix source partitions and the register fragments
  // they fill — and calls body(mma_stage), where mma_stage(s) runs acc += A·Bᵀ over stage s.
  // Shared memory is viewed as the MMA's operand type (fp32 bits as tfloat32_t: same size).
  template <class Acc, class LA, class LB, class Body>
  __device__ static void with_views(Acc& acc, const T* a_s, LA la, const T* b_s, LB lb, Body&& body) {
    Mma mma;
    auto thr_mma = mma.get_slice(threadIdx.x);
    using V = typename MmaOp<T>::value;
    static_assert(sizeof(V) == sizeof(T), "the MMA reads shared memory as stored");
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<const V*>(a_s)), la);
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<const V*>(b_s)), lb);
    Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));
    Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));
    auto s2r_a = make_tiled_copy_A(S2RAtom<true, T>{}, mma);
    auto s2r_b = make_tiled_copy_B(S2RAtom<kBKMajor, T>{}, mma);
    auto thr_s2r_a = s2r_a.get_slice(threadIdx.x);
    auto thr_s2r_b = s2r_b.get_slice(threadIdx.x);
    Tensor tXsA = thr_s2r_a.partition_S(sA);  // (copy, rows, k-blocks, stages)
    Tensor tXsB = thr_s2r_b.partition_S(sB);
    Tensor tXrA = thr_s2r_a.retile_D(tCrA);
    Tensor tXrB = thr_s2r_b.retile_D(tCrB);
    auto mma_stage = [&](int stage) {
      CUTE_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
        copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
        round_operands_to_tf32<T>(tCrA(_, _, kb));
        round_operands_to_tf32<T>(tCrB(_, _, kb));
        gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
      }
    };
    body(mma_stage);
  }

  // Runs acc += A·Bᵀ over `k_tiles` k-tiles of kBK from the pipeline stages at a_s and b_s
  // (LayoutA, LayoutB), after prologue(). load(s, tile) issues the cp.async of every
  // operand of that tile into stage s; landed(s, tile) runs when this thread's own copies
  // of the tile are complete, before the barrier that makes the stage visible to all
  // (transform_stage rewrites them there). extra_mma(s) runs after the block's own MMAs on
  // stage s, while the stage is still published: a second product over the same A tile
  // (dx's fused gb = g·B).
  template <class Acc, class Load, class Landed = NoTransform, class ExtraMma = NoExtraMma>
  __device__ static void pipeline(Acc& acc, int64_t k_tiles, const T* a_s, const T* b_s, Load&& load,
                                  Landed&& landed = Landed{}, ExtraMma&& extra_mma = ExtraMma{}) {
    with_views(acc, a_s, LayoutA{}, b_s, LayoutB{}, [&](auto& mma_stage) {
      for (int64_t kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait_group<kStages - 2>();  // with a "memory" clobber: `landed` reads the stage
        const int stage = static_cast<int>(kt % kStages);
        landed(stage, kt);
        __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1
        const int64_t next = kt + kStages - 1;
        if (next < k_tiles) load(static_cast<int>(next % kStages), next);  // refills tile kt - 1's stage
        cp_async_commit_group();
        mma_stage(stage);
        extra_mma(stage);
      }
    });
    cp_async_wait_group<0>();
    __syncthreads();  // shared memory is free for what follows
  }

  // acc += A·Bᵀ over the one-stage pair at a_s (LayoutLoraA) and b_s (LayoutLoraB), which the
  // caller filled and published with a barrier.
  template <class Acc>
  __device__ static void single_stage(Acc& acc, const T* a_s, const T* b_s) {
    with_views(acc, a_s, LayoutLoraA{}, b_s, LayoutLoraB{}, [&](auto& mma_stage) { mma_stage(0); });
  }
};

// The rank-thin tiles of cuda_sm80_thin.cu (its header argues them): 32 ranks against 128
// rows or columns, 8 warps of m16n8k16 stacked along the 128 side.
constexpr int kRankTile = 32;
template <class T>
using TallMma = decltype(make_tiled_mma(typename MmaOp<T>::type{}, Layout<Shape<_8, _1, _1>>{},
                                        Tile<_128, _16, typename MmaOp<T>::TileK>{}));
template <class T>
using WideMma = decltype(make_tiled_mma(typename MmaOp<T>::type{}, Layout<Shape<_1, _8, _1>>{},
                                        Tile<_16, _128, typename MmaOp<T>::TileK>{}));
template <class T>
using TallBlock = BlockMma<T, true, kBM, kRankTile, TallMma<T>>;  // C[128 rows, 32 ranks], both K-major
template <class T>
using WideBlock = BlockMma<T, false, kRankTile, kBN, WideMma<T>>;  // C[32 ranks, 128 columns], B MN-major

// Grouped raster order: blocks walk groups of 8 row tiles column by column, so the 8
// row tiles of A and one column tile of B stay in L2 while a wave reuses them.
struct TileCoord {
  int64_t m, n;
};
__host__ __device__ __forceinline__ TileCoord grouped_tile(int64_t block, int64_t tiles_m, int64_t tiles_n) {
  constexpr int64_t kGroup = 8;
  const int64_t per_group = kGroup * tiles_n;
  const int64_t first_m = (block / per_group) * kGroup;
  const int64_t group_rows = tiles_m - first_m < kGroup ? tiles_m - first_m : kGroup;
  const int64_t in_group = block % per_group;
  return {first_m + in_group % group_rows, in_group / group_rows};
}

// Staged output rows: kBN values of T, padded by one 16-byte chunk (rows stay 16-byte
// aligned, and consecutive rows start in different banks).
template <class T>
constexpr int kStagingLd = kBN + kChunkOf<T>;

// Copies kRows staged rows (staging[rr * kStagingLd<T> + cc], already rounded to T) to
// out[row0 + rr, col0 + cc] (leading dim ld), clipped to rows × cols: 16-byte stores where
// `vec_out` (ld, cols multiple of kChunkOf<T>, aligned out), element stores otherwise. Thread
// `thread` of `threads` takes every threads-th chunk, so a warp writes whole row segments.
template <class T, int kRows>
__device__ __forceinline__ void write_staged_rows(const T* staging, int thread, int threads, T* out, int64_t ld,
                                                  int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                                  bool vec_out) {
  constexpr int kChunk = kChunkOf<T>, kLd = kStagingLd<T>;
  constexpr int kChunksPerRow = kBN / kChunk;
  for (int c = thread; c < kRows * kChunksPerRow; c += threads) {
    const int rr = c / kChunksPerRow, cc = (c % kChunksPerRow) * kChunk;
    const int64_t row = row0 + rr, col = col0 + cc;
    if (row >= rows || col >= cols) continue;
    const T* src = staging + rr * kLd + cc;
    T* dst = out + row * ld + col;
    if (vec_out) {  // cols % kChunk == 0, so the whole chunk is inside
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < kChunk && col + e < cols; ++e) dst[e] = src[e];
    }
  }
}

// Rounds the final fp32 tile `acc` to T and writes it through shared memory `staging`
// (kBM × kStagingLd<T> elements) to out[row0 + mm, col0 + nn] (write_staged_rows).
template <class T, class Acc, class ThrMma>
__device__ __forceinline__ void store_tile(const Acc& acc, const ThrMma& thr_mma, T* staging, T* out, int64_t ld,
                                           int64_t row0, int64_t rows, int64_t col0, int64_t cols, bool vec_out) {
  Tensor sC = make_tensor(make_smem_ptr(staging),
                          make_layout(Shape<Int<kBM>, Int<kBN>>{}, Stride<Int<kStagingLd<T>>, _1>{}));
  Tensor tCsC = thr_mma.partition_C(sC);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) tCsC(i) = T(acc(i));
  __syncthreads();
  write_staged_rows<T, kBM>(staging, threadIdx.x, kThreads, out, ld, row0, rows, col0, cols, vec_out);
}

template <class T>
constexpr size_t staging_bytes() { return kBM * kStagingLd<T> * sizeof(T); }

}  // namespace sm80

// Calls f(T{}) with T the CuTe type of a 16-bit dtype; cudaErrorInvalidValue for others.
template <class F>
cudaError_t dispatch_half(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf: return f(cute::half_t{});
    case DType::kBFloat16: return f(cute::bfloat16_t{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_fused
