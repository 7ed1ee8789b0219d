// CPU kernels for diffaug_fast_ext::pre / post: one pass over memory, OpenMP over image rows, the inner
// loop over a row written so GCC vectorizes it (unit strides are versioned automatically at -O3).
// Per-element math: augment_math.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "augment_args.h"
#include "augment_math.h"

namespace diffaug {
namespace {

enum class In { Plain = 0, Normalized = 1, Pixels = 2 };

// A row is either one channel of one image row (planar: n = W elements, stride = the W stride) or, when
// every tensor stores channels interleaved with W stride C (channels_last), the whole pixel row
// (n = W * C, stride 1). chan_mean/chan_std/lidx give each row element's channel parameters and its
// logical NCHW offset (for Philox) relative to the row start.
struct RowLayout {
  bool interleaved;
  int64_t n;
  std::vector<std::vector<float>> mean, stdv;  // [rows per pixel-row][n]
  std::vector<std::vector<int64_t>> lidx;
};

RowLayout make_layout(bool interleaved, int64_t C, int64_t H, int64_t W, const std::vector<float>& mean,
                      const std::vector<float>& stdv) {
  RowLayout L{interleaved, interleaved ? W * C : W, {}, {}, {}};
  const int64_t parts = interleaved ? 1 : C;
  for (int64_t p = 0; p < parts; ++p) {
    std::vector<float> m(L.n, 0.f), s(L.n, 1.f);
    std::vector<int64_t> li(L.n);
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t c = interleaved ? j % C : p, w = interleaved ? j / C : j;
      if (!mean.empty()) {
        m[j] = mean[c];
        s[j] = stdv[c];
      }
      li[j] = c * H * W + w;
    }
    L.mean.push_back(std::move(m));
    L.stdv.push_back(std::move(s));
    L.lidx.push_back(std::move(li));
  }
  return L;
}

bool interleaved(const at::Tensor& a) { return a.stride(1) == 1 && a.stride(3) == a.size(1); }

// per-image coefficients gathered from the float32 table: out[b] = table[t[b], col]
std::vector<float> gather(const at::Tensor& t, const at::Tensor& table, int col) {
  auto tc = t.contiguous();
  auto tab = table.contiguous();
  const int64_t T = tab.size(0);
  std::vector<float> out(tc.size(0));
  for (int64_t b = 0; b < tc.size(0); ++b) {
    const int64_t s = tc.data_ptr<int64_t>()[b];
    TORCH_CHECK(s >= 0 && s < T, "t[", b, "] = ", s, " is outside the schedule's steps 0..", T - 1);
    out[b] = tab.data_ptr<float>()[s * 4 + col];
  }
  return out;
}

// UNIT: every stride is 1, known at compile time, so GCC emits packed loads/stores (runtime strides
// would need AVX2 scatters, which do not exist: the loop stayed scalar).
template <typename TX, typename TT, bool NOISE, In MODE, bool UNIT>
void pre_row(const TX* __restrict px, int64_t sx, const float* __restrict pn, int64_t sn, TT* __restrict pt,
             int64_t st, int64_t n, const float* __restrict mean, const float* __restrict stdv,
             const int64_t* __restrict lidx, float sa, float s1ma, uint64_t seed, uint64_t idx0) {
  if constexpr (UNIT) sx = sn = st = 1;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(px[j * sx]);
    float x0;
    if constexpr (MODE == In::Pixels) {
      x0 = pixel_to_unit(v);
    } else if constexpr (MODE == In::Normalized) {
      x0 = normalized_to_unit(v, mean[j], stdv[j]);
    } else {
      x0 = v;
    }
    float z;
    if constexpr (NOISE) {
      z = pn[j * sn];
    } else {
      z = philox_normal(idx0 + static_cast<uint64_t>(lidx[j]), seed);
    }
    pt[j * st] = static_cast<TT>(q_sample(x0, z, sa, s1ma));
  }
}

template <typename TX, typename TT, bool NOISE, In MODE>
void pre_launch(const at::Tensor& x, const std::optional<at::Tensor>& noise, at::Tensor& x_t,
                const std::vector<float>& sa, const std::vector<float>& s1ma, const RowLayout& L, uint64_t seed,
                uint64_t offset) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const TX* X = x.data_ptr<TX>();
  const float* N = NOISE ? noise->data_ptr<float>() : nullptr;
  TT* XT = x_t.data_ptr<TT>();
  const int64_t parts = L.interleaved ? 1 : C;
  const int64_t sxj = L.interleaved ? 1 : x.stride(3), stj = L.interleaved ? 1 : x_t.stride(3);
  const int64_t snj = NOISE ? (L.interleaved ? 1 : noise->stride(3)) : 0;
  const bool unit = sxj == 1 && stj == 1 && (!NOISE || snj == 1);
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      for (int64_t p = 0; p < parts; ++p) {  // p = channel in the planar layout
        const int64_t c = L.interleaved ? 0 : p;
        const TX* px = X + b * x.stride(0) + c * x.stride(1) + h * x.stride(2);
        const float* pn = NOISE ? N + b * noise->stride(0) + c * noise->stride(1) + h * noise->stride(2) : nullptr;
        TT* pt = XT + b * x_t.stride(0) + c * x_t.stride(1) + h * x_t.stride(2);
        const uint64_t idx0 = offset + static_cast<uint64_t>(b * C * H * W + h * W);
        if (unit)
          pre_row<TX, TT, NOISE, MODE, true>(px, 1, pn, 1, pt, 1, L.n, L.mean[p].data(), L.stdv[p].data(),
                                             L.lidx[p].data(), sa[b], s1ma[b], seed, idx0);
        else
          pre_row<TX, TT, NOISE, MODE, false>(px, sxj, pn, snj, pt, stj, L.n, L.mean[p].data(), L.stdv[p].data(),
                                              L.lidx[p].data(), sa[b], s1ma[b], seed, idx0);
      }
    }
  });
}

void pre_cpu(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table, const std::optional<at::Tensor>& noise,
             const std::optional<at::Tensor>& philox, std::optional<c10::ArrayRef<double>> mean,
             std::optional<c10::ArrayRef<double>> stdv, at::Tensor& x_t) {
  check_pre(x, t, table, noise, philox, x_t);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const auto m = channel_params(mean, C, "mean"), s = channel_params(stdv, C, "std");
  TORCH_CHECK(m.size() == s.size(), "give both mean and std, or neither");
  const bool il = interleaved(x) && interleaved(x_t) && (!noise || interleaved(*noise));
  const RowLayout L = make_layout(il, C, H, W, m, s);
  const auto sa = gather(t, table, 0), s1ma = gather(t, table, 1);
  uint64_t seed = 0, offset = 0;
  if (philox) {
    auto ph = philox->contiguous();
    seed = static_cast<uint64_t>(ph.data_ptr<int64_t>()[0]);
    offset = static_cast<uint64_t>(ph.data_ptr<int64_t>()[1]);
  }
  const bool norm = !m.empty();
  at::Tensor xt = x_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "diffaug_pre_xt", [&] {
    using TT = scalar_t;
    if constexpr (!std::is_same_v<TT, double>) {
      auto run = [&](auto tx, auto noise_flag, auto mode) {
        using TX = decltype(tx);
        pre_launch<TX, TT, decltype(noise_flag)::value, decltype(mode)::value>(x, noise, xt, sa, s1ma, L, seed,
                                                                               offset);
      };
      auto by_noise = [&](auto tx, auto mode) {
        if (noise) run(tx, std::true_type{}, mode);
        else run(tx, std::false_type{}, mode);
      };
      if (x.scalar_type() == at::kByte) {
        by_noise(uint8_t{}, std::integral_constant<In, In::Pixels>{});
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffaug_pre_x", [&] {
          if (norm) by_noise(scalar_t{}, std::integral_constant<In, In::Normalized>{});
          else by_noise(scalar_t{}, std::integral_constant<In, In::Plain>{});
        });
      }
    }
  });
}

template <typename TM, typename TT, typename TO, bool NORM, bool UNIT, bool CLIP>
void post_row(const TM* __restrict pe, int64_t se, const TT* __restrict pt, int64_t st, TO* __restrict po, int64_t so,
              int64_t n, const float* __restrict mean, const float* __restrict stdv, float sr, float srm1) {
  if constexpr (UNIT) se = st = so = 1;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x0 = predict_x0(static_cast<float>(pt[j * st]), static_cast<float>(pe[j * se]), sr, srm1, CLIP);
    po[j * so] = static_cast<TO>(NORM ? unit_to_normalized(x0, mean[j], stdv[j]) : x0);
  }
}

template <typename TM, typename TT, typename TO, bool NORM>
void post_launch(const at::Tensor& mo, const at::Tensor& x_t, at::Tensor& out, const std::vector<float>& sr,
                 const std::vector<float>& srm1, const RowLayout& L, bool clip) {
  const int64_t B = x_t.size(0), C = x_t.size(1), H = x_t.size(2);
  const TM* M = mo.data_ptr<TM>();
  const TT* XT = x_t.data_ptr<TT>();
  TO* O = out.data_ptr<TO>();
  const int64_t parts = L.interleaved ? 1 : C;
  const int64_t sej = L.interleaved ? 1 : mo.stride(3), stj = L.interleaved ? 1 : x_t.stride(3);
  const int64_t soj = L.interleaved ? 1 : out.stride(3);
  const bool unit = sej == 1 && stj == 1 && soj == 1;
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t c = L.interleaved ? 0 : p;
        const TM* pe = M + b * mo.stride(0) + c * mo.stride(1) + h * mo.stride(2);
        const TT* pt = XT + b * x_t.stride(0) + c * x_t.stride(1) + h * x_t.stride(2);
        TO* po = O + b * out.stride(0) + c * out.stride(1) + h * out.stride(2);
        // compile-time clip: with a runtime flag GCC left the normalized loop scalar (128 vs 16 ms)
        const float *mp = L.mean[p].data(), *sp = L.stdv[p].data();
        if (unit && clip) post_row<TM, TT, TO, NORM, true, true>(pe, 1, pt, 1, po, 1, L.n, mp, sp, sr[b], srm1[b]);
        else if (unit) post_row<TM, TT, TO, NORM, true, false>(pe, 1, pt, 1, po, 1, L.n, mp, sp, sr[b], srm1[b]);
        else if (clip) post_row<TM, TT, TO, NORM, false, true>(pe, sej, pt, stj, po, soj, L.n, mp, sp, sr[b], srm1[b]);
        else post_row<TM, TT, TO, NORM, false, false>(pe, sej, pt, stj, po, soj, L.n, mp, sp, sr[b], srm1[b]);
      }
    }
  });
}

void post_cpu(const at::Tensor& model_out, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table,
              std::optional<c10::ArrayRef<double>> mean, std::optional<c10::ArrayRef<double>> stdv, bool clip,
              at::Tensor& out) {
  check_post(model_out, x_t, t, table, out);
  const int64_t C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const auto m = channel_params(mean, C, "mean"), s = channel_params(stdv, C, "std");
  TORCH_CHECK(m.size() == s.size(), "give both mean and std, or neither");
  // model_out has 2C channels with learned sigma: interleaved only when its pixel stride is C
  const bool il = interleaved(x_t) && interleaved(out) && model_out.stride(1) == 1 && model_out.stride(3) == C;
  const RowLayout L = make_layout(il, C, H, W, m, s);
  const auto sr = gather(t, table, 2), srm1 = gather(t, table, 3);
  const bool norm = !m.empty();
  at::Tensor o = out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_out.scalar_type(), "diffaug_post_eps", [&] {
    using TM = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "diffaug_post_xt", [&] {
      using TT = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diffaug_post_out", [&] {
        using TO = scalar_t;
        if constexpr (!std::is_same_v<TM, double> && !std::is_same_v<TT, double>) {
          if (norm) post_launch<TM, TT, TO, true>(model_out, x_t, o, sr, srm1, L, clip);
          else post_launch<TM, TT, TO, false>(model_out, x_t, o, sr, srm1, L, clip);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(diffaug_fast_ext, CPU, m) {
  m.impl("pre", &pre_cpu);
  m.impl("post", &post_cpu);
}

}  // namespace diffaug
