// Philox4x32-10 (Salmon et al., SC'11): the counter-based random stream shared by every espo backend.
//
// This is the function defined in espo/ops/philox.py (and kernels/philox.py for Triton), bit for bit:
//
//     key     = (seed & 0xFFFFFFFF, seed >> 32)                  seed read as an unsigned 64-bit integer
//     counter = (offset & 0xFFFFFFFF, offset >> 32, stream, 0)   stream 0 is the sampling draw
//     u       = (philox(key, counter)[0] >> 8) * 2**-24          a float32 uniform in [0, 1)
//
// Plain C++ with no CUDA or torch dependency: it compiles for the device under nvcc and for the host
// under any C++11 compiler (tests/test_cuda_host.py checks the host build against espo.philox.uniform).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define ESPO_HD __host__ __device__ __forceinline__
#else
#define ESPO_HD inline
#endif

namespace espo {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr uint32_t kSampleStream = 0;

ESPO_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t v[4];
};

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1); returns the four output words.
ESPO_HD Philox4 philox4x32(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kPhiloxRounds; ++i) {
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out = {{c0, c1, c2, c3}};
  return out;
}

// The float32 uniform in [0, 1) of one row's draw: keyed by its 64-bit seed, counted by its 64-bit offset.
ESPO_HD float philox_uniform(int64_t seed, int64_t offset, uint32_t stream = kSampleStream) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(offset);
  const Philox4 r = philox4x32(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(o),
                               static_cast<uint32_t>(o >> 32), stream, 0u);
  // (r0 >> 8) < 2**24 is exact in float32, and so is the product by a power of two.
  return static_cast<float>(r.v[0] >> 8) * 5.9604644775390625e-08f;
}

}  // namespace espo
