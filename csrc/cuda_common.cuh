// Device helpers shared by the CUDA kernel files: dtype conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>

#include "cuda_kernels.h"

namespace lora_fused {
namespace cuda {

// The accumulator type of an element type: fp64 for fp64, else fp32.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

// Rounds to nearest; the primary template serves cute::half_t / cute::bfloat16_t, whose
// conversions from float round to nearest even as well.
template <class T, class Acc>
__device__ __forceinline__ T narrow(Acc v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half narrow<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float narrow<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ double narrow<double, double>(double v) { return v; }

// A rank-r intermediate (xa, gb: fp32, or fp64) as it enters the next product: rounded to
// the input dtype T, unscaled (lora_fused/reference.py's rounding order).
template <class T, class Acc>
__device__ __forceinline__ Acc rounded(Acc v) {
  return widen(narrow<T, Acc>(v));
}

// keep / (1 - p) of element idx of x under `spec`, as a multiplier (0 when dropped).
template <class Acc>
__device__ __forceinline__ Acc dropout_factor(const DropoutSpec& spec, uint64_t idx) {
  return keep_element(spec.seed, spec.threshold, idx) ? static_cast<Acc>(spec.scale) : Acc(0);
}

// A 16-byte cp.async global -> shared; src_bytes < 16 zero-fills the rest, so
// out-of-range chunks pass 0 and read nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem), "r"(src_bytes)
               : "memory");
}

// Waits until at most kPending of this thread's cp.async groups are still in flight. The
// "memory" clobber keeps the compiler from moving shared-memory accesses across the wait
// (CuTe's cp_async_wait has none): the pipeline's `landed` hook reads and rewrites the
// landed chunks with plain loads and stores right after it, before any barrier.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Closes the current group of cp.async (possibly empty), also a compiler fence.
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Opts kKernel into `smem_bytes` of dynamic shared memory once per device (the attribute
// belongs to the function on the current device; the bytes are fixed per instantiation).
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t smem_bytes) {
  static std::atomic<uint64_t> done_on_devices{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;  // past 64 devices: every call
  if (bit != 0 && (done_on_devices.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  // The largest shared-memory carveout, so that blocks whose launch bounds ask for two per
  // SM get them (sm80 forward: 2 × 80 KB of sm_80's 164 KB) rather than an L1-sized split.
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (err == cudaSuccess) done_on_devices.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

// Launches kKernel(params) on `stream` (nothing for an empty grid).
template <auto kKernel, class Params>
cudaError_t launch(const Params& params, int64_t grid_x, int64_t grid_y, size_t smem_bytes, cudaStream_t stream,
                   int threads) {
  if (grid_x == 0 || grid_y == 0) return cudaSuccess;
  const cudaError_t err = allow_dynamic_smem<kKernel>(smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  kKernel<<<grid, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// Dynamic shared memory a block may opt into on every GPU the sm_80 SASS serves: 99 KB on
// sm_86/sm_89 (sm_80 allows 163 KB, sm_90 227 KB). Every kernel's plan is checked against it.
constexpr size_t kMaxDynamicSmem = 99 * 1024;

// Blocks of 256 threads for a grid-stride loop over `count` elements.
inline unsigned reduce_blocks(int64_t count) {
  const int64_t blocks = (count + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

}  // namespace cuda
}  // namespace lora_fused
