// The bf16/fp16 route of the CPU path: every product as bf16×bf16→fp32 (fp16×fp16→fp32)
// tiles of torch's exported oneDNN micro-kernel at::native::cpublas::brgemm, so reduced
// dtypes run on the CPU's bf16 dot-product instructions (avx512_bf16, AMX) instead of fp32
// GEMMs on widened copies. cpu_brgemm.cpp says how, and which calls it serves.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "dropout_hash.h"

namespace lora_fused {

// "" when the route can run `dtype` on this CPU in this process, else why not (dtype, CPU
// instructions, oneDNN disabled by torch.backends.mkldnn, or the start-up probe failing).
std::string brgemm_route_unavailable_reason(at::ScalarType dtype);

// Whether the route serves these operands: available for their dtype, even reduction
// lengths (K forward, N backward) and, backward, grad_y with unit column stride.
bool brgemm_serves_forward(const at::Tensor& x);
bool brgemm_serves_backward(const at::Tensor& grad_y);

// The op on the route; outputs allocated (and poisoned) by the caller: y [M, N], xa [M, r]
// fp32, dx [M, K] (when compute_dx), dA [r, K], dB [N, r], all contiguous.
void brgemm_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const DropoutSpec& drop,
                    at::Tensor& y, at::Tensor& xa);
void brgemm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                     const DropoutSpec& drop, at::Tensor& dx, at::Tensor& dA, at::Tensor& dB);

}  // namespace lora_fused
