// Host interface of the CUDA kernels (cuda_simt.cu, cuda_sm80.cu, cuda_tensorcore.cu).
//
// Plain types only, no torch headers: the .cu files compile without ATen, which keeps
// nvcc fast. cuda_ops.cpp validates tensors, allocates outputs and workspaces, and
// calls these launchers on the current stream. Every launcher returns the CUDA error
// of its launches (cudaSuccess when there was nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dropout_hash.h"

namespace lora_fused {
namespace cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// Device pointers. x (and grad_y) are row-major with unit column stride and row stride
// ldx (ldg); everything else is contiguous. xa, gb and workspaces are fp32, or fp64 when
// dtype is kDouble.
struct ForwardArgs {
  DType dtype;
  const void* x;
  int64_t ldx;
  const void* weight;  // [N, K]
  const void* bias;    // [N] or nullptr
  const void* lora_A;  // [r, K]
  const void* lora_B;  // [N, r]
  void* y;             // [M, N]
  void* xa;            // [M, r]
  int64_t M, N, K, r;
  double scaling;
  DropoutSpec dropout;
};

struct BackwardArgs {
  DType dtype;
  const void* grad_y;
  int64_t ldg;
  const void* x;
  int64_t ldx;
  const void* weight;
  const void* lora_A;
  const void* lora_B;
  const void* xa;
  void* dx;         // [M, K] or nullptr
  void* dA;         // [r, K]
  void* dB;         // [N, r]
  void* db;         // [N] or nullptr
  void* gb;         // workspace [M, r]
  void* partials;   // workspace of backward_workspace_elems() accumulator elements
  int64_t M, N, K, r;
  double scaling;
  DropoutSpec dropout;
};

// Reductions over M (dA, dB, db) run in `reduction_splits(M)` slices whose partial sums
// are added in slice order: deterministic, no atomics.
inline int64_t reduction_splits(int64_t M) {
  const int64_t splits = (M + 511) / 512;
  return splits < 1 ? 1 : (splits > 64 ? 64 : splits);
}

// The tensor-core backward (cuda_tensorcore.cu) pads the rank to 16, 32 or 64 columns.
// Its g-pass gives each block a fixed range of 64-row tiles; its dA kernel covers
// 128-column tiles of x per reduction slice.
constexpr int64_t kMaxTensorCoreRank = 64;
constexpr int64_t kGpassRows = 64, kGpassCols = 64, kDaRows = 32, kDaCols = 128;

LORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t rank_pad(int64_t columns) { return columns <= 16 ? 16 : (columns <= 32 ? 32 : 64); }

inline int64_t gpass_tiles_per_block(int64_t M) {
  const int64_t tiles = ceil_div(M, kGpassRows);
  return ceil_div(tiles, tiles < 256 ? tiles : 256);
}

inline int64_t gpass_blocks(int64_t M) { return ceil_div(ceil_div(M, kGpassRows), gpass_tiles_per_block(M)); }

// Whether the tensor-core g-pass and dA serve this call (fp16/bf16 only).
inline bool tensorcore_gpass_fits(int64_t N, int64_t r, bool with_db) {
  return N > 0 && r + (with_db ? 1 : 0) <= kMaxTensorCoreRank;
}
inline bool tensorcore_dA_fits(int64_t r) { return r <= kMaxTensorCoreRank; }

// Accumulator elements of the partial-sum workspace the backward needs.
inline int64_t backward_workspace_elems(int64_t M, int64_t N, int64_t K, int64_t r, bool tensor_cores,
                                        bool with_db) {
  const int64_t db_cols = N * (r + 1), da = r * K;
  int64_t elems = reduction_splits(M) * (db_cols > da ? db_cols : da);
  if (tensor_cores && tensorcore_gpass_fits(N, r, with_db)) {
    const int64_t g = gpass_blocks(M) * ceil_div(N, kGpassCols) * kGpassCols * rank_pad(r + (with_db ? 1 : 0));
    elems = g > elems ? g : elems;
  }
  if (tensor_cores && tensorcore_dA_fits(r)) {
    const int64_t a = reduction_splits(M) * rank_pad(r) * ceil_div(K, kDaCols) * kDaCols;
    elems = a > elems ? a : elems;
  }
  return elems;
}

// SIMT kernels, every dtype (fp32 accumulation; fp64 for kDouble).
cudaError_t simt_xa(const ForwardArgs& args, cudaStream_t stream);       // xa = x~·Aᵀ
cudaError_t simt_forward(const ForwardArgs& args, cudaStream_t stream);  // y from precomputed xa (fp32/fp64 only)
cudaError_t simt_gb(const BackwardArgs& args, cudaStream_t stream);      // gb = g·B
cudaError_t simt_dx(const BackwardArgs& args, cudaStream_t stream);      // dx (fp32/fp64 only)
cudaError_t simt_dB_db(const BackwardArgs& args, cudaStream_t stream);   // dB = s·gᵀ·xa, db = Σ g
cudaError_t simt_dA(const BackwardArgs& args, cudaStream_t stream);      // dA = s·gbᵀ·x~

// Tensor-core kernels, kHalf and kBFloat16 only.
// CuTe sm80 mainloop (cuda_sm80.cu), any rank:
// y = x·Wᵀ + b + s·(round(xa)·Bᵀ), xa read from args.xa (computed by simt_xa first).
cudaError_t sm80_forward(const ForwardArgs& args, cudaStream_t stream);
// dx = g·W + s·(round(gb)·A) ⊙ keep/(1-p), from gb.
cudaError_t sm80_dx(const BackwardArgs& args, cudaStream_t stream);
// WMMA (cuda_tensorcore.cu):
// gb = g·B, dB = s·gᵀ·xa and db = Σ g in one read of g (when tensorcore_gpass_fits).
cudaError_t tensorcore_gpass(const BackwardArgs& args, cudaStream_t stream);
// dA = s·gbᵀ·x~ (when tensorcore_dA_fits).
cudaError_t tensorcore_dA(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_fused
