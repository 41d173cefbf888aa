// Plain C++ interface of the CUDA replace_tokens kernels (replace_tokens_kernel.cu): raw pointers
// and a stream, no torch types, so the .cu file compiles with nvcc alone. The torch binding is
// replace_tokens_cuda.cpp; what the kernels compute is described in replace_tokens_kernel.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace fastelectra {

enum class LogitsDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ReplaceTokensLaunch {
  const void* logits;        // (n_rows, vocab) contiguous, dtype below
  LogitsDtype dtype;
  int64_t n_rows;            // N, the number of masked positions (> 0)
  int64_t vocab;             // V, in [1, 2^31)
  const int64_t* input_ids;  // (numel_ids,) original ids
  int64_t numel_ids;
  const int64_t* positions;  // (n_rows,) flat indices into input_ids
  int64_t* out_ids;          // (numel_ids,) already a copy of input_ids; samples are scattered in
  bool* labels;              // (numel_ids,) already false; is-replaced flags are scattered in
  int64_t* sampled;          // (n_rows,) the sample of each row, -1 for an invalid row
  float* lse;                // (n_rows,) row log-sum-exp of the logits, or nullptr
  float inv_tau;             // 1 / temperature, used when noise is true
  bool noise;                // false: plain argmax (temperature 0)
  const int64_t* seed;       // (1,) Philox key on the device, read by the kernel (no host copy)
  uint64_t offset;
};

// Enqueues the replacement kernel on `stream`; returns the launch error (no synchronisation).
cudaError_t launch_replace_tokens(const ReplaceTokensLaunch& args, cudaStream_t stream);

// Enqueues a kernel writing the Gumbel noise of every element of an (n_rows, vocab) logits
// tensor into `out` (fp32, contiguous), the same noise replace_tokens adds; `seed` as above. For tests.
cudaError_t launch_gumbel_noise(float* out, int64_t n_rows, int64_t vocab, const int64_t* seed, uint64_t offset,
                                cudaStream_t stream);

}  // namespace fastelectra
