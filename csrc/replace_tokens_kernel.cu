// CUDA kernel of ELECTRA's sampled-token replacement: one pass over the generator's logits.
//
// Fuses, per masked row of the (N, V) logits: the Gumbel-max sample
// argmax_c(logits[c] * (1/tau) + g_c) (fp32) with counter-based Philox noise g (philox.h), the row
// log-sum-exp of the logits (online, optional), the scatter of the sample into the copy of the
// original ids and the is-replaced label (sample != original). The logits are read once, in their
// own dtype (fp32/fp16/bf16), with 16-byte coalesced loads; nothing else of size N*V is touched.
//
// Layout: one warp per row (4 rows per 128-thread block, at most 80 registers so that 24 rows per
// SM are in flight: ELECTRA's ~2.5k masked rows fit one wave on an H100). Lane l reads the 16-byte
// vectors l, l+32, ... of the row, two (bf16/fp16) or four (fp32) per step, so one step covers
// 16 elements per lane. Vectors are aligned on the flat index row*V + col (the Philox counter
// layout of philox.h), so each vector needs exactly 1 (fp32) or 2 (16-bit) Philox calls; a row
// that does not start or end on a vector boundary has its 1-2 edge vectors read element by element.
// A logits pointer that is not 16-byte aligned selects the element-by-element path throughout.
//
// Cheap filter: the exact noise (two logarithms) is computed only for elements whose key could
// still win. For each element, key_ub = logits*(1/tau) + gumbel_upper_bound(u) >= key; elements
// with key_ub below the warp's best exact key so far (shared by a shuffle every step) cannot be
// the argmax and are skipped. That leaves Philox, a conversion and a compare per element, and
// changes no result: the winner is the lexicographic max of (exact key, -column), which does not
// depend on the order elements are visited, so CPU and CUDA agree bit for bit.
//
// Seed from device memory: the Philox key is an int64 that every thread loads from the (1,) seed
// tensor (one broadcast read per warp, cached), so the host never reads it and a CUDA graph that
// captured a launch keys each replay with the value the seed tensor holds at that replay.
//
// Errors without a host sync: the host checks dtypes, shapes and devices; the data-dependent
// checks run here. A row whose masked position lies outside input_ids, or whose original id lies
// outside [0, V), writes nothing into ids/labels and reports sampled[row] = -1 (a valid sample is
// never negative). Nothing is read or written out of bounds.
//
// Limits: V < 2^31; rows are spread one per warp, so below ~1000 rows the GPU is under-filled.
// NaN logits never win (a row of NaN samples column 0); their lse is NaN.
// References: Gumbel-max trick (Gumbel 1954; Maddison et al. 2014, "A* sampling"); online softmax
// normaliser (Milakov & Gimelshein 2018); ELECTRA (Clark et al. 2020) for the replacement step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "philox.h"
#include "replace_tokens_cuda.h"

namespace fastelectra {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4;  // one warp per row
constexpr int kMinBlocksPerSM = 6;  // caps registers at 80 (65536 / (6 * 128)); no spills on sm_90
constexpr int kVectorBytes = 16;  // one 128-bit load per lane
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;  // 1 / ln 2
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Exact Gumbel key of one element; kept out of line because it runs only for filter survivors.
__device__ __noinline__ float exact_key(float scaled_logit, float u) {
  return fe_add(scaled_logit, gumbel_from_uniform(u));
}

// Running state of one lane over its part of a row.
struct LaneState {
  float best_key;  // exact key of the best candidate so far (-inf: none)
  int best_col;    // its column (vocab: none)
  float max;       // online log-sum-exp: running max of the logits
  float sum;       //   and sum of exp(logit - max)
};

// Folds VEC logits (flat indices vec*VEC ..) into the lane state. kAllValid: the whole vector lies
// in the row; else `first`/`last` bound the valid flat indices (edge vectors, tiny rows).
template <int VEC, bool kNoise, bool kLse, bool kAllValid>
__device__ __forceinline__ void fold_vector(const float (&x)[VEC], int64_t vec, int64_t row_begin,
                                            int64_t row_end, float inv_tau, uint64_t seed, uint64_t offset,
                                            float threshold, LaneState& st) {
  const int64_t flat0 = vec * VEC;
  bool valid[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) valid[e] = kAllValid || (flat0 + e >= row_begin && flat0 + e < row_end);
  const int col0 = (int)(flat0 - row_begin);  // may be negative for an edge vector; then invalid

  if (kLse) {
    float vmax = -kInf;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (valid[e]) vmax = fmaxf(vmax, x[e]);  // fmaxf ignores NaN; NaN reaches the sum instead
    if (vmax > st.max) {
      st.sum *= exp2f((st.max - vmax) * kLog2e);  // exp(-inf) = 0 for the first finite max
      st.max = vmax;
    }
    const float shift = st.max == -kInf ? 0.0f : st.max * kLog2e;  // all -inf so far: terms are 0
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (valid[e]) st.sum += exp2f(fmaf(x[e], kLog2e, -shift));
  }

  if (kNoise) {
    PhiloxWords r[VEC / 4];
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) r[q] = philox_group((uint64_t)(flat0 / 4 + q), seed, offset);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (!valid[e]) continue;
      const float xs = fe_mul(x[e], inv_tau);
      const float u = uniform_open(r[e / 4].w[e % 4]);
      if (xs + gumbel_upper_bound(u) >= fmaxf(threshold, st.best_key)) {  // rare after a few steps
        const float key = exact_key(xs, u);
        if (better_candidate(key, col0 + e, st.best_key, st.best_col)) {
          st.best_key = key;
          st.best_col = col0 + e;
        }
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      if (valid[e] && better_candidate(x[e], col0 + e, st.best_key, st.best_col)) {
        st.best_key = x[e];
        st.best_col = col0 + e;
      }
  }
}

template <typename T, bool kVectorLoads, bool kNoise, bool kLse>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize, kMinBlocksPerSM)
replace_tokens_kernel(const T* __restrict__ Logits,         // (n_rows, vocab) contiguous
                      int64_t n_rows,
                      int64_t vocab,
                      const int64_t* __restrict__ InputIds,   // (numel_ids,)
                      int64_t numel_ids,
                      const int64_t* __restrict__ Positions,  // (n_rows,)
                      int64_t* __restrict__ OutIds,           // (numel_ids,)
                      bool* __restrict__ Labels,              // (numel_ids,)
                      int64_t* __restrict__ Sampled,          // (n_rows,)
                      float* __restrict__ Lse,                // (n_rows,) when kLse
                      float inv_tau,
                      const int64_t* __restrict__ Seed,       // (1,) Philox key
                      uint64_t offset) {
  constexpr int VEC = kVectorBytes / sizeof(T);  // 4 fp32 or 8 fp16/bf16 per vector
  constexpr int UNROLL = 16 / VEC;               // vectors per lane per step: 16 elements
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n_rows) return;  // whole warp
  const uint64_t seed = kNoise ? (uint64_t)__ldg(Seed) : 0;  // argmax (tau = 0) needs no key

  const int64_t row_begin = row * vocab, row_end = row_begin + vocab;  // flat range of the row
  const int64_t vec_begin = row_begin / VEC, vec_end = (row_end + VEC - 1) / VEC;
  LaneState st{-kInf, (int)vocab, -kInf, 0.0f};
  float threshold = -kInf;  // best exact key of the warp at the last step

  for (int64_t step = vec_begin; step < vec_end; step += UNROLL * kWarpSize) {  // warp-uniform
    uint4 raw[UNROLL];
    bool full[UNROLL];
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) {  // issue all loads of the step first
      const int64_t vec = step + k * kWarpSize + lane;
      full[k] = kVectorLoads && vec < vec_end && vec * VEC >= row_begin && vec * VEC + VEC <= row_end;
      if (full[k]) raw[k] = __ldcs(reinterpret_cast<const uint4*>(Logits) + vec);  // streamed once
    }
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) {
      const int64_t vec = step + k * kWarpSize + lane;
      float x[VEC];
      if (full[k]) {
        const T* vals = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = to_float(vals[e]);
        fold_vector<VEC, kNoise, kLse, true>(x, vec, row_begin, row_end, inv_tau, seed, offset, threshold, st);
      } else if (vec < vec_end) {  // edge vector (or unaligned logits): element by element
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int64_t flat = vec * VEC + e;
          x[e] = (flat >= row_begin && flat < row_end) ? to_float(Logits[flat]) : 0.0f;
        }
        fold_vector<VEC, kNoise, kLse, false>(x, vec, row_begin, row_end, inv_tau, seed, offset, threshold, st);
      }
    }
    if (kNoise) {  // share the best key so far: a tighter filter for the whole warp
      float t = st.best_key;
#pragma unroll
      for (int d = kWarpSize / 2; d > 0; d /= 2) t = fmaxf(t, __shfl_xor_sync(kFullWarp, t, d));
      threshold = t;
    }
  }

  // Warp reduction of (best key, column) and of the (max, sum) pairs; every lane ends with the result.
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) {
    const float key = __shfl_xor_sync(kFullWarp, st.best_key, d);
    const int col = __shfl_xor_sync(kFullWarp, st.best_col, d);
    if (better_candidate(key, col, st.best_key, st.best_col)) {
      st.best_key = key;
      st.best_col = col;
    }
    if (kLse) {
      const float m = __shfl_xor_sync(kFullWarp, st.max, d);
      const float s = __shfl_xor_sync(kFullWarp, st.sum, d);
      const float new_max = fmaxf(st.max, m);
      const float a = st.max == new_max ? 1.0f : exp2f((st.max - new_max) * kLog2e);
      const float b = m == new_max ? 1.0f : exp2f((m - new_max) * kLog2e);
      st.sum = st.sum * a + s * b;
      st.max = new_max;
    }
  }
  if (lane != 0) return;

  if (kLse) {
    float out;
    if (st.max == kInf) out = kInf;
    else if (st.max == -kInf) out = st.sum != st.sum ? st.sum : -kInf;  // all -inf (or NaN)
    else out = st.max + logf(st.sum);
    Lse[row] = out;
  }
  const int64_t sample = st.best_col < vocab ? st.best_col : 0;  // none found: a row of NaN
  const int64_t pos = Positions[row];
  bool ok = pos >= 0 && pos < numel_ids;
  const int64_t original = ok ? InputIds[pos] : 0;
  ok = ok && original >= 0 && original < vocab;
  Sampled[row] = ok ? sample : -1;
  if (ok) {
    OutIds[pos] = sample;
    Labels[pos] = sample != original;
  }
}

__global__ void gumbel_noise_kernel(float* __restrict__ Out,            // (total,) = (n_rows * vocab,)
                                    int64_t total,
                                    const int64_t* __restrict__ Seed,  // (1,) Philox key
                                    uint64_t offset) {
  const uint64_t seed = (uint64_t)__ldg(Seed);
  const int64_t groups = (total + 3) / 4;
  for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups;
       g += (int64_t)gridDim.x * blockDim.x) {
    const PhiloxWords r = philox_group((uint64_t)g, seed, offset);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (g * 4 + j < total) Out[g * 4 + j] = gumbel_from_uniform(uniform_open(r.w[j]));
  }
}

template <typename T, bool kVectorLoads, bool kNoise, bool kLse>
cudaError_t launch_typed(const ReplaceTokensLaunch& a, cudaStream_t stream) {
  const int64_t blocks = (a.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  replace_tokens_kernel<T, kVectorLoads, kNoise, kLse><<<(unsigned)blocks, kRowsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const T*>(a.logits), a.n_rows, a.vocab, a.input_ids, a.numel_ids, a.positions, a.out_ids,
      a.labels, a.sampled, a.lse, a.inv_tau, a.seed, a.offset);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const ReplaceTokensLaunch& a, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(a.logits) % kVectorBytes == 0;
  const bool lse = a.lse != nullptr;
  const int variant = (aligned ? 4 : 0) | (a.noise ? 2 : 0) | (lse ? 1 : 0);
  switch (variant) {
    case 7: return launch_typed<T, true, true, true>(a, stream);
    case 6: return launch_typed<T, true, true, false>(a, stream);
    case 5: return launch_typed<T, true, false, true>(a, stream);
    case 4: return launch_typed<T, true, false, false>(a, stream);
    case 3: return launch_typed<T, false, true, true>(a, stream);
    case 2: return launch_typed<T, false, true, false>(a, stream);
    case 1: return launch_typed<T, false, false, true>(a, stream);
    default: return launch_typed<T, false, false, false>(a, stream);
  }
}

}  // namespace

cudaError_t launch_replace_tokens(const ReplaceTokensLaunch& args, cudaStream_t stream) {
  if (args.n_rows <= 0) return cudaSuccess;
  switch (args.dtype) {
    case LogitsDtype::kFloat32: return launch_dtype<float>(args, stream);
    case LogitsDtype::kFloat16: return launch_dtype<__half>(args, stream);
    case LogitsDtype::kBFloat16: return launch_dtype<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gumbel_noise(float* out, int64_t n_rows, int64_t vocab, const int64_t* seed, uint64_t offset,
                                cudaStream_t stream) {
  const int64_t total = n_rows * vocab;
  if (total <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t groups = (total + 3) / 4;
  const int64_t blocks = (groups + threads - 1) / threads;
  gumbel_noise_kernel<<<(unsigned)(blocks < 65535 * 16 ? blocks : 65535 * 16), threads, 0, stream>>>(
      out, total, seed, offset);
  return cudaGetLastError();
}

}  // namespace fastelectra
