// Declarations shared by the CPU op (replace_tokens.cpp) and the CUDA binding
// (replace_tokens_cuda.cpp) of fastelectra::replace_tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastelectra {

// Checks dtypes, shapes, contiguity and devices (all on `device_type`), naming the argument.
// Data-dependent checks (index ranges) are the caller's: the CPU op raises, the CUDA kernel flags.
void check_replace_tokens_args(const at::Tensor& logits, const at::Tensor& input_ids,
                               const at::Tensor& masked_positions, double temperature, const at::Tensor& seed,
                               c10::DeviceType device_type);

// 1 / temperature as the fp32 factor both implementations multiply the logits with. Returns
// false (plain argmax, the temperature -> 0 limit) when temperature is 0 or 1/temperature
// overflows fp32.
bool inverse_temperature(double temperature, float* inv_tau);

// Checks the arguments of gumbel_noise: logits 2-D, floating, on `device_type`; seed as in check_seed_arg.
void check_gumbel_noise_args(const at::Tensor& logits, const at::Tensor& seed, c10::DeviceType device_type);

// Checks the Philox seed of `op`: an int64 tensor of one element on `logits`' device. The kernels
// read it from device memory, so a step needs no host sync and a CUDA-graph replay sees the value
// the seed tensor holds at replay time.
void check_seed_arg(const char* op, const at::Tensor& seed, const at::Tensor& logits);

}  // namespace fastelectra
