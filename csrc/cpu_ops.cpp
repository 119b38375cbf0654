// CPU implementation of the fused LoRA linear.
//
// Every large product is ONE BLAS call over all M rows (x·Wᵀ forward, g·W backward), so
// MKL/oneDNN blocks and threads it as it would nn.Linear's; row-block BLAS calls inside
// at::parallel_for lost 10-20 % to that. The two rank-r terms on large outputs are folded in
// by accumulation into the same output (addmm with beta = 1 and alpha = s: y += s·xa·Bᵀ,
// dx += s·gb·A). The four rank-r products that reduce over a long side (xa = x·Aᵀ, gb = g·B,
// dA = s·gbᵀ·x~, dB = s·gᵀ·xa) run as fp32 brgemm tiles that read x and g in place
// (cpu_thin.cpp: MKL packs the long operand first, which made them cost twice their flops),
// s applied to their accumulators as they are stored; dB is stored straight through the
// transposed view. x and g are passed as they are (any strides): no copies in fp32/fp64.
//
// Dropout: the mask is regenerated from the counter hash (cpu_dropout.h), never saved. Only
// products that need x~ = x ⊙ keep/(1-p) (xa forward, dA and the mask on the rank-r part of
// dx backward) run over row blocks of kDropoutBlockRows rows: forward hashes
// and multiplies each block's x~ in one pass into a per-thread buffer; backward hashes a
// block once and in the same pass writes x~ (for dA's tiles) and adds the masked rank-r
// term to dx.
//
// Rounding order (lora_fused/reference.py): products accumulate in fp32, xa and gb enter the
// next product rounded to the input dtype unscaled, s multiplies the fp32 accumulator, y and
// dx are rounded once at the end.
//
// Routes: fp32 and fp64 run the calls below (fp64 on ATen's addmm throughout). bf16 and fp16
// run cpu_brgemm.cpp's tiles of oneDNN's bf16×bf16→fp32 micro-kernel where it serves the call
// (the CPU has the dtype's dot-product instructions, oneDNN is enabled, x / grad_y have unit
// column stride and the reductions are even: brgemm_serves_*); otherwise the same calls on
// fp32 copies widened once per call, the correct but 3-5x slower fallback.
//
// Determinism: the brgemm tiles give every output element to one thread in a fixed order;
// dA with dropout sums fixed row groups (a function of M only, not of the thread count) and
// adds the group partials in order.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu_brgemm.h"
#include "cpu_dropout.h"
#include "cpu_thin.h"

namespace lora_fused {
namespace {

// Rows per dropout block: 64 rows × K ≤ 3072 fp32 is ≤ 768 KiB per buffer, so a block's x~
// stays in the 1 MiB L2 between its hashing and its product. (Blocks sized to keep the
// backward's two buffers in 512 KiB, 16 rows at K = 3072, measured 3-4 % slower at ViT-B's
// lin2 with dropout: more partials and calls.) A constant, so the blocks and dA's partial
// sums do not depend on the thread count.
constexpr int64_t kDropoutBlockRows = 64;
// At most this many dA partials with dropout (memory ≤ kMaxPartials·r·K accumulators).
constexpr int64_t kMaxPartials = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The operand as BLAS sees it: the tensor itself in fp32/fp64, a widened copy otherwise.
at::Tensor widened(const at::Tensor& t, at::ScalarType acc) { return t.scalar_type() == acc ? t : t.to(acc); }

// A rank-r intermediate as it enters the next product: rounded to `dtype`, unscaled.
at::Tensor rounded_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype).to(t.scalar_type());
}

at::Tensor empty_acc(int64_t rows, int64_t cols, const at::Tensor& like, at::ScalarType acc) {
  return poison_(at::empty({rows, cols}, like.options().dtype(acc).memory_format(at::MemoryFormat::Contiguous)));
}

// x with unit column stride, as the dropout blocks read it: x itself or a contiguous copy.
at::Tensor with_unit_column_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

template <typename scalar_t>
const scalar_t* row_ptr(const at::Tensor& t, int64_t row) {
  return t.data_ptr<scalar_t>() + row * t.stride(0);
}

// xa = x~ · Aᵀ block by block (x~ exists one block at a time, in a per-thread buffer),
// x_rows with unit column stride.
template <typename scalar_t>
void dropped_projection(at::Tensor& xa, const at::Tensor& x_rows, const at::Tensor& a_t, const DropoutSpec& drop) {
  const int64_t M = x_rows.size(0), K = x_rows.size(1), block_rows = kDropoutBlockRows;
  const at::ThreadLocalState caller_state;  // the ATen ops below run on OpenMP threads: below autograd, as here
  at::parallel_for(0, ceil_div(M, block_rows), 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor x_dropped = empty_acc(block_rows, K, x_rows, x_rows.scalar_type());
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * block_rows, rows = std::min(block_rows, M - row0);
      fill_dropped_rows(x_dropped.data_ptr<scalar_t>(), row_ptr<scalar_t>(x_rows, row0), x_rows.stride(0), rows, K,
                        row0, drop);
      at::Tensor xa_blk = xa.narrow(0, row0, rows);
      thin_product(xa_blk, x_dropped.narrow(0, 0, rows), a_t);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const at::Tensor& seed) {
  const Sizes s = check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  const auto dtype = x.scalar_type();
  const auto acc = accumulator_type(dtype);
  const bool native = acc == dtype;
  at::Tensor y = poison_(at::empty({s.M, s.N}, x.options()));
  at::Tensor xa = poison_(at::empty({s.M, s.r}, x.options().dtype(acc)));
  if (s.M == 0) return {y, xa};

  const DropoutSpec drop = dropout_spec(dropout_p, seed);
  if (!native && brgemm_serves_forward(x)) {
    brgemm_forward(x, weight, bias, lora_A, lora_B, scaling, drop, y, xa);
    return {y, xa};
  }
  const at::Tensor x_acc = widened(x, acc);
  const at::Tensor a_t = widened(lora_A, acc).t().contiguous();  // [K, r]: the thin operand, r·K elements
  if (drop.enabled && acc == at::kDouble) {
    dropped_projection<double>(xa, with_unit_column_stride(x_acc), a_t, drop);
  } else if (drop.enabled) {
    dropped_projection<float>(xa, with_unit_column_stride(x_acc), a_t, drop);
  } else {
    thin_product(xa, x_acc, a_t);
  }

  // y = x·Wᵀ + b in one BLAS call (as nn.Linear), then y += s·round(xa)·Bᵀ accumulated in place.
  at::Tensor y_acc = native ? y : poison_(at::empty({s.M, s.N}, x.options().dtype(acc)));
  const at::Tensor weight_t = widened(weight, acc).t();  // [K, N]
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y_acc, widened(*bias, acc), x_acc, weight_t);
  } else {
    at::mm_out(y_acc, x_acc, weight_t);
  }
  y_acc.addmm_(rounded_to(xa, dtype), widened(lora_B, acc).t(), /*beta=*/1.0, /*alpha=*/scaling);
  if (!native) y.copy_(y_acc);
  return {y, xa};
}

// With dropout: dA = s·Σ_blocks gbᵀ_blk·x~_blk and, when dx_acc is defined, dx_acc += s·(gb·A) ⊙ factor,
// each block's mask hashed once for both (dropped_backward_rows), x_rows with unit column stride.
template <typename scalar_t>
void dropped_backward_terms(at::Tensor& dA, at::Tensor& dx_acc, const at::Tensor& gb, const at::Tensor& gb_t,
                            const at::Tensor& x_rows, const at::Tensor& a_acc, double scaling, const DropoutSpec& drop) {
  const int64_t M = x_rows.size(0), K = x_rows.size(1), r = a_acc.size(0);
  const int64_t block_rows = kDropoutBlockRows;
  const auto acc = x_rows.scalar_type();
  const int64_t blocks = ceil_div(M, block_rows);
  const int64_t blocks_per_group = ceil_div(blocks, kMaxPartials);
  const int64_t groups = ceil_div(blocks, blocks_per_group);  // every group gets at least one block
  // Group 0 accumulates straight into dA; the others into partials added in group order.
  at::Tensor partials = groups > 1 ? empty_acc((groups - 1) * r, K, x_rows, acc) : at::Tensor();
  const bool with_dx = dx_acc.defined();
  const at::ThreadLocalState caller_state;  // as in dropped_projection
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor x_dropped = empty_acc(block_rows, K, x_rows, acc);
    at::Tensor lora = with_dx ? empty_acc(block_rows, K, x_rows, acc) : at::Tensor();
    for (int64_t grp = begin; grp < end; ++grp) {
      at::Tensor partial = grp == 0 ? dA : partials.narrow(0, (grp - 1) * r, r);
      const int64_t first = grp * blocks_per_group, last = std::min(blocks, first + blocks_per_group);
      for (int64_t b = first; b < last; ++b) {
        const int64_t row0 = b * block_rows, rows = std::min(block_rows, M - row0);
        scalar_t* dx_rows = nullptr;
        if (with_dx) {
          at::Tensor lora_blk = lora.narrow(0, 0, rows);
          at::mm_out(lora_blk, gb.narrow(0, row0, rows), a_acc);
          dx_rows = dx_acc.data_ptr<scalar_t>() + row0 * K;
        }
        dropped_backward_rows(x_dropped.data_ptr<scalar_t>(), dx_rows, with_dx ? lora.data_ptr<scalar_t>() : nullptr,
                              row_ptr<scalar_t>(x_rows, row0), x_rows.stride(0), rows, K, row0, drop, scaling);
        thin_product(partial, gb_t.narrow(1, row0, rows), x_dropped.narrow(0, 0, rows), /*alpha=*/1.0,
                     /*accumulate=*/b > first);
      }
    }
  });
  for (int64_t grp = 1; grp < groups; ++grp) dA.add_(partials.narrow(0, (grp - 1) * r, r));
  dA.mul_(scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed,
    bool compute_dx, bool compute_db) {
  const Sizes s = check_backward_args(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed);
  const auto dtype = x.scalar_type();
  const auto acc = accumulator_type(dtype);
  const bool native = acc == dtype;
  at::Tensor dx = compute_dx ? poison_(at::empty({s.M, s.K}, grad_y.options())) : at::empty({0}, grad_y.options());
  at::Tensor db = poison_(at::empty({compute_db ? s.N : 0}, grad_y.options()));
  if (s.M == 0) {
    if (compute_db) db.zero_();
    return {dx, at::zeros_like(lora_A, at::MemoryFormat::Contiguous),
            at::zeros_like(lora_B, at::MemoryFormat::Contiguous), db};
  }

  const DropoutSpec drop = dropout_spec(dropout_p, seed);
  if (!native && brgemm_serves_backward(grad_y)) {
    at::Tensor dA = poison_(at::empty({s.r, s.K}, lora_A.options().memory_format(at::MemoryFormat::Contiguous)));
    at::Tensor dB = poison_(at::empty({s.N, s.r}, lora_B.options().memory_format(at::MemoryFormat::Contiguous)));
    brgemm_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, drop, dx, dA, dB);
    if (compute_db) db.copy_(at::sum(grad_y, {0}, /*keepdim=*/false, acc));
    return {dx, dA, dB, db};
  }
  const at::Tensor g_acc = widened(grad_y, acc);
  const at::Tensor a_acc = widened(lora_A, acc);  // [r, K]
  const at::Tensor x_acc = widened(x, acc);
  // gb = g·B, rounded to the input dtype before it enters dx and dA (as gbᵀ, the A operand of dA's tiles).
  at::Tensor gb = empty_acc(s.M, s.r, grad_y, acc);
  thin_product(gb, g_acc, widened(lora_B, acc));
  gb = rounded_to(gb, dtype);
  const at::Tensor gb_t = gb.t().contiguous();  // [r, M]: M·r elements

  at::Tensor dx_acc;
  if (compute_dx) {
    dx_acc = native ? dx : poison_(at::empty({s.M, s.K}, grad_y.options().dtype(acc)));
    at::mm_out(dx_acc, g_acc, widened(weight, acc));
    if (!drop.enabled) dx_acc.addmm_(gb, a_acc, /*beta=*/1.0, /*alpha=*/scaling);
  }
  at::Tensor dA = native ? poison_(at::empty({s.r, s.K}, lora_A.options().memory_format(at::MemoryFormat::Contiguous)))
                         : empty_acc(s.r, s.K, x, acc);
  if (drop.enabled) {
    if (acc == at::kDouble) {
      dropped_backward_terms<double>(dA, dx_acc, gb, gb_t, with_unit_column_stride(x_acc), a_acc, scaling, drop);
    } else {
      dropped_backward_terms<float>(dA, dx_acc, gb, gb_t, with_unit_column_stride(x_acc), a_acc, scaling, drop);
    }
  } else {
    thin_product(dA, gb_t, x_acc, scaling);
  }
  if (compute_dx && !native) dx.copy_(dx_acc);

  // dBᵀ [r, N] = s·round(xa)ᵀ·g, written through the transposed view of dB [N, r].
  at::Tensor dB = poison_(at::empty({s.N, s.r}, lora_B.options().memory_format(at::MemoryFormat::Contiguous)));
  at::Tensor dB_acc = native ? dB : empty_acc(s.N, s.r, grad_y, acc);
  at::Tensor dB_t = dB_acc.t();
  thin_product(dB_t, rounded_to(xa, dtype).t().contiguous(), g_acc, scaling);
  if (!native) dB.copy_(dB_acc);
  if (compute_db) db.copy_(at::sum(grad_y, {0}, /*keepdim=*/false, acc));
  return {dx, native ? dA : dA.to(lora_A.scalar_type()), dB, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace lora_fused
