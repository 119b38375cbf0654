// Host interface of the CUDA kernels (cuda_simt.cu, cuda_sm80.cu, cuda_sm80_thin.cu).
//
// Plain types only, no torch headers: the .cu files compile without ATen, which keeps
// nvcc fast. cuda_ops.cpp validates tensors, allocates outputs and workspaces, and
// calls these launchers on the current stream. Every launcher returns the CUDA error
// of its launches (cudaSuccess when there was nothing to do).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_keep_bits.cuh"
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
  // The sm90 kernel's TMA operands (nullptr elsewhere): round(xa) in the input dtype, [M, r]
  // with row stride rank_ld (written by sm80_xa when not null), and lora_B with a row stride
  // lora_B_tma_ld that is a multiple of 8 elements (lora_B itself, or a padded copy).
  void* xa_rounded = nullptr;
  int64_t rank_ld = 0;
  const void* lora_B_tma = nullptr;
  int64_t lora_B_tma_ld = 0;
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
  const void* lora_B_t;  // [r, N]: lora_B transposed (tensor-core gb only: its K-major operand)
  const void* xa;
  void* dx;         // [M, K] or nullptr
  void* dA;         // [r, K]
  void* dB;         // [N, r]
  void* db;         // [N] or nullptr
  void* gb;         // workspace [M, r]
  void* partials;   // workspace of backward_workspace_elems() accumulator elements
  void* rank_operand;  // tensor-core workspace of (r + 1) × rank_operand_ld(M) elements of the dtype
  void* gb_rounded = nullptr;  // sm90 dx, gb not fused: round(gb) in the input dtype, [M, r], row stride rank_ld
  int64_t rank_ld = 0;         // (sm80_gb writes it when not null)
  // sm90 dx computing gb (sm90_dx_computes_gb: r <= 32, K <= 1024): lora_Bᵀ [r, N] with a row
  // stride lora_B_t_tma_ld that is a multiple of 8 elements (lora_B_t itself, or a padded copy).
  const void* lora_B_t_tma = nullptr;
  int64_t lora_B_t_tma_ld = 0;
  // Dropout with dx (fp16/bf16): the keep-bit workspace uint32 [M][keep_words_per_row(K)]
  // (cuda_keep_bits.cuh) that the dx kernel (sm80 or sm90) writes and sm80_dA reads instead of
  // hashing; nullptr otherwise (dA hashes itself).
  void* keep_bits = nullptr;
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

LORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulator elements of the partial-sum workspace the backward needs: one slice of dB|db
// ([N][r + 1]) or of dA ([r][K]) per reduction split; the two reductions take turns.
inline int64_t backward_workspace_elems(int64_t M, int64_t N, int64_t K, int64_t r) {
  const int64_t db_cols = N * (r + 1), da = r * K;
  return reduction_splits(M) * (db_cols > da ? db_cols : da);
}

// Row stride of a TMA operand with r columns (16-byte multiples): the rounded xa/gb workspaces
// and a padded lora_B copy of the sm90 kernel.
inline int64_t tma_rank_ld(int64_t r) { return ceil_div(r, 8) * 8; }

// Leading dimension of the rank operands round(xa)ᵀ and round(gb)ᵀ [rows, M] the
// tensor-core dB and dA read: M rounded up to 8 elements (16-byte cp.async chunks).
inline int64_t rank_operand_ld(int64_t M) { return ceil_div(M, 8) * 8; }

// SIMT kernels, fp32 and fp64 (fp32 accumulation; fp64 for kDouble).
cudaError_t simt_xa(const ForwardArgs& args, cudaStream_t stream);       // xa = x~·Aᵀ
cudaError_t simt_forward(const ForwardArgs& args, cudaStream_t stream);  // y from precomputed xa
cudaError_t simt_gb(const BackwardArgs& args, cudaStream_t stream);      // gb = g·B
cudaError_t simt_dx(const BackwardArgs& args, cudaStream_t stream);      // dx
cudaError_t simt_dB_db(const BackwardArgs& args, cudaStream_t stream);   // dB = s·gᵀ·xa, db = Σ g
cudaError_t simt_dA(const BackwardArgs& args, cudaStream_t stream);      // dA = s·gbᵀ·x~

// Tensor-core kernels on the CuTe sm80 mainloop, any rank: kHalf and kBFloat16, and kFloat on
// TF32 (all but dB|db, whose db stays an exact fp32 sum on SIMT: when PyTorch allows TF32
// matmuls; exact fp32 and fp64 take the SIMT ones).
// cuda_sm80.cu, the two large GEMMs:
// y = x·Wᵀ + b + s·(round(xa)·Bᵀ), xa read from args.xa (sm80_xa first).
cudaError_t sm80_forward(const ForwardArgs& args, cudaStream_t stream);
// dx = g·W + s·(round(gb)·A) ⊙ keep/(1-p), W read as stored. For r <= 32 it computes gb
// itself from the g tiles it streams (reads lora_B_t, writes args.gb for dA), so sm80_gb is
// not needed; for larger r it reads args.gb (sm80_gb first). Writes args.keep_bits when given.
cudaError_t sm80_dx(const BackwardArgs& args, cudaStream_t stream);
inline bool sm80_dx_computes_gb(int64_t r) { return r <= 32; }
// cuda_sm80_thin.cu, the rank-thin products:
cudaError_t sm80_xa(const ForwardArgs& args, cudaStream_t stream);     // xa = x~·Aᵀ (fp32 out; + xa_rounded)
cudaError_t sm80_gb(const BackwardArgs& args, cudaStream_t stream);    // gb = g·B (fp32 out; + gb_rounded), reads lora_B_t
// dB = s·gᵀ·round(xa), db = Σ g (kHalf, kBFloat16); then dA = s·round(gb)ᵀ·x~ (also kFloat on TF32).
// Both use rank_operand and partials, so they run in stream order, dB_db first. dA reads the
// mask from args.keep_bits when given (dx first; fp16/bf16 only), else hashes it.
cudaError_t sm80_dB_db(const BackwardArgs& args, cudaStream_t stream);
cudaError_t sm80_dA(const BackwardArgs& args, cudaStream_t stream);

// cuda_sm90.cu, the Hopper (sm_90a) TMA + wgmma kernel of the two large GEMMs, kHalf and
// kBFloat16: only on a compute-capability-9.0 device, in a build that compiled sm_90a
// (sm90_kernels_built), when the *_supported check holds (TMA: 16-byte aligned operands and
// row strides, non-empty extents below 2^31); otherwise the sm80 kernels serve.
bool sm90_kernels_built();
bool sm90_forward_supported(const ForwardArgs& args);
bool sm90_dx_supported(const BackwardArgs& args);
// y = x·Wᵀ + b + s·(round(xa)·Bᵀ): reads xa_rounded (sm80_xa first) and lora_B_tma.
cudaError_t sm90_forward(const ForwardArgs& args, cudaStream_t stream);
// dx = g·W + s·(round(gb)·A) ⊙ keep/(1-p); writes args.keep_bits when given. When
// sm90_dx_computes_gb(r, K) it computes gb itself from the g tiles it streams (reads
// lora_B_t_tma, writes args.gb for dA), so sm80_gb is not needed; otherwise it reads
// gb_rounded (sm80_gb first).
cudaError_t sm90_dx(const BackwardArgs& args, cudaStream_t stream);
// The fused gb holds one 32-rank wgmma tile, and each of dx's ceil(K/128) column tiles repeats
// its 64x32 MMA (+25 % of the main loop's) to save one read of g and the gb GEMM. In the cost
// model (benchmarks/cost_model.py's sm90_dx_computes_gb, which tests/test_cost_model.py
// checks against these constants) fusing is cheaper up to 9 column tiles on the H100 and 6
// on the H200: 8 lies between. ViT-B's lin2 (K = 3072: 24) takes the gb GEMM.
constexpr int64_t kSm90FusedGbMaxRank = 32;
constexpr int64_t kSm90FusedGbMaxColumnTiles = 8;  // K <= 1024
constexpr bool sm90_dx_computes_gb(int64_t r, int64_t K) {
  return r <= kSm90FusedGbMaxRank && (K + 127) / 128 <= kSm90FusedGbMaxColumnTiles;
}

}  // namespace cuda
}  // namespace lora_fused
