// bf16/fp16 products of the CPU path on at::native::cpublas::brgemm (oneDNN's micro-kernel).
//
// Why this route: ATen gives extensions no bf16×bf16→fp32 GEMM on CPU (mm's out dtype must
// be the input's; the cpublas gemm overloads with a float C are not exported), and a bf16
// GEMM with a bf16 output adds a rounding the contract (lora_fused/reference.py) forbids.
// cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, const T* A, const T* B, float* C,
// is_vnni = true) IS exported (torch 2.11 and 2.14): C[M, N] (+)= A·B, A row-major, B in
// VNNI-2 layout (pairs along the reduction interleaved: B[k / 2][n][k % 2]), fp32 C. It
// runs oneDNN's brgemm when oneDNN is enabled and the ISA is at least avx512_core (bf16) /
// avx512_core_fp16 (fp16), else throws. Its is_vnni = false form falls back to a bf16 GEMM
// that is as slow as fp32 here, and cpublas::pack only packs on AMX, so B is packed here.
// Measured on the AMD EPYC (avx512_bf16) at ViT-B shapes, one thread: 64×64 output tiles
// with the whole reduction per call run at nn.Linear's bf16 speed, 3-5× the fp32 GEMM
// (benchmarks/results/cpu-amd-epyc-1t/README.md).
//
// Which calls it serves (cpu_ops.cpp falls back to the fp32 GEMMs on widened copies else):
// bf16 or fp16 operands on an x86-64 CPU with the dtype's dot-product instructions
// (avx512_bf16 / avx512_fp16), oneDNN enabled (torch.backends.mkldnn), a start-up probe
// that checked brgemm's result bit for bit on this CPU (values whose exact sums need fp32's
// mantissa, so an fp16/bf16 accumulator fails it), even reduction lengths (K forward, N
// backward) and, backward, grad_y with unit column stride (it is read in place as the A
// operand; odd lengths would make a pair of A straddle a row end). On this AMD CPU that is
// bf16; fp16 needs avx512_fp16 (Sapphire Rapids and later).
//
// Operand choice: the forward computes yᵀ = W·xᵀ + s·B·xa_rᵀ tiles, so the frozen W and B
// are read in place as A operands and only x is packed (M×K, at most W's size at ViT-B
// shapes; packing W per call cost 10-25 % at M = 256). The backward's dx = g·W reads g in
// place and packs W along N (an interleave of row pairs, which vectorises); dA and dB pack
// tiles of x~ and g along M.
//
// Rounding order, as the contract: every product accumulates in fp32 in brgemm's C; xa and
// gb are rounded to the dtype unscaled before they enter the next product (the packed
// xa_rᵀ and the padded gb_r); s and the dropout factor multiply fp32 accumulators; y and dx are
// rounded once from base + b + s·lora in the tile epilogue. x~ = x·keep/(1-p) is rounded to
// the dtype as the reference's x * keep * scale is. xa, the one fp32 output, sums brgemm
// calls over 64-long slices of K (a sequential fp32 sum over all of K drifts past the
// parity rule's 2× of the BLAS error at K = 768).
//
// Tiles and bounds: outputs in kTile×kTile tiles (64×64 fp32 accumulators, 16 KiB each, so
// a tile and its packed B slice stay in L2); packed B is [column blocks][K_pad / 2][kTile][2]
// with zero rows/columns for odd reductions and short last blocks, so brgemm never reads
// past a packed buffer; A operands are read in full rows of even length (checked, or a
// zero-padded copy: B with an odd rank, a W or A without unit column stride) or from padded
// buffers (gb_r and its transpose, xa_rᵀ). Determinism: every output element is
// produced by one thread in a fixed order (dA sums M-blocks in order within its K-block, dB
// takes all of M in one call), independent of the thread count.
//
// Why the frozen W is packed on every call, not cached (issue 12; AMD EPYC, bf16, 1 thread,
// four weights rotated so that W comes from memory as in a model, 2026-12-02): the
// backward's pack of W costs 2.1-6.0 % of a forward+backward at ViT-B's shapes
// (0.11-0.59 ms), a read-only pass over W 0.8-2.4 %. A cache keyed on what provably changes
// with W is not enough: writes through `w.data` (`w.data.copy_(...)`, the idiom of many
// initialisation and loading routines) and through numpy or DLPack aliases leave
// `w._version`, data_ptr, shape, strides and dtype as they were. Only a check of the
// contents on every use is safe: an exact one reads W and the cached copy (about what the
// pack costs), a checksum reads W once but is no proof (row permutations keep sums; any fixed
// hash has structured collisions). The most a safe cache could save is thus 1.3-3.7 %, for
// a second copy of every adapted frozen W in memory; not worth it.
#include "cpu_brgemm.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#include "checks.h"
#include "cpu_dropout.h"

namespace lora_fused {
namespace {

constexpr int64_t kTile = 64;     // rows and columns of an output tile; columns of a packed block
constexpr int64_t kXaSlice = 64;  // K per brgemm call for xa (the fp32 output): short sequential sums

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up_even(int64_t v) { return v + (v & 1); }

// C[rows, cols] (+)= A·B for a VNNI-packed B block of leading dimension kTile.
template <typename T>
void tile_product(int64_t rows, int64_t cols, int64_t reduction, const T* a, int64_t lda, const T* b_packed,
                  float* c, int64_t ldc, bool add_c) {
  at::native::cpublas::brgemm(rows, cols, reduction, lda, kTile, ldc, add_c, a, b_packed, c, /*is_vnni=*/true);
}

// VNNI pairs as 32-bit words (little-endian x86: the even row's element in the low half).
LORA_FUSED_CPU_CLONES void interleave_pairs(uint32_t* out, const uint16_t* even, const uint16_t* odd, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) out[j] = uint32_t{even[j]} | (uint32_t{odd[j]} << 16);
  for (int64_t j = cols; j < kTile; ++j) out[j] = 0;
}

// Columns whose pairs are adjacent in memory (x·Wᵀ's W, row n at src + n·ld): a 32-bit
// transpose, 16 pairs of a column at a time so reads and writes stay within a few lines.
void transpose_pairs(uint32_t* out, const uint16_t* src, int64_t ld, int64_t pairs, int64_t width) {
  constexpr int64_t kChunk = 16;
  for (int64_t kk0 = 0; kk0 < pairs; kk0 += kChunk) {
    const int64_t len = std::min(kChunk, pairs - kk0);
    for (int64_t j = 0; j < width; ++j) {
      const uint16_t* column = src + j * ld + 2 * kk0;
      for (int64_t t = 0; t < len; ++t) std::memcpy(out + (kk0 + t) * kTile + j, column + 2 * t, sizeof(uint32_t));
    }
    for (int64_t t = 0; t < len; ++t) std::fill(out + (kk0 + t) * kTile + width, out + (kk0 + t + 1) * kTile, 0u);
  }
}

// One packed column block from rows of the logical B: out[kk][j][h] = B[2·kk + h][n0 + j]
// for j < cols, zero elsewhere (columns past cols, the odd row of an odd reduction).
// row(k, scratch) returns B[k][n0 .. n0 + cols) contiguously: the source row itself when
// it is contiguous, else scratch filled with it.
template <typename T, typename RowLoader>
void pack_block(T* out, int64_t reduction, int64_t cols, RowLoader row) {
  static_assert(sizeof(T) == sizeof(uint16_t), "VNNI-2 packing of 16-bit types");
  T even[kTile], odd[kTile];
  const T zeros[kTile] = {};
  for (int64_t kk = 0; kk < ceil_div(reduction, 2); ++kk) {
    const T* e = row(2 * kk, even);
    const T* o = 2 * kk + 1 < reduction ? row(2 * kk + 1, odd) : zeros;
    interleave_pairs(reinterpret_cast<uint32_t*>(out + kk * kTile * 2), reinterpret_cast<const uint16_t*>(e),
                     reinterpret_cast<const uint16_t*>(o), cols);
  }
}

// A row loader for B[k][n] = src[k·sk + n·sn], columns n0 .. n0 + cols.
template <typename T>
auto strided_rows(const T* src, int64_t sk, int64_t sn, int64_t n0, int64_t cols) {
  return [=](int64_t k, T* scratch) -> const T* {
    const T* row = src + k * sk + n0 * sn;
    if (sn == 1) return row;
    for (int64_t j = 0; j < cols; ++j) scratch[j] = row[j * sn];
    return scratch;
  };
}

// dst[j] = round(src[j] · factor[j]) for j < n: x~ = x·keep/(1-p) rounded to the dtype, as
// the reference's x * keep * scale. Cloned per ISA like the hash (cpu_dropout.h).
template <typename T>
LORA_FUSED_ALWAYS_INLINE void dropped_row_impl(T* dst, const T* src, const float* factor, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = T(static_cast<float>(src[j]) * factor[j]);
}
LORA_FUSED_CPU_CLONES void dropped_row(at::BFloat16* dst, const at::BFloat16* src, const float* factor, int64_t n) {
  dropped_row_impl(dst, src, factor, n);
}
LORA_FUSED_CPU_CLONES void dropped_row(at::Half* dst, const at::Half* src, const float* factor, int64_t n) {
  dropped_row_impl(dst, src, factor, n);
}

// The one rounding of a tile: out[i][c] = round(base + bias[c] + s · lora · factor) over
// rows × cols of kTile-strided fp32 accumulators (bias and factor may be null). Cloned per
// ISA so the conversion loop vectorises.
template <typename T>
LORA_FUSED_ALWAYS_INLINE void store_tile_impl(T* out, int64_t ld_out, int64_t rows, int64_t cols, const float* base,
                                              const float* lora, float s, const float* bias, const float* factor) {
  for (int64_t i = 0; i < rows; ++i) {
    T* out_row = out + i * ld_out;
    const float* b = base + i * kTile;
    const float* l = lora + i * kTile;
    if (factor != nullptr) {
      const float* f = factor + i * kTile;
      for (int64_t c = 0; c < cols; ++c) out_row[c] = T(b[c] + s * l[c] * f[c]);
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < cols; ++c) out_row[c] = T(b[c] + bias[c] + s * l[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out_row[c] = T(b[c] + s * l[c]);
    }
  }
}
LORA_FUSED_CPU_CLONES void store_tile(at::BFloat16* out, int64_t ld_out, int64_t rows, int64_t cols, const float* base,
                                      const float* lora, float s, const float* bias, const float* factor) {
  store_tile_impl(out, ld_out, rows, cols, base, lora, s, bias, factor);
}
LORA_FUSED_CPU_CLONES void store_tile(at::Half* out, int64_t ld_out, int64_t rows, int64_t cols, const float* base,
                                      const float* lora, float s, const float* bias, const float* factor) {
  store_tile_impl(out, ld_out, rows, cols, base, lora, s, bias, factor);
}

// The forward's rounding of a yᵀ tile: out[c][i] = round(base[i][c] + bias[i] + s · lora[i][c])
// for c < rows (rows of y), i < cols (columns of y).
template <typename T>
LORA_FUSED_ALWAYS_INLINE void store_tile_transposed_impl(T* out, int64_t ld_out, int64_t rows, int64_t cols,
                                                         const float* base, const float* lora, float s,
                                                         const float* bias) {
  for (int64_t c = 0; c < rows; ++c) {
    T* out_row = out + c * ld_out;
    for (int64_t i = 0; i < cols; ++i) out_row[i] = T(base[i * kTile + c] + bias[i] + s * lora[i * kTile + c]);
  }
}
LORA_FUSED_CPU_CLONES void store_tile_transposed(at::BFloat16* out, int64_t ld_out, int64_t rows, int64_t cols,
                                                 const float* base, const float* lora, float s, const float* bias) {
  store_tile_transposed_impl(out, ld_out, rows, cols, base, lora, s, bias);
}
LORA_FUSED_CPU_CLONES void store_tile_transposed(at::Half* out, int64_t ld_out, int64_t rows, int64_t cols,
                                                 const float* base, const float* lora, float s, const float* bias) {
  store_tile_transposed_impl(out, ld_out, rows, cols, base, lora, s, bias);
}

int64_t packed_block_elems(int64_t reduction) { return round_up_even(reduction) * kTile; }

// B[k][n] = src[k·sk + n·sn] (k < reduction, n < cols), packed for tile_product as
// ceil(cols / kTile) blocks of packed_block_elems(reduction) elements (a poisoned workspace).
template <typename T>
at::Tensor pack_operand(const T* src, int64_t sk, int64_t sn, int64_t reduction, int64_t cols,
                        const at::TensorOptions& options) {
  const int64_t blocks = ceil_div(cols, kTile), block_elems = packed_block_elems(reduction);
  at::Tensor packed = poison_(at::empty({blocks * block_elems}, options));
  T* out = packed.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 65536 / block_elems);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kTile, width = std::min(kTile, cols - n0);
      T* block = out + nb * block_elems;
      if (sk == 1 && reduction % 2 == 0) {
        transpose_pairs(reinterpret_cast<uint32_t*>(block), reinterpret_cast<const uint16_t*>(src + n0 * sn), sn,
                        reduction / 2, width);
      } else {
        pack_block(block, reduction, width, strided_rows(src, sk, sn, n0, width));
      }
    }
  });
  return packed;
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// ---------------------------------------------------------------- availability

template <typename T>
std::string probe_brgemm() {
  // A [3, 6] · B [6, 70] (two column blocks, the second short) against exact integer sums:
  // column 0 of A is 2048 and row 0 of B is 1, so sums like 2049 need more mantissa than
  // fp16 or bf16 has; then the same again with add_C, which must double C exactly.
  constexpr int64_t M = 3, K = 6, N = 70;
  std::vector<T> a(M * K), b(K * N);
  std::vector<double> expected(M * N, 0.0);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = T(k == 0 ? 2048.0f : static_cast<float>((i + k) % 5 - 2));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[k * N + n] = T(k == 0 ? 1.0f : static_cast<float>((k * n) % 7 - 3));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) expected[i * N + n] += double(float(a[i * K + k])) * double(float(b[k * N + n]));
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  try {
    const at::Tensor packed = pack_operand<T>(b.data(), N, 1, K, N, options);
    std::vector<float> c(M * N, -1.0f);
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t nb = 0; nb < ceil_div(N, kTile); ++nb) {
        tile_product<T>(M, std::min(kTile, N - nb * kTile), K, a.data(), K,
                        data_of<T>(packed) + nb * packed_block_elems(K), c.data() + nb * kTile, N, pass == 1);
      }
      for (int64_t e = 0; e < M * N; ++e) {
        if (double(c[e]) != expected[e] * (pass + 1)) {
          at::native::cpublas::brgemm_release(true);
          return "the start-up probe of cpublas::brgemm gave an inexact result on this CPU";
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  } catch (const c10::Error& error) {
    return std::string("the start-up probe of cpublas::brgemm failed: ") + error.what_without_backtrace();
  } catch (const std::exception& error) {
    return std::string("the start-up probe of cpublas::brgemm failed: ") + error.what();
  }
  return "";
}

bool cpu_has_instructions(at::ScalarType dtype) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return dtype == at::kBFloat16 ? __builtin_cpu_supports("avx512bf16") : __builtin_cpu_supports("avx512fp16");
#else
  (void)dtype;
  return false;
#endif
}

}  // namespace

std::string brgemm_route_unavailable_reason(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return "the brgemm route serves bfloat16 and float16 only";
  if (!cpu_has_instructions(dtype)) {
    return dtype == at::kBFloat16 ? "this CPU has no avx512_bf16 instructions (or is not x86-64)"
                                  : "this CPU has no avx512_fp16 instructions (or is not x86-64)";
  }
  if (!at::globalContext().userEnabledMkldnn()) return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)";
  // Probed once per process, on the first call that reaches here (oneDNN enabled).
  if (dtype == at::kBFloat16) {
    static const std::string bf16_probe = probe_brgemm<at::BFloat16>();
    return bf16_probe;
  }
  static const std::string fp16_probe = probe_brgemm<at::Half>();
  return fp16_probe;
}

namespace {

// ---------------------------------------------------------------- forward

// The bias in fp32 (zeros without one), added to the fp32 accumulators before the rounding.
template <typename T>
std::vector<float> bias_as_float(const std::optional<at::Tensor>& bias, int64_t N) {
  std::vector<float> out(N, 0.0f);
  if (bias.has_value() && bias->defined()) {
    const T* b = data_of<T>(*bias);
    for (int64_t n = 0; n < N; ++n) out[n] = float(b[n * bias->stride(0)]);
  }
  return out;
}

// A row-major operand with unit stride along the reduction: t itself, or a contiguous copy
// zero-padded to `width` columns (an even reduction, so no pair straddles a row end).
at::Tensor rows_with_even_reduction(const at::Tensor& t, int64_t width) {
  if (t.stride(1) == 1 && t.size(1) == width) return t;
  at::Tensor padded = at::zeros({t.size(0), width}, t.options().memory_format(at::MemoryFormat::Contiguous));
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

// yᵀ tiles with W and B read in place as A operands and x packed.
template <typename T>
void forward_x_packed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const DropoutSpec& drop,
                  at::Tensor& y, at::Tensor& xa) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t r_pad = round_up_even(r);
  const auto options = x.options();
  const T* X = data_of<T>(x);
  const int64_t sxm = x.stride(0), sxk = x.stride(1);
  const at::Tensor w_rows = rows_with_even_reduction(weight, K);    // [N, K]
  const at::Tensor a_rows = rows_with_even_reduction(lora_A, K);    // [r, K]
  const at::Tensor b_rows = rows_with_even_reduction(lora_B, r_pad);  // [N, r_pad]
  const T* W = data_of<T>(w_rows);
  const T* A = data_of<T>(a_rows);
  const T* B = data_of<T>(b_rows);
  const int64_t ldw = w_rows.stride(0), lda = a_rows.stride(0), ldb = b_rows.stride(0);
  // xᵀ packed: column block mb holds rows m0 .. m0 + 64 of x.
  const at::Tensor x_packed = pack_operand<T>(X, sxk, sxm, K, M, options);
  const std::vector<float> bias_f = bias_as_float<T>(bias, N);
  const float s = static_cast<float>(scaling);
  const int64_t m_blocks = ceil_div(M, kTile), n_blocks = ceil_div(N, kTile), r_blocks = ceil_div(r, kTile);
  const int64_t x_block = packed_block_elems(K), xa_block = packed_block_elems(r);

  // Pass 1, per block of 64 rows of x: xaᵀ = A·x~ᵀ in fp32 (sums of kXaSlice-long brgemm
  // calls), written to xa and, rounded, as the packed B operand of pass 2 (xa_rᵀ, rank padded).
  at::Tensor xa_packed = poison_(at::empty({m_blocks * xa_block}, options));
  T* XAP = xa_packed.data_ptr<T>();
  float* XA = xa.data_ptr<float>();
  at::parallel_for(0, m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slice(kTile * kTile), sum(kTile * kTile);
    std::vector<T> x_dropped(drop.enabled ? kTile * K : 0), dropped_packed(drop.enabled ? x_block : 0);
    std::vector<float> factor(drop.enabled ? kTile * K : 0);
    for (int64_t mb = begin; mb < end; ++mb) {
      const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
      const T* xt = data_of<T>(x_packed) + mb * x_block;
      if (drop.enabled) {
        fill_keep_factor(factor.data(), rows, K, m0, drop);
        for (int64_t i = 0; i < rows; ++i) {
          const T* x_row = X + (m0 + i) * sxm;
          if (sxk != 1) {
            for (int64_t k = 0; k < K; ++k) x_dropped[i * K + k] = x_row[k * sxk];
            x_row = x_dropped.data() + i * K;
          }
          dropped_row(x_dropped.data() + i * K, x_row, factor.data() + i * K, K);
        }
        transpose_pairs(reinterpret_cast<uint32_t*>(dropped_packed.data()),
                        reinterpret_cast<const uint16_t*>(x_dropped.data()), K, K / 2, rows);
        xt = dropped_packed.data();
      }
      T* xa_t = XAP + mb * xa_block;
      for (int64_t jb = 0; jb < r_blocks; ++jb) {
        const int64_t j0 = jb * kTile, ranks = std::min(kTile, r - j0);
        for (int64_t k0 = 0; k0 < K; k0 += kXaSlice) {
          const int64_t len = std::min(kXaSlice, K - k0);  // even: K is even on this route
          float* target = k0 == 0 ? sum.data() : slice.data();
          tile_product<T>(ranks, rows, len, A + j0 * lda + k0, lda, xt + k0 * kTile, target, kTile, false);
          if (k0 > 0)
            for (int64_t e = 0; e < ranks * kTile; ++e) sum[e] += slice[e];
        }
        for (int64_t j = 0; j < ranks; ++j)
          for (int64_t c = 0; c < rows; ++c) XA[(m0 + c) * r + j0 + j] = sum[j * kTile + c];
      }
      // Rows of xa as columns of the packed xa_rᵀ block (its pad rows and columns zero).
      for (int64_t c = 0; c < kTile; ++c)
        for (int64_t j = 0; j < r_pad; ++j)
          xa_t[((j / 2) * kTile + c) * 2 + j % 2] = c < rows && j < r ? T(XA[(m0 + c) * r + j]) : T(0);
    }
    at::native::cpublas::brgemm_release(true);
  });

  // Pass 2, per 64×64 tile of yᵀ (N-blocks outer: a block of W serves every row block of x):
  // base = W·xᵀ and lora = B·xa_rᵀ in fp32, y = round(base + b + s·lora) stored transposed.
  T* Y = y.data_ptr<T>();
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> base(kTile * kTile), lora(kTile * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / m_blocks, mb = t % m_blocks;
      const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
      const int64_t n0 = nb * kTile, cols = std::min(kTile, N - n0);
      tile_product<T>(cols, rows, K, W + n0 * ldw, ldw, data_of<T>(x_packed) + mb * x_block, base.data(), kTile,
                      false);
      tile_product<T>(cols, rows, r_pad, B + n0 * ldb, ldb, XAP + mb * xa_block, lora.data(), kTile, false);
      store_tile_transposed(Y + m0 * N + n0, N, rows, cols, base.data(), lora.data(), s, bias_f.data() + n0);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// y tiles with x read in place as the A operand and Wᵀ packed (x needs unit column stride).
template <typename T>
void forward_w_packed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const DropoutSpec& drop,
                  at::Tensor& y, at::Tensor& xa) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t r_pad = round_up_even(r), ldx = x.stride(0);
  const auto options = x.options();
  const T* X = data_of<T>(x);
  const at::Tensor w_packed = pack_operand<T>(data_of<T>(weight), weight.stride(1), weight.stride(0), K, N, options);
  const at::Tensor a_packed = pack_operand<T>(data_of<T>(lora_A), lora_A.stride(1), lora_A.stride(0), K, r, options);
  const at::Tensor b_packed = pack_operand<T>(data_of<T>(lora_B), lora_B.stride(1), lora_B.stride(0), r, N, options);
  const std::vector<float> bias_f = bias_as_float<T>(bias, N);
  const float s = static_cast<float>(scaling);
  const int64_t m_blocks = ceil_div(M, kTile), n_blocks = ceil_div(N, kTile), r_blocks = ceil_div(r, kTile);

  // Pass 1, per row block: xa = x~·Aᵀ in fp32 (sums of kXaSlice-long brgemm calls) and
  // xa_r = round(xa), zero-padded to an even rank.
  at::Tensor xa_r = poison_(at::empty({M, r_pad}, options));
  T* XR = xa_r.data_ptr<T>();
  float* XA = xa.data_ptr<float>();
  at::parallel_for(0, m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> slice(kTile * kTile), sum(kTile * kTile);
    std::vector<T> x_dropped(drop.enabled ? kTile * K : 0);
    std::vector<float> factor(drop.enabled ? kTile * K : 0);
    for (int64_t mb = begin; mb < end; ++mb) {
      const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
      const T* a = X + m0 * ldx;
      int64_t lda = ldx;
      if (drop.enabled) {
        fill_keep_factor(factor.data(), rows, K, m0, drop);
        for (int64_t i = 0; i < rows; ++i) dropped_row(x_dropped.data() + i * K, a + i * ldx, factor.data() + i * K, K);
        a = x_dropped.data();
        lda = K;
      }
      for (int64_t jb = 0; jb < r_blocks; ++jb) {
        const int64_t j0 = jb * kTile, cols = std::min(kTile, r - j0);
        const T* a_block = data_of<T>(a_packed) + jb * packed_block_elems(K);
        for (int64_t k0 = 0; k0 < K; k0 += kXaSlice) {
          const int64_t len = std::min(kXaSlice, K - k0);  // even: K is even on this route
          float* target = k0 == 0 ? sum.data() : slice.data();
          tile_product<T>(rows, cols, len, a + k0, lda, a_block + k0 * kTile, target, kTile, false);
          if (k0 > 0)
            for (int64_t e = 0; e < rows * kTile; ++e) sum[e] += slice[e];
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) {
            XA[(m0 + i) * r + j0 + c] = sum[i * kTile + c];
            XR[(m0 + i) * r_pad + j0 + c] = T(sum[i * kTile + c]);
          }
      }
      if (r_pad != r)
        for (int64_t i = 0; i < rows; ++i) XR[(m0 + i) * r_pad + r] = T(0);
    }
    at::native::cpublas::brgemm_release(true);
  });

  // Pass 2, per 64×64 tile of y: base = x·Wᵀ and lora = xa_r·Bᵀ in fp32, y = round(base + b + s·lora).
  T* Y = y.data_ptr<T>();
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> base(kTile * kTile), lora(kTile * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mb = t / n_blocks, nb = t % n_blocks;  // neighbouring tiles share x's rows
      const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
      const int64_t n0 = nb * kTile, cols = std::min(kTile, N - n0);
      tile_product<T>(rows, cols, K, X + m0 * ldx, ldx, data_of<T>(w_packed) + nb * packed_block_elems(K),
                      base.data(), kTile, false);
      tile_product<T>(rows, cols, r_pad, XR + m0 * r_pad, r_pad, data_of<T>(b_packed) + nb * packed_block_elems(r),
                      lora.data(), kTile, false);
      store_tile(Y + m0 * N + n0, N, rows, cols, base.data(), lora.data(), s, bias_f.data() + n0, nullptr);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// Which operand the forward packs: x (forward_x_packed, whose yᵀ tiles are stored
// transposed) or W (forward_w_packed). Per call the first costs a 32-bit transpose of x
// (M·K/2 words) plus a transposed store of y (M·N elements), the second a transpose of W
// (N·K/2 words); the weights are from single-thread timings on the AMD EPYC (1.25 ns per
// word, 0.75 ns per transposed element). A function of the shapes only, so the bits of y
// do not depend on the thread count. At ViT-B: x packed for M = 256 (global attention),
// W packed for proj and qkv at M = 784 (windowed).
bool forward_packs_x(int64_t M, int64_t N, int64_t K, const at::Tensor& x) {
  if (x.stride(1) != 1) return true;  // x is not a valid A operand in place
  const double pack_x = 1.25 * M * K / 2 + 0.75 * M * N, pack_w = 1.25 * N * K / 2;
  return pack_x < pack_w;
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const DropoutSpec& drop,
                  at::Tensor& y, at::Tensor& xa) {
  if (forward_packs_x(x.size(0), weight.size(0), x.size(1), x)) {
    forward_x_packed<T>(x, weight, bias, lora_A, lora_B, scaling, drop, y, xa);
  } else {
    forward_w_packed<T>(x, weight, bias, lora_A, lora_B, scaling, drop, y, xa);
  }
}

// ---------------------------------------------------------------- backward

template <typename T>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, const at::Tensor& xa, double scaling, const DropoutSpec& drop,
                   at::Tensor& dx, at::Tensor& dA, at::Tensor& dB) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t r_pad = round_up_even(r), M_pad = round_up_even(M), ldg = grad_y.stride(0);
  const bool compute_dx = dx.numel() > 0;
  const auto options = x.options();
  const T* G = data_of<T>(grad_y);
  const T* X = data_of<T>(x);
  const int64_t sxm = x.stride(0), sxk = x.stride(1);
  const float s = static_cast<float>(scaling);
  const int64_t m_blocks = ceil_div(M, kTile), k_blocks = ceil_div(K, kTile), n_blocks = ceil_div(N, kTile);
  const int64_t r_blocks = ceil_div(r, kTile);

  // Pass 1, per row block: gb_r = round(g·B) [M, r_pad] and its transpose [r_pad, M_pad], zero-padded.
  const at::Tensor b_packed = pack_operand<T>(data_of<T>(lora_B), lora_B.stride(0), lora_B.stride(1), N, r, options);
  at::Tensor gb_r = poison_(at::empty({M, r_pad}, options));
  at::Tensor gb_rt = poison_(at::empty({r_pad, M_pad}, options));
  T* GB = gb_r.data_ptr<T>();
  T* GBT = gb_rt.data_ptr<T>();
  at::parallel_for(0, m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kTile * kTile);
    for (int64_t mb = begin; mb < end; ++mb) {
      const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
      for (int64_t jb = 0; jb < r_blocks; ++jb) {
        const int64_t j0 = jb * kTile, cols = std::min(kTile, r - j0);
        tile_product<T>(rows, cols, N, G + m0 * ldg, ldg, data_of<T>(b_packed) + jb * packed_block_elems(N),
                        acc.data(), kTile, false);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) {
            const T rounded = T(acc[i * kTile + c]);
            GB[(m0 + i) * r_pad + j0 + c] = rounded;
            GBT[(j0 + c) * M_pad + m0 + i] = rounded;
          }
      }
      if (r_pad != r)
        for (int64_t i = 0; i < rows; ++i) GB[(m0 + i) * r_pad + r] = GBT[r * M_pad + m0 + i] = T(0);
    }
    at::native::cpublas::brgemm_release(true);
  });
  if (M_pad != M)
    for (int64_t j = 0; j < r_pad; ++j) GBT[j * M_pad + M] = T(0);

  // Pass 2, per K-block of 64 columns (one thread each, M-blocks in order): the dx tiles
  // round(g·W + s·(gb_r·A) ⊙ factor) and dA[:, block] = s·Σ gb_rᵀ·x~, x~ packed along M
  // with the tile's dropout factor, hashed once for both.
  at::Tensor w_packed, a_packed;
  if (compute_dx) {
    w_packed = pack_operand<T>(data_of<T>(weight), weight.stride(0), weight.stride(1), N, K, options);
    a_packed = pack_operand<T>(data_of<T>(lora_A), lora_A.stride(0), lora_A.stride(1), r, K, options);
  }
  T* DX = compute_dx ? dx.data_ptr<T>() : nullptr;
  T* DA = dA.data_ptr<T>();
  at::parallel_for(0, k_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> base(kTile * kTile), lora(kTile * kTile), factor(kTile * kTile, 1.0f), da(r * kTile);
    std::vector<T> x_packed(kTile * kTile), x_row(kTile);
    for (int64_t kb = begin; kb < end; ++kb) {
      const int64_t k0 = kb * kTile, cols = std::min(kTile, K - k0);
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        const int64_t m0 = mb * kTile, rows = std::min(kTile, M - m0);
        if (drop.enabled) fill_keep_factor_tile(factor.data(), kTile, m0, rows, k0, cols, K, drop);
        if (compute_dx) {
          tile_product<T>(rows, cols, N, G + m0 * ldg, ldg, data_of<T>(w_packed) + kb * packed_block_elems(N),
                          base.data(), kTile, false);
          tile_product<T>(rows, cols, r_pad, GB + m0 * r_pad, r_pad,
                          data_of<T>(a_packed) + kb * packed_block_elems(r), lora.data(), kTile, false);
          store_tile(DX + m0 * K + k0, K, rows, cols, base.data(), lora.data(), s, nullptr,
                     drop.enabled ? factor.data() : nullptr);
        }
        const auto x_rows = strided_rows(X + m0 * sxm, sxm, sxk, k0, cols);
        if (drop.enabled) {
          pack_block(x_packed.data(), rows, cols, [&](int64_t i, T* scratch) -> const T* {
            dropped_row(scratch, x_rows(i, x_row.data()), factor.data() + i * kTile, cols);
            return scratch;
          });
        } else {
          pack_block(x_packed.data(), rows, cols, x_rows);
        }
        tile_product<T>(r, cols, round_up_even(rows), GBT + m0, M_pad, x_packed.data(), da.data(), kTile, mb > 0);
      }
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < cols; ++c) DA[j * K + k0 + c] = T(s * da[j * kTile + c]);
    }
    at::native::cpublas::brgemm_release(true);
  });

  // Pass 3, per N-block: dBᵀ[:, block] = s·xa_rᵀ·g[:, block] over all of M in one call.
  at::Tensor xa_rt = poison_(at::empty({r, M_pad}, options));
  T* XRT = xa_rt.data_ptr<T>();
  const float* XA = xa.data_ptr<float>();
  const int64_t sam = xa.stride(0), saj = xa.stride(1);
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t m = 0; m < M; ++m) XRT[j * M_pad + m] = T(XA[m * sam + j * saj]);
    if (M_pad != M) XRT[j * M_pad + M] = T(0);
  }
  T* DB = dB.data_ptr<T>();
  const int64_t sgm = grad_y.stride(0), sgn = grad_y.stride(1);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(r * kTile);
    std::vector<T> g_packed(packed_block_elems(M));
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t n0 = nb * kTile, cols = std::min(kTile, N - n0);
      pack_block(g_packed.data(), M, cols, strided_rows(G, sgm, sgn, n0, cols));
      tile_product<T>(r, cols, M_pad, XRT, M_pad, g_packed.data(), acc.data(), kTile, false);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t j = 0; j < r; ++j) DB[(n0 + c) * r + j] = T(s * acc[j * kTile + c]);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

bool brgemm_serves_forward(const at::Tensor& x) {
  return x.size(1) > 0 && x.size(1) % 2 == 0 && brgemm_route_unavailable_reason(x.scalar_type()).empty();
}

bool brgemm_serves_backward(const at::Tensor& grad_y) {
  return grad_y.size(1) > 0 && grad_y.size(1) % 2 == 0 && grad_y.stride(1) == 1 &&
         brgemm_route_unavailable_reason(grad_y.scalar_type()).empty();
}

void brgemm_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const DropoutSpec& drop,
                    at::Tensor& y, at::Tensor& xa) {
  if (x.scalar_type() == at::kBFloat16) {
    forward_impl<at::BFloat16>(x, weight, bias, lora_A, lora_B, scaling, drop, y, xa);
  } else {
    forward_impl<at::Half>(x, weight, bias, lora_A, lora_B, scaling, drop, y, xa);
  }
}

void brgemm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& xa, double scaling,
                     const DropoutSpec& drop, at::Tensor& dx, at::Tensor& dA, at::Tensor& dB) {
  if (x.scalar_type() == at::kBFloat16) {
    backward_impl<at::BFloat16>(grad_y, x, weight, lora_A, lora_B, xa, scaling, drop, dx, dA, dB);
  } else {
    backward_impl<at::Half>(grad_y, x, weight, lora_A, lora_B, xa, scaling, drop, dx, dA, dB);
  }
}

}  // namespace lora_fused

// torch.ops.lora_fused.cpu_brgemm_unavailable_reason(dtype): "" when the route is available
// for dtype here, else why not (for `python -m lora_fused` and the tests).
TORCH_LIBRARY_FRAGMENT(lora_fused, m) {
  m.def("cpu_brgemm_unavailable_reason(ScalarType dtype) -> str",
        [](c10::ScalarType dtype) { return lora_fused::brgemm_route_unavailable_reason(dtype); });
}
