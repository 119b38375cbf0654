// Host check of csrc/cuda_tma_operand.h: which operands the sm90 kernel may describe with
// TMA. Prints one line per failed expectation and exits 1 if any failed.
#include <cstdint>
#include <cstdio>

#include "cuda_tma_operand.h"

using lora_fused::cuda::TmaOperand;
using lora_fused::cuda::tma_operand_ok;

namespace {

int failures = 0;

void expect(bool want, const TmaOperand& o, const char* what) {
  if (tma_operand_ok(o) != want) {
    std::printf("FAIL %s: rows %lld depth %lld ld %lld %s -> %s, expected %s\n", what,
                static_cast<long long>(o.rows), static_cast<long long>(o.depth), static_cast<long long>(o.ld),
                o.k_major ? "K-major" : "MN-major", want ? "rejected" : "accepted", want ? "accepted" : "rejected");
    ++failures;
  }
}

}  // namespace

int main() {
  alignas(16) static unsigned char buffer[64];
  const void* base = buffer;
  const void* misaligned = buffer + 8;
  const int64_t big = int64_t{1} << 31;

  // Accepted: contiguous and padded rows, both majors, rank workspaces with padded rows.
  expect(true, {base, 4096, 768, 768, true, 2}, "contiguous x");
  expect(true, {base, 4096, 768, 1024, true, 2}, "x with padded rows (a column slice)");
  expect(true, {base, 300, 17, 24, true, 2}, "round(xa) [M, 17], rows padded to 24");
  expect(true, {base, 1, 8, 8, true, 2}, "one row, K = 8");
  expect(true, {base, 768, 2304, 768, false, 2}, "dx's W viewed [K, N]");
  expect(true, {base, 768, 16, 768, false, 2}, "dx's lora_A viewed [K, r]");
  expect(true, {base, big - 1, 8, 8, true, 2}, "rows just below 2^31");

  // Rejected: what TMA cannot encode or the kernel cannot index.
  expect(false, {nullptr, 16, 16, 16, true, 2}, "null base");
  expect(false, {misaligned, 16, 16, 16, true, 2}, "base 8 bytes past a 16-byte boundary");
  expect(false, {base, 300, 200, 0, true, 2}, "expanded x (row stride 0)");
  expect(false, {base, 300, 200, 8, true, 2}, "overlapping rows (0 < ld < K)");
  expect(false, {base, 200, 264, 8, false, 2}, "MN-major with ld < rows");
  expect(false, {base, 200, 264, 0, false, 2}, "MN-major expanded");
  expect(false, {base, 300, 20, 20, true, 2}, "row stride 40 bytes, not a multiple of 16");
  expect(false, {base, 300, 200, 204, true, 2}, "row stride 408 bytes");
  expect(false, {base, 0, 8, 8, true, 2}, "no rows");
  expect(false, {base, 8, 0, 8, true, 2}, "no depth");
  expect(false, {base, big, 8, 8, true, 2}, "rows = 2^31");
  expect(false, {base, 8, big, big, true, 2}, "depth = 2^31");
  expect(false, {base, 8, 8, int64_t{1} << 39, true, 2}, "row stride 2^40 bytes");
  expect(true, {base, 8, 8, (int64_t{1} << 39) - 8, true, 2}, "row stride just below 2^40 bytes");
  expect(false, {base, 8, 8, -8, true, 2}, "negative row stride");

  if (failures == 0) std::printf("tma_operand_ok: all expectations hold\n");
  return failures == 0 ? 0 : 1;
}
