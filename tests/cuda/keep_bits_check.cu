// Host-side check of csrc/cuda_keep_bits.cuh (run by tests/test_cuda_sm80_layouts.py; no GPU
// needed): both dx epilogues' keep-bit packings, simulated over CuTe's own partition_C
// coordinates for every thread of the sm80 (mma.sync, 128×128 block) and sm90 (wgmma, two
// consumer warpgroups) TiledMMAs, with warp shuffles replaced by reads of the partner lane's
// registers. Against a random 128×128 mask packed directly: every word of the tile written
// exactly once (sm90: by one lane; sm80: each byte of the shared tile by one lane) and equal
// to the direct packing; clip_to_columns and kept() on a residue. Prints the counts, exits
// non-zero on a problem.
#include "cuda_sm90.cu"
#include "cuda_keep_bits.cuh"

#include <cstdio>
#include <vector>

using namespace lora_fused::cuda;
using namespace lora_fused::cuda::keep_bits;
using namespace cute;

constexpr int kTile = 128;

std::vector<uint8_t> random_mask(uint32_t seed) {
  std::vector<uint8_t> keep(kTile * kTile);
  for (auto& k : keep) {
    seed = seed * 1664525u + 1013904223u;
    k = (seed >> 24) & 1u;
  }
  return keep;
}

uint32_t packed_directly(const std::vector<uint8_t>& keep, int row, int word) {
  uint32_t w = 0;
  for (int b = 0; b < 32; ++b) w |= uint32_t{keep[row * kTile + 32 * word + b]} << b;
  return w;
}

// compact[thread][reg] of every thread, from its partition_C coordinates and the slot map.
template <int kRegs, class Mma, class SlotOf>
std::vector<uint32_t> compact_registers(Mma mma, int threads, const std::vector<uint8_t>& keep, SlotOf slot_of,
                                        int* bad) {
  std::vector<uint32_t> compact(threads * kRegs, 0);
  for (int t = 0; t < threads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kTile>, Int<kTile>>{}));
    std::vector<int> bit_used(kRegs * 32, 0);
    for (int i = 0; i < size(c); ++i) {
      const Slot s = slot_of(i);
      *bad += s.reg < 0 || s.reg >= kRegs || bit_used[s.reg * 32 + s.bit]++ != 0;
      compact[t * kRegs + s.reg] |= uint32_t{keep[get<0>(c(i)) * kTile + get<1>(c(i))]} << s.bit;
    }
  }
  return compact;
}

template <int kRegs>
uint32_t transposed(const std::vector<uint32_t>& compact, int t, int reg) {
  return quad_transpose(compact[t * kRegs + reg], t & 3, [&](int d) { return compact[(t ^ d) * kRegs + reg]; });
}

int check_sm90(uint32_t seed) {
  sm90::TiledMmaOf<cute::bfloat16_t, false> mma;
  const auto keep = random_mask(seed);
  int bad = size(mma) != sm90::kConsumerThreads;
  const auto compact = compact_registers<kWgmmaRegs>(mma, sm90::kConsumerThreads, keep, wgmma_slot, &bad);
  std::vector<int> written(kTile * kTileWords, 0);
  for (int t = 0; t < sm90::kConsumerThreads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kTile>, Int<kTile>>{}));
    for (int h = 0; h < kWgmmaRegs; ++h) {
      const int row = get<0>(c(2 * h)), word = t & 3;  // the epilogue's store: word q of value 2h's row
      written[row * kTileWords + word]++;
      bad += transposed<kWgmmaRegs>(compact, t, h) != packed_directly(keep, row, word);
    }
  }
  for (int w : written) bad += w != 1;
  printf("sm90 wgmma keep bits (seed %u): problems %d\n", seed, bad);
  return bad;
}

int check_sm80(uint32_t seed) {
  sm80::TiledMmaFor<cute::half_t> mma;
  const auto keep = random_mask(seed);
  int bad = size(mma) != sm80::kThreads;
  const auto compact = compact_registers<kMma80Regs>(mma, sm80::kThreads, keep, mma80_slot, &bad);
  std::vector<uint8_t> tile_bytes(kTile * kTileWords * 4, 0);
  std::vector<int> written(tile_bytes.size(), 0);
  for (int t = 0; t < sm80::kThreads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kTile>, Int<kTile>>{}));
    const int byte = mma80_word_byte(get<1>(c(0)));
    for (int reg = 0; reg < kMma80Regs; ++reg) {
      const uint32_t bytes = transposed<kMma80Regs>(compact, t, reg);
      for (int g = 0; g < 4; ++g) {
        const int row = get<0>(c(mma80_first_value(reg, g)));
        const int at = (row * kTileWords + (t & 3)) * 4 + byte;  // byte n_w of word q of the row
        written[at]++;
        tile_bytes[at] = static_cast<uint8_t>(bytes >> (8 * g));
      }
    }
  }
  for (int w : written) bad += w != 1;
  for (int row = 0; row < kTile; ++row)
    for (int word = 0; word < kTileWords; ++word) {
      const uint8_t* b = &tile_bytes[(row * kTileWords + word) * 4];
      const uint32_t w = b[0] | uint32_t{b[1]} << 8 | uint32_t{b[2]} << 16 | uint32_t{b[3]} << 24;
      bad += w != packed_directly(keep, row, word);
    }
  printf("sm80 mma.sync keep bits (seed %u): problems %d\n", seed, bad);
  return bad;
}

int check_clip_and_read() {
  int bad = 0;
  bad += clip_to_columns(0xFFFFFFFFu, 96, 200) != 0xFFFFFFFFu;
  bad += clip_to_columns(0xFFFFFFFFu, 96, 100) != 0xFu;
  bad += clip_to_columns(0xFFFFFFFFu, 96, 96) != 0u;
  bad += clip_to_columns(0xFFFFFFFFu, 96, 50) != 0u;
  bad += keep_words_per_row(1) != 1 || keep_words_per_row(32) != 1 || keep_words_per_row(33) != 2;
  const uint32_t words[4] = {0u, 0u, 1u << 5, 0x80000000u};  // 2 rows of 2 words
  bad += !kept(words, 2, 1, 5) || kept(words, 2, 1, 4) || !kept(words, 2, 1, 63) || kept(words, 2, 0, 5);
  printf("clip_to_columns, keep_words_per_row, kept: problems %d\n", bad);
  return bad;
}

int main() {
  int bad = 0;
  for (uint32_t seed : {1u, 2u, 12345u}) bad += check_sm90(seed) + check_sm80(seed);
  bad += check_clip_and_read();
  printf("total problems %d\n", bad);
  return bad != 0;
}
