// Counter-based random numbers and Gumbel noise shared by the CPU and the CUDA replace_tokens op.
//
// What lives here: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
// as 1, 2, 3", SC'11; checked against the Random123 known-answer vectors in tests), the mapping
// of one 32-bit word to a uniform in (0, 1), the Gumbel noise g = -log(-log(1 - v)), the cheap
// test that lets both implementations skip the noise of elements that cannot win, and the counter
// layout. Every function is __host__ __device__, so replace_tokens.cpp (CPU) and
// replace_tokens_kernel.cu (CUDA) run the same source.
//
// Noise layout: an exponential race per octet. For logits of shape (N, V), element (row, col) has
// the flat index flat = row * V + col; eight consecutive flat indices form an octet, o = flat / 8, in
// which the element sits at position j = flat % 8. Its noise is g = -log(E), E ~ Exponential(1), and
// the eight E of an octet are drawn smallest first:
//   E_min = E0 / 8, E0 from the octet's min word: the minimum of 8 Exponential(1) is Exponential(8);
//   J = the top 3 bits of fine word 7: the position that holds E_min, uniform over the 8;
//   every other position j: E = E_min + E' with E' from fine word j (j < J) or j - 1 (j > J): given the
//   minimum, the others exceed it by independent Exponential(1) (memorylessness).
// So the eight E are independent Exponential(1) and the g independent Gumbel(0, 1), as if each came
// from its own word, and no element of an octet has noise above -log(E_min). The filter below needs
// only that bound, hence only the min word: the fine words are made for the few octets whose elements
// may still win.
// Words come from Philox4x32-10 keyed on (seed lo32, seed hi32), counter (c0, c1, offset lo32, offset hi32):
//   - the min word of an octet whose 8 elements lie in one row (a whole octet): q = o - ceil(row V / 8),
//     its index among the row's whole octets; call (row, (q >> 7) << 5 | q % 32), word (q >> 5) % 4. One
//     call serves the row's octets q, q + 32, q + 64 and q + 96, which one lane of the CUDA kernel reads
//     in two steps;
//   - the min word of any other octet (one that spans two rows or the end of the logits): word 0 of the
//     edge call (o lo32, o hi32 | 2^30);
//   - fine words 0-3 and 4-7: calls (o lo32, o hi32 | 2^31) and (o lo32, o hi32 | 2^31 | 2^30).
// The counters never meet: (q >> 7) << 5 | q % 32 < 2^26 as V < 2^31, and o hi32 < 2^28 as o < 2^60.
// Rows are below 2^32 (checked by the ops). Octets follow the flat index, not the column, so a 16-byte
// vector of a contiguous logits tensor always lies in one octet, whatever the row length and alignment.
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
// Accuracy and range. A word r gives v = fl(r * 2^-32 + 2^-33), capped at 1 - 2^-24, so v lies in
// [2^-33, 1 - 2^-24] and keeps 24-bit relative precision near 0, and E = -log(1 - v), computed with the
// exactly known rounding error of 1 - v, is accurate to a few ulps where it is small: there the largest
// noise values (the ones that win an argmax over 30k columns) come from. E_min = E / 8 lies in
// [2^-36, 2.08] and every other E in [E_min, 18.7], so the noise lies in [-2.93, 24.95]: the tails
// beyond are cut, at probability 6e-8 below per element and 1.2e-10 above per octet (only the upper
// tail can decide a sample).
#pragma once

#include <math.h>
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

// Philox4x32-10 of N counters that share the key and the upper counter half (c2, c3): the rounds
// are interleaved, so the key schedule is computed once per round for all N, the first round's
// multiply of the shared c2 once, and the N dependency chains give the device independent work.
template <int N>
FE_HOST_DEVICE void philox4x32_10_many(const uint32_t (&c0_in)[N], const uint32_t (&c1_in)[N], uint32_t c2_in,
                                       uint32_t c3_in, uint32_t k0, uint32_t k1, PhiloxWords (&out)[N]) {
  uint32_t c0[N], c1[N], c2[N], c3[N];
  for (int i = 0; i < N; ++i) {
    c0[i] = c0_in[i];
    c1[i] = c1_in[i];
    c2[i] = c2_in;
    c3[i] = c3_in;
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key is bumped before rounds 2..10
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < N; ++i) {
      uint32_t hi0, hi1;
      const uint32_t lo0 = mulhilo32(kPhiloxM0, c0[i], &hi0);
      const uint32_t lo1 = mulhilo32(kPhiloxM1, c2[i], &hi1);
      c0[i] = hi1 ^ c1[i] ^ k0;
      c1[i] = lo1;
      c2[i] = hi0 ^ c3[i] ^ k1;
      c3[i] = lo0;
    }
  }
  for (int i = 0; i < N; ++i) {
    out[i].w[0] = c0[i];
    out[i].w[1] = c1[i];
    out[i].w[2] = c2[i];
    out[i].w[3] = c3[i];
  }
}

// Streams in bit 30 and 31 of the counter's second word (see the noise layout above).
constexpr uint32_t kEdgeStream = 0x40000000u;   // the min word of an octet that is not whole in a row
constexpr uint32_t kFineStream = 0x80000000u;   // fine words 0-3
constexpr uint32_t kFineStream2 = 0xc0000000u;  // fine words 4-7
constexpr int kGroupOctets = 128;  // a row's min calls: one per 4 of each 128 whole octets, stride 32

FE_HOST_DEVICE void philox_call(uint32_t c0, uint32_t c1, uint64_t seed, uint64_t offset, PhiloxWords& out) {
  const uint32_t a[1] = {c0}, b[1] = {c1};
  PhiloxWords o[1];
  philox4x32_10_many<1>(a, b, (uint32_t)offset, (uint32_t)(offset >> 32), (uint32_t)seed, (uint32_t)(seed >> 32), o);
  out = o[0];
}

// The second counter word of the call of a row's min words that serves its whole octets q with
// q / 128 = block and q % 32 = lane (the first is the row): word k is the min word of whole octet
// q = 128 block + 32 k + lane.
FE_HOST_DEVICE uint32_t min_call_counter(uint32_t block, uint32_t lane) { return block << 5 | lane; }

FE_HOST_DEVICE PhiloxWords min_call(uint64_t row, uint32_t block, uint32_t lane, uint64_t seed, uint64_t offset) {
  PhiloxWords out;
  philox_call((uint32_t)row, min_call_counter(block, lane), seed, offset, out);
  return out;
}

// The second counter word of octet o's calls in `stream` (edge or fine).
FE_HOST_DEVICE uint32_t octet_counter_hi(uint64_t o, uint32_t stream) { return (uint32_t)(o >> 32) | stream; }

// Word k (0..3) of a Philox result; k known at compile time on the hot paths. Selects rather than an
// indexed read, which would put the words in local memory on the device.
FE_HOST_DEVICE uint32_t word_at(const PhiloxWords& p, int k) {
  return k < 2 ? (k == 0 ? p.w[0] : p.w[1]) : (k == 2 ? p.w[2] : p.w[3]);
}

// The min word of octet o, asked for by an element of the row with flat range [row_begin, row_end).
FE_HOST_DEVICE uint32_t octet_min_word(uint64_t o, uint64_t row, uint64_t row_begin, uint64_t row_end, uint64_t seed,
                                       uint64_t offset) {
  if (8 * o >= row_begin && 8 * o + 8 <= row_end) {  // whole in the row
    const uint64_t q = o - (row_begin + 7) / 8;
    return word_at(min_call(row, (uint32_t)(q / kGroupOctets), (uint32_t)(q % 32), seed, offset), (int)(q / 32 % 4));
  }
  PhiloxWords edge;
  philox_call((uint32_t)o, octet_counter_hi(o, kEdgeStream), seed, offset, edge);
  return edge.w[0];
}

// The two fine calls of octet o, run together: words 0-3 and 4-7.
FE_HOST_DEVICE void fine_calls(uint64_t o, uint64_t seed, uint64_t offset, PhiloxWords (&out)[2]) {
  const uint32_t lo[2] = {(uint32_t)o, (uint32_t)o};
  const uint32_t hi[2] = {octet_counter_hi(o, kFineStream), octet_counter_hi(o, kFineStream2)};
  philox4x32_10_many<2>(lo, hi, (uint32_t)offset, (uint32_t)(offset >> 32), (uint32_t)seed, (uint32_t)(seed >> 32),
                        out);
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

// E = -log(1 - v) ~ Exponential(1) from one random word, v = uniform_open(r). w = fl(1 - v) and its
// rounding error c = (1 - w) - v are both computed exactly, so 1 - v = w + c and
// log(1 - v) = log(w) + log(1 + c / w) ~= log(w) + c / w keeps E accurate when v is tiny.
FE_HOST_DEVICE float exponential_from_word(uint32_t r) {
  const float v = uniform_open(r);
  const float w = fe_sub(1.0f, v);
  const float c = fe_sub(fe_sub(1.0f, w), v);
  return -fe_add(fe_log(w), fe_div(c, w));  // negation is exact
}

// E_min of an octet from its min word: the minimum of its 8 exponentials (exact scaling by 1/8).
FE_HOST_DEVICE float octet_min_exponential(uint32_t min_word) {
  return fe_mul(exponential_from_word(min_word), 0.125f);
}

// The position J of an octet's minimum exponential, from its fine words 4-7 (the second fine call).
FE_HOST_DEVICE int octet_min_position(const PhiloxWords& fine_hi) { return (int)(fine_hi.w[3] >> 29); }

// The position J of octet o's minimum alone: the second fine call only.
FE_HOST_DEVICE int octet_min_position(uint64_t o, uint64_t seed, uint64_t offset) {
  PhiloxWords fine_hi;
  philox_call((uint32_t)o, octet_counter_hi(o, kFineStream2), seed, offset, fine_hi);
  return octet_min_position(fine_hi);
}

// The fine word of position j != J of an octet (j < J: word j, j > J: word j - 1).
FE_HOST_DEVICE uint32_t octet_fine_word(int j, int J, const PhiloxWords (&fine)[2]) {
  const int k = j < J ? j : j - 1;  // selects: no indexed read (see word_at)
  return k < 4 ? word_at(fine[0], k) : word_at(fine[1], k - 4);
}

// The exponential E = E_min + E' of a position other than the minimum's, E' from its fine word r.
FE_HOST_DEVICE float octet_other_exponential(float e_min, uint32_t r) {
  return fe_add(e_min, exponential_from_word(r));
}

// The exponential E of position j of an octet with minimum e_min and fine words `fine`.
FE_HOST_DEVICE float octet_exponential(int j, float e_min, const PhiloxWords (&fine)[2]) {
  const int J = octet_min_position(fine[1]);
  return j == J ? e_min : octet_other_exponential(e_min, octet_fine_word(j, J, fine));
}

// The Gumbel noise of an exponential: what every implementation adds to logit / tau (negation is exact).
FE_HOST_DEVICE float gumbel_from_exponential(float e) { return -fe_log(e); }

// The noise of the flat indices 8 o .. 8 o + 7 that lie below n_rows * vocab, into out[8 o ..]: the
// gumbel_noise ops (CPU and CUDA), one octet per call.
FE_HOST_DEVICE void octet_noise(float* out, uint64_t o, uint64_t n_rows, uint64_t vocab, uint64_t seed,
                                uint64_t offset) {
  const uint64_t total = n_rows * vocab, row = 8 * o / vocab;
  const float e_min =
      octet_min_exponential(octet_min_word(o, row, row * vocab, (row + 1) * vocab, seed, offset));
  PhiloxWords fine[2];
  fine_calls(o, seed, offset, fine);
  for (int j = 0; j < 8 && 8 * o + j < total; ++j)
    out[8 * o + j] = gumbel_from_exponential(octet_exponential(j, e_min, fine));
}

// ----------------------------------------------------------------------------- filter
// Most of a row cannot win the argmax, and the exact noise (fine words, logarithms) is by far the most
// expensive part of an element, so both implementations skip it where a cheap test proves that
// the element's key is below T, an exact key already found (or the warp's best: the CUDA kernel).
// The test needs neither a logarithm nor an int-to-float conversion, and of the random words only
// the octet's min word r:
//   key = y + g with y = logit/tau and g = -log(E) <= -log(E_min), E_min = E0 / 8 >= v / 8 (as
//   E0 = -log(1 - v) >= v, v = uniform_open(r)), so the element can reach T only if
//   v <= 8 exp(y - T) = exp(y - M) * 8 exp(M - T), M the running max of y.
// q = exp(y - M) is the term that the log-sum-exp adds anyway (for tau = 1), so the test costs a
// multiply-add and a compare: skip when  1 + v_low > 1 + 2^-22 + q * c,  c = 8 exp(M - T + margin),
// where v_low = (r >> 9) 2^-23 <= v (uniform_open's conversion and roundings are monotone and keep
// multiples of 2^-23 below r 2^-32), so 1 + v_low is exactly the float with bits 0x3f800000 | (r >> 9).
// (With probability 2^-23 r >> 9 is 0 and the test passes.) As every E of the octet is at least
// E_min, one test of the octet's largest y bounds all its elements' tests.
// An octet that passes makes its fine words and E_min; its minimum's element (position J) is keyed
// first, as it holds the octet's largest noise, and every other element passes a second test before
// its logarithms: E = E_min + E' >= E_min + v' (filter_may_win_above).
// Every rounding is covered by the margin (2^-5 in log space, against ~2^-8 of accumulated error)
// while |M| and |T| are at most 2^14; beyond that c is infinite and every element takes the exact
// path, so huge logits (and their ties) stay exact. T = -inf, a NaN or an infinite logit also give
// an infinite c or q, hence a NaN or infinite bound, which passes. An element whose q underflows
// to 0 lies more than 87 below M and loses to the element at M.
// The filter only ever skips elements that lose, so it changes no result, and it need not agree
// bit for bit between host and device (it does not: exp2 differs), only hold on each.
constexpr float kLog2e = 0x1.715476p+0f;        // 1 / ln 2
constexpr float kFilterMargin = 0x1p-5f;        // slack in log space (see above)
constexpr float kFilterRange = 0x1p14f;         // |M|, |T| up to which the margin covers rounding
constexpr float kOnePlusFilterUlp = 0x1.000004p+0f;  // 1 + 2^-22: covers the rounding of 1 + q c

// 2^x for the filter: one MUFU.EX2 on the device (results below 2^-126 flush to 0). The host mirrors
// it inline, cheaper than a libm call per element: 2^x = 2^i 2^f, f in [0, 1), with 2^f from a
// degree-4 fit (relative error < 3e-6, far inside the filter's margin), 0 below 2^-126, +inf from
// 2^128, NaN kept.
FE_HOST_DEVICE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  if (!(x >= -126.0f)) return x != x ? x : 0.0f;
  if (x >= 128.0f) return __builtin_huge_valf();
  int i = (int)x;
  if ((float)i > x) --i;  // floor
  const float f = x - (float)i;
  const float p = 1.0000025f + f * (0.69300669f + f * (0.24142735f + f * (0.052037518f + f * 0.013520617f)));
  return p * fe_bits_float((uint32_t)(i + 127) << 23);
#endif
}

// c = 8 exp(M - T + margin) for the running max M of y and the best key T (infinite: test off).
FE_HOST_DEVICE float filter_scale(float m, float t) {
  if (!(fabsf(m) <= kFilterRange && fabsf(t) <= kFilterRange)) return __builtin_huge_valf();
  return fast_exp2((m - t + kFilterMargin) * kLog2e + 3.0f);  // 2^3 = 8
}

// False only if every element of an octet with min word r and, for its y, q = exp(y - M) provably loses
// (see above).
FE_HOST_DEVICE bool filter_may_win(uint32_t r, float q, float c) {
  const float one_plus_v_low = fe_bits_float(0x3f800000u | (r >> 9));  // 1 + (r >> 9) 2^-23
  return !(one_plus_v_low > q * c + kOnePlusFilterUlp);
}

// The second test, for an element j != J of an octet that passed the first: its exponential
// E = E_min + E' is at least e_low = E_min + v_low(r) for its fine word r (E' >= v >= v_low, and the
// rounded sums are monotone), so it can reach T only if e_low <= exp(y - T) = q c / 8. False only if the
// element provably loses; one add and a multiply-compare instead of its two logarithms.
FE_HOST_DEVICE bool filter_may_win_above(float e_min, uint32_t r, float q, float c) {
  const float v_low = fe_sub(fe_bits_float(0x3f800000u | (r >> 9)), 1.0f);  // exact
  return !(fe_add(e_min, v_low) > q * c * 0.125f);
}

// Ordering of (key, column) candidates: the larger key wins, ties go to the smaller column, a
// NaN key never wins. Associative and commutative, so any traversal order gives the same argmax.
FE_HOST_DEVICE bool better_candidate(float key, int64_t col, float best_key, int64_t best_col) {
  return key > best_key || (key == best_key && col < best_col);
}

}  // namespace fastelectra
