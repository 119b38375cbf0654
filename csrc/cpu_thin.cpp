// Rank-thin fp32 products on at::native::cpublas::brgemm (oneDNN's fp32 micro-kernel).
//
// Why: the four rank-r products that reduce over a long dimension (xa = x·Aᵀ, gb = g·B,
// dA = s·gbᵀ·x~, dBᵀ = s·xaᵀ·g) read one large operand (x or g, M×K or M×N) for 2r flops per
// element. Through MKL's sgemm each of them cost 1.8-2.2x its flop share of the layer (fp32,
// r = 16, ViT-B shapes, the AMD EPYC of benchmarks/results, per-call timings with rotated
// inputs), as if the long operand were packed into panels first, a full extra pass. The brgemm kernel
// reads A row-major with a leading dimension and B row-major, packing nothing: the long
// operand streams through once, from where the big GEMM next to it left it in cache, and
// the four products drop to about their flop share. cpublas::brgemm(M, N, K, lda, ldb, ldc,
// add_C, const float* A, const float* B, float* C, is_vnni = false) is exported by torch
// 2.11 and 2.14; where oneDNN's ukernel does not serve fp32 on a CPU, torch itself falls back
// to its gemm, so the route is always correct.
//
// Tiles and bounds: out [P, Q] in tiles of up to kTile × kTile, each tile's reduction over R
// in kSlice-long brgemm calls: the first writes the tile's accumulator, each later one a
// scratch that is added in order. Operand pointers stay within their tensors:
// A = a + p0·lda + k0 (rows ≤ P - p0, k ≤ R - k0), B = b + k0·ldb + q0 (cols ≤ Q - q0).
// Both operands need unit column stride; the rank-thin one is copied row-major when it has
// none (r·max(M, K, N) elements at most), a strided long one falls back to ATen's addmm.
// Accuracy: sums of kSlice-long sequential fp32 sums (a sequential fp32 sum over all of a
// K = 768-3072 reduction drifts past the parity rule's 2x of the BLAS error; sliced, the error
// is below MKL's here). alpha multiplies the fp32 accumulator at the store (the contract's s).
// Determinism: each output element is produced by one thread in one fixed order, so its
// bits do not depend on the thread count.
#include "cpu_thin.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>

#include <algorithm>
#include <vector>

namespace lora_fused {
namespace {

constexpr int64_t kTile = 64;   // output tile edge: 64×64 fp32 accumulators (16 KiB) stay in L1/L2
constexpr int64_t kSlice = 64;  // reduction length per brgemm call

// acc[rows, cols] (ld kTile) = Σ_slices A_slice · B_slice over a reduction of `len`, where
// A(row i, k) = a[i·lda + k] and B(k, col j) = b[k·ldb + j].
void sliced_tile(float* acc, float* scratch, int64_t rows, int64_t cols, int64_t len, const float* a, int64_t lda,
                 const float* b, int64_t ldb) {
  for (int64_t k0 = 0; k0 < len; k0 += kSlice) {
    const int64_t k = std::min(kSlice, len - k0);
    float* target = k0 == 0 ? acc : scratch;
    at::native::cpublas::brgemm(rows, cols, k, lda, ldb, kTile, /*add_C=*/false, a + k0, b + k0 * ldb, target,
                                /*is_vnni=*/false);
    if (k0 > 0) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) acc[i * kTile + j] += scratch[i * kTile + j];
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An operand with unit column stride: t itself, or a row-major copy when it is the rank-thin
// one (at most r·max(M, K, N) elements); an undefined tensor when the long one is strided.
at::Tensor with_unit_column_stride(const at::Tensor& t, const at::Tensor& other) {
  if (t.stride(1) == 1 || t.size(1) == 1) return t;
  return t.numel() <= other.numel() ? t.contiguous() : at::Tensor();
}

}  // namespace

void thin_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate) {
  const bool fp32 = out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat;
  const at::Tensor a_rows = fp32 ? with_unit_column_stride(a, b) : at::Tensor();
  const at::Tensor b_rows = fp32 ? with_unit_column_stride(b, a) : at::Tensor();
  if (!a_rows.defined() || !b_rows.defined() || a.size(1) == 0) {
    at::addmm_out(out, out, a, b, /*beta=*/accumulate ? 1.0 : 0.0, alpha);
    return;
  }
  const int64_t P = a.size(0), R = a.size(1), Q = b.size(1);
  const float* A = a_rows.data_ptr<float>();
  const float* B = b_rows.data_ptr<float>();
  float* C = out.data_ptr<float>();
  const int64_t lda = a_rows.stride(0), ldb = b_rows.stride(0);
  const int64_t so0 = out.stride(0), so1 = out.stride(1);
  const float scale = static_cast<float>(alpha);
  const int64_t q_tiles = ceil_div(Q, kTile);
  at::parallel_for(0, ceil_div(P, kTile) * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kTile * kTile), scratch(kTile * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = (t / q_tiles) * kTile, q0 = (t % q_tiles) * kTile;
      const int64_t rows = std::min(kTile, P - p0), cols = std::min(kTile, Q - q0);
      sliced_tile(acc.data(), scratch.data(), rows, cols, R, A + p0 * lda, lda, B + q0, ldb);
      for (int64_t i = 0; i < rows; ++i) {
        float* c = C + (p0 + i) * so0 + q0 * so1;
        const float* row = acc.data() + i * kTile;
        if (accumulate) {
          for (int64_t j = 0; j < cols; ++j) c[j * so1] += scale * row[j];
        } else {
          for (int64_t j = 0; j < cols; ++j) c[j * so1] = scale * row[j];
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}

}  // namespace lora_fused
