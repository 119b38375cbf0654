// SIMT kernels: one tiled GEMM template serves every product of the contract for fp32 and
// fp64 (fp16/bf16 run on tensor cores: cuda_sm80.cu and cuda_sm80_thin.cu).
//
// A "problem" functor supplies the operands element by element, a(m, k) and b(k, n), and
// stores each result. The reduction range has two segments, [0, K0) and [K0, K0 + K1),
// summed into separate accumulators, so an op can append the LoRA step to its main
// product ([x | s·xa]·[W | B]ᵀ) and still treat the two parts differently (dx masks
// only the LoRA part). blockIdx.z splits the reduction into slices for the long
// reductions over M; those store partial sums that reduce_* kernels add in slice order.
#include "cuda_common.cuh"
#include "cuda_reduce.cuh"

namespace lora_fused {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kThreads = 256;

template <class Acc>
struct Tiles {
  Acc a[kTileK][kTileM + 1];
  Acc b[kTileK][kTileN + 1];
};

// acc[i][j] += Σ_{k in [k_begin, k_end)} a(m0 + ty + 16i, k) · b(k, n0 + tx + 16j).
template <class Problem, class Acc>
__device__ __forceinline__ void accumulate(const Problem& p, Tiles<Acc>& s, int64_t m0, int64_t n0, int64_t M,
                                           int64_t N, int64_t k_begin, int64_t k_end, Acc (&acc)[4][4]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t kt = k_begin; kt < k_end; kt += kTileK) {
    // Operands are read along whichever axis is contiguous in memory (coalesced loads).
    // The load loops stay rolled: fully unrolled, ptxas spilled 20 bytes in the fp16/bf16
    // dB/db instantiation (tests/test_cuda_ptxas.py).
#pragma unroll 1
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int kk = Problem::kAContiguousM ? e / kTileM : e % kTileK;
      const int mm = Problem::kAContiguousM ? e % kTileM : e / kTileK;
      const int64_t m = m0 + mm, k = kt + kk;
      s.a[kk][mm] = (m < M && k < k_end) ? p.a(m, k) : Acc(0);
    }
#pragma unroll 1
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = Problem::kBContiguousN ? e / kTileN : e % kTileK;
      const int nn = Problem::kBContiguousN ? e % kTileN : e / kTileK;
      const int64_t n = n0 + nn, k = kt + kk;
      s.b[kk][nn] = (n < N && k < k_end) ? p.b(k, n) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = s.a[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = s.b[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
}

template <class Problem>
__global__ void __launch_bounds__(kThreads)
    simt_gemm_kernel(Problem p, int64_t M, int64_t N, int64_t K0, int64_t K1, int64_t k_per_split) {
  using Acc = typename Problem::Acc;
  __shared__ Tiles<Acc> tiles;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int split = blockIdx.z;
  const int64_t k_lo = split * k_per_split;
  const int64_t k_hi = min(k_lo + k_per_split, K0 + K1);
  Acc acc0[4][4], acc1[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc0[i][j] = acc1[i][j] = Acc(0);
  accumulate(p, tiles, m0, n0, M, N, k_lo, min(k_hi, K0), acc0);
  accumulate(p, tiles, m0, n0, M, N, max(k_lo, K0), k_hi, acc1);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) p.store(m, n, acc0[i][j], acc1[i][j], split);
    }
}

// Launches out[M, N] = Σ_k a(m, k)·b(k, n) over K0 + K1 in `splits` slices of k_per_split.
template <class Problem>
cudaError_t run_gemm(const Problem& p, int64_t M, int64_t N, int64_t K0, int64_t K1, int64_t splits,
                     int64_t k_per_split, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((M + kTileM - 1) / kTileM), static_cast<unsigned>((N + kTileN - 1) / kTileN),
                  static_cast<unsigned>(splits));
  simt_gemm_kernel<Problem><<<grid, kThreads, 0, stream>>>(p, M, N, K0, K1, k_per_split);
  return cudaGetLastError();
}

template <class Problem>
cudaError_t run_gemm(const Problem& p, int64_t M, int64_t N, int64_t K0, int64_t K1, cudaStream_t stream) {
  return run_gemm(p, M, N, K0, K1, 1, K0 + K1 > 0 ? K0 + K1 : 1, stream);
}

// ---- the products of the contract ---------------------------------------------------

// xa[M, r] = x~·Aᵀ
template <class T>
struct XaProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = false, kBContiguousN = false;
  const T* x;
  int64_t ldx;
  const T* lora_A;
  Acc* xa;
  int64_t K, r;
  DropoutSpec drop;
  __device__ Acc a(int64_t m, int64_t k) const {
    const Acc v = widen(x[m * ldx + k]);  // x~ rounded to the input dtype, as the reference forms it
    return drop.enabled ? rounded<T>(v * dropout_factor<Acc>(drop, static_cast<uint64_t>(m * K + k))) : v;
  }
  __device__ Acc b(int64_t k, int64_t j) const { return widen(lora_A[j * K + k]); }
  __device__ void store(int64_t m, int64_t j, Acc main, Acc, int) const { xa[m * r + j] = main; }
};

// y[M, N] = x·Wᵀ + b + s·(round(xa)·Bᵀ): the second reduction segment reads xa rounded to
// the input dtype, unscaled; s multiplies its accumulator (the reference's rounding order).
template <class T>
struct ForwardProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = false, kBContiguousN = false;
  const T* x;
  int64_t ldx;
  const T* weight;
  const T* bias;
  const T* lora_B;
  const Acc* xa;
  T* y;
  int64_t N, K, r;
  Acc scaling;
  __device__ Acc a(int64_t m, int64_t k) const {
    return k < K ? widen(x[m * ldx + k]) : rounded<T>(xa[m * r + (k - K)]);
  }
  __device__ Acc b(int64_t k, int64_t n) const {
    return k < K ? widen(weight[n * K + k]) : widen(lora_B[n * r + (k - K)]);
  }
  __device__ void store(int64_t m, int64_t n, Acc main, Acc lora, int) const {
    y[m * N + n] = narrow<T, Acc>(main + (bias != nullptr ? widen(bias[n]) : Acc(0)) + scaling * lora);
  }
};

// gb[M, r] = g·B
template <class T>
struct GbProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = false, kBContiguousN = true;
  const T* grad_y;
  int64_t ldg;
  const T* lora_B;
  Acc* gb;
  int64_t r;
  __device__ Acc a(int64_t m, int64_t n) const { return widen(grad_y[m * ldg + n]); }
  __device__ Acc b(int64_t n, int64_t j) const { return widen(lora_B[n * r + j]); }
  __device__ void store(int64_t m, int64_t j, Acc main, Acc, int) const { gb[m * r + j] = main; }
};

// dx[M, K] = g·W + s·(round(gb)·A) ⊙ keep/(1-p)
template <class T>
struct DxProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = false, kBContiguousN = true;
  const T* grad_y;
  int64_t ldg;
  const T* weight;
  const T* lora_A;
  const Acc* gb;
  T* dx;
  int64_t N, K, r;
  Acc scaling;
  DropoutSpec drop;
  __device__ Acc a(int64_t m, int64_t k) const {
    return k < N ? widen(grad_y[m * ldg + k]) : rounded<T>(gb[m * r + (k - N)]);
  }
  __device__ Acc b(int64_t k, int64_t c) const {
    return k < N ? widen(weight[k * K + c]) : widen(lora_A[(k - N) * K + c]);
  }
  __device__ void store(int64_t m, int64_t c, Acc main, Acc lora, int) const {
    lora *= scaling;
    if (drop.enabled) lora *= dropout_factor<Acc>(drop, static_cast<uint64_t>(m * K + c));
    dx[m * K + c] = narrow<T, Acc>(main + lora);
  }
};

// partials[split][N][cols] = Σ_{m in slice} g[m, n]·[round(xa) | 1][m, j]   (cols = r, or r + 1 with db)
template <class T>
struct DbProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = true, kBContiguousN = true;
  const T* grad_y;
  int64_t ldg;
  const Acc* xa;
  Acc* partials;
  int64_t N, r, cols;
  __device__ Acc a(int64_t n, int64_t m) const { return widen(grad_y[m * ldg + n]); }
  __device__ Acc b(int64_t m, int64_t j) const { return j < r ? rounded<T>(xa[m * r + j]) : Acc(1); }
  __device__ void store(int64_t n, int64_t j, Acc main, Acc, int split) const {
    partials[(split * N + n) * cols + j] = main;
  }
};

// partials[split][r][K] = Σ_{m in slice} round(gb)[m, i]·x~[m, c]
template <class T>
struct DaProblem {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kAContiguousM = true, kBContiguousN = true;
  const Acc* gb;
  const T* x;
  int64_t ldx;
  Acc* partials;
  int64_t K, r;
  DropoutSpec drop;
  __device__ Acc a(int64_t i, int64_t m) const { return rounded<T>(gb[m * r + i]); }
  __device__ Acc b(int64_t m, int64_t c) const {
    const Acc v = widen(x[m * ldx + c]);
    return drop.enabled ? rounded<T>(v * dropout_factor<Acc>(drop, static_cast<uint64_t>(m * K + c))) : v;
  }
  __device__ void store(int64_t i, int64_t c, Acc main, Acc, int split) const {
    partials[(split * r + i) * K + c] = main;
  }
};

// The slice length of a reduction over M: a multiple of the tile depth.
int64_t slice_rows(int64_t M, int64_t splits) {
  const int64_t rows = (M + splits - 1) / splits;
  return (rows + kTileK - 1) / kTileK * kTileK;
}

template <class T>
struct TypeTag {
  using type = T;
};

template <class F>
cudaError_t dispatch_wide(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(TypeTag<float>{});
    case DType::kDouble: return f(TypeTag<double>{});
    default: return cudaErrorInvalidValue;  // fp16/bf16 run on tensor cores
  }
}

}  // namespace

cudaError_t simt_xa(const ForwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    XaProblem<T> p{static_cast<const T*>(a.x), a.ldx, static_cast<const T*>(a.lora_A), static_cast<Acc*>(a.xa),
                   a.K, a.r, a.dropout};
    return run_gemm(p, a.M, a.r, a.K, 0, stream);
  });
}

cudaError_t simt_forward(const ForwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    ForwardProblem<T> p{static_cast<const T*>(a.x), a.ldx, static_cast<const T*>(a.weight),
                        static_cast<const T*>(a.bias), static_cast<const T*>(a.lora_B),
                        static_cast<const Acc*>(a.xa), static_cast<T*>(a.y), a.N, a.K, a.r,
                        static_cast<Acc>(a.scaling)};
    return run_gemm(p, a.M, a.N, a.K, a.r, stream);
  });
}

cudaError_t simt_gb(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    GbProblem<T> p{static_cast<const T*>(a.grad_y), a.ldg, static_cast<const T*>(a.lora_B), static_cast<Acc*>(a.gb),
                   a.r};
    return run_gemm(p, a.M, a.r, a.N, 0, stream);
  });
}

cudaError_t simt_dx(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    DxProblem<T> p{static_cast<const T*>(a.grad_y), a.ldg, static_cast<const T*>(a.weight),
                   static_cast<const T*>(a.lora_A), static_cast<const Acc*>(a.gb), static_cast<T*>(a.dx),
                   a.N, a.K, a.r, static_cast<Acc>(a.scaling), a.dropout};
    return run_gemm(p, a.M, a.K, a.N, a.r, stream);
  });
}

cudaError_t simt_dB_db(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    const int64_t cols = a.r + (a.db != nullptr ? 1 : 0);
    const int64_t splits = reduction_splits(a.M);
    Acc* partials = static_cast<Acc*>(a.partials);
    DbProblem<T> p{static_cast<const T*>(a.grad_y), a.ldg, static_cast<const Acc*>(a.xa), partials, a.N, a.r, cols};
    cudaError_t err = run_gemm(p, a.N, cols, a.M, 0, splits, slice_rows(a.M, splits), stream);
    if (err != cudaSuccess) return err;
    return reduce_dB_db(static_cast<const Acc*>(partials), splits, a.N, a.r, a.db != nullptr,
                        static_cast<Acc>(a.scaling), static_cast<T*>(a.dB), static_cast<T*>(a.db), stream);
  });
}

cudaError_t simt_dA(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_wide(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    const int64_t splits = reduction_splits(a.M);
    Acc* partials = static_cast<Acc*>(a.partials);
    DaProblem<T> p{static_cast<const Acc*>(a.gb), static_cast<const T*>(a.x), a.ldx, partials, a.K, a.r, a.dropout};
    cudaError_t err = run_gemm(p, a.r, a.K, a.M, 0, splits, slice_rows(a.M, splits), stream);
    if (err != cudaSuccess) return err;
    return reduce_scaled(static_cast<const Acc*>(partials), splits, a.r * a.K, static_cast<Acc>(a.scaling),
                         static_cast<T*>(a.dA), stream);
  });
}

}  // namespace cuda
}  // namespace lora_fused
