// Counter-based random numbers and Gumbel noise shared by the CPU and the CUDA replace_tokens op.
//
// What lives here: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
// as 1, 2, 3", SC'11; checked against the Random123 known-answer vectors in tests), the mapping
// of one 32-bit word to a uniform in (0, 1), the Gumbel noise g = -log(-log(1 - v)), a cheap
// upper bound of that noise, and the counter layout. Every function is __host__ __device__, so
// replace_tokens.cpp (CPU) and replace_tokens_kernel.cu (CUDA) run the same source.
//
// Counter layout. For logits of shape (N, V), element (row, col) has the flat index
// flat = row * V + col. Philox is keyed on (seed lo32, seed hi32) and run on the counter
// (group lo32, group hi32, offset lo32, offset hi32) with group = flat / 4; output word j is the
// random word of flat index 4 * group + j. Groups follow the flat index, not the column, so that
// a 16-byte vector of a contiguous logits tensor (4 fp32 or 8 bf16/fp16 values) always needs
// exactly 1 or 2 whole Philox calls, whatever the row length and its alignment.
//
// Bit-identical CPU and CUDA noise. The noise is built only from integer operations, integer to
// float conversion, and IEEE-754 float additions, subtractions, multiplications and divisions,
// each rounded once to nearest: on the device through __fadd_rn/__fsub_rn/__fmul_rn/__fdiv_rn/
// __uint2float_rn (explicitly rounded, never fused into an FMA and not changed by fast-math
// flags), on the host through plain operators compiled with -ffp-contract=off (setup.py and the
// JIT build pass it; clang also honours the pragma below). The logarithm is our own (range
// reduction to [sqrt(1/2), sqrt(2)) plus the atanh series), not the platform's logf, whose last
// bit differs between glibc and CUDA. All inputs and intermediates are normal floats, so
// flush-to-zero settings do not matter. Same bits in, same bits out, on both sides.
//
// Accuracy and range. v = fl(r * 2^-32 + 2^-33), capped at 1 - 2^-24, so v lies in
// [2^-33, 1 - 2^-24] and keeps 24-bit relative precision near 0, where the largest noise
// values (the ones that win an argmax over 30k columns) come from. log(1 - v) is computed
// with the exactly known rounding error of 1 - v, so the noise is accurate to a few ulps and
// lies in [-2.82, 22.9]: the tails beyond are cut, at probability 6e-8 below and 1e-10 above per
// draw (only the upper tail can decide a sample).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FE_HOST_DEVICE inline
#endif

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace fastelectra {

// ----------------------------------------------------------------------------- Philox4x32-10
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers (Salmon et al., table 2)
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments: golden ratio, sqrt(3) - 1
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxWords {
  uint32_t w[4];
};

// The high and low 32 bits of the 64-bit product a * b (32-bit multiplies on the device: a
// 64-bit multiply there is several instructions).
FE_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
#endif
}

FE_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key is bumped before rounds 2..10
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  PhiloxWords out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// The 4 random words of flat indices 4*group .. 4*group+3 (see the counter layout above).
FE_HOST_DEVICE PhiloxWords philox_group(uint64_t group, uint64_t seed, uint64_t offset) {
  return philox4x32_10((uint32_t)group, (uint32_t)(group >> 32), (uint32_t)offset,
                       (uint32_t)(offset >> 32), (uint32_t)seed, (uint32_t)(seed >> 32));
}

// ----------------------------------------------------------------------------- exact float ops
// Each is one IEEE-754 operation rounded to nearest even, identical on host and device.
FE_HOST_DEVICE float fe_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FE_HOST_DEVICE float fe_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FE_HOST_DEVICE float fe_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FE_HOST_DEVICE float fe_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FE_HOST_DEVICE float fe_u32_to_float(uint32_t r) {
#if defined(__CUDA_ARCH__)
  return __uint2float_rn(r);
#else
  return (float)r;
#endif
}
FE_HOST_DEVICE uint32_t fe_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  return b;
#endif
}
FE_HOST_DEVICE float fe_bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// ----------------------------------------------------------------------------- noise
// Constants are hex literals: exact, so every compiler (and the numpy reference in the tests)
// starts from the same bits.
constexpr float kOneBelow = 0x1.fffffep-1f;    // 1 - 2^-24, the largest float below 1
constexpr float kTwoPow32Inv = 0x1p-32f;       // 2^-32
constexpr float kTwoPow33Inv = 0x1p-33f;       // 2^-33
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;  // bit pattern of sqrt(1/2) rounded to float
constexpr float kLn2Hi = 0x1.62e4p-1f;         // 45426 / 2^16: ln 2 to 16 bits, so k * kLn2Hi is exact
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;      // ln 2 - kLn2Hi, rounded
constexpr float kAtanh3 = 0x1.555556p-1f;      // 2/3, 2/5, 2/7, 2/9 rounded:
constexpr float kAtanh5 = 0x1.99999ap-2f;      //   2 atanh(s) = 2s + s^3 (2/3 + s^2 (2/5 + ...))
constexpr float kAtanh7 = 0x1.24924ap-2f;
constexpr float kAtanh9 = 0x1.c71c72p-3f;

// Uniform in [2^-33, 1 - 2^-24] from one random word.
FE_HOST_DEVICE float uniform_open(uint32_t r) {
  const float v = fe_add(fe_mul(fe_u32_to_float(r), kTwoPow32Inv), kTwoPow33Inv);
  return v < kOneBelow ? v : kOneBelow;
}

// Natural log of a positive normal float, to a few ulps, from exact float operations only.
// x = 2^k * m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1) with
// |s| <= 0.1716, where the series truncated after s^9 is off by less than 1e-9.
FE_HOST_DEVICE float fe_log(float x) {
  const uint32_t ix = fe_float_bits(x);
  // (ix - bits(sqrt 1/2)) >> 23 is floor(log2(x / sqrt(1/2))) when read as a signed number; the
  // bias of 64 exponents keeps the unsigned shift valid for every x > 2^-64.
  const int32_t k = (int32_t)((ix - kSqrtHalfBits + (64u << 23)) >> 23) - 64;
  const float m = fe_bits_float(ix - ((uint32_t)k << 23));
  const float f = fe_sub(m, 1.0f);  // exact: m is within a factor 2 of 1
  const float s = fe_div(f, fe_add(2.0f, f));
  const float z = fe_mul(s, s);
  float p = fe_add(kAtanh7, fe_mul(z, kAtanh9));
  p = fe_add(kAtanh5, fe_mul(z, p));
  p = fe_add(kAtanh3, fe_mul(z, p));
  const float log_m = fe_add(fe_add(s, s), fe_mul(fe_mul(s, z), p));
  const float kf = (float)k;
  return fe_add(fe_mul(kf, kLn2Hi), fe_add(log_m, fe_mul(kf, kLn2Lo)));
}

// Gumbel(0, 1) noise g = -log(E), E = -log(1 - v) ~ Exponential(1), for v from uniform_open.
// w = fl(1 - v) and its rounding error c = (1 - w) - v are both computed exactly, so 1 - v = w + c
// and log(1 - v) = log(w) + log(1 + c / w) ~= log(w) + c / w keeps E accurate when v is tiny.
FE_HOST_DEVICE float gumbel_from_uniform(float v) {
  const float w = fe_sub(1.0f, v);
  const float c = fe_sub(fe_sub(1.0f, w), v);
  const float e = -fe_add(fe_log(w), fe_div(c, w));  // negation is exact
  return -fe_log(e);
}

// An upper bound of gumbel_from_uniform(v) that costs a conversion and a multiply-add: as
// E >= v, g <= -log v = -ln2 * log2 v, and log2 v >= bits(v) / 2^23 - 127 (the exponent plus the
// mantissa fraction, below log2 of 1 + fraction). The margin covers rounding on both sides.
// Only a filter: elements whose key cannot beat the running best skip the exact noise. It need
// not agree bit for bit between host and device, only hold on each.
constexpr float kBoundMargin = 0x1p-8f;  // 2^-8, far above the few-ulp error of the noise
FE_HOST_DEVICE float gumbel_upper_bound(float v) {
  const float log2_low = (float)fe_float_bits(v) * 0x1p-23f - 127.0f;
  return -0.693147182f * log2_low + kBoundMargin;  // -ln 2 * log2 v + margin
}

// The Gumbel noise of flat index `flat` (the reference path; kernels share one Philox call
// between 4 consecutive indices).
FE_HOST_DEVICE float gumbel_noise_at(uint64_t flat, uint64_t seed, uint64_t offset) {
  const PhiloxWords r = philox_group(flat >> 2, seed, offset);
  return gumbel_from_uniform(uniform_open(r.w[flat & 3]));
}

// Ordering of (key, column) candidates: the larger key wins, ties go to the smaller column, a
// NaN key never wins. Associative and commutative, so any traversal order gives the same argmax.
FE_HOST_DEVICE bool better_candidate(float key, int64_t col, float best_key, int64_t best_col) {
  return key > best_key || (key == best_key && col < best_col);
}

}  // namespace fastelectra
