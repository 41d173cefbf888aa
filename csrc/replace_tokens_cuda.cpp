// CUDA binding of fastelectra::replace_tokens and fastelectra::gumbel_noise: checks the
// arguments, allocates the outputs and enqueues the kernels of replace_tokens_kernel.cu on the
// current stream, without a host synchronisation. Compiled only in the CUDA build
// (FASTELECTRA_WITH_CUDA); the CPU build sees an empty file.
//
// The seed is an int64 (1,) tensor on the logits' device whose pointer is handed to the kernels,
// which load it themselves: nothing is copied to the host, so the op is safe to capture in a CUDA
// graph and each replay uses the value the seed tensor holds then.
// Invalid data cannot be checked here without a sync, so the kernel does it: a row whose masked
// position lies outside input_ids, or whose original id lies outside [0, V), leaves ids and labels
// untouched and reports sampled[row] = -1 (see replace_tokens_kernel.cu).
#ifdef FASTELECTRA_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the current stream (what at::cuda::getCurrentCUDAStream returns)
#include <torch/library.h>

#include <tuple>

#include "replace_tokens.h"
#include "replace_tokens_cuda.h"

namespace fastelectra {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> replace_tokens_cuda(
    const at::Tensor& logits, const at::Tensor& input_ids, const at::Tensor& masked_positions,
    double temperature, const at::Tensor& seed, int64_t offset, bool return_lse) {
  check_replace_tokens_args(logits, input_ids, masked_positions, temperature, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor positions = masked_positions.contiguous();
  at::Tensor out_ids = ids.clone();
  at::Tensor labels = at::zeros(ids.sizes(), ids.options().dtype(at::kBool));
  at::Tensor sampled = at::empty({n}, ids.options());
  at::Tensor lse = at::empty({return_lse ? n : 0}, logits.options().dtype(at::kFloat));
  if (n == 0) return {out_ids, labels, sampled, lse};

  ReplaceTokensLaunch args{};
  args.logits = logits.data_ptr();
  switch (logits.scalar_type()) {
    case at::kFloat: args.dtype = LogitsDtype::kFloat32; break;
    case at::kHalf: args.dtype = LogitsDtype::kFloat16; break;
    default: args.dtype = LogitsDtype::kBFloat16; break;  // the only other dtype the check lets through
  }
  args.n_rows = n;
  args.vocab = vocab;
  args.input_ids = ids.data_ptr<int64_t>();
  args.numel_ids = ids.numel();
  args.positions = positions.data_ptr<int64_t>();
  args.out_ids = out_ids.data_ptr<int64_t>();
  args.labels = labels.data_ptr<bool>();
  args.sampled = sampled.data_ptr<int64_t>();
  args.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  args.inv_tau = 1.0f;
  args.noise = inverse_temperature(temperature, &args.inv_tau);
  args.seed = seed.const_data_ptr<int64_t>();
  args.offset = (uint64_t)offset;
  const cudaError_t err = launch_replace_tokens(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "replace_tokens: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {out_ids, labels, sampled, lse};
}

at::Tensor gumbel_noise_cuda(const at::Tensor& logits, const at::Tensor& seed, int64_t offset) {
  check_gumbel_noise_args(logits, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  const cudaError_t err = launch_gumbel_noise(out.data_ptr<float>(), logits.size(0), logits.size(1),
                                              seed.const_data_ptr<int64_t>(), (uint64_t)offset,
                                              c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gumbel_noise: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastelectra, CUDA, m) {
  m.impl("replace_tokens", &replace_tokens_cuda);
  m.impl("gumbel_noise", &gumbel_noise_cuda);
}

}  // namespace fastelectra

#endif  // FASTELECTRA_WITH_CUDA
