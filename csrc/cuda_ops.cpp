// CUDA implementation of the two ops: validation, outputs and workspaces from the caching
// allocator, the device guard and current stream, and the choice of kernels: fp16/bf16 on
// tensor cores through the CuTe sm80 mainloop (cuda_sm80.cu for the two large GEMMs,
// cuda_sm80_thin.cu for the rank-thin products), except that on a compute-capability-9.0
// device (H100/H200) of a build with sm_90a the two large GEMMs, forward and dx, run on the
// TMA + wgmma kernel (cuda_sm90.cu) whenever their operands meet TMA's alignment; fp32 on
// TF32 tensor cores (every product but dB|db, whose db must stay an exact fp32 sum) when
// PyTorch allows TF32 matmuls at the time of the call, exact fp32 SIMT otherwise; fp64 on SIMT
// (cuda_simt.cu).
// Dropout masks are hashed once per element in the forward (the xa pre-pass, r ≤ 32) and in
// the fp16/bf16 backward (dx's epilogue, which writes keep bits that dA reads) when dx is
// computed; otherwise, and on TF32 (whose dx writes none), dA hashes (once per 32-rank tile).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_kernels.h"

namespace lora_fused {
namespace {

// Grid limits: gridDim.y (and .z) is at most 65535. The SIMT kernels put one output
// dimension on gridDim.y in tiles of 64: N (forward), r (xa, gb), K (dx, dA) or r + 1
// (dB|db). The tensor-core kernels keep every large dimension on gridDim.x; only the tall
// rank-thin GEMMs (xa, gb) put the rank on gridDim.y, in tiles of 32 (the wide ones put the
// split-M slices there, at most 64).
constexpr int64_t kMaxGridY = 65535;

cuda::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    default: TORCH_CHECK(false, "lora_fused: unsupported dtype ", dtype);
  }
}

bool is_16bit(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// fp32 on TF32 tensor cores exactly when cuBLAS may use them for PyTorch's own fp32 matmuls:
// torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high" or
// "medium"), both of which allowTF32CuBLAS reports (torch 2.11 and 2.14 alike). Read per
// call, so the parity reference (the same-dtype PyTorch computation) runs under the same
// setting.
bool uses_tf32(at::ScalarType dtype) { return dtype == at::kFloat && at::globalContext().allowTF32CuBLAS(); }

void check_launch(cudaError_t err, const char* op, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel '", kernel, "' failed: ", cudaGetErrorString(err));
}

// The kernels read rows with any stride but need unit stride along them.
at::Tensor with_unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

// The leading dimension the kernels see: the row stride, or the row length for a single row
// (whose stride is arbitrary and would needlessly disable the 16-byte vector loads).
int64_t row_stride(const at::Tensor& t) {
  return t.size(0) <= 1 ? t.size(1) : t.stride(0);
}

// The sm90 (TMA + wgmma) kernel serves fp16/bf16 on sm_90 devices when the build has its
// sm_90a code; the operand checks are the launchers' (sm90_*_supported).
bool sm90_device(const at::Tensor& t) {
  if (!is_16bit(t.scalar_type()) || !cuda::sm90_kernels_built()) return false;
  int major = 0, minor = 0;
  const int device = t.device().index();
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, or the next launch check would report it
    return false;              // the sm80 kernels need no such query
  }
  return major == 9 && minor == 0;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A contiguous [rows, cols] parameter (lora_B [N, r], or the fused-gb dx's lora_Bᵀ [r, N]) as a
// TMA operand: itself when its row stride (cols elements) is a multiple of 16 bytes and its
// base 16-byte aligned, else a copy whose rows are padded to tma_rank_ld(cols) elements (the
// padding is never read: the descriptor's extent is cols).
std::pair<at::Tensor, int64_t> rank_rows_for_tma(const at::Tensor& contiguous) {
  const int64_t rows = contiguous.size(0), r = contiguous.size(1);
  if (aligned16(contiguous) && (r * contiguous.element_size()) % 16 == 0) return {contiguous, r};
  const int64_t ld = cuda::tma_rank_ld(r);
  // Poisoned: the padding is never read, and a descriptor that did read it would see NaN.
  at::Tensor padded = poison_(at::empty({rows, ld}, contiguous.options()));
  padded.narrow(1, 0, r).copy_(contiguous);
  return {padded, ld};
}

void check_grid_limits(const char* op, const Sizes& s, bool tensor_cores, bool simt) {
  if (tensor_cores) {
    TORCH_CHECK(s.r <= kMaxGridY * 32, op, ": rank r = ", s.r, " must be at most ", kMaxGridY * 32, " on CUDA");
  }
  if (!simt) return;
  constexpr int64_t kMax = kMaxGridY * 64;
  TORCH_CHECK(s.N <= kMax && s.K <= kMax && s.r + 1 <= kMax, op, ": N = ", s.N, ", K = ", s.K, " and r + 1 = ",
              s.r + 1, " must be at most ", kMax, " on CUDA for the SIMT kernels (fp64, fp32)");
}

std::tuple<at::Tensor, at::Tensor> fused_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, double scaling, double dropout_p,
                                                      const at::Tensor& seed) {
  const char* op = "lora_fused::fused_forward";
  const Sizes s = check_forward_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed);
  const auto dtype = x.scalar_type();
  const bool tensor_cores = is_16bit(dtype) || uses_tf32(dtype);
  check_grid_limits(op, s, tensor_cores, !tensor_cores);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = poison_(at::empty({s.M, s.N}, x.options()));
  at::Tensor xa = poison_(at::empty({s.M, s.r}, x.options().dtype(accumulator_type(dtype))));
  if (s.M == 0) return {y, xa};

  const at::Tensor x_k = with_unit_column_stride(x);
  const at::Tensor weight_c = weight.contiguous(), a_c = lora_A.contiguous(), b_c = lora_B.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();

  cuda::ForwardArgs args;
  args.dtype = kernel_dtype(dtype);
  args.x = x_k.data_ptr();
  args.ldx = row_stride(x_k);
  args.weight = weight_c.data_ptr();
  args.bias = has_bias ? bias_c.data_ptr() : nullptr;
  args.lora_A = a_c.data_ptr();
  args.lora_B = b_c.data_ptr();
  args.y = y.data_ptr();
  args.xa = xa.data_ptr();
  args.M = s.M, args.N = s.N, args.K = s.K, args.r = s.r;
  args.scaling = scaling;
  args.dropout = dropout_spec(dropout_p, seed);

  // Hopper: round(xa) also goes to a T-typed workspace with 16-byte rows for the TMA kernel,
  // which reads lora_B with such rows too (a padded copy when r·2 bytes is not a multiple).
  at::Tensor xa_rounded, lora_B_tma;
  bool sm90 = false;
  if (sm90_device(x)) {
    args.rank_ld = cuda::tma_rank_ld(s.r);
    xa_rounded = poison_(at::empty({s.M, args.rank_ld}, x.options()));
    std::tie(lora_B_tma, args.lora_B_tma_ld) = rank_rows_for_tma(b_c);
    args.xa_rounded = xa_rounded.data_ptr();
    args.lora_B_tma = lora_B_tma.data_ptr();
    sm90 = cuda::sm90_forward_supported(args);
    if (!sm90) args.xa_rounded = nullptr;  // x or W misaligned for TMA, or K = 0: the sm80 kernel
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // xa first, then the GEMM reads it. The pre-pass hashes each dropout element once per
  // rank tile (tensor cores: 32 ranks, so once for r <= 32; SIMT: 64).
  if (tensor_cores) {
    check_launch(cuda::sm80_xa(args, stream), op, "tensor-core xa = dropout(x)·lora_Aᵀ");
    if (sm90) {
      check_launch(cuda::sm90_forward(args, stream), op, "sm90 TMA + wgmma forward");
    } else {
      check_launch(cuda::sm80_forward(args, stream), op, "tensor-core forward");
    }
  } else {
    check_launch(cuda::simt_xa(args, stream), op, "xa = dropout(x)·lora_Aᵀ");
    check_launch(cuda::simt_forward(args, stream), op, "forward");
  }
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed,
    bool compute_dx, bool compute_db) {
  const char* op = "lora_fused::fused_backward";
  const Sizes s = check_backward_args(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed);
  const auto dtype = x.scalar_type();
  // fp16/bf16: every product on tensor cores; fp32 on TF32: every product but dB|db (exact
  // fp32 SIMT, see below); exact fp32 and fp64: SIMT.
  const bool tf32 = uses_tf32(dtype);  // read once: the dispatch below must see one setting
  const bool tensor_cores = is_16bit(dtype) || tf32;
  check_grid_limits(op, s, tensor_cores, !is_16bit(dtype));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_options = x.options().dtype(accumulator_type(dtype));
  at::Tensor dx = compute_dx ? poison_(at::empty({s.M, s.K}, grad_y.options())) : at::empty({0}, grad_y.options());
  at::Tensor db = poison_(at::empty({compute_db ? s.N : 0}, grad_y.options()));
  if (s.M == 0) {
    if (compute_db) db.zero_();
    return {dx, at::zeros_like(lora_A, at::MemoryFormat::Contiguous),
            at::zeros_like(lora_B, at::MemoryFormat::Contiguous), db};
  }
  at::Tensor dA = poison_(at::empty({s.r, s.K}, lora_A.options()));
  at::Tensor dB = poison_(at::empty({s.N, s.r}, lora_B.options()));

  const at::Tensor g_k = with_unit_column_stride(grad_y), x_k = with_unit_column_stride(x);
  const at::Tensor weight_c = weight.contiguous(), a_c = lora_A.contiguous(), b_c = lora_B.contiguous();
  const at::Tensor xa_c = xa.contiguous();
  at::Tensor gb = poison_(at::empty({s.M, s.r}, acc_options));
  at::Tensor partials = poison_(at::empty({cuda::backward_workspace_elems(s.M, s.N, s.K, s.r)}, acc_options));
  // The tensor-core operands: lora_B as a K-major [r, N] operand of gb = g·B (a copy of a
  // parameter, not an output: nothing to poison); round(xa)ᵀ / round(gb)ᵀ [r + 1, ld] in the
  // input dtype for dB|db and dA, in turn. dx reads W as stored, TF32 included.
  const at::Tensor b_t = tensor_cores ? lora_B.t().contiguous() : at::Tensor();
  at::Tensor rank_operand = tensor_cores
                                ? poison_(at::empty({(s.r + 1) * cuda::rank_operand_ld(s.M)}, x.options()))
                                : at::Tensor();

  cuda::BackwardArgs args;
  args.dtype = kernel_dtype(dtype);
  args.grad_y = g_k.data_ptr();
  args.ldg = row_stride(g_k);
  args.x = x_k.data_ptr();
  args.ldx = row_stride(x_k);
  args.weight = weight_c.data_ptr();
  args.lora_A = a_c.data_ptr();
  args.lora_B = b_c.data_ptr();
  args.lora_B_t = b_t.defined() ? b_t.data_ptr() : nullptr;
  args.xa = xa_c.data_ptr();
  args.dx = compute_dx ? dx.data_ptr() : nullptr;
  args.dA = dA.data_ptr();
  args.dB = dB.data_ptr();
  args.db = compute_db ? db.data_ptr() : nullptr;
  args.gb = gb.data_ptr();
  args.partials = partials.data_ptr();
  args.rank_operand = tensor_cores ? rank_operand.data_ptr() : nullptr;
  args.M = s.M, args.N = s.N, args.K = s.K, args.r = s.r;
  args.scaling = scaling;
  args.dropout = dropout_spec(dropout_p, seed);

  // Hopper: dx on the TMA kernel. For r <= 32 and K <= 1024 (sm90_dx_computes_gb) it computes
  // gb itself from its g tiles (reading lora_Bᵀ with 16-byte rows: b_t, or a padded copy when
  // N % 8 != 0) and writes the fp32 gb for dA; otherwise it reads round(gb) from a T-typed
  // workspace with 16-byte rows that the tall gb GEMM writes beside the fp32 gb.
  at::Tensor gb_rounded, a_tma, b_t_tma;
  bool sm90_dx = false;
  if (compute_dx && sm90_device(x)) {
    args.rank_ld = cuda::tma_rank_ld(s.r);
    if (cuda::sm90_dx_computes_gb(s.r, s.K)) {
      std::tie(b_t_tma, args.lora_B_t_tma_ld) = rank_rows_for_tma(b_t);
      args.lora_B_t_tma = b_t_tma.data_ptr();
    } else {
      gb_rounded = poison_(at::empty({s.M, args.rank_ld}, x.options()));
      args.gb_rounded = gb_rounded.data_ptr();
    }
    a_tma = aligned16(a_c) ? a_c : a_c.clone();  // lora_A [r, K] viewed [K, r]: needs an aligned base
    args.lora_A = a_tma.data_ptr();
    sm90_dx = cuda::sm90_dx_supported(args);
    if (!sm90_dx) args.gb_rounded = nullptr;  // g or W misaligned for TMA (K % 8, ldg % 8), or N = 0
  }

  // Dropout with dx on fp16/bf16: the mask is hashed once, by the dx kernel (sm80 or sm90),
  // which writes it as keep bits [M][ceil(K/32)] (cuda_keep_bits.cuh) that sm80_dA reads
  // instead of hashing again; dx runs before dA on every path below. Poisoned like every
  // workspace: all ones ("keep everything"), so a word dx failed to write changes dA (the GPU
  // tests compare it bitwise with dA hashing). Without dx, or on TF32/SIMT (whose dA hashes),
  // there is none.
  at::Tensor keep_bits;
  if (is_16bit(dtype) && compute_dx && args.dropout.enabled && s.K > 0) {
    keep_bits = poison_(at::empty({s.M, cuda::keep_words_per_row(s.K)}, x.options().dtype(at::kInt)));
    args.keep_bits = keep_bits.data_ptr();
  }

  // gb before dA (and before dx, unless dx computes gb itself from the g tiles it streams:
  // r <= 32 on the sm80 kernel, also K <= 1024 on the sm90 one). dB|db and dA share the
  // partial-sum and rank-operand workspaces; the stream orders them. dx before dA on every path: dA reads
  // dx's gb (when dx computes it) and its keep bits.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (tensor_cores) {
    const bool gb_in_dx = compute_dx && s.K > 0 &&  // K = 0: no dx blocks
                          (sm90_dx ? cuda::sm90_dx_computes_gb(s.r, s.K) : cuda::sm80_dx_computes_gb(s.r));
    if (!gb_in_dx) check_launch(cuda::sm80_gb(args, stream), op, "tensor-core gb = grad_y·lora_B");
    // TF32: dB|db stays exact fp32 (SIMT): db = Σ g would otherwise sum g rounded to TF32 as an
    // MMA operand, where nn.Linear's bias gradient is an exact fp32 sum.
    if (tf32) {
      check_launch(cuda::simt_dB_db(args, stream), op, "dB, db");
    } else {
      check_launch(cuda::sm80_dB_db(args, stream), op, "tensor-core dB, db");
    }
    if (sm90_dx) {
      check_launch(cuda::sm90_dx(args, stream), op, gb_in_dx ? "sm90 TMA + wgmma dx and gb" : "sm90 TMA + wgmma dx");
    } else if (compute_dx) {
      check_launch(cuda::sm80_dx(args, stream), op, gb_in_dx ? "tensor-core dx and gb" : "tensor-core dx");
    }
    check_launch(cuda::sm80_dA(args, stream), op, "tensor-core dA");
  } else {
    check_launch(cuda::simt_gb(args, stream), op, "gb = grad_y·lora_B");
    check_launch(cuda::simt_dB_db(args, stream), op, "dB, db");
    if (compute_dx) check_launch(cuda::simt_dx(args, stream), op, "dx");
    check_launch(cuda::simt_dA(args, stream), op, "dA");
  }
  return {dx, dA, dB, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) {
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("fused_backward", &fused_backward_cuda);
}

}  // namespace lora_fused
