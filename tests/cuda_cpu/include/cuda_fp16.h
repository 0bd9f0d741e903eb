// Fake <cuda_fp16.h> of the CPU emulation (tests/cuda_cpu): __half as its 16 bits, exact conversions.
#pragma once
#include "espo_emulate.h"

struct __half {
  unsigned short x;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

// Every float16 is a float32: the conversion is exact.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu;
  const uint32_t man = h.x & 0x3ffu;
  if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2**-24
  const float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

// Round to nearest even, as __float2half_rn does.
inline __half __float2half_rn(float f) {
  const uint32_t b = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const float a = fabsf(f);
  if (a != a) return __half{static_cast<unsigned short>(sign | 0x7e00u)};
  if (a >= 65520.0f) return __half{static_cast<unsigned short>(sign | 0x7c00u)};
  if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2**-24
    const float q = nearbyintf(a * 16777216.0f);
    return __half{static_cast<unsigned short>(sign | static_cast<uint16_t>(q))};
  }
  uint32_t m = __float_as_uint(a);
  const uint32_t round = ((m >> 13) & 1u) + 0xfffu;
  m += round;
  const uint32_t exp = (m >> 23) - 112u;
  return __half{static_cast<unsigned short>(sign | (exp << 10) | ((m >> 13) & 0x3ffu))};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
