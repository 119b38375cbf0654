// Device helpers shared by the CUDA kernel files: dtype conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

template <class T, class Acc>
__device__ __forceinline__ T narrow(Acc v);
template <>
__device__ __forceinline__ __half narrow<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float narrow<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ double narrow<double, double>(double v) { return v; }

// keep / (1 - p) of element idx of x under `spec`, as a multiplier (0 when dropped).
template <class Acc>
__device__ __forceinline__ Acc dropout_factor(const DropoutSpec& spec, uint64_t idx) {
  return keep_element(spec.seed, spec.threshold, idx) ? static_cast<Acc>(spec.scale) : Acc(0);
}

// Blocks of 256 threads for a grid-stride loop over `count` elements.
inline unsigned reduce_blocks(int64_t count) {
  const int64_t blocks = (count + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? blocks : 4096);
}

}  // namespace cuda
}  // namespace lora_fused
