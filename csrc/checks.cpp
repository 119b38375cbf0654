#include "checks.h"

#include <ATen/ops/fill.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

namespace lora_fused {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_floating(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), "; all operands must share one dtype");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_seed(const char* op, const at::Tensor& seed) {
  TORCH_CHECK(seed.defined() && seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a 0-dim int64 CPU tensor, got ", seed.defined() ? seed.toString() : "undefined",
              " of shape ", seed.defined() ? shape_str(seed) : "?");
}

void check_scalars(const char* op, double scaling, double dropout_p) {
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

Sizes check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                     const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_str(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), op, ": tensors must be on CPU or CUDA, got ", x.device());
  check_floating(op, "weight", weight, x);
  check_floating(op, "lora_A", lora_A, x);
  check_floating(op, "lora_B", lora_B, x);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, op, ": weight must be [N, K] with K = ", K,
              " (x is ", shape_str(x), "), got ", shape_str(weight));
  const int64_t N = weight.size(0);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1, op,
              ": lora_A must be [r, K] with r >= 1 and K = ", K, ", got ", shape_str(lora_A));
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r, op, ": lora_B must be [N, r] = [", N,
              ", ", r, "], got ", shape_str(lora_B));
  return Sizes{M, N, K, r};
}

}  // namespace

Sizes check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                         const at::Tensor& seed) {
  const char* op = "lora_fused::fused_forward";
  const Sizes s = check_operands(op, x, weight, lora_A, lora_B);
  if (bias.has_value() && bias->defined()) {
    check_floating(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, op, ": bias must be [N] = [", s.N, "], got ",
                shape_str(*bias));
  }
  check_scalars(op, scaling, dropout_p);
  check_seed(op, seed);
  return s;
}

Sizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                          double dropout_p, const at::Tensor& seed) {
  const char* op = "lora_fused::fused_backward";
  const Sizes s = check_operands(op, x, weight, lora_A, lora_B);
  check_floating(op, "grad_y", grad_y, x);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.M && grad_y.size(1) == s.N, op, ": grad_y must be [M, N] = [",
              s.M, ", ", s.N, "], got ", shape_str(grad_y));
  const auto acc = accumulator_type(x.scalar_type());
  TORCH_CHECK(xa.defined() && xa.scalar_type() == acc, op, ": xa must have dtype ", acc, " (the forward's xa), got ",
              xa.defined() ? xa.toString() : "undefined");
  TORCH_CHECK(xa.device() == x.device(), op, ": xa is on ", xa.device(), " but x is on ", x.device());
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == s.M && xa.size(1) == s.r, op, ": xa must be [M, r] = [", s.M, ", ", s.r,
              "], got ", shape_str(xa));
  check_scalars(op, scaling, dropout_p);
  check_seed(op, seed);
  return s;
}

DropoutSpec dropout_spec(double dropout_p, const at::Tensor& seed) {
  return make_dropout_spec(dropout_p, seed.item<int64_t>());
}

bool poison_enabled() {
  const char* value = std::getenv("LORA_FUSED_POISON_OUTPUTS");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

at::Tensor& poison_(at::Tensor& tensor) {
  if (tensor.defined() && tensor.numel() > 0 && poison_enabled()) {
    if (at::isFloatingType(tensor.scalar_type())) {
      tensor.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      tensor.fill_(-1);
    }
  }
  return tensor;
}

at::Tensor poison_(at::Tensor&& tensor) {
  poison_(tensor);
  return std::move(tensor);
}

}  // namespace lora_fused
