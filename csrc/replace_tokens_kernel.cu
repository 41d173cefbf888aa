// CUDA kernel of ELECTRA's sampled-token replacement: one pass over the generator's logits.
//
// Fuses, per masked row of the (N, V) logits: the Gumbel-max sample
// argmax_c(logits[c] * (1/tau) + g_c) (fp32) with counter-based Philox noise g (philox.h), the row
// log-sum-exp of the logits (online, optional), the scatter of the sample into the copy of the
// original ids and the is-replaced label (sample != original). The logits are read once, in their
// own dtype (fp32/fp16/bf16), with 16-byte coalesced loads; nothing else of size N*V is touched.
//
// Layout: one warp per row (4 rows per 128-thread block, at most 96 registers so that 20 rows per
// SM are in flight: ELECTRA's ~2.5k masked rows fit one wave on an H100). A block per row, its 4
// warps each reading a quarter and merging through shared memory, was measured slower on an H100
// (2026-11-23: 1019 against 1364 GB/s at 2500 x 30522 bf16) and removed. The row's 16-byte
// vectors (aligned on the flat index row*V + col, so each lies in one octet of philox.h's noise
// layout) are read from the row's first whole octet to its last, 16 elements per lane per step: lane l
// takes vectors l + 32k of the step, k < 2 (16-bit logits) or k < 4 (fp32). The steps reach a ring in
// the warp's shared memory by asynchronous copies (cp.async) issued a ring's worth of steps less one
// before the step is computed, so that the bytes in flight need no registers (sm_90: an 8 KB ring, 7 KB
// in flight per warp; the sizes per architecture are at kRingBytes). Steps go in windows of two, the 128
// octets that share the row's min calls. The elements of the octets at the row's ends that span rows (at
// most 7 at each end) are read element by element after the loop; a logits pointer that is not 16-byte
// aligned takes that path for the whole row.
//
// Per element the hot path is a share of one Philox call (per lane and window one call gives the min
// words of its 4 octets; fp32 lanes 2m and 2m + 1, which hold the two halves of each octet, make one of
// the pair's two calls each and take the other's words by shuffle), a conversion, the running max and,
// with the lse, one exp2 (MUFU) and an add. The noise filter (philox.h: no element of an octet can beat
// the best exact key T if 1 + v > 1 + q c, v from the octet's min word, q = exp(logit/tau - M),
// c = 8 exp(M - T + margin)) runs once per 16-byte vector, on its largest logit; so the octet's fine
// Philox calls and the exact noise (logarithms), out of line, run only for the few vectors whose
// elements may still win, and there the per-element test picks them. That changes no result: the
// winner is the lexicographic max of (exact key, -column), which does not depend on the order elements
// are visited, so CPU and CUDA agree bit for bit. Before the loop each lane keys its first octet's
// minimum element (the octet's largest noise), and the warp's best of these is the first T. A vector
// that passes the filter goes into the warp's queue in shared memory (an atomic and two stores); when a
// step ends with kSurvivorBatch or more queued, the whole warp settles them, a lane per vector, and
// shares its best key (a tighter T for every lane). A vector's largest logit is taken packed for 16-bit
// logits (two HMNMX2 levels), before the unpack.
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
// Tested on the CPU too: without nvcc's __CUDACC__ the launches go to fe_host::launch, which
// tests/cuda_host/ provides to run these kernels on emulated warps (g++, in CI, no GPU needed).
//
// Limits: V < 2^31, N < 2^32; rows are spread one per warp, so below ~1000 rows the GPU is under-filled.
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
constexpr int kMinBlocksPerSM = 5;  // caps registers at 96 (65536 / (5 * 128), in units of 8): no spills
constexpr int kVectorBytes = 16;  // one 128-bit load per lane and vector
constexpr int kStepElements = 16;  // logits per lane and step: 2 vectors of 16-bit logits, 4 of fp32
// Per warp: the ring of steps copied ahead into shared memory, as large as 5 blocks per SM allow (a power
// of two). 8 KB where an SM has 228 KB of shared memory (sm_90, sm_100, sm_103: 5 x 37 KB per block);
// 4 KB on sm_80 (164 KB) and sm_86, sm_89, sm_120 (100 KB). Before sm_80 the copies are synchronous (no
// cp.async), so a deeper ring would only cost occupancy: it holds one step (T4: 64 KB). The host build
// takes 8 KB, or FE_REPLACE_RING_BYTES (tests/test_replace.py also builds it with 4 KB and 2 KB).
#if defined(FE_REPLACE_RING_BYTES)
constexpr int kRingBytes = FE_REPLACE_RING_BYTES;
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ == 900 || __CUDA_ARCH__ == 1000 || __CUDA_ARCH__ == 1030
constexpr int kRingBytes = 8192;
#elif __CUDA_ARCH__ >= 800
constexpr int kRingBytes = 4096;
#else
constexpr int kRingBytes = 0;  // one step
#endif
template <typename T>
__host__ __device__ constexpr int step_bytes() {  // a warp's step: kStepElements logits per lane
  return kStepElements * (int)sizeof(T) * kWarpSize;
}
template <typename T>
__host__ __device__ constexpr int ring_steps() {  // steps in a warp's ring
  return kRingBytes > 0 ? kRingBytes / step_bytes<T>() : 1;
}
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kInf = __builtin_huge_valf();

// Copies of 16 bytes from global into shared memory that complete asynchronously, without passing
// through registers (sm_80 and later: cp.async.cg, cached in L2 only), in groups: commit_copies() closes
// the group of the lane's copies issued since the last, and wait_copies<n>() returns once at most the n
// groups the lane committed last are still in flight, its earlier copies visible to it. Before sm_80 a
// copy is a load and a store, complete at once. The host build (tests/cuda_host/) models them as copies
// that land at the wait, their destination unreadable (NaN) until then.
#if defined(FE_CUDA_HOST_EMULATION)
__device__ __forceinline__ void copy_async(uint4* dst, const uint4* src) { fe_host::async_copy(dst, src); }
__device__ __forceinline__ void commit_copies() { fe_host::async_commit(); }
template <int N>
__device__ __forceinline__ void wait_copies() { fe_host::async_wait(N); }
#else
__device__ __forceinline__ void copy_async(uint4* dst, const uint4* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
               "l"(src)
               : "memory");
#else
  *dst = __ldcs(src);
#endif
}
__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// The VEC values of one 16-byte vector as fp32 (exact for every input dtype).
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[4], float) {
  x[0] = __uint_as_float(raw.x);
  x[1] = __uint_as_float(raw.y);
  x[2] = __uint_as_float(raw.z);
  x[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[8], __nv_bfloat16) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the upper half of an fp32: a shift and a mask
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[8], __half) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// The largest of a 16-byte vector's values as fp32, fmaxf's rule (a NaN loses; all NaN: NaN). For
// 16-bit logits the pairs are compared packed (HMNMX2: three instructions for eight values, and two
// conversions), where unpacking first costs eight conversions and seven FMNMX; a conversion to fp32 is
// exact and monotone, so the two give the same value (at most +0 for -0, which compares equal).
__device__ __forceinline__ float vector_max(const uint4& raw, float) {
  return fmaxf(fmaxf(__uint_as_float(raw.x), __uint_as_float(raw.y)),
               fmaxf(__uint_as_float(raw.z), __uint_as_float(raw.w)));
}
template <typename T2>  // __nv_bfloat162 or __half2: the pairs of a vector's four words
__device__ __forceinline__ float packed_max(const uint4& raw) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  const T2* p = reinterpret_cast<const T2*>(w);
  const T2 m = __hmax2(__hmax2(p[0], p[1]), __hmax2(p[2], p[3]));
  return fmaxf(__low2float(m), __high2float(m));
}
__device__ __forceinline__ float vector_max(const uint4& raw, __nv_bfloat16) {
  return packed_max<__nv_bfloat162>(raw);
}
__device__ __forceinline__ float vector_max(const uint4& raw, __half) { return packed_max<__half2>(raw); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Exact Gumbel key of one element from its exponential; kept out of line because it runs only for
// filter survivors.
__device__ __noinline__ float exact_key(float y, float e) { return fe_add(y, gumbel_from_exponential(e)); }

// Where the noise of a group of N elements of one octet comes from (philox.h's layout): the logits
// (the octet is the group's flat index / 8), the position in the octet of the group's first element, the
// octet's min word and the Philox key and stream. The survivor path derives the octet from the group's
// address, so the loop keeps no octet index in registers.
template <typename T>
struct NoiseSource {
  const T* logits;
  int j0;
  uint32_t min_word;
  uint64_t seed;
  uint64_t offset;
};

// Running state of one lane over its part of a row.
struct LaneState {
  float best_key;  // exact key of the best candidate so far (-inf: none)
  int best_col;    // its column (vocab: none)
  float max;       // running max of the logits (fmaxf: NaN skipped)
  float shift;     // max * log2(e) once max > -inf, else 0
  float sum;       // log-sum-exp: sum of exp(logit - max)
  float y_shift;   // tau != 1: the same shift for y = logit / tau
  float scale;     // noise filter: c = 8 exp(M - T + margin) (philox.h), M = max / tau, T = best key known
};

template <bool kUnitTau>
__device__ __forceinline__ float scaled(float x, float inv_tau) {
  return kUnitTau ? x : fe_mul(x, inv_tau);  // the key's y (tau = 1: x itself, as x * 1 is exact)
}

template <bool kUnitTau>
__device__ __forceinline__ void update_scale(LaneState& st, float inv_tau, float threshold) {
  st.scale = filter_scale(scaled<kUnitTau>(st.max, inv_tau), fmaxf(threshold, st.best_key));
}

// The filter's q = exp(y - M) of a logit x (philox.h), y = x / tau, M the running max of y.
template <bool kUnitTau>
__device__ __forceinline__ float filter_q(float x, float inv_tau, const LaneState& st) {
  return kUnitTau ? fast_exp2(fmaf(x, kLog2e, -st.shift))
                  : fast_exp2(fmaf(scaled<false>(x, inv_tau), kLog2e, -st.y_shift));
}

// Whether a group of one octet, with largest logit group_max and the octet's min word, may hold an
// element that beats the best key: the filter of the whole group at once (philox.h). Every exponential of
// the octet is at least its minimum, so the group's largest logit bounds every element's test. (MUFU.EX2
// is monotone to within a few ulps, far inside the filter's margin.)
template <bool kUnitTau>
__device__ __forceinline__ bool group_may_win(float group_max, uint32_t min_word, float inv_tau, const LaneState& st) {
  return filter_may_win(min_word, filter_q<kUnitTau>(group_max, inv_tau, st), st.scale);
}

// The elements of a group that the filter lets through: their exact keys against the lane's best.
// Out of line (like exact_key): it runs for a few groups per row, and the hot loop stays small. It reads
// the group's N logits again (from L2 or memory: the loop read them a few steps before), and the
// octet's fine Philox calls, which complete its exponentials, run only here.
template <typename T, int N, bool kUnitTau>
__device__ __noinline__ LaneState fold_survivors(LaneState st, const T* __restrict__ xs, int col0, NoiseSource<T> src,
                                                 float inv_tau, float threshold) {
  PhiloxWords fine[2];
  fine_calls((uint64_t)(xs - src.logits) / 8, src.seed, src.offset, fine);
  const float e_min = octet_min_exponential(src.min_word);
  const int J = octet_min_position(fine[1]);
  // The octet's minimum first, if it is in the group: it has the octet's largest noise, so its key, the
  // lane's best if it is better, lets the second test below skip most of the others.
  const int eJ = J - src.j0;
  if (eJ >= 0 && eJ < N) {
    const float x = to_float(xs[eJ]);
    if (group_may_win<kUnitTau>(x, src.min_word, inv_tau, st)) {
      const float key = exact_key(scaled<kUnitTau>(x, inv_tau), e_min);
      if (better_candidate(key, col0 + eJ, st.best_key, st.best_col)) {
        st.best_key = key;
        st.best_col = col0 + eJ;
        update_scale<kUnitTau>(st, inv_tau, threshold);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if (e == eJ) continue;
    const float x = to_float(xs[e]);
    const float q = filter_q<kUnitTau>(x, inv_tau, st);
    if (!filter_may_win(src.min_word, q, st.scale)) continue;
    const uint32_t r = octet_fine_word(src.j0 + e, J, fine);
    if (!filter_may_win_above(e_min, r, q, st.scale)) continue;
    const float key = exact_key(scaled<kUnitTau>(x, inv_tau), octet_other_exponential(e_min, r));
    if (better_candidate(key, col0 + e, st.best_key, st.best_col)) {
      st.best_key = key;
      st.best_col = col0 + e;
      update_scale<kUnitTau>(st, inv_tau, threshold);
    }
  }
  return st;
}

// The warp's largest value of x (every lane gets it).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int d = kWarpSize / 2; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, d));
  return x;
}

// A threshold before the loop: the lane keys the minimum's element of its first octet, if the lane's
// first vector holds it (fp32: one lane of the pair does), as its best so far. That element has the
// octet's largest noise, and the warp's best of 32 such keys is a threshold that the first steps' filter
// uses, where it would otherwise start from -inf and send every lane's first vectors, all their elements,
// through the out-of-line path (a simulation: ~1,100-1,300 of ~5,000-6,800 such instructions per row
// fewer at spread logits). Costs one Philox call, E_min and one more logarithm per lane and row.
template <typename T, bool kUnitTau>
__device__ __noinline__ LaneState seed_threshold(LaneState st, uint4 raw, int64_t flat, int j0, int64_t row, int col0,
                                                 float inv_tau, uint64_t seed, uint64_t offset) {
  constexpr int VEC = kVectorBytes / sizeof(T);
  // the vector is the row's whole octet q = lane / (8 / VEC): word 0 of the min call for q % 32 = q
  const uint32_t q = (uint32_t)(threadIdx.x % kWarpSize) / (8 / VEC);
  const uint32_t r = min_call((uint64_t)row, 0u, q, seed, offset).w[0];
  const int e = octet_min_position((uint64_t)flat / 8, seed, offset) - j0;
  if (e < 0 || e >= VEC) return st;  // fp32: the other lane of the pair holds it
  float x[VEC];
  unpack(raw, x, T());
  float xe = x[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) xe = i == e ? x[i] : xe;  // selects: no indexed read
  const float key = exact_key(scaled<kUnitTau>(xe, inv_tau), octet_min_exponential(r));
  if (better_candidate(key, col0 + e, st.best_key, st.best_col)) {
    st.best_key = key;
    st.best_col = col0 + e;
  }
  return st;
}

// Folds N logits x of one octet (columns col0 .. col0+N-1; group_max their fmaxf; min_word the octet's
// min word) into the lane state: the running max, the lse and, without noise, the argmax. With noise it
// returns whether the group passes the filter (its elements may still beat the best key), for the caller
// to settle: rare after a row's first steps.
template <int N, bool kNoise, bool kLse, bool kUnitTau>
__device__ __forceinline__ bool fold(const float (&x)[N], float group_max, int col0, uint32_t min_word,
                                     float inv_tau, float threshold, LaneState& st) {
  if (group_max > st.max) {  // rare after the first steps
    if (kLse) st.sum *= fast_exp2((st.max - group_max) * kLog2e);  // 0 for the first finite max
    st.max = group_max;
    st.shift = group_max * kLog2e;
    if (kNoise && !kUnitTau) st.y_shift = scaled<false>(group_max, inv_tau) * kLog2e;
    if (kNoise) update_scale<kUnitTau>(st, inv_tau, threshold);
  }
  if (kLse) {
#pragma unroll
    for (int e = 0; e < N; ++e) st.sum += fast_exp2(fmaf(x[e], kLog2e, -st.shift));  // exp(logit - max)
  }
  if constexpr (kNoise) {
    // the rare groups that pass take the per-element test and the exact noise, out of line (fold_survivors)
    return group_may_win<kUnitTau>(group_max, min_word, inv_tau, st);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (better_candidate(x[e], col0 + e, st.best_key, st.best_col)) {
        st.best_key = x[e];
        st.best_col = col0 + e;
      }
    return false;
  }
}

// The vectors of the vector loop that passed the filter, one queue per warp in shared memory, settled
// a batch at a time by the whole warp (settle_survivors), each lane one vector. Settled as they came, a
// warp ran the out-of-line path once per step and vector slot in which any lane's vector passed, one or
// two lanes busy and the others waiting: 6-19 times per 30522-column row in a model of the filter
// (benchmarks/replace_filter_sim.py: one warp, bf16 vectors, equal logits, N(0, 1) or N(0, 3^2)).
// Queued, and settled when a step ends with kSurvivorBatch or more, the same rows take 2-3 batches: the
// threshold stays a little longer where it was, so more vectors pass, but each costs an enqueue of a
// few instructions, and a batch about what one run did. Modelled: ~25% (equal logits) to ~60% (N(0, 3^2))
// fewer out-of-line instructions per row; a batch of 4 saves less, one of 32 no more than 16.
constexpr int kSurvivorBatch = 16;

template <int kCapacity>
struct SurvivorQueue {
  int count;
  uint32_t vector[kCapacity];    // the vector's index among the row's vectors
  uint32_t min_word[kCapacity];  // its octet's min word
};

// The calling warp's ring of steps (the block's warps share one shared-memory array).
template <typename T>
__device__ __forceinline__ uint4* warp_ring() {
  constexpr int kVectors = ring_steps<T>() * step_bytes<T>() / kVectorBytes;
  __shared__ uint4 rings[kRowsPerBlock * kVectors];
  return rings + (threadIdx.x / kWarpSize) * kVectors;
}

// The calling warp's queue (the block's warps share one shared-memory array).
template <int kCapacity>
__device__ __forceinline__ SurvivorQueue<kCapacity>& warp_queue() {
  __shared__ SurvivorQueue<kCapacity> queues[kRowsPerBlock];
  return queues[threadIdx.x / kWarpSize];
}

// The number of vectors in the warp's queue, the same in every lane (all lanes call it): the barriers
// order it after every lane's enqueues and before any lane's next ones (lanes need not run in lockstep).
template <int kCapacity>
__device__ __forceinline__ int queued_count() {
  __syncwarp();
  const int n = warp_queue<kCapacity>().count;
  __syncwarp();
  return n;
}

// Settles the warp's n queued vectors (all lanes call it): lane l takes entries l, l + 32, ..., whose
// elements go through the per-element test and the exact noise against the lane's best key and the
// warp's threshold; then the queue is emptied. The row's vectors start at flat index head_end, the row at
// row_begin. The caller shares the lanes' best keys afterwards.
template <typename T, bool kUnitTau, int kCapacity>
__device__ __noinline__ LaneState settle_survivors(LaneState st, int n, const T* logits, int64_t row_begin,
                                                   int64_t head_end, float inv_tau, float threshold, uint64_t seed,
                                                   uint64_t offset) {
  constexpr int VEC = kVectorBytes / sizeof(T);
  SurvivorQueue<kCapacity>& queue = warp_queue<kCapacity>();
  const T* first = logits + head_end;
  const int col_first = (int)(head_end - row_begin);
  const int lane = threadIdx.x % kWarpSize;
  for (int s = lane; s < n; s += kWarpSize) {
    const uint32_t i = queue.vector[s], r = queue.min_word[s];
    const T* xs = first + (int64_t)i * VEC;
    // the test again, against the best key now: the vector may have been queued steps ago
    if (!group_may_win<kUnitTau>(vector_max(*reinterpret_cast<const uint4*>(xs), T()), r, inv_tau, st)) continue;
    // fp32: the row's vectors start on an octet, so odd vectors hold elements 4..7 of theirs
    const NoiseSource<T> src{logits, VEC == 4 ? (int)(i & 1) * VEC : 0, r, seed, offset};
    st = fold_survivors<T, VEC, kUnitTau>(st, xs, col_first + (int)i * VEC, src, inv_tau, threshold);
  }
  __syncwarp();  // every lane has read its entries
  if (lane == 0) queue.count = 0;
  __syncwarp();
  return st;
}

// The warp's best key as the threshold of every lane's filter, if it is better than the last.
template <bool kUnitTau>
__device__ __forceinline__ void share_best(LaneState& st, float inv_tau, float& threshold) {
  const float t = warp_max(st.best_key);
  if (t > threshold) {
    threshold = t;
    update_scale<kUnitTau>(st, inv_tau, threshold);
  }
}

// The flat elements lane, lane+32, ... of [begin, end) one by one (row edges, unaligned logits).
template <typename T, bool kNoise, bool kLse, bool kUnitTau>
__device__ __forceinline__ void fold_elements(const T* __restrict__ Logits, int64_t begin, int64_t end, int64_t row,
                                              int64_t row_begin, int64_t row_end, int lane, float inv_tau,
                                              uint64_t seed, uint64_t offset, float threshold, LaneState& st) {
  for (int64_t flat = begin + lane; flat < end; flat += kWarpSize) {
    const float x[1] = {to_float(Logits[flat])};
    const uint64_t octet = (uint64_t)flat >> 3;
    const uint32_t r =
        kNoise ? octet_min_word(octet, (uint64_t)row, (uint64_t)row_begin, (uint64_t)row_end, seed, offset) : 0u;
    const int col = (int)(flat - row_begin);
    if (fold<1, kNoise, kLse, kUnitTau>(x, x[0], col, r, inv_tau, threshold, st)) {  // rare
      const NoiseSource<T> src{Logits, (int)(flat & 7), r, seed, offset};
      st = fold_survivors<T, 1, kUnitTau>(st, Logits + flat, col, src, inv_tau, threshold);
    }
  }
}

template <typename T, bool kNoise, bool kLse, bool kUnitTau>
__global__ void __launch_bounds__(kRowsPerBlock * kWarpSize, kMinBlocksPerSM)
replace_tokens_kernel(const T* __restrict__ Logits,         // (n_rows, vocab) contiguous
                      int64_t n_rows,
                      int64_t vocab,
                      bool vector_loads,                       // Logits is 16-byte aligned
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
  constexpr int kVectorsPerOctet = 8 / VEC;      // 1 or 2: a vector lies in one octet (philox.h)
  constexpr int kVectorsPerLane = kStepElements / VEC;      // per step: 32 bytes (16-bit) or 64 (fp32) in flight
  constexpr int kStepVectors = kVectorsPerLane * kWarpSize;  // vectors per warp and step
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= n_rows) return;  // whole warp
  const uint64_t seed = kNoise ? (uint64_t)__ldg(Seed) : 0;  // argmax (tau = 0) needs no key

  // Flat range of the row; the vectors of its whole octets [vec_begin, vec_end) go through the vector
  // loop. The loop starts on the row's first whole octet (fp32: an even vector), so lanes 2m and 2m + 1
  // hold the two halves of one octet, and the lanes read the octets in the order of the row's min calls
  // (philox.h).
  const int64_t row_begin = row * vocab, row_end = row_begin + vocab;
  const int64_t first_octet = (row_begin + 7) / 8;
  int64_t vec_begin = first_octet * kVectorsPerOctet, vec_end = row_end / 8 * kVectorsPerOctet;
  if (!vector_loads || vec_begin >= vec_end) vec_begin = vec_end = 0;  // no whole octet: all by element
  const int64_t head_end = vec_begin < vec_end ? vec_begin * VEC : row_end;
  const int64_t tail_begin = vec_begin < vec_end ? vec_end * VEC : row_end;

  LaneState st{-kInf, (int)vocab, -kInf, 0.0f, 0.0f, 0.0f, kInf};
  float threshold = -kInf;  // best exact key of the warp at the last share
  // The vectors that pass the filter wait in the warp's queue (a step adds at most 32 per vector slot).
  constexpr int kQueueCapacity = kNoise ? kSurvivorBatch - 1 + kVectorsPerLane * kWarpSize : 1;
  if (kNoise) {
    if (lane == 0) warp_queue<kQueueCapacity>().count = 0;
    __syncwarp();
  }
  // The row's vectors, indexed from 0 with 32-bit indices (a row has fewer than 2^31 elements).
  // This lane's vectors: step + k * 32 + lane.
  const uint4* __restrict__ LaneVectors = reinterpret_cast<const uint4*>(Logits) + vec_begin + lane;
  const int n_vectors = (int)(vec_end - vec_begin);
  // The whole octets of the row go by windows of two steps, 128 octets: the lane's vectors k of the
  // window's step h are octets q = 128 window + 32 (2h + k) + lane (16-bit logits: a vector is an octet)
  // or q = 128 window + 32 (2h + k / 2) + 16 (k % 2) + lane / 2 (fp32: lanes 2m and 2m + 1 hold the two
  // halves of an octet), whose min words are word 2h + k (or 2h + k / 2) of the window's min call for
  // q % 32. So each lane makes one min call per window: 16-bit logits their own, fp32 lanes the call of
  // q % 32 = 16 (lane % 2) + lane / 2, whose words their partner lane (lane ^ 1) takes by shuffle.
  const bool upper_half = kVectorsPerOctet == 2 && (lane & 1);  // fp32: the octet's elements 4..7
  const int lane_j0 = upper_half ? VEC : 0;
  const uint32_t call_lane = kVectorsPerOctet == 2 ? 16 * (lane & 1) + lane / 2 : lane;

  // With at least `at_least` vectors queued (all lanes call it): the warp settles them and shares the best
  // key found, a tighter filter for every lane.
  auto settle_queued = [&](int at_least) {
    const int n = queued_count<kQueueCapacity>();
    if (n >= at_least) {
      st = settle_survivors<T, kUnitTau, kQueueCapacity>(st, n, Logits, row_begin, head_end, inv_tau, threshold, seed,
                                                         offset);
      share_best<kUnitTau>(st, inv_tau, threshold);
    }
  };
  // One step: the lane's vectors k of raw, the step's vectors from `step`, with the min words of half h
  // of the window's call (own: the lane's, partner: the lane ^ 1's; fp32 only).
  auto do_step = [&](const uint4 (&raw)[kVectorsPerLane], int step, int h, const uint32_t (&own)[4]) {
    uint32_t partner[2] = {0u, 0u};
    if (kNoise && kVectorsPerOctet == 2) {
      partner[0] = __shfl_xor_sync(kFullWarp, h ? own[2] : own[0], 1);
      partner[1] = __shfl_xor_sync(kFullWarp, h ? own[3] : own[1], 1);
    }
#pragma unroll
    for (int k = 0; k < kVectorsPerLane; ++k) {
      const int i = step + k * kWarpSize + lane;
      if (i >= n_vectors) continue;  // only in a row's last window
      float x[VEC];
      unpack(raw[k], x, T());
      uint32_t r = 0u;
      if (kNoise) {
        if (kVectorsPerOctet == 1) {
          r = own[2 * h + k];
        } else {
          const uint32_t mine = own[2 * h + k / 2];
          r = (k % 2 == (int)upper_half) ? mine : partner[k / 2];
        }
      }
      if (fold<VEC, kNoise, kLse, kUnitTau>(x, vector_max(raw[k], T()), (int)(head_end - row_begin) + i * VEC, r,
                                            inv_tau, threshold, st)) {  // rare: into the warp's queue
        SurvivorQueue<kQueueCapacity>& queue = warp_queue<kQueueCapacity>();
        const int slot = atomicAdd(&queue.count, 1);
        queue.vector[slot] = (uint32_t)i;
        queue.min_word[slot] = r;
      }
    }
    // With a batch's worth queued the warp settles them; the lanes' best keys change nowhere else in the loop.
    if (kNoise) settle_queued(kSurvivorBatch);
  };
  // The ring: the steps reach the warp's shared memory (cp.async) kRingSteps - 1 steps before the warp
  // computes them, so each warp keeps up to 7 KB of its row in flight (sm_90; fp32: 6 KB) without holding
  // it in registers, where two steps in registers kept 1-2 KB and measured 2.0 TB/s at 2500 rows (H100,
  // 2026-11-24): the ~19 warps per SM had too few bytes in flight for the memory's latency.
  // Step s lies in slot s % kRingSteps, its vector k at Ring[(slot * kVectorsPerLane + k) * 32]. A lane
  // copies in only the vectors that it reads itself, so the ring needs no barrier: the lane's own wait
  // orders its copies before its reads, and it copies over a slot only after the step read from it was
  // computed. Copies past the row's last vector are not issued (their groups are empty), so none is in
  // flight when the warp returns.
  constexpr int kRingSteps = ring_steps<T>();  // 8 KB: 8 (16-bit logits) or 4 (fp32); 4 KB: 4 or 2
  static_assert(kRingSteps >= 1 && (kRingSteps & (kRingSteps - 1)) == 0, "a ring of 1, 2, 4, ... steps");
  uint4* const Ring = warp_ring<T>() + lane;
  int copied = 0;                        // steps whose copies were issued
  int taken = 0;                         // steps read from the ring
  const uint4* copy_from = LaneVectors;  // the lane's first vector of the next step to copy
  int copy_left = n_vectors - lane;      // the row's vectors from there on, as seen by the lane
  auto copy_step = [&]() {
    uint4* const slot = Ring + (copied % kRingSteps) * kStepVectors;
#pragma unroll
    for (int k = 0; k < kVectorsPerLane; ++k)
      if (k * kWarpSize < copy_left) copy_async(slot + k * kWarpSize, copy_from + k * kWarpSize);
    commit_copies();
    ++copied;
    copy_from += kStepVectors;
    copy_left -= kStepVectors;
  };
  // The next step's vectors, once they are in; the copy of the step kRingSteps - 1 after it starts first.
  auto next_step = [&](uint4 (&raw)[kVectorsPerLane]) {
    copy_step();
    wait_copies<kRingSteps - 1>();
    const uint4* const slot = Ring + (taken % kRingSteps) * kStepVectors;
#pragma unroll
    for (int k = 0; k < kVectorsPerLane; ++k) raw[k] = slot[k * kWarpSize];
    ++taken;
  };

#pragma unroll
  for (int s = 1; s < kRingSteps; ++s) copy_step();
  uint4 raw[kVectorsPerLane];
  next_step(raw);  // step 0
  if (kNoise && lane < n_vectors)  // the lane's first octet's minimum: a threshold for the first steps
    st = seed_threshold<T, kUnitTau>(st, raw[0], head_end + lane * VEC, lane_j0, row,
                                     (int)(head_end - row_begin) + lane * VEC, inv_tau, seed, offset);
  if (kNoise) threshold = warp_max(st.best_key);
  for (int step = 0; step < n_vectors; step += 2 * kStepVectors) {  // warp-uniform
    uint32_t own[4] = {0u, 0u, 0u, 0u};
    if (kNoise) {
      const uint32_t window = (uint32_t)step / (2 * kStepVectors);
      const PhiloxWords w = min_call((uint64_t)row, window, call_lane, seed, offset);
#pragma unroll
      for (int m = 0; m < 4; ++m) own[m] = w.w[m];
    }
    do_step(raw, step, 0, own);
    next_step(raw);
    do_step(raw, step + kStepVectors, 1, own);
    next_step(raw);  // the next window's first step
  }
  if (kNoise) settle_queued(1);  // the vectors still queued
  fold_elements<T, kNoise, kLse, kUnitTau>(Logits, row_begin, head_end, row, row_begin, row_end, lane, inv_tau,
                                           seed, offset, threshold, st);
  fold_elements<T, kNoise, kLse, kUnitTau>(Logits, tail_begin, row_end, row, row_begin, row_end, lane, inv_tau,
                                           seed, offset, threshold, st);

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
      const float a = st.max == new_max ? 1.0f : fast_exp2((st.max - new_max) * kLog2e);
      const float b = m == new_max ? 1.0f : fast_exp2((m - new_max) * kLog2e);
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

__global__ void gumbel_noise_kernel(float* __restrict__ Out,            // (n_rows * vocab,)
                                    int64_t n_rows,
                                    int64_t vocab,
                                    const int64_t* __restrict__ Seed,  // (1,) Philox key
                                    uint64_t offset) {
  const uint64_t seed = (uint64_t)__ldg(Seed);
  const int64_t octets = (n_rows * vocab + 7) / 8;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < octets;
       o += (int64_t)gridDim.x * blockDim.x)
    octet_noise(Out, (uint64_t)o, (uint64_t)n_rows, (uint64_t)vocab, seed, offset);
}

template <typename T, bool kNoise, bool kLse, bool kUnitTau>
cudaError_t launch_typed(const ReplaceTokensLaunch& a, cudaStream_t stream) {
  const int64_t blocks = (a.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const bool aligned = reinterpret_cast<uintptr_t>(a.logits) % kVectorBytes == 0;
#if defined(__CUDACC__)
  replace_tokens_kernel<T, kNoise, kLse, kUnitTau><<<(unsigned)blocks, kRowsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const T*>(a.logits), a.n_rows, a.vocab, aligned, a.input_ids, a.numel_ids, a.positions, a.out_ids,
      a.labels, a.sampled, a.lse, a.inv_tau, a.seed, a.offset);
#else  // the host build of the tests (tests/cuda_host/): the same kernel on emulated warps
  (void)stream;
  fe_host::launch(replace_tokens_kernel<T, kNoise, kLse, kUnitTau>, dim3((unsigned)blocks),
                  dim3(kRowsPerBlock * kWarpSize), static_cast<const T*>(a.logits), a.n_rows, a.vocab, aligned,
                  a.input_ids, a.numel_ids, a.positions, a.out_ids, a.labels, a.sampled, a.lse, a.inv_tau, a.seed,
                  a.offset);
#endif
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const ReplaceTokensLaunch& a, cudaStream_t stream) {
  const bool lse = a.lse != nullptr;
  if (!a.noise)  // argmax: no noise, tau unused
    return lse ? launch_typed<T, false, true, true>(a, stream) : launch_typed<T, false, false, true>(a, stream);
  if (a.inv_tau == 1.0f)  // ELECTRA's case: one exp2 per element serves the lse and the noise filter
    return lse ? launch_typed<T, true, true, true>(a, stream) : launch_typed<T, true, false, true>(a, stream);
  return lse ? launch_typed<T, true, true, false>(a, stream) : launch_typed<T, true, false, false>(a, stream);
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
  const int64_t octets = (total + 7) / 8;
  const int64_t blocks = (octets + threads - 1) / threads;
  const unsigned grid = (unsigned)(blocks < 65535 * 16 ? blocks : 65535 * 16);
#if defined(__CUDACC__)
  gumbel_noise_kernel<<<grid, threads, 0, stream>>>(out, n_rows, vocab, seed, offset);
#else  // the host build of the tests (tests/cuda_host/)
  (void)stream;
  fe_host::launch(gumbel_noise_kernel, dim3(grid), dim3(threads), out, n_rows, vocab, seed, offset);
#endif
  return cudaGetLastError();
}

}  // namespace fastelectra
