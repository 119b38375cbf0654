// Host-side checks of what csrc/cuda_sm90.cu assumes of CuTe's layouts (run by
// tests/test_cuda_sm90_layouts.py; no GPU needed): the stage layouts are bijections of
// rows × 64 × stages elements and each stage spans exactly the bytes the pipeline's
// transaction count expects; the two-warpgroup TiledMMA's accumulator partition covers the
// 128×128 tile once and gives warpgroup w only rows [64w, 64w + 64) (the epilogue stages
// each warpgroup's rows in its own buffer); 256 consumer threads; the TMA copies' boxes fill a
// stage and the depth tiles number ceil(depth / 64); shared memory within sm_90's 227 KB.
// Prints the counts, exits non-zero on a problem.
#include "cuda_sm90.cu"

#include <cstdio>
#include <vector>

using namespace lora_fused::cuda::sm90;
using namespace cute;

template <class T, bool kKMajor>
int check_stages(const char* name) {
  using L = StageLayout<T, kKMajor>;
  L layout{};
  std::vector<int> seen(cosize_v<L>, 0);
  for (int s = 0; s < kStages; ++s)
    for (int r = 0; r < kBM; ++r)
      for (int k = 0; k < kBK; ++k) seen[layout(r, k, s)]++;
  int bad = 0;
  for (int v : seen) bad += v != 1;
  // stage s occupies [s·128·64, (s+1)·128·64): one TMA box pair per stage, 1024-byte aligned
  for (int s = 0; s < kStages; ++s)
    for (int r = 0; r < kBM; ++r)
      for (int k = 0; k < kBK; ++k) {
        const int offset = layout(r, k, s);
        bad += offset / (kBM * kBK) != s;
      }
  bad += (kBM * kBK * sizeof(T)) % 1024 != 0;
  printf("%s: cosize %d, problems %d\n", name, int(cosize_v<L>), bad);
  return bad;
}

template <class T, bool kBKMajor>
int check_partition_c(const char* name) {
  TiledMmaOf<T, kBKMajor> mma;
  int bad = size(mma) != kConsumerThreads;
  std::vector<int> seen(kBM * kBN, 0);
  for (int t = 0; t < kConsumerThreads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
    bad += size(c) != size(acc) || size(acc) != 64;
    const int row_base = (t / 128) * (kBM / 2);
    for (int i = 0; i < size(c); ++i) {
      const int row = get<0>(c(i)), col = get<1>(c(i));
      bad += row < row_base || row >= row_base + kBM / 2;  // this warpgroup's staging rows
      seen[row * kBN + col]++;
      if (i % 2 == 0) {  // the epilogue's packed pair: (row, col), (row, col + 1), col even
        bad += col % 2 != 0 || get<0>(c(i + 1)) != row || get<1>(c(i + 1)) != col + 1;
      }
    }
  }
  for (int v : seen) bad += v != 1;
  printf("%s: partition_C covers 128x128 once, warpgroup rows apart, values in column pairs: problems %d\n", name,
         bad);
  return bad;
}

// The TMA copy of an operand (a default-constructed descriptor: only its layouts matter
// here, so no driver call): its boxes fill a stage exactly, and over a rows × depth operand
// the persistent producer's view (local_tile with make_coord(_, _): TMA, TMA rows, TMA depth,
// row tiles, depth tiles) has ceil(rows / 128) row tiles and ceil(depth / 64) depth tiles
// (the producer's loop bound), each one box's worth.
template <class T, bool kKMajor>
int check_tma_partition(const char* name, int rows, int depth) {
  TmaOf<T, kKMajor> tma{};
  Tensor s = make_tensor(make_smem_ptr(static_cast<T*>(nullptr)), StageLayout<T, kKMajor>{});
  auto slice = tma.get_slice(0);
  Tensor destination = slice.partition_D(s);  // (TMA, TMA rows, TMA depth, stages)
  Tensor g = local_tile(tma.get_tma_tensor(make_shape(rows, depth)), Shape<Int<kBM>, Int<kBK>>{}, make_coord(_, _));
  Tensor source = slice.partition_S(g);  // (TMA, TMA rows, TMA depth, row tiles, depth tiles)
  int bad = size(destination) != cosize_v<StageLayout<T, kKMajor>>;
  bad += size<3>(destination) != kStages;
  bad += rank(source) != 5;
  bad += size<3>(source) != (rows + kBM - 1) / kBM;
  bad += size<4>(source) != (depth + kBK - 1) / kBK;
  bad += size<0>(source) * size<1>(source) * size<2>(source) != kBM * kBK;
  printf("%s (%d x %d): %d elements per stage in %d TMA copies, %d row tiles x %d depth tiles: problems %d\n", name,
         rows, depth, int(size<0>(destination) * size<1>(destination) * size<2>(destination)),
         int(size<0>(destination)) / int(size(typename TmaOf<T, kKMajor>::ValLayoutSrc{})), int(size<3>(source)),
         int(size<4>(source)), bad);
  return bad;
}

int main() {
  int bad = 0;
  using H = cute::half_t;
  using B = cute::bfloat16_t;
  bad += check_stages<H, true>("K-major stages (x, W, round(xa), lora_B, g, round(gb))");
  bad += check_stages<B, false>("MN-major stages (dx's W and lora_A)");
  bad += check_partition_c<H, true>("forward TiledMMA (K-major B)");
  bad += check_partition_c<B, false>("dx TiledMMA (MN-major B)");
  const size_t stage_bytes = (cosize_v<StageLayout<H, true>> + cosize_v<StageLayout<H, false>>) * sizeof(H) / kStages;
  bad += stage_bytes != kStageBytes;
  printf("transaction bytes per stage %u, stage holds %zu: problems %d\n", kStageBytes, stage_bytes,
         int(stage_bytes != kStageBytes));
  const size_t smem = smem_bytes<B, false>();
  bad += smem > 227 * 1024;
  printf("dynamic shared memory %zu bytes of 232448\n", smem);
  bad += check_tma_partition<H, true>("K-major TMA, x over K", 300, 200);
  bad += check_tma_partition<H, true>("K-major TMA, round(xa) over r = 17", 300, 17);
  bad += check_tma_partition<B, false>("MN-major TMA, dx's W over N", 264, 520);
  bad += check_tma_partition<B, false>("MN-major TMA, lora_A over r = 65", 264, 65);
  // grouped_tile is sm80's, checked by sm80_layout_check.cu
  printf("total problems %d\n", bad);
  return bad != 0;
}
