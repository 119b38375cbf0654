// The backward's keep-bit workspace: the dropout mask of x hashed once, by the dx kernel
// (sm80 or sm90, whichever runs), and read back by sm80_dA instead of hashing again.
//
// Layout. uint32 keep_bits[M][W], W = keep_words_per_row(K) = ceil(K / 32): bit b of word
// (m, w) is keep(m, 32w + b) of lora_fused/dropout.py (dropout_hash.h), bits past K are 0.
// A dx output tile is 128 columns from a multiple of 128, so it owns words [c0/32, c0/32 + 4)
// of each of its rows whole: no word straddles two tiles, each is written by exactly one
// thread with one 4-byte store, no atomics. cuda_ops.cpp allocates the workspace only with
// dropout on and dx computed (fp16/bf16: sm80_dA is the reader), poisoned like every
// workspace: poison is all ones, "keep everything", so a word the dx kernel failed to write
// changes dA. The GPU tests (tests/test_cuda_gpu.py, keep-bit cases) compare dA from the bits
// bitwise with dA hashing the mask, which catches any such word; their tolerance parity
// catches a systematic miss (a lane, a row, a K residue, a tile), not reliably one word.
//
// Packing without shared-memory round trips for the bits themselves. Both accumulator
// layouts (mma.sync m16n8 and wgmma m64nN, F32) give lane q = lane % 4 of a quad columns
// 8a + 2q + {0, 1} of one row, for each 8-column block a the thread holds: the quad's four
// lanes hold the block's 8 columns, byte a % 4 of a 32-bit word, 2 bits per lane. Each
// thread collects its keep flags, as it computes them in the epilogue, into "compact"
// registers: bit 8g + 2j + e holds the flag of its column 2q + e of word j (0..3, the tile
// row's 4 words) in byte group g (0..3: which byte of the word for wgmma, which of four rows
// for mma.sync: see the slot functions). quad_transpose then hands lane q the fields j = q
// of all four lanes: 2 bits from each, placed at 2q' + e of each byte, i.e. byte g of word q
// complete for this warp. Three shuffles per compact register, no per-element bit work
// beyond one OR: on sm90 (at its 168-register cap) a thread carries 2 compact registers.
//   sm90 (wgmma 64×128, one warp holds whole rows): a row's 4 words come out complete in the
//     4 lanes of its quad; lane q stores word q of each of its two rows.
//   sm80 (mma.sync, 2×4 warps over 128×128: a warp holds columns 8n_w + 32jj + [0, 8) of its
//     rows, byte n_w of every word): the transposed bytes are this warp's byte of word q of
//     four rows each; they go to byte n_w of a 128×4-word shared tile (the four column warps
//     write disjoint bytes), and after the epilogue's barrier 256 threads store its 512
//     words, two each.
// tests/cuda/keep_bits_check.cu runs both packings on the host over CuTe's own partition_C
// coordinates, for every thread of both MMAs, against a directly packed random mask.
#pragma once

#include <cstdint>

#include "dropout_hash.h"

namespace lora_fused {
namespace cuda {

// 32-bit words per row of the keep-bit workspace.
LORA_HD int64_t keep_words_per_row(int64_t K) { return (K + 31) / 32; }

namespace keep_bits {

constexpr int kTileWords = 4;  // a 128-column dx tile row: 4 words

// Where a thread keeps the flag of one accumulator value: compact register `reg`, bit `bit`.
struct Slot {
  int reg, bit;
};

// sm90: value i of a consumer thread's 64×128 wgmma fragment (CuTe order e + 2h + 4blk: column
// 8blk + 2q + e, row h·8 + lane/4 of the warp's 16) → register h, byte group blk % 4, word blk / 4.
LORA_HD constexpr Slot wgmma_slot(int i) { return {(i >> 1) & 1, 8 * ((i >> 2) & 3) + 2 * (i >> 4) + (i & 1)}; }
constexpr int kWgmmaRegs = 2;

// sm80: value i of a thread's 128×128 mma.sync fragment ((2,2),4,4) = e + 2h + 4mi + 16jj:
// row slot h + 2mi (8 rows), column 8n_w + 32jj + 2q + e → register (slot / 4), byte group
// slot % 4, word jj.
LORA_HD constexpr Slot mma80_slot(int i) { return {(i >> 3) & 1, 8 * ((i >> 1) & 3) + 2 * (i >> 4) + (i & 1)}; }
constexpr int kMma80Regs = 2;
// The accumulator index of the first value in byte group g of register reg (its row).
LORA_HD constexpr int mma80_first_value(int reg, int g) { return 2 * (4 * reg + g); }
// The byte of every word this thread's warp fills (n_w), from its value 0's tile column.
LORA_HD constexpr int mma80_word_byte(int column_of_value0) { return (column_of_value0 & 31) >> 3; }

// Lane q of a quad: byte g of the result holds, at bits 2q' + e, field (g, j = q) of lane q''s
// compact register (q' = 0..3). from_lane(d) returns the compact register of lane q ^ d.
template <class FromLane>
LORA_HD uint32_t quad_transpose(uint32_t compact, int q, FromLane&& from_lane) {
  uint32_t out = ((compact >> (2 * q)) & 0x03030303u) << (2 * q);
#if defined(__CUDACC__)  // (host compilers of cuda_kernels.h warn on the pragma)
#pragma unroll
#endif
  for (int d = 1; d < 4; ++d) out |= ((from_lane(d) >> (2 * q)) & 0x03030303u) << (2 * (q ^ d));
  return out;
}

#if defined(__CUDACC__)
// The same within a warp, by shuffles: every lane of the warp must call it (full mask).
__device__ __forceinline__ uint32_t quad_transpose(uint32_t compact) {
  return quad_transpose(compact, static_cast<int>(threadIdx.x & 3),
                        [&](int d) { return __shfl_xor_sync(0xFFFFFFFFu, compact, d); });
}

// A 4-byte cp.async global -> shared of one keep word (zero-filled, nothing read, when not
// `inside`), in the caller's current cp.async group.
__device__ __forceinline__ void cp_async_word(uint32_t* smem, const uint32_t* gmem, bool inside) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(address), "l"(gmem), "r"(inside ? 4 : 0)
               : "memory");
}
#endif

// A word of columns [first_col, first_col + 32) with the bits at columns >= K cleared.
LORA_HD uint32_t clip_to_columns(uint32_t word, int64_t first_col, int64_t K) {
  const int64_t valid = K - first_col;
  return valid >= 32 ? word : (valid <= 0 ? 0u : word & ((uint32_t{1} << valid) - 1u));
}

// Whether x's element (m, c) is kept, from the workspace.
LORA_HD bool kept(const uint32_t* bits, int64_t words_per_row, int64_t m, int64_t c) {
  return (bits[m * words_per_row + (c >> 5)] >> (c & 31)) & 1u;
}

}  // namespace keep_bits
}  // namespace cuda
}  // namespace lora_fused
