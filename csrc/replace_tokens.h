// Declarations shared by the CPU op (replace_tokens.cpp) and the CUDA binding
// (replace_tokens_cuda.cpp) of fastelectra::replace_tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace fastelectra {

// Checks dtypes, shapes, contiguity and devices (all on `device_type`), naming the argument.
// Data-dependent checks (index ranges) are the caller's: the CPU op raises, the CUDA kernel flags.
void check_replace_tokens_args(const at::Tensor& logits, const at::Tensor& input_ids,
                               const at::Tensor& masked_positions, double temperature, const at::Tensor& seed,
                               c10::DeviceType device_type);

// Temperatures below 2^-32 sample as temperature 0 (plain argmax): logits / temperature would overflow fp32
// for logits past FLT_MAX * temperature, and ties among the overflowed ones would go to the first column
// instead of the largest logit; at such temperatures the noise only decides between logits within ~1e-8.
constexpr double kMaxInverseTemperature = 4294967296.0;  // 2^32

// Rows of logits are numbered with 32 bits in the noise's Philox counters (philox.h).
constexpr int64_t kMaxRows = 4294967295;  // 2^32 - 1

// 1 / temperature as the fp32 factor both implementations multiply the logits with. Returns
// false (plain argmax, the temperature -> 0 limit) when temperature is 0 or 1/temperature
// exceeds kMaxInverseTemperature.
bool inverse_temperature(double temperature, float* inv_tau);

// Checks the arguments of gumbel_noise: logits 2-D, floating, at most kMaxRows rows of fewer than 2^31
// columns, on `device_type`; seed as in check_seed_arg.
void check_gumbel_noise_args(const at::Tensor& logits, const at::Tensor& seed, c10::DeviceType device_type);

// Checks the Philox seed of `op`: an int64 tensor of one element on `logits`' device. The kernels
// read it from device memory, so a step needs no host sync and a CUDA-graph replay sees the value
// the seed tensor holds at replay time.
void check_seed_arg(const char* op, const at::Tensor& seed, const at::Tensor& logits);

// Text of a number, a shape, a dtype or a device, for argument errors. TORCH_CHECK builds its
// message with a std::ostream made inside this library, and where the toolchain linked its own
// libstdc++ into the library (the H100 machine's /opt/gcc g++ did) that stream has no number facet:
// formatting an integer through it crashed (a segfault instead of the error). Strings pass through
// safely, so every message streams only strings and these.
std::string text(int64_t v);
std::string text(double v);
std::string text(c10::IntArrayRef v);
std::string text(c10::ScalarType t);
std::string text(const c10::Device& d);
std::string text(c10::DeviceType t);

}  // namespace fastelectra
