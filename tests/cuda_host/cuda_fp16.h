// Stand-in for CUDA's fp16 header (tests only; see cuda_runtime.h here): the storage type and the
// exact conversions to fp32 and the packed max that csrc/replace_tokens_kernel.cu uses.
#pragma once

#include <math.h>
#include <stdint.h>

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu,
                 mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = ldexpf((float)mantissa, -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)  // inf, NaN
                                       : sign | ((exponent + 112u) << 23) | (mantissa << 13);
  return __uint_as_float(bits);
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half2 __hmax2(__half2 a, __half2 b) {
  return {{fe_host::max_bits(a.x.bits, __half2float(a.x), b.x.bits, __half2float(b.x))},
          {fe_host::max_bits(a.y.bits, __half2float(a.y), b.y.bits, __half2float(b.y))}};
}
