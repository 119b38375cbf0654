// Validation shared by the CPU and CUDA implementations of the two ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include "dropout_hash.h"

namespace lora_fused {

// Problem sizes of one call: x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r].
struct Sizes {
  int64_t M, N, K, r;
};

// The dtype of xa and of internal sums: fp64 for fp64 inputs, else fp32.
inline at::ScalarType accumulator_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

Sizes check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                         const at::Tensor& seed);

Sizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                          double dropout_p, const at::Tensor& seed);

// The dropout parameters of a call (seed is a validated 0-dim int64 CPU tensor).
DropoutSpec dropout_spec(double dropout_p, const at::Tensor& seed);

// Debug switch shared with the Triton launchers (lora_fused/debug.py): when the environment
// variable LORA_FUSED_POISON_OUTPUTS is set to anything but "" or "0", every output and
// workspace a kernel is meant to write is filled with NaN (integers: all ones) right after
// allocation, so an unwritten element fails a parity test. Read at every call.
bool poison_enabled();

// Fills `tensor` with NaN / all-ones when poison_enabled(); returns it (for chaining).
at::Tensor& poison_(at::Tensor& tensor);
at::Tensor poison_(at::Tensor&& tensor);

}  // namespace lora_fused
