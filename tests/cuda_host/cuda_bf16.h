// Stand-in for CUDA's bf16 header (tests only; see cuda_runtime.h here): the storage types, the exact
// conversions to fp32 (the upper half of an fp32) and the packed max that csrc/replace_tokens_kernel.cu
// uses.
#pragma once

#include <stdint.h>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.bits << 16); }
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat162 __hmax2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {{fe_host::max_bits(a.x.bits, __bfloat162float(a.x), b.x.bits, __bfloat162float(b.x))},
          {fe_host::max_bits(a.y.bits, __bfloat162float(a.y), b.y.bits, __bfloat162float(b.y))}};
}
