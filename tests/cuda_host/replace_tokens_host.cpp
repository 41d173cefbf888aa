// The CUDA replace_tokens kernels (csrc/replace_tokens_kernel.cu) built for the host with the
// stand-in headers of this folder, behind a C interface for ctypes (tests/test_replace.py). The
// arguments are those of ReplaceTokensLaunch; the caller prepares out_ids (a copy of input_ids) and
// labels (false) as the CUDA binding does. Each call returns 0, or 1 with the launch's error in `err`.
#include "cuda_runtime.h"
#ifndef FE_CUDA_HOST_EMULATION
#error "tests/cuda_host must come first on the include path (it stands in for CUDA's headers)"
#endif

#include <stdio.h>

#include "replace_tokens_kernel.cu"

namespace {

int finish(cudaError_t launched, char* err, int err_len) {
  if (launched == cudaSuccess) return 0;
  const std::string& what = fe_host::emu().error;
  snprintf(err, (size_t)err_len, "%s", what.empty() ? cudaGetErrorString(launched) : what.c_str());
  return 1;
}

}  // namespace

extern "C" {

int fe_host_replace_tokens(const void* logits, int dtype, int64_t n_rows, int64_t vocab, const int64_t* input_ids,
                           int64_t numel_ids, const int64_t* positions, int64_t* out_ids, bool* labels,
                           int64_t* sampled, float* lse, float inv_tau, int noise, const int64_t* seed,
                           uint64_t offset, char* err, int err_len) {
  static const int64_t kElementBytes[3] = {4, 2, 2};
  if (dtype < 0 || dtype > 2) return finish(cudaErrorInvalidValue, err, err_len);
  const char* begin = static_cast<const char*>(logits);
  fe_host::emu().readable = {{begin, begin + n_rows * vocab * kElementBytes[dtype]},
                             {reinterpret_cast<const char*>(seed), reinterpret_cast<const char*>(seed + 1)}};
  fastelectra::ReplaceTokensLaunch a{};
  a.logits = logits;
  a.dtype = static_cast<fastelectra::LogitsDtype>(dtype);
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.input_ids = input_ids;
  a.numel_ids = numel_ids;
  a.positions = positions;
  a.out_ids = out_ids;
  a.labels = labels;
  a.sampled = sampled;
  a.lse = lse;
  a.inv_tau = inv_tau;
  a.noise = noise != 0;
  a.seed = seed;
  a.offset = offset;
  return finish(fastelectra::launch_replace_tokens(a, nullptr), err, err_len);
}

int fe_host_gumbel_noise(float* out, int64_t n_rows, int64_t vocab, const int64_t* seed, uint64_t offset, char* err,
                         int err_len) {
  fe_host::emu().readable = {{reinterpret_cast<const char*>(seed), reinterpret_cast<const char*>(seed + 1)}};
  return finish(fastelectra::launch_gumbel_noise(out, n_rows, vocab, seed, offset, nullptr), err, err_len);
}

}  // extern "C"
