// CUDA kernels for diffaug_fast_ext::pre / post: one thread per pixel (b, h, w), looping over the C
// channels, so neighbouring threads touch neighbouring addresses in both NCHW and channels_last layouts.
// Per-element math: augment_math.h, shared with the CPU kernel (built with --fmad=false, see there).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE, which minimal toolkits lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "augment_args.h"
#include "augment_math.h"

namespace diffaug {
namespace {

constexpr int kMaxC = 4;  // DiffAug denoisers take RGB; one spare for RGBA-style inputs
constexpr int kThreads = 256;

struct Strides {
  int64_t b, c, h, w;
};
Strides strides_of(const at::Tensor& a) { return {a.stride(0), a.stride(1), a.stride(2), a.stride(3)}; }

struct PreArgs {
  int64_t B, C, H, W;
  Strides sx, sn, st;
  const int64_t* t;
  const float* table;
  const int64_t* philox;  // device int64 [2] (seed, offset): read in-kernel, so CUDA graphs can replay it
  float mean[kMaxC], stdv[kMaxC];
  int table_steps;
};

// The thread's pixel (b, h, w) and its image's two coefficients table[t[b], col0 .. col0 + 1]; false
// for the threads past the last pixel.
struct Pixel {
  int64_t b, h, w;
  float k0, k1;
};
__device__ __forceinline__ bool pixel_of(int64_t B, int64_t H, int64_t W, const int64_t* t, const float* table,
                                         int col0, Pixel& p) {
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= B * H * W) return false;
  p.w = pix % W;
  p.h = (pix / W) % H;
  p.b = pix / (W * H);
  const int64_t s = t[p.b];
  p.k0 = table[s * 4 + col0];
  p.k1 = table[s * 4 + col0 + 1];
  return true;
}

template <typename TX, typename TT, bool NOISE, int MODE>
__global__ void pre_kernel(const TX* __restrict__ x, const float* __restrict__ noise, TT* __restrict__ x_t, PreArgs a) {
  Pixel p;
  if (!pixel_of(a.B, a.H, a.W, a.t, a.table, 0, p)) return;
  const int64_t b = p.b, h = p.h, w = p.w;
  const float sa = p.k0, s1ma = p.k1;
  uint64_t seed = 0, offset = 0;
  if (!NOISE) {
    seed = static_cast<uint64_t>(a.philox[0]);
    offset = static_cast<uint64_t>(a.philox[1]);
  }
  for (int64_t c = 0; c < a.C; ++c) {
    const float v = static_cast<float>(x[b * a.sx.b + c * a.sx.c + h * a.sx.h + w * a.sx.w]);
    const float x0 = MODE == 2 ? pixel_to_unit(v) : (MODE == 1 ? normalized_to_unit(v, a.mean[c], a.stdv[c]) : v);
    const float z = NOISE ? noise[b * a.sn.b + c * a.sn.c + h * a.sn.h + w * a.sn.w]
                          : philox_normal(offset + static_cast<uint64_t>(((b * a.C + c) * a.H + h) * a.W + w), seed);
    x_t[b * a.st.b + c * a.st.c + h * a.st.h + w * a.st.w] = static_cast<TT>(q_sample(x0, z, sa, s1ma));
  }
}

struct PostArgs {
  int64_t B, C, H, W;
  Strides se, st, so;
  const int64_t* t;
  const float* table;
  float mean[kMaxC], stdv[kMaxC];
  bool clip, norm;
};

template <typename TM, typename TT, typename TO>
__global__ void post_kernel(const TM* __restrict__ eps, const TT* __restrict__ x_t, TO* __restrict__ out, PostArgs a) {
  Pixel p;
  if (!pixel_of(a.B, a.H, a.W, a.t, a.table, 2, p)) return;
  const int64_t b = p.b, h = p.h, w = p.w;
  const float sr = p.k0, srm1 = p.k1;
  for (int64_t c = 0; c < a.C; ++c) {
    const float x0 = predict_x0(static_cast<float>(x_t[b * a.st.b + c * a.st.c + h * a.st.h + w * a.st.w]),
                                static_cast<float>(eps[b * a.se.b + c * a.se.c + h * a.se.h + w * a.se.w]), sr, srm1,
                                a.clip);
    out[b * a.so.b + c * a.so.c + h * a.so.h + w * a.so.w] =
        static_cast<TO>(a.norm ? unit_to_normalized(x0, a.mean[c], a.stdv[c]) : x0);
  }
}

// mean/std checked and copied into a kernel argument struct
template <typename Args>
bool fill_params(Args& a, int64_t C, const std::optional<c10::ArrayRef<double>>& mean,
                 const std::optional<c10::ArrayRef<double>>& stdv) {
  TORCH_CHECK(C <= kMaxC, "the CUDA kernel supports at most ", kMaxC, " channels");
  const MeanStd ms = mean_std(mean, stdv, C);
  for (size_t c = 0; c < ms.mean.size(); ++c) {
    a.mean[c] = ms.mean[c];
    a.stdv[c] = ms.stdv[c];
  }
  return ms.given();
}

int blocks_for(int64_t pixels) { return static_cast<int>((pixels + kThreads - 1) / kThreads); }

void pre_cuda(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table,
              const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& philox,
              std::optional<c10::ArrayRef<double>> mean, std::optional<c10::ArrayRef<double>> stdv, at::Tensor& x_t) {
  check_pre(x, t, table, noise, philox, x_t);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto tc = t.contiguous();
  auto tab = table.contiguous();
  auto ph = philox ? philox->contiguous() : at::Tensor();
  PreArgs a{B, C, H, W, strides_of(x), noise ? strides_of(*noise) : Strides{0, 0, 0, 0}, strides_of(x_t),
            tc.data_ptr<int64_t>(), tab.data_ptr<float>(), philox ? ph.data_ptr<int64_t>() : nullptr, {}, {},
            static_cast<int>(tab.size(0))};
  const bool norm = fill_params(a, C, mean, stdv);
  if (B * H * W == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* N = noise ? noise->data_ptr<float>() : nullptr;
  dispatch_pre(x, x_t, noise.has_value(), norm, [&](auto tx, auto tt, auto noise_flag, auto mode) {
    using TX = decltype(tx);
    using TT = decltype(tt);
    pre_kernel<TX, TT, decltype(noise_flag)::value, decltype(mode)::value>
        <<<blocks_for(B * H * W), kThreads, 0, stream>>>(x.data_ptr<TX>(), N, x_t.data_ptr<TT>(), a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void post_cuda(const at::Tensor& model_out, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& table,
               std::optional<c10::ArrayRef<double>> mean, std::optional<c10::ArrayRef<double>> stdv, bool clip,
               at::Tensor& out) {
  check_post(model_out, x_t, t, table, out);
  const c10::cuda::CUDAGuard guard(x_t.device());
  const int64_t B = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  auto tc = t.contiguous();
  auto tab = table.contiguous();
  PostArgs a{B, C, H, W, strides_of(model_out), strides_of(x_t), strides_of(out), tc.data_ptr<int64_t>(),
             tab.data_ptr<float>(), {}, {}, clip, false};
  a.norm = fill_params(a, C, mean, stdv);
  if (B * H * W == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_post(model_out, x_t, out, [&](auto tm, auto tt, auto to) {
    using TM = decltype(tm);
    using TT = decltype(tt);
    using TO = decltype(to);
    post_kernel<TM, TT, TO><<<blocks_for(B * H * W), kThreads, 0, stream>>>(model_out.data_ptr<TM>(),
                                                                         x_t.data_ptr<TT>(), out.data_ptr<TO>(), a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(diffaug_fast_ext, CUDA, m) {
  m.impl("pre", &pre_cuda);
  m.impl("post", &post_cuda);
}

}  // namespace diffaug
