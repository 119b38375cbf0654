// Host-side checks of the layout assumptions in csrc/cuda_sm80_mainloop.cuh (run by
// tests/test_cuda_sm80_layouts.py): load_stage writes 16-byte chunks (8 fp16/bf16 or 4
// fp32 elements) at layout(row, k, stage), so every shared-memory layout must be a
// bijection whose chunks along the contiguous dimension stay contiguous and 16-byte
// aligned, and the threads' chunks must cover each stage once; the epilogue pairs acc(i)
// with partition_C's coordinate i, which must cover the block tile exactly once (the
// 128×128 tile and cuda_sm80_thin.cu's 128×32 and 32×128 ones, for the 16-bit and the TF32
// MMAs); and
// grouped_tile must visit every tile once. Prints the counts, exits non-zero on a problem.
#include "cuda_sm80_mainloop.cuh"
#include <cstdio>
#include <vector>
using namespace lora_fused::cuda::sm80;
using namespace cute;

template <class T, class L, bool kKMajor, int kRows, int kDepth>
int check_layout(const char* name) {
  constexpr int kBK = kBKOf<T>, kChunk = kChunkOf<T>;
  L layout{};
  const int n = kRows * kBK * kDepth;
  std::vector<int> seen(cosize_v<L>, 0);
  int bad = 0;
  for (int s = 0; s < kDepth; ++s)
    for (int r = 0; r < kRows; ++r)
      for (int k = 0; k < kBK; ++k) seen[layout(r, k, s)]++;
  for (size_t i = 0; i < seen.size(); ++i) if (seen[i] != 1) ++bad;
  // chunks along the contiguous dimension stay contiguous and 16-byte aligned
  for (int s = 0; s < kDepth; ++s)
    for (int r = 0; r < kRows; r += (kKMajor ? 1 : kChunk))
      for (int k = 0; k < kBK; k += (kKMajor ? kChunk : 1)) {
        const int base = layout(r, k, s);
        if (base % kChunk) ++bad;
        for (int e = 0; e < kChunk; ++e) {
          const int off = kKMajor ? layout(r, k + e, s) : layout(r + e, k, s);
          if (off != base + e) ++bad;
        }
      }
  printf("%s: cosize %d (elements %d), problems %d\n", name, int(cosize_v<L>), n, bad);
  return bad;
}

template <class Mma, int kRows, int kCols>
int check_partition_c(const char* name) {
  Mma mma;
  if (size(mma) != kThreads) { printf("%s: %d threads, expected %d\n", name, int(size(mma)), kThreads); return 1; }
  std::vector<int> seen(kRows * kCols, 0);
  for (int t = 0; t < kThreads; ++t) {
    auto thr = mma.get_slice(t);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));
    Tensor acc = partition_fragment_C(mma, Shape<Int<kRows>, Int<kCols>>{});
    if (size(c) != size(acc)) { printf("%s: size mismatch\n", name); return 1; }
    for (int i = 0; i < size(c); ++i) seen[get<0>(c(i)) * kCols + get<1>(c(i))]++;
  }
  int bad = 0;
  for (int v : seen) if (v != 1) ++bad;
  printf("%s: partition_C covers the %dx%d tile once per element: problems %d\n", name, kRows, kCols, bad);
  return bad;
}

// The chunks load_stage copies (and transform_stage rewrites): over the block's threads,
// every element of a kRows × kBK stage exactly once, including tiles with fewer chunks
// than threads (the 32-rank operands).
template <class T, bool kKMajor, int kRows>
int check_chunks(const char* name) {
  constexpr int kBK = kBKOf<T>, kChunk = kChunkOf<T>;
  std::vector<int> seen(kRows * kBK, 0);
  int bad = 0;
  for (int t = 0; t < kThreads; ++t)
    for_each_chunk_of_thread<T, kKMajor, kRows>(t, [&](int rr, int kk) {
      for (int e = 0; e < kChunk; ++e) {
        const int row = rr + (kKMajor ? 0 : e), k = kk + (kKMajor ? e : 0);
        if (row >= kRows || k >= kBK) { ++bad; continue; }
        seen[row * kBK + k]++;
      }
    });
  for (int v : seen) if (v != 1) ++bad;
  printf("%s: chunks cover the %dx%d stage once per element: problems %d\n", name, kRows, kBK, bad);
  return bad;
}

int main() {
  int bad = 0;
  using H = cute::half_t;
  bad += check_layout<H, KMajorSmem<H, kBM, kStages>, true, kBM, kStages>("K-major A stages");
  bad += check_layout<H, MNMajorSmem<H, kBN, kStages>, false, kBN, kStages>("MN-major B stages");
  bad += check_layout<H, KMajorSmem<H, kBN, 1>, true, kBN, 1>("K-major lora");
  bad += check_layout<H, MNMajorSmem<H, kBN, 1>, false, kBN, 1>("MN-major lora");
  bad += check_layout<H, KMajorSmem<H, kRankTile, kStages>, true, kRankTile, kStages>("K-major 32-rank stages (thin)");
  bad += check_chunks<H, true, kBM>("K-major 128-row chunks");
  bad += check_chunks<H, false, kBN>("MN-major 128-row chunks");
  bad += check_chunks<H, true, kRankTile>("K-major 32-rank chunks");
  bad += check_partition_c<TiledMmaFor<cute::half_t>, kBM, kBN>("128x128 GEMM tile");
  bad += check_partition_c<TallMma<cute::bfloat16_t>, kBM, kRankTile>("tall thin tile");
  bad += check_partition_c<WideMma<cute::half_t>, kRankTile, kBN>("wide thin tile");
  // fp32 on TF32: 4-element chunks, 16-deep k-tiles, K-major operands only
  bad += check_layout<float, KMajorSmem<float, kBM, kStages>, true, kBM, kStages>("fp32 K-major A/B stages");
  bad += check_layout<float, KMajorSmem<float, kBN, 1>, true, kBN, 1>("fp32 K-major lora");
  bad += check_layout<float, KMajorSmem<float, kRankTile, kStages>, true, kRankTile, kStages>("fp32 K-major 32-rank stages");
  bad += check_chunks<float, true, kBM>("fp32 K-major 128-row chunks");
  bad += check_chunks<float, true, kRankTile>("fp32 K-major 32-rank chunks");
  bad += check_partition_c<TiledMmaFor<float>, kBM, kBN>("TF32 128x128 GEMM tile");
  bad += check_partition_c<TallMma<float>, kBM, kRankTile>("TF32 tall thin tile");
  // the grouped raster visits every tile once
  for (long tm : {1L, 3L, 9L, 17L}) for (long tn : {1L, 2L, 5L}) {
    std::vector<int> seen(tm * tn, 0);
    for (long b = 0; b < tm * tn; ++b) {
      auto t = grouped_tile(b, tm, tn);
      if (t.m < 0 || t.m >= tm || t.n < 0 || t.n >= tn) { ++bad; continue; }
      seen[t.m * tn + t.n]++;
    }
    for (int v : seen) if (v != 1) ++bad;
  }
  printf("total problems %d\n", bad);
  return bad != 0;
}
