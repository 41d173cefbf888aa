// Stand-in for CUDA's runtime header, for tests only: with this folder first on the include path,
// g++ compiles csrc/replace_tokens_kernel.cu as host code and runs its kernels on the CPU, so CI
// (which has no GPU) executes the CUDA kernel's own logic: its indexing, vector and edge paths,
// Philox counter layout, noise filter, warp reductions and invalid-row handling.
//
// How a launch runs. Every warp of the grid is run in turn; its 32 lanes are fibers (ucontext) on
// the calling thread, scheduled round-robin. A lane runs until it reaches a warp shuffle or
// returns; when all 32 wait at a shuffle the values are exchanged and they go on. That is the
// semantics of __shfl_xor_sync with a full mask on converged lanes, deterministic and without OS
// threads; __syncwarp is the same wait without the exchange, and a lane at a __syncwarp never matches one
// at a shuffle. What the device would do undefined things with is an error of the launch instead:
// lanes that diverge (some wait at a shuffle while others returned, or wait at different shuffles,
// or with a partial mask), and a __ldg/__ldcs outside the ranges the caller declared readable, or a
// 16-byte load that is not 16-byte aligned (a fault on the device). Asynchronous copies into shared
// memory (cp.async) land only when the lane waits for their group; until then their destination reads
// as NaN, so a kernel that reads a copy too early computes wrong results.
//
// What this does not model: timing, registers, caches, and the device's own arithmetic where it
// differs from the host's (philox.h picks host or device code with __CUDA_ARCH__, which is not
// defined here: the filter's exp2 is the host's, as in the CPU op).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <deque>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#define FE_CUDA_HOST_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Shared memory: one static object per declaration. Warps run one after another, each to its end, so
// a warp's part of a block's shared memory (indexed by the warp) is its own while it runs.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef struct CUstream_st* cudaStream_t;

namespace fe_host {

constexpr int kLanes = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Lane {
  ucontext_t context;
  uint3 thread_idx;
  bool waiting = false;  // stopped at a shuffle or a __syncwarp
  bool barrier = false;  // the wait is a __syncwarp
  bool done = false;     // returned from the kernel
  uint32_t value = 0;    // the shuffled word: this lane's going in, the source lane's coming out
  int source = 0;
  unsigned mask = 0;
  int64_t shuffles = 0;  // shuffles this lane has reached in the current warp
  std::vector<char> stack;
  // Asynchronous copies (cp.async): those issued since the last commit, and the committed groups not
  // yet waited for, oldest first. A copy lands when a wait retires its group.
  struct AsyncCopy {
    void* dst;
    uint4 data;
  };
  std::vector<AsyncCopy> open_copies;
  std::deque<std::vector<AsyncCopy>> copy_groups;
};

struct Emulator {
  Lane lanes[kLanes];
  int current = 0;
  ucontext_t scheduler;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::function<void()> body;  // the kernel call of the current launch
  std::vector<std::pair<const char*, const char*>> readable;  // [begin, end) for __ldg / __ldcs
  std::string error;  // first error of the current launch
  cudaError_t last_error = cudaSuccess;

  void fail(const std::string& what) {
    if (error.empty()) error = what;
  }
};

inline Emulator& emu() {
  static Emulator e;
  return e;
}

inline void lane_entry() {
  Emulator& e = emu();
  e.body();
  e.lanes[e.current].done = true;
}  // returns to uc_link: the scheduler

// Runs one warp (lanes 32*warp .. of the block) to its end; false (and e.error) if the lanes diverged.
inline bool run_warp(unsigned warp) {
  Emulator& e = emu();
  for (int l = 0; l < kLanes; ++l) {
    Lane& lane = e.lanes[l];
    lane.thread_idx = uint3{warp * kLanes + (unsigned)l, 0, 0};
    lane.waiting = lane.done = false;
    lane.shuffles = 0;
    lane.open_copies.clear();
    lane.copy_groups.clear();
    lane.stack.resize(kStackBytes);
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack.data();
    lane.context.uc_stack.ss_size = lane.stack.size();
    lane.context.uc_link = &e.scheduler;
    makecontext(&lane.context, lane_entry, 0);
  }
  for (;;) {
    for (int l = 0; l < kLanes; ++l) {
      if (e.lanes[l].done || e.lanes[l].waiting) continue;
      e.current = l;
      swapcontext(&e.scheduler, &e.lanes[l].context);
    }
    int waiting = 0, done = 0;
    for (const Lane& lane : e.lanes) {
      waiting += lane.waiting;
      done += lane.done;
    }
    if (done == kLanes) return true;
    const std::string where = "block " + std::to_string(e.block_idx.x) + ", warp " + std::to_string(warp);
    if (done > 0) {
      e.fail("lanes diverged at a warp shuffle (" + where + "): " + std::to_string(waiting) +
             " lanes wait at it, " + std::to_string(done) + " returned");
      return false;
    }
    for (const Lane& lane : e.lanes)
      if (lane.shuffles != e.lanes[0].shuffles || lane.barrier != e.lanes[0].barrier || lane.mask != 0xffffffffu) {
        e.fail("lanes diverged at a warp shuffle (" + where + "): different shuffles or barriers, or a partial mask");
        return false;
      }
    uint32_t in[kLanes];
    for (int l = 0; l < kLanes; ++l) in[l] = e.lanes[l].value;
    for (Lane& lane : e.lanes) {
      lane.value = in[lane.source & (kLanes - 1)];
      lane.waiting = false;
    }
  }
}

// kernel(args...) on a grid of 1-D blocks; the launch's error, if any, comes from cudaGetLastError.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  Emulator& e = emu();
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % kLanes != 0 || block.x == 0) {
    e.last_error = cudaErrorInvalidValue;
    return;
  }
  e.error.clear();
  e.grid_dim = grid;
  e.block_dim = block;
  e.body = [&] { kernel(args...); };
  for (unsigned b = 0; b < grid.x && e.error.empty(); ++b) {
    e.block_idx = uint3{b, 0, 0};
    for (unsigned w = 0; w < block.x / kLanes && e.error.empty(); ++w) run_warp(w);
  }
  e.body = nullptr;
  if (!e.error.empty()) e.last_error = cudaErrorLaunchFailure;
}

// Waits until every lane of the warp waits (a shuffle: exchanging `value` from lane `source`; a barrier:
// nothing). The other lanes run meanwhile and may write memory, shared memory too, that the compiler
// must not assume unchanged across the switch: hence the compiler barriers.
inline uint32_t wait_for_warp(uint32_t value, unsigned mask, int source, bool barrier) {
  Emulator& e = emu();
  Lane& lane = e.lanes[e.current];
  lane.value = value;
  lane.mask = mask;
  lane.source = source;
  lane.barrier = barrier;
  lane.waiting = true;
  ++lane.shuffles;
  asm volatile("" ::: "memory");
  swapcontext(&lane.context, &e.scheduler);
  asm volatile("" ::: "memory");
  return lane.value;
}
inline uint32_t shuffle_word(uint32_t value, unsigned mask, int source) {
  return wait_for_warp(value, mask, source, false);
}

template <typename T>
inline T load(const T* p, const char* what) {
  Emulator& e = emu();
  const char* c = reinterpret_cast<const char*>(p);
  bool ok = false;
  for (const auto& r : e.readable) ok = ok || (c >= r.first && c + sizeof(T) <= r.second);
  if (!ok) {
    e.fail(std::string(what) + " outside the readable ranges");
    return T{};
  }
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    e.fail(std::string(what) + " of " + std::to_string(sizeof(T)) + " bytes not aligned to " +
           std::to_string(alignof(T)));
    return T{};
  }
  return *p;
}

// cp.async of 16 bytes (the kernel's copy_async): the source is read now, under load()'s checks, and the
// destination holds all-ones bytes (a NaN in every float format) until a wait retires the copy's group,
// so a kernel that reads a copy before waiting for it computes with NaNs.
inline void async_copy(uint4* dst, const uint4* src) {
  Lane& lane = emu().lanes[emu().current];
  const uint4 data = load(src, "an async copy's source");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) emu().fail("an async copy's destination not aligned to 16");
  memset(dst, 0xff, sizeof(uint4));
  lane.open_copies.push_back({dst, data});
}
inline void async_commit() {
  Lane& lane = emu().lanes[emu().current];
  lane.copy_groups.push_back(std::move(lane.open_copies));
  lane.open_copies.clear();
}
// Until at most `newer` committed groups are pending: the older ones land.
inline void async_wait(int newer) {
  Lane& lane = emu().lanes[emu().current];
  while ((int)lane.copy_groups.size() > newer) {
    for (const Lane::AsyncCopy& c : lane.copy_groups.front()) memcpy(c.dst, &c.data, sizeof(uint4));
    lane.copy_groups.pop_front();
  }
}

}  // namespace fe_host

#define threadIdx (fe_host::emu().lanes[fe_host::emu().current].thread_idx)
#define blockIdx (fe_host::emu().block_idx)
#define blockDim (fe_host::emu().block_dim)
#define gridDim (fe_host::emu().grid_dim)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = fe_host::emu().last_error;
  fe_host::emu().last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "launch failure";
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t word;
  memcpy(&word, &value, 4);
  word = fe_host::shuffle_word(word, mask, (int)(threadIdx.x % fe_host::kLanes) ^ lane_mask);
  T out;
  memcpy(&out, &word, 4);
  return out;
}
// A warp barrier that also orders the lanes' memory accesses.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  fe_host::wait_for_warp(0u, mask, (int)(threadIdx.x % fe_host::kLanes), true);
}
// Lanes run one at a time and switch only at a shuffle or a barrier, so an atomic is a plain update.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return fe_host::load(p, "__ldg");
}
template <typename T>
inline T __ldcs(const T* p) {
  return fe_host::load(p, "__ldcs");
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
// Per-halfword unsigned minimum (CUDA's SIMD intrinsic; one VIMNMX.U16x2 on sm_90).
inline unsigned __vminu2(unsigned a, unsigned b) {
  const unsigned lo = (a & 0xffffu) < (b & 0xffffu) ? a & 0xffffu : b & 0xffffu;
  const unsigned hi = (a >> 16) < (b >> 16) ? a >> 16 : b >> 16;
  return hi << 16 | lo;
}

namespace fe_host {
// Elementwise max of two 16-bit floats given as bits and their fp32 values, with CUDA's __hmax rule:
// a NaN loses to a number, two NaNs give the canonical NaN (0x7fff), +0 beats -0.
inline uint16_t max_bits(uint16_t a, float fa, uint16_t b, float fb) {
  if (fa != fa && fb != fb) return 0x7fffu;
  if (fa != fa) return b;
  if (fb != fb) return a;
  if (fa == fb) return (a & 0x8000u) ? b : a;  // equal: the same bits, or +0 and -0
  return fa > fb ? a : b;
}
}  // namespace fe_host
