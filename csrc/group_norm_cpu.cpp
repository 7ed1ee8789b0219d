// Fused GroupNorm + timestep scale/shift + SiLU for the UNet's residual blocks on CPU (float32):
//
//   y = silu(GN(x) * (1 + scale[b, c]) + shift[b, c]),   GN(x) = (x - mean_bg) * rstd_bg * gamma[c] + beta[c]
//
// Unfused, eager PyTorch makes four passes over the activation after the statistics (normalize+affine,
// * (1 + scale), + shift, SiLU), each a read and a write of a tensor the size of the layer. Here the
// per-image, per-channel affine is folded into one multiply-add, y = silu(a[b, c] * x + d[b, c]), and
// applied in one pass after one statistics read (sums of x - shift and its square, the shift a sample
// of the group, so the variance has no catastrophic cancellation). Layouts: NCHW-contiguous (a group is one contiguous block) and
// channels_last (a pixel's channels are contiguous: sums and the apply loop vectorize over channels).
// The result differs from the unfused chain by float32 rounding (the fold changes the order of roundings).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>

namespace diffaug {
namespace {

// exp(x) for float32 x in [-87, 0], Cephes expf (range reduction by ln 2 in two parts, degree-5
// polynomial), ~1 ulp. Written out so the apply loop vectorizes (glibc's vector expf needs -ffast-math).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) = 1.6e-38, still normal: no denormal stalls, no 2^k underflow
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return y * scale;
}

// silu(v) = v * sigmoid(v), sigmoid from e = exp(-|v|) in (0, 1]: 1 / (1 + e) for v >= 0, e / (1 + e)
// below. One clamp, no overflow, and measurably faster here than v / (1 + exp(-v)) with two clamps
// (4.7 vs 6.9 ms for 3.2 M elements on one core).
inline float silu(float v) {
  const float e = exp_nonpositive(v < 0.0f ? v : -v);
  const float r = 1.0f / (1.0f + e);
  return v * (v >= 0.0f ? r : e * r);
}

// y[i] = silu(a[i % n] * x[i] + d[i % n]) over one run where a/d are per element (channels_last pixel)
// or constants (NCHW channel plane: n = 1 handled by the caller passing broadcast values).
void apply_plane(const float* __restrict x, float* __restrict y, int64_t n, float a, float d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = silu(a * x[i] + d);
}

void apply_pixels(const float* __restrict x, float* __restrict y, int64_t pixels, int64_t C,
                  const float* __restrict a, const float* __restrict d) {
  for (int64_t p = 0; p < pixels; ++p) {
    const float* __restrict xp = x + p * C;
    float* __restrict yp = y + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yp[c] = silu(a[c] * xp[c] + d[c]);
  }
}

// One statistics pass: sums of t = v - shift and of t^2 over a contiguous run, float lanes flushed into
// double every 256 elements. With shift = a sample of the data (its first element), the variance
// E[t^2] - E[t]^2 has no catastrophic cancellation even for a large mean (tested at N(1000, 9)).
void run_moments(const float* __restrict v, int64_t n, float shift, double& sum, double& sumsq) {
  constexpr int L = 16;
  double s = 0, q = 0;
  int64_t i = 0;
  while (i + L <= n) {
    float as[L] = {0}, aq[L] = {0};
    const int64_t end = std::min(n - L, i + 256 - L);
    for (; i <= end; i += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const float t = v[i + l] - shift;
        as[l] += t;
        aq[l] += t * t;
      }
    }
    for (int l = 0; l < L; ++l) {
      s += as[l];
      q += aq[l];
    }
  }
  for (; i < n; ++i) {
    const double t = static_cast<double>(v[i]) - shift;
    s += t;
    q += t * t;
  }
  sum += s;
  sumsq += q;
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                               int64_t groups, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "x must be float32 [B, C, H, W], got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  TORCH_CHECK(groups > 0 && C % groups == 0, "C = ", C, " is not divisible by groups = ", groups);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "weight and bias must be float32 [C]");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "give both scale and shift, or neither");
  if (scale) {
    TORCH_CHECK(scale->sizes() == at::IntArrayRef({B, C}) && shift->sizes() == at::IntArrayRef({B, C}) &&
                    scale->scalar_type() == at::kFloat && shift->scalar_type() == at::kFloat,
                "scale and shift must be float32 [B, C]");
  }
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || x.is_contiguous(), "x must be contiguous (NCHW or channels_last)");
  auto out = at::empty_like(x, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t cpg = C / groups;
  const double count = static_cast<double>(cpg * HW);
  const float* X = x.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  auto wc = weight.contiguous(), bc = bias.contiguous();
  const float *gamma = wc.data_ptr<float>(), *beta = bc.data_ptr<float>();
  at::Tensor sc, sh;
  if (scale) {
    sc = scale->contiguous();
    sh = shift->contiguous();
  }
  const float* S = scale ? sc.data_ptr<float>() : nullptr;
  const float* T = scale ? sh.data_ptr<float>() : nullptr;

  // fold GN affine, (1 + scale) and shift into y = silu(a * x + d), per (b, c)
  std::vector<float> a(B * C), d(B * C);
  auto fold = [&](int64_t b, int64_t g, double mean, double var) {
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const float ga = static_cast<float>(rstd) * gamma[c];
      float aa = ga, dd = beta[c] - static_cast<float>(mean) * ga;
      if (S) {
        const float s1 = 1.0f + S[b * C + c];
        aa = aa * s1;
        dd = dd * s1 + T[b * C + c];
      }
      a[b * C + c] = aa;
      d[b * C + c] = dd;
    }
  };

  if (!cl) {
    at::parallel_for(0, B * groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* xg = X + i * cpg * HW;
        double s = 0, q = 0;
        run_moments(xg, cpg * HW, xg[0], s, q);
        const double m = s / count;
        fold(i / groups, i % groups, xg[0] + m, std::max(q / count - m * m, 0.0));
      }
    });
    at::parallel_for(0, B * C, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) apply_plane(X + i * HW, Y + i * HW, HW, a[i], d[i]);
    });
    return out;
  }

  // channels_last: per-channel sums of t = x - shift_g and t^2 over pixel chunks (vectorized over C),
  // one read, reduced per group; shift_g = the group's first value at pixel 0
  const int nthreads = at::get_num_threads();
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = X + b * HW * C;
    std::vector<float> shift_c(C);
    for (int64_t c = 0; c < C; ++c) shift_c[c] = xb[(c / cpg) * cpg];
    std::vector<double> part(static_cast<size_t>(nthreads) * 2 * C, 0.0);
    at::parallel_for(0, HW, 2048, [&](int64_t p0, int64_t p1) {
      double* acc_d = part.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
      std::vector<float> acc(2 * C, 0.0f);
      const float* __restrict sh_c = shift_c.data();
      float* __restrict as = acc.data();
      float* __restrict aq = acc.data() + C;
      int64_t p = p0;
      while (p < p1) {  // float partial sums over blocks of 256 pixels, then into double
        const int64_t pe = std::min(p1, p + 256);
        for (; p < pe; ++p) {
          const float* __restrict xp = xb + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float t = xp[c] - sh_c[c];
            as[c] += t;
            aq[c] += t * t;
          }
        }
        for (int64_t c = 0; c < 2 * C; ++c) {
          acc_d[c] += acc[c];
          acc[c] = 0.0f;
        }
      }
    });
    std::vector<double> mean(groups), var(groups);
    for (int64_t g = 0; g < groups; ++g) {
      double s = 0, q = 0;
      for (int th = 0; th < nthreads; ++th)
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          s += part[static_cast<size_t>(th) * 2 * C + c];
          q += part[static_cast<size_t>(th) * 2 * C + C + c];
        }
      const double m = s / count;
      mean[g] = shift_c[g * cpg] + m;
      var[g] = std::max(q / count - m * m, 0.0);
    }
    for (int64_t g = 0; g < groups; ++g) fold(b, g, mean[g], var[g]);
    const float *ab = a.data() + b * C, *db = d.data() + b * C;
    float* yb = Y + b * HW * C;
    at::parallel_for(0, HW, 1024, [&](int64_t p0, int64_t p1) {
      apply_pixels(xb + p0 * C, yb + p0 * C, p1 - p0, C, ab, db);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffaug_fast_ext, CPU, m) { m.impl("group_norm_silu", &group_norm_silu_cpu); }

}  // namespace diffaug
