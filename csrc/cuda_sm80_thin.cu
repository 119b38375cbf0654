// The rank-thin products of the fp16/bf16 and TF32 paths on the CuTe sm80 mainloop
// (cuda_sm80_mainloop.cuh: swizzles, cp.async stages, ldmatrix, mma.sync), by composition:
// the same BlockMma pipeline with a tile whose one side is 32 ranks instead of 128.
//
//   tall GEMM  C[M, r] = A·Bᵀ over depth D, A [M, D] and B [r, D] both K-major:
//       xa = x~·lora_Aᵀ (D = K; the forward's pre-pass) and gb = g·lora_B (D = N, B = lora_Bᵀ,
//       which the op layer transposes once: N·r elements; only where dx does not compute gb
//       itself: r > 32 or no dx; always before the sm90 dx). fp32 out, unscaled; for the sm90
//       kernel (cuda_sm90.cu) also T(out) into a [M, r] workspace with 16-byte rows, the
//       rounded rank operand its TMA loads (the reference's rounding: unscaled, to T).
//   wide GEMM  C[r, n] = A·Bᵀ over a slice of M, A = round(xa)ᵀ or round(gb)ᵀ [rows, M]
//       K-major, B = g or x, element (n, m) at ptr[m·ld + n]: MN-major (ldmatrix.trans;
//       fp32: the mainloop's swizzled 32-row layout and 32-bit shared loads, as dx's W):
//       the split-M partial sums of dB|db (A = [round(xa) | 1]ᵀ: the ones row gives db =
//       Σ_m g) and of dA (B = x~). The partials go to fixed slots, reduced in slice order
//       (cuda_reduce.cuh): deterministic, no atomics.
//   rank_transpose: round(xa)ᵀ / round(gb)ᵀ in the input dtype (the reference's rounding
//       order: unscaled rank intermediates rounded to the input dtype; for fp32 a plain
//       transpose, TF32 rounding comes with the other operand's, in registers), zero-padded to
//       a multiple of 8 columns so the wide GEMM's A operand loads in 16-byte cp.async chunks.
//
// Dropout: x~ = round(x·keep/(1-p)) is formed in shared memory, by the thread that copied
// each chunk, after its cp.async landed and before the barrier that publishes the stage
// (transform_stage in the pipeline's `landed` hook); no extra barrier. xa hashes once per
// element of x per rank tile (once for r ≤ 32). dA reads the keep bits the dx kernel wrote
// (cuda_keep_bits.cuh) whenever dx ran: the same thread cp.asyncs each chunk's 4-byte keep word
// beside the chunk (8 KB of words over the 4 stages: 48 KB per block, still two per SM), so
// the backward hashes x once; without dx it hashes once per element per rank tile. The
// keep-bit variant is its own instantiation (wide_kernel<T, true>): 128 registers on sm_80 and
// sm_90a, no spills, at the cap of two blocks per SM, so re-read ptxas -v after changing it.
//
// fp32 (TF32 tensor cores, when PyTorch allows TF32 matmuls): every thin product, on the same
// tiles in bytes (16-deep k-tiles, 4-float chunks, m16n8k8 TF32 MMAs, both operands rounded
// to TF32 with cvt.rna as they leave shared memory: tests/test_cuda_ptxas.py checks every MMA
// input). The wide GEMM's MN-major g / x stages take the mainloop's fp32 MN-major layout
// (32-row atoms, 32-bit shared loads: no ldmatrix.trans for 32-bit values), as dx's W; dB's db
// row is Σ round_tf32(g)·1, the TF32 reference's operands. Only the hashing wide_kernel<float,
// false> exists: the TF32 dx writes no keep bits, so its dA hashes x once per 32-rank tile.
// TF32 runs dA here but not dB|db (sm80_dB_db takes fp16/bf16 only): its db row would be
// Σ round_tf32(g), and nn.Linear's bias gradient is an exact fp32 sum, so cuda_ops.cpp keeps
// TF32's dB|db on the exact fp32 SIMT GEMM.
// ptxas -v: wide_kernel<float, false> 94 registers on sm_80, 92 on sm_90a; tall_kernel<float>
// 64 on both; no spills, two blocks per SM (40 KB of stages, the same bytes as fp16/bf16).
//
// Tiles. 256 threads, 8 warps of m16n8k16 (m16n8k8 for TF32). Tall: 128 rows × 32 ranks, the warps stacked
// along rows (16 rows each, all 32 ranks: 16 fp32 accumulators per thread). Wide: 32 ranks
// × 128 columns, the warps side by side (16 columns each, all 32 ranks). 32 ranks serve
// r ≤ 31 with db, r ≤ 32 without, in one tile — SAM's r = 4..16 — and larger ranks take
// more rank tiles (blockIdx); the padding costs MMA issue, not memory: per 32-deep k-tile a
// block moves 8 KB of the wide operand for 2·128·32·32 flops (32 flop/byte, a fifth of
// mma.sync's rate on an A100 at its DRAM bandwidth), so both GEMMs stay bound by reading x
// or g once (fp32: 16 flop/byte per 16-deep k-tile of 8 KB, against TF32's half rate). One
// rank tile size keeps the build at 4 thin kernels per architecture for each of fp16, bf16 and
// fp32 (and the 16-bit wide ones' keep-bit variants for dA).
//
// Pipeline and shared memory. kStages = 4 stages of 8 KB (the 128-wide operand) + 2 KB (the
// rank operand): 40 KB per block, so two blocks fit on every sm_80+ SM (sm_86/sm_89's 100
// KB included) and __launch_bounds__(256, 2) caps registers at 128 (tests/test_cuda_ptxas.py
// checks there are no spills). Synchronisation and bounds are the mainloop's: group g holds
// k-tile g; every chunk is predicated on its rows and k-range and zero-filled outside, so
// the k-residue and the rank padding add nothing. A split's slice of M is a multiple of
// kBK rows, both operands' depth is clipped to the slice's end, and round(xa)ᵀ's padding
// columns are zeros (never NaN from the poisoned workspace: rank_transpose writes them).
#include "cuda_common.cuh"
#include "cuda_keep_bits.cuh"
#include "cuda_reduce.cuh"
#include "cuda_sm80_mainloop.cuh"

namespace lora_fused {
namespace cuda {
namespace {

using namespace sm80;

template <class Block, class T>
constexpr size_t pipeline_bytes() {
  constexpr size_t bytes = Block::kPipelineBytes;
  static_assert(bytes <= 48 * 1024, "thin GEMMs stay within 48 KB: two blocks per SM on sm_86/sm_89");
  static_assert(cosize_v<typename Block::LayoutA> * sizeof(T) % 128 == 0, "B stages stay 128-byte aligned");
  return bytes;
}

// x~ = round(x·keep/(1-p)) of element (m, k) of x, whose hash index is m·ld + k.
struct DropoutOf {
  DropoutSpec spec;
  int64_t ld;
  __device__ float operator()(float v, int64_t m, int64_t k) const {
    return v * dropout_factor<float>(spec, static_cast<uint64_t>(m * ld + k));
  }
};

// The pipeline stages of a thin block in dynamic shared memory: A's, then B's.
template <class Block, class T>
struct StageBuffers {
  T* a;
  T* b;
  __device__ explicit StageBuffers(unsigned char* smem)
      : a(reinterpret_cast<T*>(smem)), b(reinterpret_cast<T*>(smem) + cosize_v<typename Block::LayoutA>) {}
};

// Runs the block's C tile (A rows × B rows of Block) through the pipeline over k_tiles,
// then calls store(row, col, value) for each of this thread's accumulators (tile coordinates).
template <class Block, class T, class Load, class Landed, class Store>
__device__ __forceinline__ void gemm_tile(const T* a_s, const T* b_s, int64_t k_tiles, Load&& load, Landed&& landed,
                                          Store&& store) {
  using TileShape = Shape<Int<Block::kTileRowsA>, Int<Block::kTileRowsB>>;
  typename Block::Mma mma;
  Tensor acc = partition_fragment_C(mma, TileShape{});
  clear(acc);
  Block::prologue(k_tiles, load);
  Block::pipeline(acc, k_tiles, a_s, b_s, load, landed);
  Tensor coords = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(TileShape{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) store(get<0>(coords(i)), get<1>(coords(i)), acc(i));
}

template <class T>
struct TallParams {
  Operand<T> a;     // [M, depth], K-major: x or g
  Operand<T> b;     // [r, depth], K-major: lora_A or lora_Bᵀ
  float* out;       // [M, r]
  DropoutOf drop;   // applied to a (xa) when drop.spec.enabled
  T* rounded;       // [M, r] with row stride rounded_ld: T(out), for the sm90 kernel's TMA; or nullptr
  int64_t rounded_ld;
};

template <class T>
__global__ void __launch_bounds__(kThreads, 2) tall_kernel(TallParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using Block = TallBlock<T>;
  const StageBuffers<Block, T> st(smem);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  constexpr int kBK = Block::kBK;
  const int64_t k_tiles = ceil_div(p.a.depth, kBK);

  auto load = [&](int stage, int64_t kt) {
    load_stage<true, kBM>(st.a, typename Block::LayoutA{}, stage, p.a, m0, kt * kBK);
    load_stage<true, kRankTile>(st.b, typename Block::LayoutB{}, stage, p.b, j0, kt * kBK);
  };
  auto landed = [&](int stage, int64_t kt) {
    if (p.drop.spec.enabled) transform_stage<true, kBM>(st.a, typename Block::LayoutA{}, stage, m0, kt * kBK, p.drop);
  };

  const int64_t M = p.a.rows, r = p.b.rows;
  gemm_tile<Block>(st.a, st.b, k_tiles, load, landed, [&](int rr, int jj, float value) {
    const int64_t m = m0 + rr, j = j0 + jj;
    if (m < M && j < r) {
      p.out[m * r + j] = value;
      if (p.rounded != nullptr) p.rounded[m * p.rounded_ld + j] = T(value);
    }
  });
}

template <class T>
struct WideParams {
  Operand<T> a;          // [ranks, depth], K-major: round(xa)ᵀ (+ ones row) or round(gb)ᵀ
  Operand<T> b;          // element (c, m) at ptr[m * ld + c], MN-major: g or x
  int64_t rows_per_split, rank_tiles;
  float* partials;       // element (split, j, c) at split * split_stride + j * rank_stride + c * col_stride
  int64_t split_stride, rank_stride, col_stride;
  DropoutOf drop;        // applied to b (dA) when drop.spec.enabled: element (c, m) is x[m, c]
  const uint32_t* keep_bits;  // dA with the dx kernel's keep bits [M][keep_ld]: read instead of hashing; or nullptr
  int64_t keep_ld;
};

// The keep words of a wide stage: one per 16-byte chunk of B (8 columns of one row of x, inside
// one word since c0 is a multiple of 128), beside the pipeline stages; chunk (line mm, first
// column cc) of stage s at words[s * kChunks + mm * kChunksPerLine + cc / kChunk].
template <class T>
struct WideKeepWords {
  static constexpr int kChunksPerLine = kBN / kChunkOf<T>, kChunks = kBKOf<T> * kChunksPerLine;
  static constexpr size_t kBytes = size_t{kStages} * kChunks * sizeof(uint32_t);
  __device__ static int index(int stage, int mm, int cc) {
    return stage * kChunks + mm * kChunksPerLine + cc / kChunkOf<T>;
  }
};

template <class T>
constexpr size_t wide_smem_bytes() {
  constexpr size_t bytes = pipeline_bytes<WideBlock<T>, T>() + WideKeepWords<T>::kBytes;
  static_assert(bytes <= 48 * 1024, "the wide GEMM with its keep words stays within 48 KB: two blocks per SM");
  return bytes;
}

// kKeepBits: dA's x~ from keep bits (p.keep_bits), its own instantiation: with the hash path
// beside it in one kernel, ptxas spilled at the 128-register cap.
template <class T, bool kKeepBits>
__global__ void __launch_bounds__(kThreads, 2) wide_kernel(WideParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using Block = WideBlock<T>;
  using KeepWords = WideKeepWords<T>;
  constexpr int kBK = Block::kBK;
  const StageBuffers<Block, T> st(smem);
  uint32_t* const keep_words = reinterpret_cast<uint32_t*>(smem + pipeline_bytes<Block, T>());
  const int64_t c0 = static_cast<int64_t>(blockIdx.x / p.rank_tiles) * kBN;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x % p.rank_tiles) * kRankTile;
  const int64_t split = blockIdx.y, m_begin = split * p.rows_per_split, m_end = m_begin + p.rows_per_split;
  Operand<T> a = p.a, b = p.b;  // both stop at the slice's end
  a.depth = a.depth < m_end ? a.depth : m_end;
  b.depth = b.depth < m_end ? b.depth : m_end;
  const int64_t k_tiles = b.depth > m_begin ? ceil_div(b.depth - m_begin, kBK) : 0;

  // With keep bits, each thread copies the keep word of every chunk of x it copies, into the
  // same cp.async group, so `landed` finds both complete without a barrier (the mainloop's
  // ownership argument); one 4-byte word serves 8 elements of a chunk (and the 4 threads
  // whose chunks share it read the same address: 4 bytes of traffic per 32 elements).
  // Without keep bits p.keep_bits is null: no pointer is formed from it.
  auto load = [&](int stage, int64_t kt) {
    const int64_t m_tile = m_begin + kt * kBK;
    load_stage<true, kRankTile>(st.a, typename Block::LayoutA{}, stage, a, j0, m_tile);
    load_stage<false, kBN>(st.b, typename Block::LayoutB{}, stage, b, c0, m_tile);
    if constexpr (kKeepBits) {
      const int rows_left = static_cast<int>(b.depth - m_tile < kBK ? b.depth - m_tile : kBK);
      const int cols_left = static_cast<int>(b.rows - c0 < kBN ? b.rows - c0 : kBN);
      const uint32_t* const tile_words = p.keep_bits + c0 / 32 + m_tile * p.keep_ld;
      for_each_own_chunk<T, false, kBN>([&](int cc, int mm) {
        const bool inside = mm < rows_left && cc < cols_left;
        keep_bits::cp_async_word(&keep_words[KeepWords::index(stage, mm, cc)],
                                 inside ? tile_words + mm * p.keep_ld + (cc >> 5) : p.keep_bits, inside);
      });
    }
  };
  auto landed = [&](int stage, int64_t kt) {
    const int64_t m_tile = m_begin + kt * kBK;
    if constexpr (kKeepBits) {  // x~ exactly as DropoutOf forms it: v · (keep ? 1/(1-p) : 0)
      const float scale = static_cast<float>(p.drop.spec.scale);
      transform_stage<false, kBN>(st.b, typename Block::LayoutB{}, stage, c0, m_tile,
                                  [&](float v, int64_t c, int64_t m) {
                                    const int mm = static_cast<int>(m - m_tile), cc = static_cast<int>(c - c0);
                                    const uint32_t word = keep_words[KeepWords::index(stage, mm, cc)];
                                    return v * (((word >> (c & 31)) & 1u) ? scale : 0.f);
                                  });
    } else if (p.drop.spec.enabled) {
      transform_stage<false, kBN>(st.b, typename Block::LayoutB{}, stage, c0, m_tile,
                                  [&](float v, int64_t c, int64_t m) { return p.drop(v, m, c); });
    }
  };

  float* out = p.partials + split * p.split_stride;
  gemm_tile<Block>(st.a, st.b, k_tiles, load, landed, [&](int jj, int cc, float value) {
    const int64_t j = j0 + jj, c = c0 + cc;
    if (j < a.rows && c < b.rows) out[j * p.rank_stride + c * p.col_stride] = value;
  });
}

// dst[j, m] = T(src[m, j]) for j < r, 1 in row r when ones_row, 0 in the columns [M, ld).
template <class T>
__global__ void rank_transpose_kernel(const float* src, int64_t M, int64_t r, int64_t rows, int64_t ld, T* dst) {
  const int64_t count = rows * ld;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e / ld, m = e % ld;
    dst[e] = T(m >= M ? 0.f : (j < r ? src[m * r + j] : 1.f));
  }
}

// ---- launchers ----------------------------------------------------------------------

template <class T>
cudaError_t tall(const Operand<T>& a, const Operand<T>& b, float* out, DropoutOf drop, T* rounded, int64_t rounded_ld,
                 cudaStream_t stream) {
  TallParams<T> p{a, b, out, drop, rounded, rounded_ld};
  return launch<tall_kernel<T>>(p, ceil_div(a.rows, kBM), ceil_div(b.rows, kRankTile),
                                pipeline_bytes<TallBlock<T>, T>(), stream, kThreads);
}

// partial[split][j][c] (through the strides) = Σ_{m in split} a[j, m]·b[c, m] over
// reduction_splits(M) slices of M.
template <class T>
cudaError_t wide(const Operand<T>& a, const Operand<T>& b, int64_t M, float* partials, int64_t split_stride,
                 int64_t rank_stride, int64_t col_stride, DropoutOf drop, const uint32_t* keep_bits,
                 cudaStream_t stream) {
  const int64_t splits = reduction_splits(M);
  WideParams<T> p;
  p.a = a, p.b = b;
  p.rows_per_split = ceil_div(ceil_div(M, splits), kBKOf<T>) * kBKOf<T>;
  p.rank_tiles = ceil_div(a.rows, kRankTile);
  p.partials = partials;
  p.split_stride = split_stride, p.rank_stride = rank_stride, p.col_stride = col_stride;
  p.drop = drop;
  p.keep_bits = keep_bits;
  p.keep_ld = keep_words_per_row(b.rows);
  const int64_t grid_x = ceil_div(b.rows, kBN) * p.rank_tiles;
  // TF32 has no keep bits (its dx writes none): no keep-bit instantiation for fp32.
  if constexpr (!std::is_same_v<T, float>) {
    if (drop.spec.enabled && keep_bits != nullptr) {
      return launch<wide_kernel<T, true>>(p, grid_x, splits, wide_smem_bytes<T>(), stream, kThreads);
    }
  } else if (keep_bits != nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch<wide_kernel<T, false>>(p, grid_x, splits, pipeline_bytes<WideBlock<T>, T>(), stream, kThreads);
}

// The A operand of the wide GEMM: round(src)ᵀ [rows, rank_operand_ld(M)] in the workspace.
template <class T>
Operand<T> rank_transpose(const float* src, int64_t M, int64_t r, bool ones_row, T* workspace, cudaError_t* err,
                          cudaStream_t stream) {
  const int64_t rows = r + (ones_row ? 1 : 0), ld = rank_operand_ld(M);
  rank_transpose_kernel<T><<<reduce_blocks(rows * ld), 256, 0, stream>>>(src, M, r, rows, ld, workspace);
  *err = cudaGetLastError();
  // ld % 8 == 0 by construction; the base is a fresh allocation today, but whether it is
  // 16-byte aligned is checked, not assumed (an offset workspace takes the element path).
  return {workspace, ld, rows, ld, vector_loadable<T>(workspace, ld, ld)};
}

template <class T>
cudaError_t xa_t(const ForwardArgs& a, cudaStream_t stream) {
  const Operand<T> x{static_cast<const T*>(a.x), a.ldx, a.M, a.K, vector_loadable<T>(a.x, a.ldx, a.K)};
  const Operand<T> lora_A{static_cast<const T*>(a.lora_A), a.K, a.r, a.K, vector_loadable<T>(a.lora_A, a.K, a.K)};
  return tall(x, lora_A, static_cast<float*>(a.xa), DropoutOf{a.dropout, a.K}, static_cast<T*>(a.xa_rounded),
              a.rank_ld, stream);
}

template <class T>
cudaError_t gb_t(const BackwardArgs& a, cudaStream_t stream) {
  const Operand<T> g{static_cast<const T*>(a.grad_y), a.ldg, a.M, a.N, vector_loadable<T>(a.grad_y, a.ldg, a.N)};
  const Operand<T> lora_B_t{static_cast<const T*>(a.lora_B_t), a.N, a.r, a.N, vector_loadable<T>(a.lora_B_t, a.N, a.N)};
  return tall(g, lora_B_t, static_cast<float*>(a.gb), DropoutOf{DropoutSpec{}, 0}, static_cast<T*>(a.gb_rounded),
              a.rank_ld, stream);
}

template <class T>
cudaError_t dB_db_t(const BackwardArgs& a, cudaStream_t stream) {
  const bool with_db = a.db != nullptr;
  const int64_t cols = a.r + (with_db ? 1 : 0), splits = reduction_splits(a.M);
  cudaError_t err = cudaSuccess;
  const Operand<T> xa_t =
      rank_transpose(static_cast<const float*>(a.xa), a.M, a.r, with_db, static_cast<T*>(a.rank_operand), &err, stream);
  if (err != cudaSuccess) return err;
  const Operand<T> g_t{static_cast<const T*>(a.grad_y), a.ldg, a.N, a.M, vector_loadable<T>(a.grad_y, a.ldg, a.N)};
  float* partials = static_cast<float*>(a.partials);  // [split][N][cols], the SIMT path's layout
  err = wide(xa_t, g_t, a.M, partials, a.N * cols, 1, cols, DropoutOf{DropoutSpec{}, 0}, nullptr, stream);
  if (err != cudaSuccess) return err;
  return reduce_dB_db(static_cast<const float*>(partials), splits, a.N, a.r, with_db, static_cast<float>(a.scaling),
                      static_cast<T*>(a.dB), static_cast<T*>(a.db), stream);
}

template <class T>
cudaError_t dA_t(const BackwardArgs& a, cudaStream_t stream) {
  const int64_t splits = reduction_splits(a.M);
  cudaError_t err = cudaSuccess;
  const Operand<T> gb_t =
      rank_transpose(static_cast<const float*>(a.gb), a.M, a.r, false, static_cast<T*>(a.rank_operand), &err, stream);
  if (err != cudaSuccess) return err;
  const Operand<T> x_t{static_cast<const T*>(a.x), a.ldx, a.K, a.M, vector_loadable<T>(a.x, a.ldx, a.K)};
  float* partials = static_cast<float*>(a.partials);  // [split][r][K]
  // x~ from the dx kernel's keep bits when it wrote them (stream order: dx ran first), else hashed here.
  err = wide(gb_t, x_t, a.M, partials, a.r * a.K, a.K, 1, DropoutOf{a.dropout, a.K},
             static_cast<const uint32_t*>(a.keep_bits), stream);
  if (err != cudaSuccess) return err;
  return reduce_scaled(static_cast<const float*>(partials), splits, a.r * a.K, static_cast<float>(a.scaling),
                       static_cast<T*>(a.dA), stream);
}

// fp16/bf16, and fp32 on TF32 (the caller's choice: exact fp32 and fp64 take SIMT).
template <class F>
cudaError_t dispatch_tensor_core(DType dtype, F&& f) {
  return dtype == DType::kFloat ? f(float{}) : dispatch_half(dtype, f);
}

}  // namespace

cudaError_t sm80_xa(const ForwardArgs& a, cudaStream_t stream) {
  return dispatch_tensor_core(a.dtype, [&](auto tag) { return xa_t<decltype(tag)>(a, stream); });
}

cudaError_t sm80_gb(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_tensor_core(a.dtype, [&](auto tag) { return gb_t<decltype(tag)>(a, stream); });
}

// fp16/bf16 only: TF32's dB|db runs on the exact fp32 SIMT GEMM (cuda_ops.cpp), because this
// kernel's db row would sum g rounded to TF32, where nn.Linear's bias gradient is an exact sum.
cudaError_t sm80_dB_db(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_half(a.dtype, [&](auto tag) { return dB_db_t<decltype(tag)>(a, stream); });
}

cudaError_t sm80_dA(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_tensor_core(a.dtype, [&](auto tag) { return dA_t<decltype(tag)>(a, stream); });
}

}  // namespace cuda
}  // namespace lora_fused
