// fp16/bf16 (and fp32 on TF32) forward and dx on the CuTe sm80 mainloop
// (cuda_sm80_mainloop.cuh: tiles, pipeline depth, synchronisation and bounds are argued
// there); on sm_90 devices fp16/bf16 take cuda_sm90.cu's TMA + wgmma kernel instead whenever
// TMA can load the operands (cuda_ops.cpp), so these serve Hopper only as the fallback. The
// LoRA terms are composition, not copies of the mainloop:
//
// Forward: y = round(acc(x·Wᵀ) + b + s·acc(round(xa)·Bᵀ)). xa comes from the pre-pass
// (sm80_xa in cuda_sm80_thin.cu, which hashes each dropout element once per 32-rank tile).
// The block first runs the rank-r product round(xa)·Bᵀ through one extra shared-memory
// stage (while the first kStages-1 k-tiles of x and W are already in flight), scales those fp32 accumulators by s, then
// runs the K pipeline of x·Wᵀ on top of them; bias and the single rounding in the
// epilogue, stored through shared memory with 16-byte stores.
//
// dx = round(acc(g·W) + s·acc(round(gb)·A) ⊙ keep/(1-p)): as a GEMM (M, K, N) with g
// K-major and W MN-major (ldmatrix.trans; fp32: 32-bit shared loads). The N pipeline of g·W
// runs first; for r ≤ 32 the same g tiles also feed gb = g·B (a 128×32 TallMma product over
// a third, 32-rank operand lora_Bᵀ staged with them: 8 KB more shared memory), so g is read
// by dB and dx only, not by a separate gb GEMM; the blocks of the first column tile write
// gb (fp32) for dA, the others compute the same values and drop them. Then g·W is parked in
// the drained pipeline stages (fp32, each thread its own accumulators: no barrier needed),
// the rank-r product
// round(gb)·A runs through the LoRA stage (round(gb) straight from the gb accumulators, or
// from the gb workspace when r > 32 and sm80_gb ran first), s and the mask multiply it, and
// g·W is added back before the single rounding. The mask is hashed once per element of dx,
// and with a keep-bit workspace (cuda_keep_bits.cuh) the block also writes its tile's keep
// bits for sm80_dA, which then hashes nothing: the backward hashes x once. Nothing
// rank-sized is ever rounded after scaling, so nothing overflows where PEFT's order would
// not. The extra MMA work is 32 of every 160 columns (r ≤ 32 padded to one rank tile) and
// is repeated by each of the K/128 column tiles; dx is bound by g's traffic at SAM's shapes.
//
// Rank: the LoRA stage is one k-tile deep (32 ranks for fp16/bf16, 16 for fp32) and loops
// for larger r, so one instantiation per dtype and kernel serves every rank.
//
// fp32 runs here on TF32 tensor cores when PyTorch allows TF32 matmuls (cuda_ops.cpp reads
// the flag per call): the same tiles in bytes (16-deep k-tiles of 4-element chunks), the
// operands rounded to TF32 as they leave shared memory (round_operands_to_tf32 in the
// mainloop), everything else fp32. dx reads W as stored, as for fp16/bf16: its MN-major
// stages go to registers by 32-bit shared-memory loads instead of ldmatrix.trans (the
// mainloop argues their swizzle and banks), so no transposed copy of W is made per
// backward. Its cp.async chunks of W run along K, so they need K % 4 == 0 (before, along N
// of a transposed copy): a layer with K % 4 != 0 loads W element by element, as fp16 does
// at K % 8 != 0. 6 kernels per architecture in all.
#include "cuda_common.cuh"
#include "cuda_keep_bits.cuh"
#include "cuda_sm80_mainloop.cuh"

namespace lora_fused {
namespace cuda {
namespace {

using namespace sm80;

template <class T>
struct ForwardParams80 {
  Operand<T> x;       // [M, K], K-major
  Operand<T> weight;  // [N, K], K-major
  const float* xa;    // [M, r] fp32 (the pre-pass)
  const T* lora_B;    // [N, r]
  const T* bias;      // [N] or nullptr
  T* y;               // [M, N]
  int64_t M, N, r;
  float scaling;
  bool vec_out;
};

template <class T>
struct DxParams80 {
  Operand<T> grad_y;  // [M, N], K-major (the reduction runs over N)
  Operand<T> weight;  // element (c, n): W[n * K + c], MN-major
  Operand<T> lora_B_t;  // [r, N], K-major, when dx computes gb itself (ptr nullptr otherwise)
  float* gb;          // [M, r] fp32: written here when lora_B_t.ptr, else read (sm80_gb's)
  const T* lora_A;    // [r, K]: element (c, j) at A[j * K + c], MN-major
  T* dx;              // [M, K]
  int64_t M, K, r;
  float scaling;
  DropoutSpec drop;
  uint32_t* keep_bits;  // with dropout: the keep-bit workspace [M][keep_ld] this kernel writes, or nullptr
  int64_t keep_ld;      // keep_words_per_row(K)
  bool vec_out;
};

// Shared memory: the pipeline stages of both operands, then the one-stage LoRA pair, then
// (dx: kGbStages) the pipeline stages of the fused gb's lora_Bᵀ operand; the epilogue's
// staging tile, and dx's parked fp32 g·W tile, reuse the start once the pipeline has drained.
template <class T, bool kBKMajor, bool kGbStages = false>
struct SmemPlan {
  using Block = BlockMma<T, kBKMajor>;
  static constexpr size_t a_off = 0;
  static constexpr size_t b_off = a_off + cosize_v<typename Block::LayoutA> * sizeof(T);
  static constexpr size_t lora_a_off = b_off + cosize_v<typename Block::LayoutB> * sizeof(T);
  static constexpr size_t lora_b_off = lora_a_off + cosize_v<typename Block::LayoutLoraA> * sizeof(T);
  static constexpr size_t gb_b_off = lora_b_off + cosize_v<typename Block::LayoutLoraB> * sizeof(T);
  static constexpr size_t end =
      gb_b_off + (kGbStages ? cosize_v<typename TallBlock<T>::LayoutB> * sizeof(T) : size_t{0});
  static constexpr size_t bytes = end > staging_bytes<T>() ? end : staging_bytes<T>();
  static constexpr size_t parked_bytes = size_t{kBM} * kBN * sizeof(float);  // dx's fp32 g·W
  static_assert(parked_bytes <= lora_a_off, "the parked g·W tile fits in the drained pipeline stages");
  static_assert(gb_b_off % 128 == 0, "stages stay 128-byte aligned");
  static_assert(bytes <= kMaxDynamicSmem, "shared-memory plan exceeds sm_86/sm_89's 99 KB per block");
  static_assert(lora_a_off % 128 == 0 && lora_b_off % 128 == 0, "stages stay 128-byte aligned");
  // fp16/bf16 dx's keep-bit tile (128 rows × 4 words) in the drained LoRA stage, past the
  // parked g·W and the staging tile, which both start at 0.
  static constexpr size_t keep_tile_off = lora_a_off;
  static_assert(sizeof(T) != 2 || (staging_bytes<T>() <= keep_tile_off &&
                                   keep_tile_off + kBM * keep_bits::kTileWords * 4 <= gb_b_off),
                "the keep-bit tile fits in the LoRA stage, past the staging tile");
};

// Everything a block needs to run MMAs over its shared memory: the TiledMMA, the
// shared-to-register copies, and the register fragments they fill.
template <class T, bool kBKMajor>
struct BlockState {
  using Block = BlockMma<T, kBKMajor>;
  using Plan = SmemPlan<T, kBKMajor>;  // offsets up to the LoRA pair are the same with kGbStages
  T* a_s;
  T* b_s;
  T* lora_a_s;
  T* lora_b_s;
  __device__ explicit BlockState(unsigned char* smem)
      : a_s(reinterpret_cast<T*>(smem + Plan::a_off)),
        b_s(reinterpret_cast<T*>(smem + Plan::b_off)),
        lora_a_s(reinterpret_cast<T*>(smem + Plan::lora_a_off)),
        lora_b_s(reinterpret_cast<T*>(smem + Plan::lora_b_off)) {}
};

// acc += round(R)·Lᵀ over r ranks through the one-stage LoRA pair, a k-tile of ranks at a
// time, shared by both kernels: `fill_lora_a(r0)` writes rows × ranks [r0, r0 + kBK) of the
// rank-r operand R (xa or gb), rounded to T unscaled; `fill_lora_b(r0)` the same ranks of L
// (lora_B or lora_A).
template <class T, bool kBKMajor, class FillLoraA, class FillLoraB, class Acc>
__device__ __forceinline__ void lora_product(const BlockState<T, kBKMajor>& st, Acc& acc, int64_t r,
                                             FillLoraA&& fill_lora_a, FillLoraB&& fill_lora_b) {
  using Block = BlockMma<T, kBKMajor>;
  for (int64_t r0 = 0; r0 < r; r0 += Block::kBK) {
    fill_lora_a(r0);
    fill_lora_b(r0);
    __syncthreads();
    Block::single_stage(acc, st.lora_a_s, st.lora_b_s);
    __syncthreads();  // before the next rank chunk overwrites the stage
  }
}

// fill_lora_a from an fp32 [M, r] workspace (xa, or gb from sm80_gb), rows from m0.
template <class T, bool kBKMajor>
struct RankRowsFromMemory {
  const BlockState<T, kBKMajor>& st;
  const float* rows;
  int64_t m0, M, r;
  __device__ void operator()(int64_t r0) const {
    constexpr int kBK = BlockMma<T, kBKMajor>::kBK;
    const typename BlockMma<T, kBKMajor>::LayoutLoraA layout_la;
    for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
      const int rr = e / kBK, j = e % kBK;
      const int64_t m = m0 + rr, rank = r0 + j;
      st.lora_a_s[layout_la(rr, j, 0)] = T((m < M && rank < r) ? rows[m * r + rank] : 0.f);
    }
  }
};

// Occupancy (ptxas -v, tests/test_cuda_ptxas.py). The forward holds 64 fp32 accumulators
// per thread; its fp16/bf16 sm_80 SASS fits in 128 registers without spilling, so two blocks
// share an SM (2 × 80 KB of shared memory within sm_80's 164 KB): one block's prologue, LoRA
// stage and epilogue overlap the other's main loop. sm_90a's ptxas spills 16 bytes at 128,
// the TF32 forward (cvt.rna on every operand fragment) spills 8 on sm_80, and dx (the
// MN-major W operand's shared-to-register partitions, the mask's index arithmetic, and since
// the fused gb its 16 more accumulators and their fragments) spills at 128 on both, so
// those keep one block per SM (forward 161-204 registers; dx 192-202 for fp16/bf16 with the
// keep-bit packing, 175-178 for TF32 without it; no spills).
// sm_86/sm_89 fit one 80 KB block per SM anyway.
template <class T>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kForwardBlocksPerSm = 1;
#else
constexpr int kForwardBlocksPerSm = sizeof(T) == 2 ? 2 : 1;
#endif

template <class T>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSm<T>) forward_kernel(ForwardParams80<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  using Block = BlockMma<T, true>;
  constexpr int kBK = Block::kBK;
  const BlockState<T, true> st(smem);
  const TileCoord tile = grouped_tile(blockIdx.x, ceil_div(p.M, kBM), ceil_div(p.N, kBN));
  const int64_t m0 = tile.m * kBM, n0 = tile.n * kBN;

  auto fill_lora_b = [&](int64_t r0) {  // lora_B, ranks [r0, r0 + kBK): K-major like W
    const typename Block::LayoutLoraB layout_lb;
    for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
      const int nn = e / kBK, j = e % kBK;
      const int64_t n = n0 + nn, rank = r0 + j;
      st.lora_b_s[layout_lb(nn, j, 0)] = (n < p.N && rank < p.r) ? p.lora_B[n * p.r + rank] : T(0.f);
    }
  };
  auto load = [&](int stage, int64_t k_tile) {
    load_stage<true, kBM>(st.a_s, typename Block::LayoutA{}, stage, p.x, m0, k_tile * kBK);
    load_stage<true, kBN>(st.b_s, typename Block::LayoutB{}, stage, p.weight, n0, k_tile * kBK);
  };

  typename Block::Mma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  // The rank-r product first, scaled by s, while the first k-tiles of x and W are in flight;
  // then x·Wᵀ accumulates on top.
  const int64_t k_tiles = ceil_div(p.x.depth, kBK);
  Block::prologue(k_tiles, load);
  clear(acc);
  lora_product(st, acc, p.r, RankRowsFromMemory<T, true>{st, p.xa, m0, p.M, p.r}, fill_lora_b);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) acc(i) *= p.scaling;
  Block::pipeline(acc, k_tiles, st.a_s, st.b_s, load);

  if (p.bias != nullptr) {
    Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int64_t n = n0 + get<1>(coords(i));
      if (n < p.N) acc(i) += static_cast<float>(p.bias[n]);
    }
  }
  store_tile(acc, thr_mma, reinterpret_cast<T*>(smem), p.y, p.N, m0, p.M, n0, p.N, p.vec_out);
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) dx_kernel(DxParams80<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr bool kWKMajor = false;  // W as stored: MN-major for every dtype
  using Block = BlockMma<T, kWKMajor>;
  using GbBlock = TallBlock<T>;  // gb = g·B: 128 rows × 32 ranks over the same g stages
  using Plan = SmemPlan<T, kWKMajor, true>;
  static_assert(std::is_same_v<typename GbBlock::LayoutA, typename Block::LayoutA>, "gb reads dx's g stages");
  constexpr int kBK = Block::kBK;
  const BlockState<T, kWKMajor> st(smem);
  T* const gb_b_s = reinterpret_cast<T*>(smem + Plan::gb_b_off);
  const TileCoord tile = grouped_tile(blockIdx.x, ceil_div(p.M, kBM), ceil_div(p.K, kBN));
  const int64_t m0 = tile.m * kBM, c0 = tile.n * kBN;  // rows of dx, columns of dx (x's K)
  const bool fused_gb = p.lora_B_t.ptr != nullptr;
  // Keep bits for fp16/bf16 only: fp32 (TF32) gets no workspace from cuda_ops.cpp and its dA
  // hashes the mask, so its instantiation carries none of the packing.
  constexpr bool kKeepBits = sizeof(T) == 2;

  auto load = [&](int stage, int64_t k_tile) {  // k runs over N
    load_stage<true, kBM>(st.a_s, typename Block::LayoutA{}, stage, p.grad_y, m0, k_tile * kBK);
    load_stage<kWKMajor, kBN>(st.b_s, typename Block::LayoutB{}, stage, p.weight, c0, k_tile * kBK);
    if (fused_gb) load_stage<true, kRankTile>(gb_b_s, typename GbBlock::LayoutB{}, stage, p.lora_B_t, 0, k_tile * kBK);
  };

  typename Block::Mma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  typename GbBlock::Mma gb_mma;
  Tensor gb_acc = partition_fragment_C(gb_mma, Shape<Int<kBM>, Int<kRankTile>>{});
  Tensor gb_coords = gb_mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kRankTile>>{}));
  clear(acc);
  clear(gb_acc);

  // g·W over N, and gb = g·B from the same stages.
  const int64_t k_tiles = ceil_div(p.grad_y.depth, kBK);
  Block::prologue(k_tiles, load);
  GbBlock::with_views(gb_acc, st.a_s, typename GbBlock::LayoutA{}, gb_b_s, typename GbBlock::LayoutB{},
                      [&](auto& gb_stage) {
                        Block::pipeline(acc, k_tiles, st.a_s, st.b_s, load, NoTransform{}, [&](int stage) {
                          if (fused_gb) gb_stage(stage);
                        });
                      });
  if (fused_gb && tile.n == 0) {  // one column tile's blocks write gb for dA
    CUTE_UNROLL
    for (int i = 0; i < size(gb_acc); ++i) {
      const int64_t m = m0 + get<0>(gb_coords(i)), j = get<1>(gb_coords(i));
      if (m < p.M && j < p.r) p.gb[m * p.r + j] = gb_acc(i);
    }
  }

  // Park g·W in the drained stages (each thread reads back only what it wrote).
  float* const parked = reinterpret_cast<float*>(smem);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) parked[i * kThreads + threadIdx.x] = acc(i);
  clear(acc);

  // The rank-r product round(gb)·A.
  auto fill_gb_from_registers = [&](int64_t r0) {  // this thread's gb accumulators of ranks [r0, r0 + kBK)
    const typename Block::LayoutLoraA layout_la;
    CUTE_UNROLL
    for (int i = 0; i < size(gb_acc); ++i) {
      const int rr = get<0>(gb_coords(i)), j = get<1>(gb_coords(i)) - static_cast<int>(r0);
      if (j >= 0 && j < kBK) st.lora_a_s[layout_la(rr, j, 0)] = T(gb_acc(i));
    }
  };
  const RankRowsFromMemory<T, kWKMajor> fill_gb_from_memory{st, p.gb, m0, p.M, p.r};
  auto fill_lora_a = [&](int64_t r0) {
    if (fused_gb) {
      fill_gb_from_registers(r0);
    } else {
      fill_gb_from_memory(r0);
    }
  };
  auto fill_lora_b = [&](int64_t r0) {  // lora_A, ranks [r0, r0 + kBK), in W's layout
    const typename Block::LayoutLoraB layout_lb;
    for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
      const int cc = e % kBN, j = e / kBN;  // consecutive threads read consecutive columns of A
      const int64_t c = c0 + cc, rank = r0 + j;
      st.lora_b_s[layout_lb(cc, j, 0)] = (c < p.K && rank < p.r) ? p.lora_A[rank * p.K + c] : T(0.f);
    }
  };
  lora_product(st, acc, p.r, fill_lora_a, fill_lora_b);

  // s·(gb·A) ⊙ keep/(1-p), the mask hashed once per element, plus g·W; each keep flag also
  // goes into this thread's compact keep bits (cuda_keep_bits.cuh: mma80_slot).
  Tensor coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  const float kept_factor = p.scaling * static_cast<float>(p.drop.scale);
  uint32_t compact[keep_bits::kMma80Regs] = {0u, 0u};
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    float factor = p.scaling;
    if (p.drop.enabled) {
      const int64_t m = m0 + get<0>(coords(i)), c = c0 + get<1>(coords(i));
      const bool kept =
          m < p.M && c < p.K && keep_element(p.drop.seed, p.drop.threshold, static_cast<uint64_t>(m * p.K + c));
      factor = kept ? kept_factor : 0.f;
      if constexpr (kKeepBits) {
        const keep_bits::Slot slot = keep_bits::mma80_slot(i);
        compact[slot.reg] |= uint32_t{kept} << slot.bit;
      }
    }
    acc(i) = acc(i) * factor + parked[i * kThreads + threadIdx.x];
  }
  // This warp's byte (n_w) of each word of the tile's keep bits, into the shared keep tile
  // (uniform condition: the whole warp shuffles or none of it).
  const bool write_keep_bits = kKeepBits && p.drop.enabled && p.keep_bits != nullptr;
  if constexpr (kKeepBits) {
    if (write_keep_bits) {
      uint32_t* const keep_tile = reinterpret_cast<uint32_t*>(smem + Plan::keep_tile_off);
      const int q = threadIdx.x & 3, byte = keep_bits::mma80_word_byte(get<1>(coords(0)));
      CUTE_UNROLL
      for (int reg = 0; reg < keep_bits::kMma80Regs; ++reg) {
        const uint32_t bytes = keep_bits::quad_transpose(compact[reg]);
        CUTE_UNROLL
        for (int g = 0; g < 4; ++g) {
          const int rr = get<0>(coords(keep_bits::mma80_first_value(reg, g)));
          reinterpret_cast<unsigned char*>(keep_tile + rr * keep_bits::kTileWords + q)[byte] =
              static_cast<unsigned char>(bytes >> (8 * g));
        }
      }
    }
  }
  __syncthreads();  // parked values read before staging overwrites them; the keep tile complete
  if constexpr (kKeepBits) {
    if (write_keep_bits) {  // 512 words, two per thread, each stored once
      const uint32_t* const keep_tile = reinterpret_cast<const uint32_t*>(smem + Plan::keep_tile_off);
      for (int w = threadIdx.x; w < kBM * keep_bits::kTileWords; w += kThreads) {
        const int64_t m = m0 + w / keep_bits::kTileWords, col = c0 + 32 * (w % keep_bits::kTileWords);
        if (m < p.M && col < p.K) {
          p.keep_bits[m * p.keep_ld + col / 32] = keep_bits::clip_to_columns(keep_tile[w], col, p.K);
        }
      }
    }
  }
  store_tile(acc, thr_mma, reinterpret_cast<T*>(smem), p.dx, p.K, m0, p.M, c0, p.K, p.vec_out);
}

static_assert(kRankTile == 32, "sm80_dx_computes_gb (cuda_kernels.h) fuses gb for one 32-rank tile");

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <class T>
cudaError_t forward_t(const ForwardArgs& a, cudaStream_t stream) {
  ForwardParams80<T> p;
  p.x = {static_cast<const T*>(a.x), a.ldx, a.M, a.K, vector_loadable<T>(a.x, a.ldx, a.K)};
  p.weight = {static_cast<const T*>(a.weight), a.K, a.N, a.K, vector_loadable<T>(a.weight, a.K, a.K)};
  p.xa = static_cast<const float*>(a.xa);
  p.lora_B = static_cast<const T*>(a.lora_B);
  p.bias = static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.M = a.M, p.N = a.N, p.r = a.r;
  p.scaling = static_cast<float>(a.scaling);
  p.vec_out = a.N % kChunkOf<T> == 0 && aligned16(a.y);
  const int64_t tiles = ceil_div(a.M, kBM) * ceil_div(a.N, kBN);
  return launch<forward_kernel<T>>(p, tiles, 1, SmemPlan<T, true>::bytes, stream, kThreads);
}

template <class T>
cudaError_t dx_t(const BackwardArgs& a, cudaStream_t stream) {
  DxParams80<T> p;
  p.grad_y = {static_cast<const T*>(a.grad_y), a.ldg, a.M, a.N, vector_loadable<T>(a.grad_y, a.ldg, a.N)};
  p.weight = {static_cast<const T*>(a.weight), a.K, a.K, a.N, vector_loadable<T>(a.weight, a.K, a.K)};
  p.lora_B_t = {nullptr, a.N, a.r, a.N, false};
  if (sm80_dx_computes_gb(a.r)) {
    const T* b_t = static_cast<const T*>(a.lora_B_t);
    if (b_t == nullptr) return cudaErrorInvalidValue;
    p.lora_B_t = {b_t, a.N, a.r, a.N, vector_loadable<T>(b_t, a.N, a.N)};
  }
  p.gb = static_cast<float*>(a.gb);
  p.lora_A = static_cast<const T*>(a.lora_A);
  p.dx = static_cast<T*>(a.dx);
  p.M = a.M, p.K = a.K, p.r = a.r;
  p.scaling = static_cast<float>(a.scaling);
  p.drop = a.dropout;
  p.keep_bits = static_cast<uint32_t*>(a.keep_bits);
  if (sizeof(T) != 2 && p.keep_bits != nullptr) return cudaErrorInvalidValue;  // dx_kernel<float> writes none
  p.keep_ld = keep_words_per_row(a.K);
  p.vec_out = a.K % kChunkOf<T> == 0 && aligned16(a.dx);
  const int64_t tiles = ceil_div(a.M, kBM) * ceil_div(a.K, kBN);
  return launch<dx_kernel<T>>(p, tiles, 1, SmemPlan<T, false, true>::bytes, stream, kThreads);
}

}  // namespace

cudaError_t sm80_forward(const ForwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return forward_t<cute::half_t>(a, stream);
    case DType::kBFloat16: return forward_t<cute::bfloat16_t>(a, stream);
    case DType::kFloat: return forward_t<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t sm80_dx(const BackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kHalf: return dx_t<cute::half_t>(a, stream);
    case DType::kBFloat16: return dx_t<cute::bfloat16_t>(a, stream);
    case DType::kFloat: return dx_t<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lora_fused
