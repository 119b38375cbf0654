// Tensor-core (WMMA, fp16/bf16 in, fp32 accumulate) kernels: the fused forward and dx.
//
// Both are 128×128 output tiles computed by 8 warps (2×4, 64×32 each), with a 3-stage
// cp.async pipeline over 32-deep reduction tiles. The operands' shared-memory rows are
// padded by 8 elements (16 bytes), which keeps every fragment pointer 32-byte aligned as
// WMMA requires and spreads rows over the banks.
//
// Forward: y = x·Wᵀ + b + s·(xa·Bᵀ). While a tile of x sits in shared memory for
// x·Wᵀ, the same tile (masked, when dropout is on) also feeds xa += x~·Aᵀ; after the K
// loop, xa rounded to the input dtype *unscaled* and a tile of B form one more
// reduction step into a temporary accumulator, which joins the main one as s·tmp (the
// reference's rounding order: s never touches a rounded operand, so nothing overflows
// where PEFT's order would not).
//
// g-pass: one read of g gives gb = g·B (per row, over all of N) and the partial sums of
// dB = gᵀ·xa (and db = Σ g, as a ones column appended to xa) for the block's rows; blocks
// own fixed row ranges, so adding their partials in block order is deterministic.
//
// dA = s·gbᵀ·x~: blocks own column tiles of x and fixed row slices, partials likewise.
//
// dx: the LoRA part gb·A (gb rounded unscaled) is computed first into the accumulators,
// scaled by s in fp32 and masked through
// shared memory when dropout is on (WMMA's fragment layout is opaque, so elementwise
// work goes through a per-warp 16×16 scratch), and the K loop of g·W then accumulates
// on top of it.
#include <mma.h>

#include "cuda_common.cuh"

namespace lora_fused {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3, kThreads = 256, kWarps = kThreads / 32;
constexpr int kWarpM = 64, kWarpN = 32;                              // warp grid 2 × 4
constexpr int kFragsM = kWarpM / 16, kFragsN = kWarpN / 16;          // 4 × 2 fragments per warp
constexpr int kSkew = 8;                                             // row padding, elements
constexpr int kLdK = kBK + kSkew;                                    // rows of [rows][kBK] tiles
constexpr int kLdN = kBN + kSkew;                                    // rows of [kBK][kBN] tiles
constexpr int kDxRankChunk = 32;                                     // rank step of dx's LoRA part
constexpr size_t kScratchBytes = kWarps * 256 * sizeof(float);       // one 16×16 fp32 tile per warp

static_assert(kWarps == (kBM / kWarpM) * (kBN / kWarpN), "warp grid must cover the block tile");
static_assert(kBM / 16 == kWarps, "the forward gives each warp 16 rows of xa");

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }
constexpr size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

template <class T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <class T, class Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes < 16 zero-fills the rest: out-of-range chunks pass 0 and read nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem), "r"(src_bytes)
               : "memory");
}
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

// Writes the warp's accumulators (rows row0 + 64·wm.., cols col0 + 32·wn..) to out
// [rows, cols] (leading dim ld) through the warp's scratch tile, adding bias[col].
template <class T>
__device__ __forceinline__ void store_tile(FragAcc (&acc)[kFragsM][kFragsN], float* scratch, T* out, int64_t ld,
                                           int64_t row0, int64_t rows, int64_t col0, int64_t cols, const T* bias) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / (kBN / kWarpN), wn = warp % (kBN / kWarpN);
#pragma unroll
  for (int i = 0; i < kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t r = row0 + wm * kWarpM + i * 16 + e / 16;
        const int64_t c = col0 + wn * kWarpN + j * 16 + e % 16;
        if (r < rows && c < cols) {
          const float bias_value = bias != nullptr ? widen(bias[c]) : 0.f;
          out[r * ld + c] = narrow<T, float>(scratch[e] + bias_value);
        }
      }
      __syncwarp();
    }
}

// ---- forward ------------------------------------------------------------------------

template <class T>
struct ForwardParams {
  const T* x;
  int64_t ldx;
  const T* weight;
  const T* bias;
  const T* lora_A;
  const T* lora_B;
  T* y;
  float* xa;  // written when kRankPad > 0, read otherwise
  int64_t M, N, K, r;
  float scaling;
  DropoutSpec drop;
  bool vec;
};

// Shared-memory plan of the forward. kRankPad: 16, 32 or 64 when xa is accumulated in
// the K loop (r <= kRankPad), 0 when it was precomputed. The epilogue reuses the space.
template <class T, int kRankPad>
struct ForwardSmem {
  static constexpr int kRankChunk = kRankPad > 0 ? kRankPad : 64;
  static constexpr int kLdR = kRankChunk + kSkew;  // [rows][rank] tiles of the input dtype
  static constexpr int kLdXa = kRankChunk + 4;     // fp32 xa tile
  static constexpr size_t x_stage = kBM * kLdK * sizeof(T);
  static constexpr size_t w_stage = kBN * kLdK * sizeof(T);
  static constexpr size_t a_stage = kRankPad * kLdK * sizeof(T);
  static constexpr size_t x_off = 0;
  static constexpr size_t w_off = align128(x_off + kStages * x_stage);
  static constexpr size_t a_off = align128(w_off + kStages * w_stage);
  static constexpr size_t dropped_off = align128(a_off + kStages * a_stage);
  static constexpr size_t loop_end = dropped_off + (kRankPad > 0 ? kBM * kLdK * sizeof(T) : 0);
  static constexpr size_t xa32_off = 0;
  static constexpr size_t xa_t_off = align128(xa32_off + (kRankPad > 0 ? kBM * kLdXa * sizeof(float) : 0));
  static constexpr size_t b_off = align128(xa_t_off + kBM * kLdR * sizeof(T));
  static constexpr size_t scratch_off = align128(b_off + kBN * kLdR * sizeof(T));
  static constexpr size_t epilogue_end = scratch_off + kScratchBytes;
  static constexpr size_t bytes = max_size(loop_end, epilogue_end);
};

template <class T, int kRankPad>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(ForwardParams<T> p) {
  using S = ForwardSmem<T, kRankPad>;
  constexpr int kRankFrags = kRankPad / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  T* x_s = reinterpret_cast<T*>(smem + S::x_off);
  T* w_s = reinterpret_cast<T*>(smem + S::w_off);
  T* a_s = reinterpret_cast<T*>(smem + S::a_off);
  T* dropped_s = reinterpret_cast<T*>(smem + S::dropped_off);

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / (kBN / kWarpN), wn = warp % (kBN / kWarpN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  FragAcc acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  FragAcc xa_acc[kRankFrags > 0 ? kRankFrags : 1];  // rows 16·warp of the block's xa
#pragma unroll
  for (int f = 0; f < (kRankFrags > 0 ? kRankFrags : 1); ++f) wmma::fill_fragment(xa_acc[f], 0.f);

  const int64_t k_tiles = (p.K + kBK - 1) / kBK;
  auto load_stage = [&](int stage, int64_t tile) {
    const int64_t k0 = tile * kBK;
    load_tile<T, kBM, kBK, kLdK>(x_s + stage * kBM * kLdK, p.x, p.ldx, m0, p.M, k0, p.K, p.vec);
    load_tile<T, kBN, kBK, kLdK>(w_s + stage * kBN * kLdK, p.weight, p.K, n0, p.N, k0, p.K, p.vec);
    if constexpr (kRankPad > 0) {
      load_tile<T, kRankPad, kBK, kLdK>(a_s + stage * kRankPad * kLdK, p.lora_A, p.K, 0, p.r, k0, p.K, p.vec);
    }
  };

  // Group g of cp.async always holds tile g (possibly empty), so waiting until at most
  // kStages - 2 groups are pending means tile kt has landed.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next);  // refills tile kt - 1's stage
    cp_async_commit();

    const int stage = static_cast<int>(kt % kStages);
    const T* xs = x_s + stage * kBM * kLdK;
    const T* ws = w_s + stage * kBN * kLdK;
    const T* xa_src = xs;
    if constexpr (kRankPad > 0) {
      if (p.drop.enabled) {
        const int64_t k0 = kt * kBK;
        for (int e = tid; e < kBM * kBK; e += kThreads) {
          const int rr = e / kBK, cc = e % kBK;
          const int64_t m = m0 + rr, k = k0 + cc;
          const float factor =
              (m < p.M && k < p.K) ? dropout_factor<float>(p.drop, static_cast<uint64_t>(m * p.K + k)) : 0.f;
          // x·keep/(1-p) rounded to the input dtype, as the reference computes x~.
          dropped_s[rr * kLdK + cc] = narrow<T, float>(widen(xs[rr * kLdK + cc]) * factor);
        }
        __syncthreads();
        xa_src = dropped_s;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      FragA<T> a[kFragsM];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) wmma::load_matrix_sync(a[i], xs + (wm * kWarpM + i * 16) * kLdK + kk, kLdK);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        FragB<T, wmma::col_major> b;  // element (k, n) at ws[n * kLdK + k]: W's rows are Wᵀ's columns
        wmma::load_matrix_sync(b, ws + (wn * kWarpN + j * 16) * kLdK + kk, kLdK);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
      if constexpr (kRankPad > 0) {
        const T* as = a_s + stage * kRankPad * kLdK;
        FragA<T> xt;
        wmma::load_matrix_sync(xt, xa_src + warp * 16 * kLdK + kk, kLdK);
#pragma unroll
        for (int f = 0; f < kRankFrags; ++f) {
          FragB<T, wmma::col_major> a_frag;
          wmma::load_matrix_sync(a_frag, as + f * 16 * kLdK + kk, kLdK);
          wmma::mma_sync(xa_acc[f], xt, a_frag, xa_acc[f]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is free for the epilogue

  constexpr int kRankChunk = S::kRankChunk;
  float* xa32 = reinterpret_cast<float*>(smem + S::xa32_off);
  T* xa_t = reinterpret_cast<T*>(smem + S::xa_t_off);
  T* b_t = reinterpret_cast<T*>(smem + S::b_off);
  if constexpr (kRankPad > 0) {
#pragma unroll
    for (int f = 0; f < kRankFrags; ++f) {
      wmma::store_matrix_sync(xa32 + warp * 16 * S::kLdXa + f * 16, xa_acc[f], S::kLdXa, wmma::mem_row_major);
    }
    __syncthreads();
    if (blockIdx.y == 0) {  // one column of blocks stores xa
      for (int e = tid; e < kBM * kRankPad; e += kThreads) {
        const int rr = e / kRankPad, j = e % kRankPad;
        const int64_t m = m0 + rr;
        if (m < p.M && j < p.r) p.xa[m * p.r + j] = xa32[rr * S::kLdXa + j];
      }
    }
  }

  // The LoRA up-projection, rank in chunks: acc += s·(round(xa)·Bᵀ), the product in a
  // temporary fp32 accumulator (same fragment type as acc, hence the same element map).
  for (int64_t r0 = 0; r0 < p.r; r0 += kRankChunk) {
    for (int e = tid; e < kBM * kRankChunk; e += kThreads) {
      const int rr = e / kRankChunk, j = e % kRankChunk;
      const int64_t m = m0 + rr, rank = r0 + j;
      float v = 0.f;
      if (m < p.M && rank < p.r) v = kRankPad > 0 ? xa32[rr * S::kLdXa + j] : p.xa[m * p.r + rank];
      xa_t[rr * S::kLdR + j] = narrow<T, float>(v);
    }
    for (int e = tid; e < kBN * kRankChunk; e += kThreads) {
      const int nn = e / kRankChunk, j = e % kRankChunk;
      const int64_t n = n0 + nn, rank = r0 + j;
      b_t[nn * S::kLdR + j] = (n < p.N && rank < p.r) ? p.lora_B[n * p.r + rank] : narrow<T, float>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        FragAcc lora;
        wmma::fill_fragment(lora, 0.f);
#pragma unroll
        for (int kk = 0; kk < kRankChunk; kk += 16) {
          FragA<T> a;
          wmma::load_matrix_sync(a, xa_t + (wm * kWarpM + i * 16) * S::kLdR + kk, S::kLdR);
          FragB<T, wmma::col_major> b;  // element (rank, n) at b_t[n * kLdR + rank]
          wmma::load_matrix_sync(b, b_t + (wn * kWarpN + j * 16) * S::kLdR + kk, S::kLdR);
          wmma::mma_sync(lora, a, b, lora);
        }
#pragma unroll
        for (int t = 0; t < lora.num_elements; ++t) acc[i][j].x[t] += p.scaling * lora.x[t];
      }
    }
    __syncthreads();  // before the next chunk overwrites xa_t / b_t
  }

  float* scratch = reinterpret_cast<float*>(smem + S::scratch_off) + warp * 256;
  store_tile<T>(acc, scratch, p.y, p.N, m0, p.M, n0, p.N, p.bias);
}

// ---- dx -----------------------------------------------------------------------------

template <class T>
struct DxParams {
  const T* grad_y;
  int64_t ldg;
  const T* weight;
  const T* lora_A;
  const float* gb;
  T* dx;
  int64_t M, N, K, r;
  float scaling;
  DropoutSpec drop;
  bool vec;
};

template <class T>
struct DxSmem {
  static constexpr int kLdR = kDxRankChunk + kSkew;
  static constexpr size_t g_stage = kBM * kLdK * sizeof(T);
  static constexpr size_t w_stage = kBK * kLdN * sizeof(T);
  static constexpr size_t g_off = 0;
  static constexpr size_t w_off = align128(g_off + kStages * g_stage);
  // The LoRA tiles and the scratch are used while the first stages are in flight.
  static constexpr size_t gb_off = align128(w_off + kStages * w_stage);
  static constexpr size_t a_off = align128(gb_off + kBM * kLdR * sizeof(T));
  static constexpr size_t scratch_off = align128(a_off + kDxRankChunk * kLdN * sizeof(T));
  static constexpr size_t bytes = scratch_off + kScratchBytes;
};

template <class T>
__global__ void __launch_bounds__(kThreads, 1) dx_kernel(DxParams<T> p) {
  using S = DxSmem<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* g_s = reinterpret_cast<T*>(smem + S::g_off);
  T* w_s = reinterpret_cast<T*>(smem + S::w_off);
  T* gb_t = reinterpret_cast<T*>(smem + S::gb_off);
  T* a_t = reinterpret_cast<T*>(smem + S::a_off);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / (kBN / kWarpN), wn = warp % (kBN / kWarpN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;  // columns of dx (the K dimension)
  float* scratch = reinterpret_cast<float*>(smem + S::scratch_off) + warp * 256;

  const int64_t n_tiles = (p.N + kBK - 1) / kBK;
  auto load_stage = [&](int stage, int64_t tile) {
    const int64_t k0 = tile * kBK;  // along N, the reduction dimension
    load_tile<T, kBM, kBK, kLdK>(g_s + stage * kBM * kLdK, p.grad_y, p.ldg, m0, p.M, k0, p.N, p.vec);
    load_tile<T, kBK, kBN, kLdN>(w_s + stage * kBK * kLdN, p.weight, p.K, k0, p.N, c0, p.K, p.vec);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_stage(s, s);
    cp_async_commit();
  }

  FragAcc acc[kFragsM][kFragsN];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // LoRA part: acc = round(gb)·A, rank in chunks of kDxRankChunk; s (and the mask)
  // multiply the fp32 sum below, never the rounded gb (which would overflow at large s).
  for (int64_t r0 = 0; r0 < p.r; r0 += kDxRankChunk) {
    for (int e = tid; e < kBM * kDxRankChunk; e += kThreads) {
      const int rr = e / kDxRankChunk, j = e % kDxRankChunk;
      const int64_t m = m0 + rr, rank = r0 + j;
      const float v = (m < p.M && rank < p.r) ? p.gb[m * p.r + rank] : 0.f;
      gb_t[rr * S::kLdR + j] = narrow<T, float>(v);
    }
    for (int e = tid; e < kDxRankChunk * kBN; e += kThreads) {
      const int j = e / kBN, cc = e % kBN;
      const int64_t rank = r0 + j, c = c0 + cc;
      a_t[j * kLdN + cc] = (rank < p.r && c < p.K) ? p.lora_A[rank * p.K + c] : narrow<T, float>(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDxRankChunk; kk += 16) {
      FragA<T> a[kFragsM];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        wmma::load_matrix_sync(a[i], gb_t + (wm * kWarpM + i * 16) * S::kLdR + kk, S::kLdR);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        FragB<T, wmma::row_major> b;  // element (rank, c) at a_t[rank * kLdN + c]
        wmma::load_matrix_sync(b, a_t + kk * kLdN + wn * kWarpN + j * 16, kLdN);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
    }
    __syncthreads();
  }
  if (!p.drop.enabled) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
#pragma unroll
        for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] *= p.scaling;
  } else {
    // s and the mask multiply the LoRA part only, so they apply before g·W joins in.
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t m = m0 + wm * kWarpM + i * 16 + e / 16;
          const int64_t c = c0 + wn * kWarpN + j * 16 + e % 16;
          const float factor =
              (m < p.M && c < p.K) ? dropout_factor<float>(p.drop, static_cast<uint64_t>(m * p.K + c)) : 0.f;
          scratch[e] *= p.scaling * factor;
        }
        __syncwarp();
        wmma::load_matrix_sync(acc[i][j], scratch, 16, wmma::mem_row_major);
        __syncwarp();
      }
  }

  for (int64_t kt = 0; kt < n_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = kt + kStages - 1;
    if (next < n_tiles) load_stage(static_cast<int>(next % kStages), next);
    cp_async_commit();
    const int stage = static_cast<int>(kt % kStages);
    const T* gs = g_s + stage * kBM * kLdK;
    const T* ws = w_s + stage * kBK * kLdN;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      FragA<T> a[kFragsM];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) wmma::load_matrix_sync(a[i], gs + (wm * kWarpM + i * 16) * kLdK + kk, kLdK);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        FragB<T, wmma::row_major> b;  // element (n, c) at ws[n * kLdN + c]
        wmma::load_matrix_sync(b, ws + kk * kLdN + wn * kWarpN + j * 16, kLdN);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();

  store_tile<T>(acc, scratch, p.dx, p.K, m0, p.M, c0, p.K, nullptr);
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
cudaError_t forward_t(const ForwardArgs& a, cudaStream_t stream) {
  static_assert(ForwardSmem<T, kRankPad>::bytes <= kMaxDynamicSmem, "shared-memory plan exceeds sm_86/sm_89's 99 KB per block");
  ForwardParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.ldx = a.ldx;
  p.weight = static_cast<const T*>(a.weight);
  p.bias = static_cast<const T*>(a.bias);
  p.lora_A = static_cast<const T*>(a.lora_A);
  p.lora_B = static_cast<const T*>(a.lora_B);
  p.y = static_cast<T*>(a.y);
  p.xa = static_cast<float*>(a.xa);
  p.M = a.M, p.N = a.N, p.K = a.K, p.r = a.r;
  p.scaling = static_cast<float>(a.scaling);
  p.drop = a.dropout;
  p.vec = a.K % 8 == 0 && a.ldx % 8 == 0 && aligned16(a.x) && aligned16(a.weight) && aligned16(a.lora_A);
  return launch<forward_kernel<T, kRankPad>>(p, (a.M + kBM - 1) / kBM, (a.N + kBN - 1) / kBN,
                ForwardSmem<T, kRankPad>::bytes, stream, kThreads);
}

template <class T>
cudaError_t forward_by_rank(const ForwardArgs& a, cudaStream_t stream) {
  if (a.r <= 16) return forward_t<T, 16>(a, stream);
  if (a.r <= 32) return forward_t<T, 32>(a, stream);
  if (a.r <= kMaxFusedRank) return forward_t<T, 64>(a, stream);
  return forward_t<T, 0>(a, stream);
}

template <class T>
cudaError_t dx_t(const BackwardArgs& a, cudaStream_t stream) {
  static_assert(DxSmem<T>::bytes <= kMaxDynamicSmem, "shared-memory plan exceeds sm_86/sm_89's 99 KB per block");
  DxParams<T> p;
  p.grad_y = static_cast<const T*>(a.grad_y);
  p.ldg = a.ldg;
  p.weight = static_cast<const T*>(a.weight);
  p.lora_A = static_cast<const T*>(a.lora_A);
  p.gb = static_cast<const float*>(a.gb);
  p.dx = static_cast<T*>(a.dx);
  p.M = a.M, p.N = a.N, p.K = a.K, p.r = a.r;
  p.scaling = static_cast<float>(a.scaling);
  p.drop = a.dropout;
  p.vec = a.N % 8 == 0 && a.ldg % 8 == 0 && a.K % 8 == 0 && aligned16(a.grad_y) && aligned16(a.weight);
  return launch<dx_kernel<T>>(p, (a.M + kBM - 1) / kBM, (a.K + kBN - 1) / kBN, DxSmem<T>::bytes, stream, kThreads);
}


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

cudaError_t tensorcore_forward(const ForwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return forward_by_rank<__half>(a, stream);
    case DType::kBFloat16: return forward_by_rank<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

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

cudaError_t tensorcore_dx(const BackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return dx_t<__half>(a, stream);
    case DType::kBFloat16: return dx_t<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_fused
