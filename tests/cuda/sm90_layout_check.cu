// Host-side checks of what csrc/cuda_sm90.cu assumes of CuTe's layouts (run by
// tests/test_cuda_sm90_layouts.py; no GPU needed): the stage layouts are bijections of
// rows × 64 × stages elements and each stage spans exactly the bytes the pipeline's
// transaction count expects; the two-warpgroup TiledMMA's accumulator partition covers the
// 128×128 tile once and gives warpgroup w only rows [64w, 64w + 64) (the epilogue stages
// each warpgroup's rows in its own buffer); 256 consumer threads; the TMA copies' boxes fill a
// stage and the depth tiles number ceil(depth / 64); shared memory within sm_90's 227 KB.
// The fused-gb dx (sm90_dx_computes_gb: r <= 32, K <= 1024): lora_Bᵀ's 32-row stages, the 64x32
// gb TiledMMA's partition
// (rows per warpgroup, column pairs), the shared-memory offsets round(gb) is written to
// (k_major_stage_offset, compared with the address TMA/wgmma use: CuTe's smem_ptr path and
// the SW128 formula; a rank pair is one aligned 32-bit word in the stage's A buffer), the
// transaction bytes of its k-stages and rank stage, and its shared-memory total.
// Prints the counts, exits non-zero on a problem.
#include "cuda_sm90.cu"

#include <cstdio>
#include <vector>

using namespace lora_fused::cuda::sm90;
using namespace cute;

template <class T, class L, int kRows>
int check_stages_of(const char* name) {
  L layout{};
  std::vector<int> seen(cosize_v<L>, 0);
  for (int s = 0; s < kStages; ++s)
    for (int r = 0; r < kRows; ++r)
      for (int k = 0; k < kBK; ++k) seen[layout(r, k, s)]++;
  int bad = cosize_v<L> != kRows * kBK * kStages;
  for (int v : seen) bad += v != 1;
  // stage s occupies [s·rows·64, (s+1)·rows·64): one TMA box (pair) per stage, 1024-byte aligned
  for (int s = 0; s < kStages; ++s)
    for (int r = 0; r < kRows; ++r)
      for (int k = 0; k < kBK; ++k) {
        const int offset = layout(r, k, s);
        bad += offset / (kRows * kBK) != s;
      }
  bad += (kRows * kBK * sizeof(T)) % 1024 != 0;
  printf("%s: cosize %d, problems %d\n", name, int(cosize_v<L>), bad);
  return bad;
}
template <class T, bool kKMajor>
int check_stages(const char* name) {
  return check_stages_of<T, StageLayout<T, kKMajor>, kBM>(name);
}

template <class TiledMma, int kCols>
int check_partition_c(const char* name) {
  TiledMma mma;
  int bad = size(mma) != kConsumerThreads;
  std::vector<int> seen(kBM * kCols, 0);
  for (int t = 0; t < kConsumerThreads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kCols>>{}));
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kCols>>{});
    bad += size(c) != size(acc) || size(acc) != kBM * kCols / kConsumerThreads;
    const int row_base = (t / 128) * (kBM / 2);
    for (int i = 0; i < size(c); ++i) {
      const int row = get<0>(c(i)), col = get<1>(c(i));
      bad += row < row_base || row >= row_base + kBM / 2;  // this warpgroup's staging rows
      seen[row * kCols + col]++;
      if (i % 2 == 0) {  // the epilogue's packed pair: (row, col), (row, col + 1), col even
        bad += col % 2 != 0 || get<0>(c(i + 1)) != row || get<1>(c(i + 1)) != col + 1;
      }
    }
  }
  for (int v : seen) bad += v != 1;
  printf("%s: partition_C covers 128x%d once, warpgroup rows apart, values in column pairs: problems %d\n", name,
         kCols, bad);
  return bad;
}

// The TMA copy of an operand (a default-constructed descriptor: only its layouts matter
// here, so no driver call): its boxes fill a stage exactly, and over a rows × depth operand
// the persistent producer's view (local_tile with make_coord(_, _): TMA, TMA rows, TMA depth,
// row tiles, depth tiles) has ceil(rows / 128) row tiles and ceil(depth / 64) depth tiles
// (the producer's loop bound), each one box's worth.
template <class T, bool kKMajor, class Stages = StageLayout<T, kKMajor>, int kRows = kBM>
int check_tma_partition(const char* name, int rows, int depth) {
  TmaOf<T, kKMajor, Stages> tma{};
  Tensor s = make_tensor(make_smem_ptr(static_cast<T*>(nullptr)), Stages{});
  auto slice = tma.get_slice(0);
  Tensor destination = slice.partition_D(s);  // (TMA, TMA rows, TMA depth, stages)
  Tensor g = local_tile(tma.get_tma_tensor(make_shape(rows, depth)), Shape<Int<kRows>, Int<kBK>>{}, make_coord(_, _));
  Tensor source = slice.partition_S(g);  // (TMA, TMA rows, TMA depth, row tiles, depth tiles)
  int bad = size(destination) != cosize_v<Stages>;
  bad += size<3>(destination) != kStages;
  bad += rank(source) != 5;
  bad += size<3>(source) != (rows + kRows - 1) / kRows;
  bad += size<4>(source) != (depth + kBK - 1) / kBK;
  bad += size<0>(source) * size<1>(source) * size<2>(source) != kRows * kBK;
  printf("%s (%d x %d): %d elements per stage in %d TMA copies, %d row tiles x %d depth tiles: problems %d\n", name,
         rows, depth, int(size<0>(destination) * size<1>(destination) * size<2>(destination)),
         int(size<0>(destination)) / int(size(typename TmaOf<T, kKMajor, Stages>::ValLayoutSrc{})), int(size<3>(source)),
         int(size<4>(source)), bad);
  return bad;
}

// The element offset TMA's SWIZZLE_128B writes and wgmma's SW128 descriptor reads for
// (row, k, stage) of the K-major stages, two independent ways: CuTe's smem_ptr path over a
// 1024-byte-aligned (fake) shared base, where the swizzle acts on byte addresses; and the
// swizzle's definition for 16-bit elements: 8-row atoms of 128-byte rows, the 16-byte chunk
// k / 8 of row r XORed with r % 8.
template <class T>
int address_through_smem_ptr(int row, int k, int stage) {
  T* base = reinterpret_cast<T*>(uintptr_t{1} << 20);
  Tensor stages = make_tensor(make_smem_ptr(base), StageLayout<T, true>{});
  return int(raw_pointer_cast(&stages(row, k, stage)) - base);
}
int sw128_formula(int row, int k, int stage) {
  return stage * kBM * kBK + (row / 8) * 512 + (row % 8) * 64 + ((k / 8) ^ (row % 8)) * 8 + k % 8;
}

// k_major_stage_offset, the one offset function the fused-gb dx writes round(gb) with, is
// the address TMA and wgmma use, at every element of every stage.
template <class T>
int check_k_major_stage_offset(const char* name) {
  static_assert(sizeof(T) == 2, "sw128_formula counts 64 elements per 128-byte row");
  int reference_bad = 0, bad = 0;
  for (int stage = 0; stage < kStages; ++stage)
    for (int row = 0; row < kBM; ++row)
      for (int k = 0; k < kBK; ++k) {
        const int expected = sw128_formula(row, k, stage);
        reference_bad += address_through_smem_ptr<T>(row, k, stage) != expected;
        bad += k_major_stage_offset<T>(row, k, stage) != expected;
      }
  printf("%s: smem_ptr addresses vs the SW128 formula: %d mismatches; k_major_stage_offset vs both: %d of %d\n",
         name, reference_bad, bad, kStages * kBM * kBK);
  return reference_bad + bad;
}

// Where the fused-gb dx writes round(gb): thread t's gb values (i, i + 1), ranks (j, j + 1)
// of one row, go to k_major_stage_offset(row, j, stage), one aligned 32-bit store whose
// second half is where wgmma reads (row, j + 1); inside stage `stage`'s A buffer, in the
// writing warpgroup's rows; ranks [0, 32) of each row written once, as wgmma addresses them.
template <class T>
int check_gb_writes(const char* name) {
  GbTiledMmaOf<T> gb_mma;
  int bad = 0;
  for (int stage = 0; stage < kStages; ++stage) {
    std::vector<int> seen(kBM * kBK, 0);
    for (int t = 0; t < kConsumerThreads; ++t) {
      Tensor c = gb_mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kGbRanks>>{}));
      for (int i = 0; i < size(c); i += 2) {
        const int row = get<0>(c(i)), j = get<1>(c(i));
        const int offset = k_major_stage_offset<T>(row, j, stage);
        bad += offset != address_through_smem_ptr<T>(row, j, stage);
        bad += offset % 2 != 0 || address_through_smem_ptr<T>(get<0>(c(i + 1)), get<1>(c(i + 1)), stage) != offset + 1;
        bad += offset / (kBM * kBK) != stage || row / (kBM / 2) != t / 128;
        seen[offset - stage * kBM * kBK] += 1;
        seen[offset + 1 - stage * kBM * kBK] += 1;
      }
    }
    for (int row = 0; row < kBM; ++row)
      for (int j = 0; j < kBK; ++j)
        bad += seen[address_through_smem_ptr<T>(row, j, stage) - stage * kBM * kBK] != (j < kGbRanks ? 1 : 0);
  }
  printf("%s: round(gb) pairs as aligned 32-bit words at wgmma's addresses, ranks [0, 32) of each row once per "
         "stage: problems %d\n", name, bad);
  return bad;
}

int main() {
  int bad = 0;
  using H = cute::half_t;
  using B = cute::bfloat16_t;
  bad += check_stages<H, true>("K-major stages (x, W, round(xa), lora_B, g, round(gb))");
  bad += check_stages<B, false>("MN-major stages (dx's W and lora_A)");
  bad += check_stages_of<H, GbStageLayout<H>, kGbRanks>("fused gb: lora_B^T stages (32 ranks)");
  bad += check_partition_c<TiledMmaOf<H, true>, kBN>("forward TiledMMA (K-major B)");
  bad += check_partition_c<TiledMmaOf<B, false>, kBN>("dx TiledMMA (MN-major B)");
  bad += check_partition_c<GbTiledMmaOf<B>, kGbRanks>("fused gb TiledMMA (64x32 per warpgroup)");
  bad += check_k_major_stage_offset<H>("K-major stage offsets (half)");
  bad += check_k_major_stage_offset<B>("K-major stage offsets (bf16)");
  bad += check_gb_writes<H>("fused gb (half): round(gb) into the rank stage's A buffer");
  bad += check_gb_writes<B>("fused gb (bf16): round(gb) into the rank stage's A buffer");
  const size_t stage_bytes = (cosize_v<StageLayout<H, true>> + cosize_v<StageLayout<H, false>>) * sizeof(H) / kStages;
  bad += stage_bytes != kStageBytes;
  printf("transaction bytes per stage %u, stage holds %zu: problems %d\n", kStageBytes, stage_bytes,
         int(stage_bytes != kStageBytes));
  // Fused-gb dx: a k-stage holds g, W and lora_B^T boxes, the rank stage lora_A's only.
  const size_t gb_stage_bytes = cosize_v<GbStageLayout<H>> * sizeof(H) / kStages;
  const size_t k_stage = stage_bytes + gb_stage_bytes, rank_stage = cosize_v<StageLayout<H, false>> * sizeof(H) / kStages;
  const int fused_bad = (kRankStageBytes != rank_stage) + (kRankStageBytes + kGbKStageExtraBytes != k_stage) +
                        (kPipelineStageBytes<true> != kRankStageBytes) + (kPipelineStageBytes<false> != kStageBytes);
  bad += fused_bad;
  printf("fused gb: k-stage transaction bytes %u + %u (holds %zu), rank stage %u (holds %zu): problems %d\n",
         kRankStageBytes, kGbKStageExtraBytes, k_stage, kRankStageBytes, rank_stage, fused_bad);
  const size_t smem = smem_bytes<B, false>(), smem_fused = smem_bytes<B, false, true>(), smem_fwd = smem_bytes<H, true>();
  bad += smem > 227 * 1024 || smem_fused > 227 * 1024 || smem_fwd > 227 * 1024;
  bad += smem_fused != smem + cosize_v<GbStageLayout<B>> * sizeof(B);  // the empty base costs nothing
  printf("dynamic shared memory: forward %zu, dx %zu, fused-gb dx %zu bytes of 232448\n", smem_fwd, smem, smem_fused);
  bad += check_tma_partition<H, true>("K-major TMA, x over K", 300, 200);
  bad += check_tma_partition<H, true>("K-major TMA, round(xa) over r = 17", 300, 17);
  bad += check_tma_partition<B, false>("MN-major TMA, dx's W over N", 264, 520);
  bad += check_tma_partition<B, false>("MN-major TMA, lora_A over r = 65", 264, 65);
  bad += check_tma_partition<B, true, GbStageLayout<B>, kGbRanks>("fused gb: K-major TMA, lora_B^T r = 17 over N", 17, 520);
  bad += check_tma_partition<H, true, GbStageLayout<H>, kGbRanks>("fused gb: K-major TMA, lora_B^T r = 32 over N", 32, 64);
  // grouped_tile is sm80's, checked by sm80_layout_check.cu
  printf("total problems %d\n", bad);
  return bad != 0;
}
