// Stand-in for CUDA's bf16 header (tests only; see cuda_runtime.h here): the storage type and its
// exact conversion to fp32 (the upper half of an fp32).
#pragma once

#include <stdint.h>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.bits << 16); }
