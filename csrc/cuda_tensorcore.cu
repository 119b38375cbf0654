// Tensor-core (WMMA, fp16/bf16 in, fp32 accumulate) kernels of the backward's rank-r
// reductions: the g-pass (gb, dB, db) and dA. (The forward and dx, the two large GEMMs,
// run on the CuTe mainloop in cuda_sm80.cu; these two are next to move there, issue 11.)
//
// g-pass: one read of g gives gb = g·B (per row, over all of N) and the partial sums of
// dB = gᵀ·xa (and db = Σ g, as a ones column appended to xa) for the block's rows; blocks
// own fixed row ranges, so adding their partials in block order is deterministic.
//
// dA = s·gbᵀ·x~: blocks own column tiles of x and fixed row slices, partials likewise.
//
// Shared-memory rows are padded by 8 elements (16 bytes), which keeps every fragment
// pointer 32-byte aligned as WMMA requires and spreads rows over the banks.
#include <mma.h>

#include "cuda_common.cuh"

namespace lora_fused {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256, kWarps = kThreads / 32;  // dA
constexpr int kSkew = 8;                                // row padding, elements

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <class T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <class T, class Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Copies src[row0 : row0 + kRows, col0 : col0 + kCols] (row-major, leading dim ld) into
// dst[kRows][kLd], zero outside [rows, cols). With `vec` (cols and ld multiples of 8,
// 16-byte aligned base) it issues asynchronous 16-byte copies; otherwise plain loads.
template <class T, int kRows, int kCols, int kLd, int kNumThreads = kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int64_t row0, int64_t rows, int64_t col0,
                                          int64_t cols, bool vec) {
  constexpr int kChunk = 8;  // elements per 16 bytes
  constexpr int kChunksPerRow = kCols / kChunk;
  static_assert(kCols % kChunk == 0, "tile width must be a multiple of 8 elements");
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kNumThreads) {
    const int rr = c / kChunksPerRow, cc = (c % kChunksPerRow) * kChunk;
    T* d = dst + rr * kLd + cc;
    const int64_t gr = row0 + rr, gc = col0 + cc;
    if (vec) {
      const bool inside = gr < rows && gc < cols;
      cp_async_16(d, inside ? src + gr * ld + gc : src, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        d[e] = (gr < rows && gc + e < cols) ? src[gr * ld + gc + e] : narrow<T, float>(0.f);
      }
    }
  }
}

// ---- g-pass: gb, dB, db -------------------------------------------------------------

constexpr int kGThreads = 128;  // 4 warps: 16 rows of gb and 16 columns of dB each
static_assert(kGpassRows == 16 * (kGThreads / 32) && kGpassCols == 16 * (kGThreads / 32), "g-pass warp layout");

template <class T>
struct GpassParams {
  const T* grad_y;
  int64_t ldg;
  const T* lora_B;
  const float* xa;
  float* gb;
  float* partials;  // [blocks][n_pad][kRankPad]
  int64_t M, N, r, n_pad, rows_per_block;
  bool with_db;
  bool vec;
};

template <class T, int kRankPad>
struct GpassSmem {
  static constexpr int kLdG = kGpassCols + kSkew;
  static constexpr int kLdR = kRankPad + kSkew;
  static constexpr size_t g_stage = kGpassRows * kLdG * sizeof(T);
  static constexpr size_t g_off = 0;
  static constexpr size_t b_off = align128(g_off + 2 * g_stage);
  static constexpr size_t xa_off = align128(b_off + kGpassCols * kLdR * sizeof(T));
  static constexpr size_t scratch_off = align128(xa_off + kGpassRows * kLdR * sizeof(T));
  static constexpr size_t bytes = scratch_off + (kGThreads / 32) * 256 * sizeof(float);
};

// Steps through (row tile, N tile) pairs of the block's rows, g tiles double-buffered.
template <class T, int kRankPad>
__global__ void __launch_bounds__(kGThreads, 1) gpass_kernel(GpassParams<T> p) {
  using S = GpassSmem<T, kRankPad>;
  constexpr int kRankFrags = kRankPad / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  T* g_s = reinterpret_cast<T*>(smem + S::g_off);
  T* b_s = reinterpret_cast<T*>(smem + S::b_off);
  T* xa_s = reinterpret_cast<T*>(smem + S::xa_off);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* scratch = reinterpret_cast<float*>(smem + S::scratch_off) + warp * 256;

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = min(row_begin + p.rows_per_block, p.M);
  const int64_t n_tiles = (p.N + kGpassCols - 1) / kGpassCols;
  const int64_t steps = (row_end - row_begin + kGpassRows - 1) / kGpassRows * n_tiles;
  float* partial = p.partials + static_cast<int64_t>(blockIdx.x) * p.n_pad * kRankPad;

  // Rows past row_end belong to the next block: zero-filled, they add nothing here.
  auto load_g = [&](int stage, int64_t step) {
    const int64_t m0 = row_begin + (step / n_tiles) * kGpassRows, n0 = (step % n_tiles) * kGpassCols;
    load_tile<T, kGpassRows, kGpassCols, S::kLdG, kGThreads>(g_s + stage * kGpassRows * S::kLdG, p.grad_y, p.ldg, m0,
                                                             row_end, n0, p.N, p.vec);
  };

  FragAcc gb_acc[kRankFrags];
#pragma unroll
  for (int f = 0; f < kRankFrags; ++f) wmma::fill_fragment(gb_acc[f], 0.f);

  load_g(0, 0);
  cp_async_commit();
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t row_tile = step / n_tiles, n_tile = step % n_tiles;
    const int64_t m0 = row_begin + row_tile * kGpassRows, n0 = n_tile * kGpassCols;
    if (step + 1 < steps) load_g(static_cast<int>((step + 1) % 2), step + 1);  // its stage was freed last step
    cp_async_commit();
    for (int e = tid; e < kGpassCols * kRankPad; e += kGThreads) {
      const int nn = e / kRankPad, j = e % kRankPad;
      const int64_t n = n0 + nn;
      b_s[nn * S::kLdR + j] = (n < p.N && j < p.r) ? p.lora_B[n * p.r + j] : narrow<T, float>(0.f);
    }
    if (n_tile == 0) {  // a new row tile: its xa, rounded to the input dtype as the reference does
      for (int e = tid; e < kGpassRows * kRankPad; e += kGThreads) {
        const int rr = e / kRankPad, j = e % kRankPad;
        const int64_t m = m0 + rr;
        float v = 0.f;
        if (m < row_end) v = j < p.r ? p.xa[m * p.r + j] : (j == p.r && p.with_db ? 1.f : 0.f);
        xa_s[rr * S::kLdR + j] = narrow<T, float>(v);
      }
    }
    cp_async_wait<1>();  // this step's g tile has landed (the newest group may be pending)
    __syncthreads();
    const T* gs = g_s + static_cast<int>(step % 2) * kGpassRows * S::kLdG;

    // gb rows 16·warp += g[rows, n-tile]·B[n-tile, :]
#pragma unroll
    for (int kk = 0; kk < kGpassCols; kk += 16) {
      FragA<T> a;
      wmma::load_matrix_sync(a, gs + warp * 16 * S::kLdG + kk, S::kLdG);
#pragma unroll
      for (int f = 0; f < kRankFrags; ++f) {
        FragB<T, wmma::row_major> b;  // element (n, j) at b_s[n * kLdR + j]
        wmma::load_matrix_sync(b, b_s + kk * S::kLdR + f * 16, S::kLdR);
        wmma::mma_sync(gb_acc[f], a, b, gb_acc[f]);
      }
    }

    // partial dB rows n0 + 16·warp += g[rows, those columns]ᵀ·[xa | 1][rows, :]
    {
      float* dst = partial + (n0 + warp * 16) * kRankPad;
      FragAcc d[kRankFrags];
#pragma unroll
      for (int f = 0; f < kRankFrags; ++f) {
        if (row_tile == 0) {
          wmma::fill_fragment(d[f], 0.f);
        } else {
          wmma::load_matrix_sync(d[f], dst + f * 16, kRankPad, wmma::mem_row_major);
        }
      }
#pragma unroll
      for (int kk = 0; kk < kGpassRows; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> gt;  // element (n, m) at gs[m * kLdG + n]
        wmma::load_matrix_sync(gt, gs + kk * S::kLdG + warp * 16, S::kLdG);
#pragma unroll
        for (int f = 0; f < kRankFrags; ++f) {
          FragB<T, wmma::row_major> x;  // element (m, j) at xa_s[m * kLdR + j]
          wmma::load_matrix_sync(x, xa_s + kk * S::kLdR + f * 16, S::kLdR);
          wmma::mma_sync(d[f], gt, x, d[f]);
        }
      }
#pragma unroll
      for (int f = 0; f < kRankFrags; ++f) wmma::store_matrix_sync(dst + f * 16, d[f], kRankPad, wmma::mem_row_major);
    }

    if (n_tile == n_tiles - 1) {  // the row tile's gb is complete
#pragma unroll
      for (int f = 0; f < kRankFrags; ++f) {
        wmma::store_matrix_sync(scratch, gb_acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t m = m0 + warp * 16 + e / 16;
          const int j = f * 16 + e % 16;
          if (m < row_end && j < p.r) p.gb[m * p.r + j] = scratch[e];
        }
        __syncwarp();
        wmma::fill_fragment(gb_acc[f], 0.f);
      }
    }
    __syncthreads();  // g, B and xa tiles (and the partials) are free for the next step
  }
  cp_async_wait<0>();
}

// dB[n, j] = s·Σ_blocks partials[b][n][j]; db[n] = Σ_blocks partials[b][n][r].
template <class T>
__global__ void gpass_reduce_kernel(const float* partials, int64_t blocks, int64_t N, int64_t n_pad, int64_t r,
                                    int64_t rank_pad, float scaling, T* dB, T* db) {
  const int64_t cols = r + (db != nullptr ? 1 : 0);
  const int64_t count = N * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / cols, j = e % cols;
    float sum = 0.f;
    for (int64_t b = 0; b < blocks; ++b) sum += partials[(b * n_pad + n) * rank_pad + j];
    if (j < r) {
      dB[n * r + j] = narrow<T, float>(scaling * sum);
    } else {
      db[n] = narrow<T, float>(sum);
    }
  }
}

// ---- dA -----------------------------------------------------------------------------

template <class T>
struct DaParams {
  const T* x;
  int64_t ldx;
  const float* gb;
  float* partials;  // [splits][kRankPad][k_pad]
  int64_t M, K, r, k_pad, rows_per_split;
  DropoutSpec drop;
  bool vec;
};

template <class T, int kRankPad>
struct DaSmem {
  static constexpr int kLdX = kDaCols + kSkew;
  static constexpr int kLdR = kRankPad + kSkew;
  static constexpr size_t x_stage = kDaRows * kLdX * sizeof(T);
  static constexpr size_t x_off = 0;
  static constexpr size_t gb_off = align128(x_off + 2 * x_stage);
  static constexpr size_t bytes = gb_off + kDaRows * kLdR * sizeof(T);
};

static_assert(kDaCols == 16 * kWarps, "dA gives each warp 16 columns");

// Block (column tile, row slice): partial dA[:, tile] = gb[slice]ᵀ·x~[slice, tile].
template <class T, int kRankPad>
__global__ void __launch_bounds__(kThreads) dA_kernel(DaParams<T> p) {
  using S = DaSmem<T, kRankPad>;
  constexpr int kRankFrags = kRankPad / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  T* x_s = reinterpret_cast<T*>(smem + S::x_off);
  T* gb_s = reinterpret_cast<T*>(smem + S::gb_off);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kDaCols;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_split;
  const int64_t row_end = min(row_begin + p.rows_per_split, p.M);
  const int64_t steps = row_end > row_begin ? (row_end - row_begin + kDaRows - 1) / kDaRows : 0;

  auto load_x = [&](int stage, int64_t step) {
    load_tile<T, kDaRows, kDaCols, S::kLdX>(x_s + stage * kDaRows * S::kLdX, p.x, p.ldx, row_begin + step * kDaRows,
                                            row_end, c0, p.K, p.vec);
  };

  FragAcc acc[kRankFrags];
#pragma unroll
  for (int f = 0; f < kRankFrags; ++f) wmma::fill_fragment(acc[f], 0.f);

  if (steps > 0) load_x(0, 0);
  cp_async_commit();
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t m0 = row_begin + step * kDaRows;
    if (step + 1 < steps) load_x(static_cast<int>((step + 1) % 2), step + 1);
    cp_async_commit();
    for (int e = tid; e < kDaRows * kRankPad; e += kThreads) {
      const int rr = e / kRankPad, j = e % kRankPad;
      const int64_t m = m0 + rr;
      // gb rounded to the input dtype (the reference's gb is a product in that dtype); s comes at the end.
      gb_s[rr * S::kLdR + j] = narrow<T, float>((m < row_end && j < p.r) ? p.gb[m * p.r + j] : 0.f);
    }
    cp_async_wait<1>();
    __syncthreads();
    T* xs = x_s + static_cast<int>(step % 2) * kDaRows * S::kLdX;
    if (p.drop.enabled) {  // x~ in place, rounded to the input dtype as the reference computes it
      for (int e = tid; e < kDaRows * kDaCols; e += kThreads) {
        const int rr = e / kDaCols, cc = e % kDaCols;
        const int64_t m = m0 + rr, c = c0 + cc;
        const float factor =
            (m < row_end && c < p.K) ? dropout_factor<float>(p.drop, static_cast<uint64_t>(m * p.K + c)) : 0.f;
        xs[rr * S::kLdX + cc] = narrow<T, float>(widen(xs[rr * S::kLdX + cc]) * factor);
      }
      __syncthreads();
    }
#pragma unroll
    for (int kk = 0; kk < kDaRows; kk += 16) {
      FragB<T, wmma::row_major> b;  // element (m, c) at xs[m * kLdX + c]
      wmma::load_matrix_sync(b, xs + kk * S::kLdX + warp * 16, S::kLdX);
#pragma unroll
      for (int f = 0; f < kRankFrags; ++f) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;  // element (j, m) at gb_s[m * kLdR + j]
        wmma::load_matrix_sync(a, gb_s + kk * S::kLdR + f * 16, S::kLdR);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();  // x stage and gb tile are free for the next step
  }
  cp_async_wait<0>();
  float* out = p.partials + static_cast<int64_t>(blockIdx.y) * kRankPad * p.k_pad + c0 + warp * 16;
#pragma unroll
  for (int f = 0; f < kRankFrags; ++f) {
    wmma::store_matrix_sync(out + f * 16 * p.k_pad, acc[f], p.k_pad, wmma::mem_row_major);
  }
}

// dA[j, c] = s·Σ_splits partials[split][j][c]
template <class T>
__global__ void dA_reduce_kernel(const float* partials, int64_t splits, int64_t K, int64_t k_pad, int64_t r,
                                 int64_t rank_pad, float scaling, T* dA) {
  const int64_t count = r * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e / K, c = e % K;
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) sum += partials[(s * rank_pad + j) * k_pad + c];
    dA[e] = narrow<T, float>(scaling * sum);
  }
}

// ---- launchers ----------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <class T, int kRankPad>
cudaError_t gpass_t(const BackwardArgs& a, cudaStream_t stream) {
  static_assert(GpassSmem<T, kRankPad>::bytes <= kMaxDynamicSmem, "shared-memory plan exceeds sm_86/sm_89's 99 KB per block");
  GpassParams<T> p;
  p.grad_y = static_cast<const T*>(a.grad_y);
  p.ldg = a.ldg;
  p.lora_B = static_cast<const T*>(a.lora_B);
  p.xa = static_cast<const float*>(a.xa);
  p.gb = static_cast<float*>(a.gb);
  p.partials = static_cast<float*>(a.partials);
  p.M = a.M, p.N = a.N, p.r = a.r;
  p.n_pad = ceil_div(a.N, kGpassCols) * kGpassCols;
  p.rows_per_block = gpass_tiles_per_block(a.M) * kGpassRows;
  p.with_db = a.db != nullptr;
  p.vec = a.N % 8 == 0 && a.ldg % 8 == 0 && aligned16(a.grad_y);
  const int64_t blocks = gpass_blocks(a.M);
  cudaError_t err = launch<gpass_kernel<T, kRankPad>>(p, blocks, 1, GpassSmem<T, kRankPad>::bytes, stream, kGThreads);
  if (err != cudaSuccess) return err;
  const int64_t count = a.N * (a.r + (p.with_db ? 1 : 0));
  gpass_reduce_kernel<T><<<reduce_blocks(count), 256, 0, stream>>>(p.partials, blocks, a.N, p.n_pad, a.r, kRankPad,
                                                                   static_cast<float>(a.scaling),
                                                                   static_cast<T*>(a.dB), static_cast<T*>(a.db));
  return cudaGetLastError();
}

template <class T>
cudaError_t gpass_by_rank(const BackwardArgs& a, cudaStream_t stream) {
  switch (rank_pad(a.r + (a.db != nullptr ? 1 : 0))) {
    case 16: return gpass_t<T, 16>(a, stream);
    case 32: return gpass_t<T, 32>(a, stream);
    default: return gpass_t<T, 64>(a, stream);
  }
}

template <class T, int kRankPad>
cudaError_t dA_t(const BackwardArgs& a, cudaStream_t stream) {
  static_assert(DaSmem<T, kRankPad>::bytes <= kMaxDynamicSmem, "shared-memory plan exceeds sm_86/sm_89's 99 KB per block");
  const int64_t splits = reduction_splits(a.M);
  DaParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.ldx = a.ldx;
  p.gb = static_cast<const float*>(a.gb);
  p.partials = static_cast<float*>(a.partials);
  p.M = a.M, p.K = a.K, p.r = a.r;
  p.k_pad = ceil_div(a.K, kDaCols) * kDaCols;
  p.rows_per_split = ceil_div(ceil_div(a.M, splits), kDaRows) * kDaRows;
  p.drop = a.dropout;
  p.vec = a.K % 8 == 0 && a.ldx % 8 == 0 && aligned16(a.x);
  cudaError_t err = launch<dA_kernel<T, kRankPad>>(p, ceil_div(a.K, kDaCols), splits, DaSmem<T, kRankPad>::bytes,
                           stream, kThreads);
  if (err != cudaSuccess || a.K == 0) return err;
  dA_reduce_kernel<T><<<reduce_blocks(a.r * a.K), 256, 0, stream>>>(p.partials, splits, a.K, p.k_pad, a.r, kRankPad,
                                                                    static_cast<float>(a.scaling),
                                                                    static_cast<T*>(a.dA));
  return cudaGetLastError();
}

template <class T>
cudaError_t dA_by_rank(const BackwardArgs& a, cudaStream_t stream) {
  switch (rank_pad(a.r)) {
    case 16: return dA_t<T, 16>(a, stream);
    case 32: return dA_t<T, 32>(a, stream);
    default: return dA_t<T, 64>(a, stream);
  }
}

}  // namespace

cudaError_t tensorcore_gpass(const BackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return gpass_by_rank<__half>(a, stream);
    case DType::kBFloat16: return gpass_by_rank<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t tensorcore_dA(const BackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return dA_by_rank<__half>(a, stream);
    case DType::kBFloat16: return dA_by_rank<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_fused
