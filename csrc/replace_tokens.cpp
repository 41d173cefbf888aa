// fastelectra::replace_tokens: schema, argument checks and the CPU implementation.
//
// Fuses ELECTRA's replacement step for the (N, V) generator logits of the masked positions:
// Gumbel-max sampling sample = argmax_c(logits[c] * (1/tau) + g_c) with counter-based Philox
// noise (philox.h; tau = 0: plain argmax), the scatter of the samples into a copy of the original
// ids, the is-replaced labels (masked AND sample != original) and optionally the row log-sum-exp
// of the logits (fp32, for the generator's MLM loss).
//
//   replace_tokens(Tensor logits, Tensor input_ids, Tensor masked_positions, float temperature,
//                  Tensor seed, int offset, bool return_lse) -> (ids, labels, sampled, lse)
//   logits (N, V) fp32/fp16/bf16 contiguous; input_ids (B, T) int64; masked_positions (N,) int64
//   flat indices into input_ids.view(-1), one per row of logits, expected distinct.
//   seed: int64, one element, on logits' device. It is read where the noise is made (by the CUDA
//   kernel from device memory), never copied to the host: no sync, and a CUDA graph that captured
//   the op draws with whatever value the seed tensor holds at each replay.
//   ids (B, T) int64, labels (B, T) bool, sampled (N,) int64, lse (N,) fp32 or (0,) when not asked.
//
//   gumbel_noise(Tensor logits, Tensor seed, int offset) -> Tensor
//   the (N, V) fp32 noise g that replace_tokens adds for these logits' shape, seed and offset
//   (only the shape and device of `logits` are used). For tests and debugging.
//
// The CPU version runs rows in parallel (at::parallel_for) with the same noise, the same
// candidate order and philox.h's filter as the CUDA kernel (replace_tokens_kernel.cu), which both
// apply to blocks before elements (the filter only skips losers, so the blocks' sizes change
// nothing): both return identical samples for the same logits, seed and offset. It raises on every invalid
// input, including masked positions outside input_ids and ids outside [0, V).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

#include "philox.h"
#include "replace_tokens.h"

// Makes `import fastelectra._C` work (the ops are registered by the static initialisers below).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fastelectra {

void check_replace_tokens_args(const at::Tensor& logits, const at::Tensor& input_ids,
                               const at::Tensor& masked_positions, double temperature, const at::Tensor& seed,
                               c10::DeviceType device_type) {
  TORCH_CHECK(logits.dim() == 2, "replace_tokens: logits must be 2-D (num_masked, vocab_size), got shape ",
              text(logits.sizes()));
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "replace_tokens: logits must be float32, float16 or bfloat16, got ", text(dt));
  TORCH_CHECK(logits.size(1) >= 1, "replace_tokens: logits has an empty vocabulary dimension");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int32_t>::max(),
              "replace_tokens: logits vocabulary size must be below 2^31, got ", text(logits.size(1)));
  TORCH_CHECK(logits.size(0) <= kMaxRows, "replace_tokens: logits has ", text(logits.size(0)),
              " rows; at most 2^32 - 1 are supported (the noise is keyed on 32-bit row numbers)");
  TORCH_CHECK(logits.is_contiguous(), "replace_tokens: logits must be contiguous (row-major (num_masked, "
              "vocab_size)), got strides ", text(logits.strides()), "; call .contiguous() first");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong && input_ids.dim() == 2,
              "replace_tokens: input_ids must be an int64 tensor of shape (batch, seqlen), got ",
              text(input_ids.scalar_type()), " of shape ", text(input_ids.sizes()));
  TORCH_CHECK(masked_positions.scalar_type() == at::kLong && masked_positions.dim() == 1,
              "replace_tokens: masked_positions must be a 1-D int64 tensor of flat indices into input_ids, got ",
              text(masked_positions.scalar_type()), " of shape ", text(masked_positions.sizes()));
  TORCH_CHECK(masked_positions.size(0) == logits.size(0), "replace_tokens: masked_positions has ",
              text(masked_positions.size(0)), " entries but logits has ", text(logits.size(0)),
              " rows; they must match");
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "replace_tokens: temperature must be a finite number >= 0, got ", text(temperature));
  TORCH_CHECK(logits.device() == input_ids.device() && logits.device() == masked_positions.device(),
              "replace_tokens: logits, input_ids and masked_positions must be on one device, got logits on ",
              text(logits.device()), ", input_ids on ", text(input_ids.device()), ", masked_positions on ",
              text(masked_positions.device()));
  TORCH_CHECK(logits.device().type() == device_type, "replace_tokens: the ", text(device_type),
              " implementation got logits on ", text(logits.device()));
  check_seed_arg("replace_tokens", seed, logits);
}

std::string text(int64_t v) { return std::to_string(v); }

std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

std::string text(c10::IntArrayRef v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

std::string text(c10::ScalarType t) { return c10::toString(t); }

std::string text(const c10::Device& d) { return d.str(); }

std::string text(c10::DeviceType t) { return c10::DeviceTypeName(t, /*lower_case=*/true); }

bool inverse_temperature(double temperature, float* inv_tau) {
  if (!(temperature > 0.0) || !(1.0 / temperature <= kMaxInverseTemperature)) return false;
  const float inv = (float)(1.0 / temperature);
  *inv_tau = inv;
  return true;
}

void check_gumbel_noise_args(const at::Tensor& logits, const at::Tensor& seed, c10::DeviceType device_type) {
  TORCH_CHECK(logits.dim() == 2, "gumbel_noise: logits must be 2-D (num_masked, vocab_size), got shape ",
              text(logits.sizes()));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "gumbel_noise: logits must be a floating tensor, got ",
              text(logits.scalar_type()));
  TORCH_CHECK(logits.size(0) <= kMaxRows, "gumbel_noise: logits has ", text(logits.size(0)),
              " rows; at most 2^32 - 1 are supported (the noise is keyed on 32-bit row numbers)");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int32_t>::max(),
              "gumbel_noise: logits vocabulary size must be below 2^31, got ", text(logits.size(1)));
  TORCH_CHECK(logits.device().type() == device_type, "gumbel_noise: the ", text(device_type),
              " implementation got logits on ", text(logits.device()));
  check_seed_arg("gumbel_noise", seed, logits);
}

void check_seed_arg(const char* op, const at::Tensor& seed, const at::Tensor& logits) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 tensor with one element (e.g. torch.tensor([seed])), got ",
              text(seed.scalar_type()), " of shape ", text(seed.sizes()));
  TORCH_CHECK(seed.device() == logits.device(), op, ": seed must be on the device of logits (",
              text(logits.device()), "), got seed on ", text(seed.device()));
}

namespace {

// The sample of one row (see better_candidate in philox.h for the order). The row goes octet by octet
// (philox.h's layout; the octets at its two ends may hold elements of other rows, which are left out),
// the min words of its whole octets made 32 calls at a time for 128 octets; philox.h's filter first
// tests an octet's part of the row on its min word and largest y, which bound every element's test;
// an octet that passes makes its fine Philox calls, keys its minimum's element and takes the others
// through the per-element tests, the exact noise only for the elements that pass them (as the CUDA
// kernel's fold_survivors).
template <typename scalar_t, bool kNoise>
int64_t sample_row(const scalar_t* x, int64_t row, int64_t vocab, float inv_tau, uint64_t seed,
                   uint64_t offset) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float best_key = -kInf;
  int64_t best_col = vocab;  // none yet
  if (kNoise) {
    float m = -kInf;     // running max of y = logit / tau
    float shift = 0.0f;  // m * log2(e) once m > -inf
    float c = kInf;      // filter_scale(m, best_key)
    const uint64_t row_begin = (uint64_t)row * (uint64_t)vocab, row_end = row_begin + (uint64_t)vocab;
    const uint64_t first_whole = (row_begin + 7) / 8;  // the row's whole octets start here
    constexpr int kCalls = kGroupOctets / 4;
    PhiloxWords min_calls[kCalls];
    uint64_t group = ~(uint64_t)0;  // the block of 128 whole octets whose calls min_calls holds
    for (uint64_t o = row_begin / 8; 8 * o < row_end; ++o) {
      const uint64_t lo = std::max(8 * o, row_begin), hi = std::min(8 * o + 8, row_end);  // the row's part
      uint32_t r;
      if (hi - lo == 8) {
        const uint64_t q = o - first_whole;
        if (q / kGroupOctets != group) {
          group = q / kGroupOctets;
          uint32_t c0[kCalls], c1[kCalls];
          for (int l = 0; l < kCalls; ++l) {
            c0[l] = (uint32_t)row;
            c1[l] = min_call_counter((uint32_t)group, (uint32_t)l);
          }
          philox4x32_10_many<kCalls>(c0, c1, (uint32_t)offset, (uint32_t)(offset >> 32), (uint32_t)seed,
                                     (uint32_t)(seed >> 32), min_calls);
        }
        r = word_at(min_calls[q % 32], (int)(q / 32 % 4));
      } else {
        r = octet_min_word(o, (uint64_t)row, row_begin, row_end, seed, offset);
      }
      const int j0 = (int)(lo - 8 * o), count = (int)(hi - lo);
      const int64_t col0 = (int64_t)(lo - row_begin);
      float y[8];
      float y_max = -kInf;
      for (int e = 0; e < count; ++e) {
        y[e] = fe_mul(static_cast<float>(x[col0 + e]), inv_tau);
        if (y[e] > y_max) y_max = y[e];  // NaN skipped: it never wins
      }
      if (y_max > m) {
        m = y_max;
        shift = m * kLog2e;
        c = filter_scale(m, best_key);
      }
      if (!filter_may_win(r, fast_exp2(y_max * kLog2e - shift), c)) continue;
      PhiloxWords fine[2];
      fine_calls(o, seed, offset, fine);
      const float e_min = octet_min_exponential(r);
      const int J = octet_min_position(fine[1]);
      // the octet's minimum first (its largest noise), then the others through the second test
      auto fold_element = [&](int e, float e_exp) {
        const float key = fe_add(y[e], gumbel_from_exponential(e_exp));
        if (better_candidate(key, col0 + e, best_key, best_col)) {
          best_key = key;
          best_col = col0 + e;
          c = filter_scale(m, best_key);
        }
      };
      const int eJ = J - j0;
      if (eJ >= 0 && eJ < count && filter_may_win(r, fast_exp2(y[eJ] * kLog2e - shift), c)) fold_element(eJ, e_min);
      for (int e = 0; e < count; ++e) {
        if (e == eJ) continue;
        const float q = fast_exp2(y[e] * kLog2e - shift);
        if (!filter_may_win(r, q, c)) continue;
        const uint32_t w = octet_fine_word(j0 + e, J, fine);
        if (!filter_may_win_above(e_min, w, q, c)) continue;
        fold_element(e, octet_other_exponential(e_min, w));
      }
    }
  } else {
    for (int64_t col = 0; col < vocab; ++col) {
      const float key = static_cast<float>(x[col]);
      if (better_candidate(key, col, best_key, best_col)) {
        best_key = key;
        best_col = col;
      }
    }
  }
  return best_col < vocab ? best_col : 0;  // no candidate: a row of NaN
}

template <typename scalar_t>
float row_logsumexp(const scalar_t* x, int64_t vocab) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < vocab; ++c) m = std::max(m, static_cast<float>(x[c]));  // NaN skipped here
  if (std::isinf(m)) {
    bool has_nan = false;
    for (int64_t c = 0; c < vocab; ++c) has_nan |= std::isnan(static_cast<float>(x[c]));
    return (m < 0 && has_nan) ? std::numeric_limits<float>::quiet_NaN() : m;
  }
  double s = 0.0;
  for (int64_t c = 0; c < vocab; ++c) s += (double)std::exp(static_cast<float>(x[c]) - m);  // expf: < 1 ulp
  return m + (float)std::log(s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> replace_tokens_cpu(
    const at::Tensor& logits, const at::Tensor& input_ids, const at::Tensor& masked_positions,
    double temperature, const at::Tensor& seed, int64_t offset, bool return_lse) {
  check_replace_tokens_args(logits, input_ids, masked_positions, temperature, seed, c10::DeviceType::CPU);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor positions = masked_positions.contiguous();
  const int64_t numel = ids.numel();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t* pos_p = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pos_p[i] >= 0 && pos_p[i] < numel, "replace_tokens: masked_positions[", text(i), "] = ",
                text(pos_p[i]), " is out of range for input_ids with ", text(numel), " elements");
  for (int64_t i = 0; i < numel; ++i)
    TORCH_CHECK(ids_p[i] >= 0 && ids_p[i] < vocab, "replace_tokens: input_ids contains ", text(ids_p[i]),
                " (flat index ", text(i), "), outside [0, vocab_size=", text(vocab), ") of logits");

  at::Tensor out_ids = ids.clone();
  at::Tensor labels = at::zeros(ids.sizes(), ids.options().dtype(at::kBool));
  at::Tensor sampled = at::empty({n}, ids.options());
  at::Tensor lse = at::empty({return_lse ? n : 0}, logits.options().dtype(at::kFloat));
  if (n == 0) return {out_ids, labels, sampled, lse};

  float inv_tau = 1.0f;
  const bool noise = inverse_temperature(temperature, &inv_tau);
  const uint64_t useed = (uint64_t)*seed.const_data_ptr<int64_t>(), uoffset = (uint64_t)offset;
  int64_t* sampled_p = sampled.data_ptr<int64_t>();
  float* lse_p = return_lse ? lse.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / vocab);  // rows per task: >= ~32k elements
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "replace_tokens_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = x + row * vocab;
        sampled_p[row] = noise ? sample_row<scalar_t, true>(xr, row, vocab, inv_tau, useed, uoffset)
                               : sample_row<scalar_t, false>(xr, row, vocab, inv_tau, useed, uoffset);
        if (lse_p) lse_p[row] = row_logsumexp(xr, vocab);
      }
    });
  });

  int64_t* out_p = out_ids.data_ptr<int64_t>();
  bool* labels_p = labels.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {  // sequential: duplicate positions resolve to the last row
    out_p[pos_p[i]] = sampled_p[i];
    labels_p[pos_p[i]] = sampled_p[i] != ids_p[pos_p[i]];
  }
  return {out_ids, labels, sampled, lse};
}

at::Tensor gumbel_noise_cpu(const at::Tensor& logits, const at::Tensor& seed, int64_t offset) {
  check_gumbel_noise_args(logits, seed, c10::DeviceType::CPU);
  const uint64_t useed = (uint64_t)*seed.const_data_ptr<int64_t>();
  at::Tensor out = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  const int64_t total = out.numel();
  float* out_p = out.data_ptr<float>();
  const uint64_t n_rows = (uint64_t)logits.size(0), vocab = (uint64_t)logits.size(1);
  at::parallel_for(0, (total + 7) / 8, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) octet_noise(out_p, (uint64_t)o, n_rows, vocab, useed, (uint64_t)offset);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fastelectra, m) {
  // needs_contiguous_strides: torch.compile hands the op contiguous logits (inductor otherwise pads the
  // rows of a matmul output, which the op rejects)
  m.def("replace_tokens(Tensor logits, Tensor input_ids, Tensor masked_positions, float temperature, "
        "Tensor seed, int offset, bool return_lse) -> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::needs_contiguous_strides});
  m.def("gumbel_noise(Tensor logits, Tensor seed, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastelectra, CPU, m) {
  m.impl("replace_tokens", &replace_tokens_cpu);
  m.impl("gumbel_noise", &gumbel_noise_cpu);
}

}  // namespace fastelectra
