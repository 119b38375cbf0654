// The CPU dropout factor of one row block: keep / (1 - p) per element, regenerated from the
// shared counter hash (dropout_hash.h) instead of a saved mask.
//
// The hash is ~12 integer operations per element, as much as the rank-16 products it feeds,
// so the loop must vectorise: within a run of elements whose linear index has one high word
// the per-row key is hoisted and the body is branch-free 32-bit arithmetic. GCC's
// target_clones compiles it for AVX-512, AVX2 and baseline x86-64 and picks one at load time
// (the extension is built with the portable default flags).
#pragma once

#include <algorithm>
#include <cstdint>

#include "dropout_hash.h"

namespace lora_fused {

namespace detail {

// The ISA clones below only pay off when the loop is compiled inside each clone.
#if defined(__GNUC__)
#define LORA_FUSED_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LORA_FUSED_ALWAYS_INLINE inline
#endif

// Calls store(i, c, keep) for every element of tile [row0, row0 + rows) x [col0, col0 + width)
// of an input with `cols` columns (keep: whether dropout keeps the element).
template <typename Store>
LORA_FUSED_ALWAYS_INLINE void for_each_keep(int64_t rows, int64_t row0, int64_t col0, int64_t width, int64_t cols,
                                            uint32_t seed, uint32_t threshold, Store store) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t row_begin = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(cols) + static_cast<uint64_t>(col0);
    int64_t j = 0;
    while (j < width) {
      // [j, run_end) shares the high word of its linear index, so the key is constant there.
      const uint64_t idx = row_begin + static_cast<uint64_t>(j);
      const uint64_t to_wrap = (uint64_t{1} << 32) - (idx & 0xFFFFFFFFull);
      const int64_t run_end = static_cast<int64_t>(
          std::min<uint64_t>(static_cast<uint64_t>(width), static_cast<uint64_t>(j) + to_wrap));
      const uint32_t key = mix32(seed ^ (static_cast<uint32_t>(idx >> 32) * 0x9E3779B9u));
      const uint32_t lo0 = static_cast<uint32_t>(idx) - static_cast<uint32_t>(j);
      for (int64_t c = j; c < run_end; ++c) {
        const uint32_t lo = lo0 + static_cast<uint32_t>(c);
        const uint32_t hash = mix32(mix32(lo ^ key) + key);
        store(i, c, (hash >> 8) >= threshold);
      }
      j = run_end;
    }
  }
}

// The factor keep / (1 - p) of a tile, written with leading dimension ld_out.
template <typename scalar_t>
LORA_FUSED_ALWAYS_INLINE void fill_keep_factor_impl(scalar_t* out, int64_t ld_out, int64_t rows, int64_t row0, int64_t col0,
                                  int64_t width, int64_t cols, uint32_t seed, uint32_t threshold, scalar_t kept) {
  for_each_keep(rows, row0, col0, width, cols, seed, threshold,
                [=](int64_t i, int64_t c, bool keep) { out[i * ld_out + c] = keep ? kept : scalar_t(0); });
}

// x~ = x * (keep / (1 - p)) of whole rows (x row i at x + i * ld_x, unit column stride), the
// product of x and the factor as the reference's x * keep * scale rounds it (0 * inf stays NaN).
template <typename scalar_t>
LORA_FUSED_ALWAYS_INLINE void fill_dropped_rows_impl(scalar_t* out, const scalar_t* x, int64_t ld_x, int64_t rows,
                                                     int64_t row0, int64_t cols, uint32_t seed, uint32_t threshold,
                                                     scalar_t kept) {
  for_each_keep(rows, row0, 0, cols, cols, seed, threshold, [=](int64_t i, int64_t c, bool keep) {
    out[i * cols + c] = x[i * ld_x + c] * (keep ? kept : scalar_t(0));
  });
}

// The backward of one block of whole rows in one pass, f = keep/(1-p) hashed here:
// x~ = x * f (as fill_dropped_rows) and, when dx is not null, dx += (s * lora) * f, the rank-r
// term of dx (lora = gb·A of the block) under the mask. out, lora and dx have `cols` columns
// per row; x has ld_x.
template <typename scalar_t>
LORA_FUSED_ALWAYS_INLINE void dropped_backward_rows_impl(scalar_t* out, scalar_t* dx, const scalar_t* lora,
                                                         const scalar_t* x, int64_t ld_x, int64_t rows, int64_t row0,
                                                         int64_t cols, uint32_t seed, uint32_t threshold,
                                                         scalar_t kept, scalar_t s) {
  if (dx == nullptr) {
    fill_dropped_rows_impl(out, x, ld_x, rows, row0, cols, seed, threshold, kept);
    return;
  }
  for_each_keep(rows, row0, 0, cols, cols, seed, threshold, [=](int64_t i, int64_t c, bool keep) {
    const scalar_t factor = keep ? kept : scalar_t(0);
    out[i * cols + c] = x[i * ld_x + c] * factor;
    dx[i * cols + c] += s * lora[i * cols + c] * factor;
  });
}

}  // namespace detail

// out[i * cols + c] = keep(row0 + i, c) ? 1 / (1 - p) : 0 for an [rows, cols] block of an
// input with `cols` columns (the linear index of dropout_hash.h is (row0 + i) * cols + c),
// or for a tile of it (fill_keep_factor_tile).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_FUSED_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LORA_FUSED_CPU_CLONES
#endif

LORA_FUSED_CPU_CLONES inline void fill_keep_factor(float* out, int64_t rows, int64_t cols, int64_t row0, const DropoutSpec& spec) {
  detail::fill_keep_factor_impl(out, cols, rows, row0, 0, cols, cols, spec.seed, spec.threshold,
                                static_cast<float>(spec.scale));
}


// out[i * cols + c] = x[i * ld_x + c] * keep(row0 + i, c) / (1 - p): the dropped input x~ of
// an [rows, cols] block of rows with unit column stride, hashed and multiplied in one pass.
LORA_FUSED_CPU_CLONES inline void fill_dropped_rows(float* out, const float* x, int64_t ld_x, int64_t rows,
                                                    int64_t cols, int64_t row0, const DropoutSpec& spec) {
  detail::fill_dropped_rows_impl(out, x, ld_x, rows, row0, cols, spec.seed, spec.threshold,
                                 static_cast<float>(spec.scale));
}

inline void fill_dropped_rows(double* out, const double* x, int64_t ld_x, int64_t rows, int64_t cols, int64_t row0,
                              const DropoutSpec& spec) {
  detail::fill_dropped_rows_impl(out, x, ld_x, rows, row0, cols, spec.seed, spec.threshold, spec.scale);
}

// One backward block of whole rows: out = x~ and, when dx is not null, dx += s·lora·keep/(1-p)
// (out, dx, lora: [rows, cols] contiguous; x rows at x + i·ld_x with unit column stride).
LORA_FUSED_CPU_CLONES inline void dropped_backward_rows(float* out, float* dx, const float* lora, const float* x,
                                                        int64_t ld_x, int64_t rows, int64_t cols, int64_t row0,
                                                        const DropoutSpec& spec, double s) {
  detail::dropped_backward_rows_impl(out, dx, lora, x, ld_x, rows, row0, cols, spec.seed, spec.threshold,
                                     static_cast<float>(spec.scale), static_cast<float>(s));
}

inline void dropped_backward_rows(double* out, double* dx, const double* lora, const double* x, int64_t ld_x,
                                  int64_t rows, int64_t cols, int64_t row0, const DropoutSpec& spec, double s) {
  detail::dropped_backward_rows_impl(out, dx, lora, x, ld_x, rows, row0, cols, spec.seed, spec.threshold, spec.scale, s);
}

// The factor of one tile, rows [row0, row0 + rows) and columns [col0, col0 + width) of an
// input with `cols` columns, into out[i * ld_out + j].
LORA_FUSED_CPU_CLONES inline void fill_keep_factor_tile(float* out, int64_t ld_out, int64_t row0, int64_t rows,
                                                        int64_t col0, int64_t width, int64_t cols,
                                                        const DropoutSpec& spec) {
  detail::fill_keep_factor_impl(out, ld_out, rows, row0, col0, width, cols, spec.seed, spec.threshold,
                                static_cast<float>(spec.scale));
}

}  // namespace lora_fused
