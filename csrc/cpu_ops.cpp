// CPU implementation of the fused LoRA linear: row blocks in parallel (at::parallel_for),
// ATen BLAS on each block, dropout regenerated from the shared hash. Reduced-precision
// operands are converted to fp32 once per call (weights) or per block (activations), so
// every product accumulates in fp32 (fp64 for fp64) and no M×N temporary exists beyond
// the outputs; block temporaries are at most kMaxBlockRows rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace lora_fused {
namespace {

constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 256;

// Rows per block: about one block per thread, within [kMinBlockRows, kMaxBlockRows].
int64_t block_rows(int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((M + threads - 1) / threads, kMinBlockRows, kMaxBlockRows);
}

// keep / (1 - p) for rows [row0, row0 + rows) of an [M, K] input, in the accumulator dtype.
at::Tensor dropout_factor(const DropoutSpec& spec, int64_t row0, int64_t rows, int64_t K, at::ScalarType acc) {
  at::Tensor factor = at::empty({rows, K}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "lora_fused_dropout_factor", [&] {
    scalar_t* out = factor.data_ptr<scalar_t>();
    const auto kept = static_cast<scalar_t>(spec.scale);
    for (int64_t i = 0; i < rows; ++i) {
      const uint64_t base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(K);
      for (int64_t j = 0; j < K; ++j) {
        out[i * K + j] = keep_element(spec.seed, spec.threshold, base + j) ? kept : scalar_t(0);
      }
    }
  });
  return factor;
}

// Sums per-chunk partials [P, ...] in chunk order (deterministic) and scales the sum.
at::Tensor ordered_sum(const at::Tensor& partials, double scale) {
  at::Tensor total = partials[0].clone();
  for (int64_t c = 1; c < partials.size(0); ++c) total.add_(partials[c]);
  if (scale != 1.0) total.mul_(scale);
  return total;
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B, double scaling, double dropout_p,
                                                     const at::Tensor& seed) {
  const Sizes s = check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  const auto acc = accumulator_type(x.scalar_type());
  const bool native = acc == x.scalar_type();  // fp32/fp64: blocks of y are written in place
  at::Tensor y = poison_(at::empty({s.M, s.N}, x.options()));
  at::Tensor xa = poison_(at::empty({s.M, s.r}, x.options().dtype(acc)));
  if (s.M == 0) return {y, xa};

  const DropoutSpec drop = dropout_spec(dropout_p, seed);
  const at::Tensor weight_t = weight.to(acc).t();  // [K, N]
  const at::Tensor a_t = lora_A.to(acc).t();       // [K, r]
  const at::Tensor b_t = lora_B.to(acc).t();       // [r, N]
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_acc = has_bias ? bias->to(acc) : at::Tensor();

  const int64_t rows_per_block = block_rows(s.M);
  const int64_t blocks = (s.M + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * rows_per_block;
      const int64_t rows = std::min(rows_per_block, s.M - row0);
      const at::Tensor x_blk = x.narrow(0, row0, rows).to(acc);
      at::Tensor xa_blk = xa.narrow(0, row0, rows);
      if (drop.enabled) {
        at::mm_out(xa_blk, x_blk * dropout_factor(drop, row0, rows, s.K, acc), a_t);
      } else {
        at::mm_out(xa_blk, x_blk, a_t);
      }
      at::Tensor y_dst = y.narrow(0, row0, rows);
      at::Tensor y_blk = native ? y_dst : at::empty({rows, s.N}, x.options().dtype(acc));
      if (has_bias) {
        at::addmm_out(y_blk, bias_acc, x_blk, weight_t);
      } else {
        at::mm_out(y_blk, x_blk, weight_t);
      }
      y_blk.addmm_(xa_blk, b_t, /*beta=*/1.0, /*alpha=*/scaling);
      if (!native) y_dst.copy_(y_blk);
    }
  });
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed,
    bool compute_dx, bool compute_db) {
  const Sizes s = check_backward_args(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed);
  const auto acc = accumulator_type(x.scalar_type());
  const bool native = acc == x.scalar_type();
  at::Tensor dx = compute_dx ? poison_(at::empty({s.M, s.K}, grad_y.options())) : at::empty({0}, grad_y.options());
  at::Tensor db = poison_(at::empty({compute_db ? s.N : 0}, grad_y.options()));
  if (s.M == 0) {
    if (compute_db) db.zero_();
    return {dx, at::zeros_like(lora_A, at::MemoryFormat::Contiguous),
            at::zeros_like(lora_B, at::MemoryFormat::Contiguous), db};
  }

  const DropoutSpec drop = dropout_spec(dropout_p, seed);
  const at::Tensor weight_acc = weight.to(acc);  // [N, K]
  const at::Tensor a_acc = lora_A.to(acc);       // [r, K]
  const at::Tensor b_acc = lora_B.to(acc);       // [N, r]

  // Rows are split into `chunks` contiguous ranges, each summing its own partial dA/dB/db;
  // the partials are then added in chunk order, so the result does not depend on scheduling.
  const int64_t rows_per_block = block_rows(s.M);
  const int64_t blocks = (s.M + rows_per_block - 1) / rows_per_block;
  const int64_t chunks = std::min<int64_t>(blocks, std::max<int64_t>(1, at::get_num_threads()));
  const int64_t blocks_per_chunk = (blocks + chunks - 1) / chunks;
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor dA_parts = at::zeros({chunks, s.r, s.K}, acc_opts);
  at::Tensor dB_parts = at::zeros({chunks, s.N, s.r}, acc_opts);
  at::Tensor db_parts = compute_db ? at::zeros({chunks, s.N}, acc_opts) : at::Tensor();

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      at::Tensor dA_part = dA_parts[c], dB_part = dB_parts[c];
      for (int64_t b = c * blocks_per_chunk; b < std::min(blocks, (c + 1) * blocks_per_chunk); ++b) {
        const int64_t row0 = b * rows_per_block;
        const int64_t rows = std::min(rows_per_block, s.M - row0);
        const at::Tensor g_blk = grad_y.narrow(0, row0, rows).to(acc);
        const at::Tensor x_blk = x.narrow(0, row0, rows).to(acc);
        const at::Tensor xa_blk = xa.narrow(0, row0, rows);
        const at::Tensor gb_blk = at::mm(g_blk, b_acc);  // [rows, r]
        const at::Tensor factor = drop.enabled ? dropout_factor(drop, row0, rows, s.K, acc) : at::Tensor();
        if (compute_dx) {
          at::Tensor dx_dst = dx.narrow(0, row0, rows);
          at::Tensor lora_dx = at::mm(gb_blk, a_acc);  // [rows, K], scaled below
          if (drop.enabled) lora_dx.mul_(factor);
          at::Tensor dx_blk = native ? dx_dst : at::empty({rows, s.K}, acc_opts);
          at::addmm_out(dx_blk, lora_dx, g_blk, weight_acc, /*beta=*/scaling, /*alpha=*/1.0);
          if (!native) dx_dst.copy_(dx_blk);
        }
        dA_part.addmm_(gb_blk.t(), drop.enabled ? x_blk * factor : x_blk);
        dB_part.addmm_(g_blk.t(), xa_blk);
        if (compute_db) db_parts[c].add_(g_blk.sum(0));
      }
    }
  });

  at::Tensor dA = ordered_sum(dA_parts, scaling).to(lora_A.scalar_type());
  at::Tensor dB = ordered_sum(dB_parts, scaling).to(lora_B.scalar_type());
  if (compute_db) db.copy_(ordered_sum(db_parts, 1.0));
  return {dx, dA, dB, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace lora_fused
