// The fixed-order reductions of split-M partial sums (dA, dB, db), shared by the SIMT
// kernels (cuda_simt.cu) and the tensor-core ones (cuda_sm80_thin.cu): every output element
// adds its slices in slice order, so results are bitwise deterministic without atomics.
// Grid-stride loops of 256-thread blocks (reduce_blocks); consecutive threads own
// consecutive output elements, so each slice is read coalesced.
#pragma once

#include "cuda_common.cuh"

namespace lora_fused {
namespace cuda {

// partials[split][n][cols] (cols = r, or r + 1 with db):
// dB[n, j] = s·Σ_split partials[split][n][j]; db[n] = Σ_split partials[split][n][r].
template <class T, class Acc>
__global__ void reduce_dB_db_kernel(const Acc* partials, int64_t splits, int64_t N, int64_t r, int64_t cols,
                                    Acc scaling, T* dB, T* db) {
  const int64_t count = N * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partials[s * count + e];
    const int64_t n = e / cols, j = e % cols;
    if (j < r) {
      dB[n * r + j] = narrow<T, Acc>(scaling * sum);
    } else {
      db[n] = narrow<T, Acc>(sum);
    }
  }
}

// out[e] = s·Σ_split partials[split][e], e < count (dA: partials[split][r][K]).
template <class T, class Acc>
__global__ void reduce_scaled_kernel(const Acc* partials, int64_t splits, int64_t count, Acc scaling, T* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partials[s * count + e];
    out[e] = narrow<T, Acc>(scaling * sum);
  }
}

// Launch helpers (nothing to do for an empty output).
template <class T, class Acc>
cudaError_t reduce_dB_db(const Acc* partials, int64_t splits, int64_t N, int64_t r, bool with_db, Acc scaling, T* dB,
                         T* db, cudaStream_t stream) {
  const int64_t cols = r + (with_db ? 1 : 0);
  if (N * cols == 0) return cudaSuccess;
  reduce_dB_db_kernel<T, Acc><<<reduce_blocks(N * cols), 256, 0, stream>>>(partials, splits, N, r, cols, scaling, dB, db);
  return cudaGetLastError();
}

template <class T, class Acc>
cudaError_t reduce_scaled(const Acc* partials, int64_t splits, int64_t count, Acc scaling, T* out,
                          cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  reduce_scaled_kernel<T, Acc><<<reduce_blocks(count), 256, 0, stream>>>(partials, splits, count, scaling, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora_fused
