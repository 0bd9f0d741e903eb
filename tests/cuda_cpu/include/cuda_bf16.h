// Fake <cuda_bf16.h> of the CPU emulation (tests/cuda_cpu): __nv_bfloat16 as its 16 bits.
#pragma once
#include "espo_emulate.h"

struct __nv_bfloat16 {
  unsigned short x;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t b = __float_as_uint(f);
  if (f != f) return __nv_bfloat16{static_cast<unsigned short>((b >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<unsigned short>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
