// Argument checks shared by the CPU and CUDA implementations of diffaug_fast_ext::pre / post. The Python
// layer (diffaug_fast/ops/fused.py) validates user input with friendlier messages; these checks guard
// the raw ops against memory-unsafe calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <type_traits>
#include <vector>

namespace diffaug {

inline bool is_float_kind(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}
inline bool is_unet_dtype(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

// per-channel (mean, std) as float32, both empty when not given
struct MeanStd {
  std::vector<float> mean, stdv;
  bool given() const { return !mean.empty(); }
};

inline std::vector<float> channel_params(const std::optional<c10::ArrayRef<double>>& v, int64_t C, const char* name) {
  std::vector<float> out;
  if (!v.has_value()) return out;
  TORCH_CHECK(static_cast<int64_t>(v->size()) == C, name, " must have one value per channel (", C, "), got ",
              v->size());
  for (double d : *v) out.push_back(static_cast<float>(d));
  return out;
}

inline MeanStd mean_std(const std::optional<c10::ArrayRef<double>>& mean,
                        const std::optional<c10::ArrayRef<double>>& stdv, int64_t C) {
  MeanStd p{channel_params(mean, C, "mean"), channel_params(stdv, C, "std")};
  TORCH_CHECK(p.mean.size() == p.stdv.size(), "give both mean and std, or neither");
  return p;
}

inline void check_table(const at::Tensor& t, const at::Tensor& table, int64_t B, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == at::kLong, "t must be int64 [B=", B, "]");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 4 && table.scalar_type() == at::kFloat,
              "table must be float32 [T, 4] (Schedule.coefficient_table)");
  TORCH_CHECK(t.device() == like.device() && table.device() == like.device(), "t and table must be on ",
              like.device());
}

inline void check_pre(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table,
                      const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox,
                      const at::Tensor& x_t) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D [B, C, H, W] view, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kByte || is_float_kind(x.scalar_type()), "x must be uint8 or float, got ",
              x.scalar_type());
  TORCH_CHECK(x_t.sizes() == x.sizes() && x_t.device() == x.device(), "x_t must match x's shape and device");
  TORCH_CHECK(is_unet_dtype(x_t.scalar_type()), "x_t must be float32, float16 or bfloat16");
  TORCH_CHECK(noise.has_value() != philox.has_value(), "give exactly one of noise and philox");
  if (noise) {
    TORCH_CHECK(noise->sizes() == x.sizes() && noise->device() == x.device() && noise->scalar_type() == at::kFloat,
                "noise must be float32 shaped like x on its device");
  } else {
    TORCH_CHECK(philox->numel() == 2 && philox->scalar_type() == at::kLong && philox->device() == x.device(),
                "philox must be int64 [2] (seed, offset) on x's device");
  }
  check_table(t, table, x.size(0), x);
}

inline void check_post(const at::Tensor& model_out, const at::Tensor& x_t, const at::Tensor& t,
                       const at::Tensor& table, const at::Tensor& out) {
  TORCH_CHECK(x_t.dim() == 4 && is_unet_dtype(x_t.scalar_type()), "x_t must be a float [B, C, H, W] tensor");
  const int64_t C = x_t.size(1);
  TORCH_CHECK(model_out.dim() == 4 && is_unet_dtype(model_out.scalar_type()) && model_out.size(0) == x_t.size(0) &&
                  (model_out.size(1) == C || model_out.size(1) == 2 * C) && model_out.size(2) == x_t.size(2) &&
                  model_out.size(3) == x_t.size(3),
              "model_out must be float [B, C or 2C, H, W] matching x_t ", x_t.sizes(), ", got ", model_out.sizes());
  TORCH_CHECK(out.sizes() == x_t.sizes() && is_float_kind(out.scalar_type()), "out must be float shaped like x_t");
  TORCH_CHECK(model_out.device() == x_t.device() && out.device() == x_t.device(), "tensors must share a device");
  check_table(t, table, x_t.size(0), x_t);
}

// Runtime dtypes -> template arguments, shared by the CPU and CUDA launchers. dispatch_pre calls
// f(TX{}, TT{}, NOISE, MODE) with TX the input's element type, TT x_t's (float, half or bfloat16),
// NOISE a bool_constant (explicit noise tensor vs Philox) and MODE an int_constant: 0 = floats in
// [-1, 1], 1 = classifier-normalized floats, 2 = uint8 pixels. dispatch_post calls f(TM{}, TT{}, TO{})
// for the model output, x_t and out element types.
template <typename F>
void dispatch_pre(const at::Tensor& x, const at::Tensor& x_t, bool has_noise, bool normalized, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "diffaug_pre_xt", [&] {
    using TT = scalar_t;
    if constexpr (!std::is_same_v<TT, double>) {
      auto by_noise = [&](auto tx, auto mode) {
        if (has_noise) f(tx, TT{}, std::true_type{}, mode);
        else f(tx, TT{}, std::false_type{}, mode);
      };
      if (x.scalar_type() == at::kByte) {
        by_noise(uint8_t{}, std::integral_constant<int, 2>{});
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffaug_pre_x", [&] {
          if (normalized) by_noise(scalar_t{}, std::integral_constant<int, 1>{});
          else by_noise(scalar_t{}, std::integral_constant<int, 0>{});
        });
      }
    }
  });
}

template <typename F>
void dispatch_post(const at::Tensor& model_out, const at::Tensor& x_t, const at::Tensor& out, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_out.scalar_type(), "diffaug_post_eps", [&] {
    using TM = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "diffaug_post_xt", [&] {
      using TT = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diffaug_post_out", [&] {
        if constexpr (!std::is_same_v<TM, double> && !std::is_same_v<TT, double>) f(TM{}, TT{}, scalar_t{});
      });
    });
  });
}

}  // namespace diffaug
