// Declarations shared by the CPU op (replace_tokens.cpp) and the CUDA binding
// (replace_tokens_cuda.cpp) of fastelectra::replace_tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastelectra {

// Checks dtypes, shapes, contiguity and devices (all on `device_type`), naming the argument.
// Data-dependent checks (index ranges) are the caller's: the CPU op raises, the CUDA kernel flags.
void check_replace_tokens_args(const at::Tensor& logits, const at::Tensor& input_ids,
                               const at::Tensor& masked_positions, double temperature,
                               c10::DeviceType device_type);

// 1 / temperature as the fp32 factor both implementations multiply the logits with. Returns
// false (plain argmax, the temperature -> 0 limit) when temperature is 0 or 1/temperature
// overflows fp32.
bool inverse_temperature(double temperature, float* inv_tau);

// Checks the logits argument of gumbel_noise (2-D, floating, on `device_type`).
void check_gumbel_noise_args(const at::Tensor& logits, c10::DeviceType device_type);

}  // namespace fastelectra
