// The counter-based dropout hash of lora_fused/dropout.py, bit for bit, for host and device.
//
// Element (row, col) of an [M, K] input has idx = row * K + col; with the 32-bit words of
// idx and the low word of the seed:
//     key  = mix32(seed_lo ^ (hi32(idx) * 0x9E3779B9))
//     hash = mix32(mix32(lo32(idx) ^ key) + key)
// and the element is kept when (hash >> 8) >= threshold, threshold = round(p * 2^24).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif

namespace lora_fused {

struct DropoutSpec {
  bool enabled = false;     // p > 0
  uint32_t seed = 0;        // low 32 bits of the seed
  uint32_t threshold = 0;   // round(p * 2^24)
  double scale = 1.0;       // 1 / (1 - p)
};

LORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

LORA_HD uint32_t element_hash(uint32_t seed, uint64_t idx) {
  const uint32_t lo = static_cast<uint32_t>(idx);
  const uint32_t hi = static_cast<uint32_t>(idx >> 32);
  const uint32_t key = mix32(seed ^ (hi * 0x9E3779B9u));
  return mix32(mix32(lo ^ key) + key);
}

LORA_HD bool keep_element(uint32_t seed, uint32_t threshold, uint64_t idx) {
  return (element_hash(seed, idx) >> 8) >= threshold;
}

// Python's round() is round-half-to-even, which is nearbyint's default mode; p * 2^24 is exact.
inline DropoutSpec make_dropout_spec(double p, int64_t seed) {
  DropoutSpec spec;
  spec.enabled = p > 0.0;
  spec.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull);
  spec.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  spec.scale = spec.enabled ? 1.0 / (1.0 - p) : 1.0;
  return spec;
}

}  // namespace lora_fused
