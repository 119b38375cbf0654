// Host-side checks of the layout assumptions in csrc/cuda_sm80_mainloop.cuh (run by
// tests/test_cuda_sm80_layouts.py): load_stage writes 16-byte chunks (8 fp16/bf16 or 4
// fp32 elements) at layout(row, k, stage), so every shared-memory layout must be a
// bijection whose chunks along the contiguous dimension stay contiguous and 16-byte
// aligned, and the threads' chunks must cover each stage once; the epilogue pairs acc(i)
// with partition_C's coordinate i, which must cover the block tile exactly once (the
// 128×128 tile and cuda_sm80_thin.cu's 128×32 and 32×128 ones, for the 16-bit and the TF32
// MMAs); the fp32 MN-major operand (dx's W, read as stored) goes to the MMA's B fragments by
// 32-bit loads that put every value in its fragment slot and hit 32 distinct banks per warp
// load, and its 16-byte cp.async chunks hit 8 distinct bank groups per 8 threads; and
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

// A B operand's copy from shared memory to registers by per-thread loads (S2RAtom of an fp32
// MN-major operand: UniversalCopy, each thread reads what it keeps; not ldmatrix, where a
// thread supplies an address for data other lanes receive), as BlockMma::with_views builds
// it (retile_D into the fragment of partition_fragment_B): fragment slot j of every thread
// receives the element partition_B assigns to slot j, in every stage; and each load of a
// warp (one value index of the copy partition) reads 32 distinct 4-byte banks.
template <class T, bool kKMajor, class Mma, class L>
int check_b_fragments(const char* name) {
  using V = typename MmaOp<T>::value;
  std::vector<V> buffer(cosize_v<L>);
  Tensor sB = make_tensor(make_smem_ptr(buffer.data()), L{});
  Mma mma;
  auto s2r = make_tiled_copy_B(S2RAtom<kKMajor, T>{}, mma);
  constexpr int kStageCount = size<2>(L{});
  int bad = 0, loads = 0;
  std::vector<std::vector<long>> offsets(kThreads);  // [thread][copy value]: element offsets
  for (int t = 0; t < kThreads; ++t) {
    auto thr_mma = mma.get_slice(t);
    auto thr_s2r = s2r.get_slice(t);
    Tensor tCsB = thr_mma.partition_B(sB);  // (mma, n, k, stages): slot -> element
    Tensor frag_of = make_tensor<long>(thr_mma.partition_fragment_B(sB(_, _, 0)).layout());
    Tensor tXrB = thr_s2r.retile_D(frag_of);
    Tensor tXsB = thr_s2r.partition_S(sB);  // (copy, n, k, stages)
    if (size(tXrB) != size(tXsB) / kStageCount || size(frag_of) != size(tCsB) / kStageCount) {
      printf("%s: copy and fragment sizes differ\n", name);
      return 1;
    }
    for (int s = 0; s < kStageCount; ++s) {
      Tensor src = tXsB(_, _, _, s);
      for (int i = 0; i < size(src); ++i) {
        const long offset = &src(i) - buffer.data();
        tXrB(i) = offset;
        if (s == 0) offsets[t].push_back(offset);
      }
      Tensor want = tCsB(_, _, _, s);
      for (int j = 0; j < size(want); ++j) bad += frag_of(j) != &want(j) - buffer.data();
    }
  }
  static_assert(sizeof(T) == 4, "one 4-byte bank per element");
  for (int warp = 0; warp < kThreads / 32; ++warp)
    for (size_t i = 0; i < offsets[0].size(); ++i, ++loads) {
      unsigned banks = 0;
      for (int lane = 0; lane < 32; ++lane) banks |= 1u << (offsets[warp * 32 + lane][i] % 32);
      bad += banks != 0xffffffffu;
    }
  printf("%s: fragment slots filled with partition_B's elements, 32 distinct banks per warp load (%d loads): "
         "problems %d\n", name, loads, bad);
  return bad;
}

// The 16-byte chunks load_stage writes: each 8 consecutive threads (one shared-memory
// wavefront of 16-byte accesses) write 8 distinct 16-byte bank groups, in every stage.
template <class T, bool kKMajor, int kRows, class L>
int check_chunk_banks(const char* name) {
  L layout{};
  constexpr int kChunks = kRows * kBKOf<T> / kChunkOf<T>;
  constexpr int kPerThread = (kChunks + kThreads - 1) / kThreads;
  int bad = 0;
  for (int s = 0; s < size<2>(L{}); ++s)
    for (int i = 0; i < kPerThread; ++i)
      for (int t0 = 0; t0 < kThreads; t0 += 8) {
        unsigned groups = 0, threads = 0;
        for (int t = t0; t < t0 + 8; ++t) {
          int seen = 0;
          for_each_chunk_of_thread<T, kKMajor, kRows>(t, [&](int rr, int kk) {
            if (seen++ == i) {
              groups |= 1u << (layout(rr, kk, s) * int(sizeof(T)) / 16 % 8);
              ++threads;
            }
          });
        }
        bad += threads != 0 && __builtin_popcount(groups) != int(threads);
      }
  printf("%s: 16-byte chunks of 8 consecutive threads in distinct bank groups: problems %d\n", name, bad);
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
  // fp32 on TF32: 4-element chunks, 16-deep k-tiles; MN-major only for dx's W (and lora_A)
  bad += check_layout<float, KMajorSmem<float, kBM, kStages>, true, kBM, kStages>("fp32 K-major A/B stages");
  bad += check_layout<float, MNMajorSmem<float, kBN, kStages>, false, kBN, kStages>("fp32 MN-major B stages");
  bad += check_layout<float, MNMajorSmem<float, kBN, 1>, false, kBN, 1>("fp32 MN-major lora");
  bad += check_chunks<float, false, kBN>("fp32 MN-major 128-row chunks");
  bad += check_chunk_banks<float, false, kBN, MNMajorSmem<float, kBN, kStages>>("fp32 MN-major stages");
  bad += check_b_fragments<float, false, TiledMmaFor<float>, MNMajorSmem<float, kBN, kStages>>(
      "fp32 MN-major B stages -> TF32 fragments");
  bad += check_b_fragments<float, false, TiledMmaFor<float>, MNMajorSmem<float, kBN, 1>>(
      "fp32 MN-major lora -> TF32 fragments");

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
