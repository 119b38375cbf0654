// Which 2-D operands the sm90 kernel's TMA descriptors can describe (host only, no CUDA
// headers, so tests/cuda/tma_operand_check.cpp checks it with a plain C++ compiler).
//
// An operand is rows × depth elements with unit stride along one of them and `ld` elements
// between consecutive lines of the other: K-major (unit stride along depth, ld between rows:
// x, g, W in the forward, the rank workspaces, lora_B) or MN-major (unit stride along rows,
// ld between depth steps: W and lora_A in dx). cuTensorMapEncodeTiled's documented
// requirements on such a tensor (CUDA driver API, "Tensor Map Object Management"):
//   - globalAddress 16-byte aligned;
//   - every globalDim nonzero and at most 2^32 (the kernel's extents are ints: below 2^31);
//   - the one globalStride a multiple of 16 bytes and below 2^40 bytes;
//   - the strides describe non-overlapping lines: globalStrides[0] ≥ globalDim[0] · element
//     size (the documented stride formula, with padding ≥ 0).
// The last one excludes what PyTorch views allow and TMA does not: expanded tensors (row
// stride 0) and as_strided rows that overlap (0 < ld < the line length). Everything rejected
// here runs on the sm80 kernels, which read any row stride. The box (64 × 128 or 64 × 64
// elements, 128-byte swizzle) is fixed at compile time and within the limits (≤ 256 per
// dimension, inner box 128 bytes).
#pragma once

#include <cstdint>

namespace lora_fused {
namespace cuda {

struct TmaOperand {
  const void* ptr;
  int64_t rows;    // the non-reduced extent (M, N or K rows of the tile grid)
  int64_t depth;   // the reduced extent (K, N or r)
  int64_t ld;      // elements between consecutive lines of the strided dimension
  bool k_major;    // unit stride along depth (else along rows)
  int element_bytes;
};

inline bool tma_operand_ok(const TmaOperand& o) {
  constexpr int64_t kMaxExtent = int64_t{1} << 31;  // int extents in the kernel (TMA allows 2^32)
  constexpr int64_t kMaxStrideBytes = int64_t{1} << 40;
  if (o.ptr == nullptr || reinterpret_cast<uintptr_t>(o.ptr) % 16 != 0) return false;
  if (o.element_bytes <= 0 || o.rows < 1 || o.depth < 1 || o.rows >= kMaxExtent || o.depth >= kMaxExtent) {
    return false;
  }
  const int64_t line = o.k_major ? o.depth : o.rows;  // the contiguous extent
  if (o.ld < line) return false;                      // expanded (ld = 0) or overlapping lines
  if (o.ld >= kMaxStrideBytes / o.element_bytes) return false;
  const int64_t stride_bytes = o.ld * o.element_bytes;
  return stride_bytes % 16 == 0;
}

}  // namespace cuda
}  // namespace lora_fused
