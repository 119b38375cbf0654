// The rank-thin fp32 products of the CPU path (x·Aᵀ, g·B, gbᵀ·x~, xaᵀ·g) as tiles of
// oneDNN's fp32 brgemm micro-kernel: the long operand is read in place, row by row.
// cpu_thin.cpp says why and how.
#pragma once

#include <ATen/core/Tensor.h>

namespace lora_fused {

// out [P, Q] = alpha · a [P, R] · b [R, Q], or out += that with `accumulate`, where one side
// of the product is the rank r: xa = x·Aᵀ and gb = g·B (Q = r, a long), dA = s·gbᵀ·x~ and
// dBᵀ = s·xaᵀ·g (P = r, b long). out: any strides (dB is written as the transposed view of
// [N, r]). fp32 with a long operand of unit column stride runs the brgemm tiles; anything
// else (fp64, strided x or g) runs ATen's addmm.
void thin_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0,
                  bool accumulate = false);

}  // namespace lora_fused
