// CPU kernels for diffaug_fast_ext::pre / post: one pass over memory, OpenMP over image rows, the inner
// loop over a row written so GCC vectorizes it (unit strides are versioned automatically at -O3).
// Per-element math: augment_math.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "augment_args.h"
#include "augment_math.h"

namespace diffaug {
namespace {

enum class In { Plain = 0, Normalized = 1, Pixels = 2 };  // dispatch_pre's MODE (augment_args.h)

// A row is either one channel of one image row (planar: n = W elements, stride = the W stride) or, when
// every tensor stores channels interleaved with W stride C (channels_last), the whole pixel row
// (n = W * C, stride 1). chan_mean/chan_std give each row element's channel parameters; zmap its noise's
// place in the row's noise buffer (channel c's W draws start at c * pitch) when the row is interleaved.
struct RowLayout {
  bool interleaved;
  int64_t n, pitch;
  std::vector<std::vector<float>> mean, stdv;  // [rows per pixel-row][n]
  std::vector<int32_t> zmap;                   // interleaved only: [n]
};

// noise buffer pitch per channel: W draws plus up to 3 leading lanes of the first Philox block, rounded
// up to whole blocks of 8 (the AVX2 generator's width), plus one block of slack
int64_t noise_pitch(int64_t W) { return ((W + 3 + 31) / 32 + 1) * 32; }

RowLayout make_layout(bool interleaved, int64_t C, int64_t W, const std::vector<float>& mean,
                      const std::vector<float>& stdv) {
  RowLayout L{interleaved, interleaved ? W * C : W, noise_pitch(W), {}, {}, {}};
  const int64_t parts = interleaved ? 1 : C;
  for (int64_t p = 0; p < parts; ++p) {
    std::vector<float> m(L.n, 0.f), s(L.n, 1.f);
    for (int64_t j = 0; j < L.n; ++j) {
      const int64_t c = interleaved ? j % C : p;
      if (!mean.empty()) {
        m[j] = mean[c];
        s[j] = stdv[c];
      }
    }
    L.mean.push_back(std::move(m));
    L.stdv.push_back(std::move(s));
  }
  if (interleaved)
    for (int64_t j = 0; j < L.n; ++j) L.zmap.push_back(static_cast<int32_t>((j % C) * L.pitch + j / C));
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

// ---------------------------------------------------------------------------------------------------
// Philox noise for a run of consecutive elements. Drawing it element by element (philox_normal, as the
// GPU threads do) costs a whole Philox block and a log per element; here each block gives its four
// lanes (philox_normal4), and the blocks of a run are generated 8 at a time: the raw words first (AVX2
// below, or the shared scalar function), then Box-Muller over the words in a loop GCC vectorizes.

#if defined(__AVX2__)
inline __m256i mulhi8(__m256i a, __m256i b) {  // high words of 8 unsigned 32x32 products
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox4x32_10 of blocks g, g + 1, ..., g + 7 (no carry into the high counter word among them)
inline void philox_words8(uint64_t g, uint64_t seed, uint32_t* r0, uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxMulB));
  for (int round = 0; round < 10; ++round) {
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(mulhi8(mb, c2), c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(mulhi8(ma, c0), c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = _mm256_mullo_epi32(mb, c2);
    c3 = _mm256_mullo_epi32(ma, c0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3), c3);
}
#endif

// Scratch for one thread: raw words of up to `blocks` Philox blocks and the normals of a row.
struct NoiseScratch {
  std::vector<uint32_t> r0, r1, r2, r3;
  std::vector<float> z;
  NoiseScratch(int64_t blocks, int64_t floats) : r0(blocks), r1(blocks), r2(blocks), r3(blocks), z(floats) {}
};

// N(0, 1) draws of elements start, start + 1, ..., start + n - 1, bit-identical to philox_normal of
// each: returns a pointer to n floats inside S.z (valid until the next call). S must hold the
// (n + 3) / 4 + 1 blocks that may cover the run (noise_pitch(n) / 4 words, noise_pitch(n) floats).
const float* philox_run(uint64_t start, int64_t n, uint64_t seed, NoiseScratch& S) {
  const uint64_t g0 = start >> 2;
  const int64_t blocks = static_cast<int64_t>(((start + n + 3) >> 2) - g0);
  int64_t g = 0;
#if defined(__AVX2__)
  for (; g + 8 <= blocks; g += 8) {
    const uint64_t base = g0 + g;
    if ((base & 0xffffffffu) > 0xfffffff7u) break;  // the low counter word wraps inside these 8: scalar
    philox_words8(base, seed, &S.r0[g], &S.r1[g], &S.r2[g], &S.r3[g]);
  }
#endif
  for (; g < blocks; ++g) {
    uint32_t r[4];
    philox4x32_10(g0 + g, seed, r);
    S.r0[g] = r[0];
    S.r1[g] = r[1];
    S.r2[g] = r[2];
    S.r3[g] = r[3];
  }
  const uint32_t *__restrict r0 = S.r0.data(), *__restrict r1 = S.r1.data();
  const uint32_t *__restrict r2 = S.r2.data(), *__restrict r3 = S.r3.data();
  float* __restrict z = S.z.data();
#pragma omp simd
  for (int64_t k = 0; k < blocks; ++k) {
    float a, b, c, d;
    box_muller(r0[k], r1[k], a, b);
    box_muller(r2[k], r3[k], c, d);
    z[4 * k] = a;
    z[4 * k + 1] = b;
    z[4 * k + 2] = c;
    z[4 * k + 3] = d;
  }
  return z + (start & 3);
}

// How a row's noise is read: from a float32 tensor with a stride, from a contiguous buffer (planar
// rows with Philox), or through zmap from per-channel buffers (interleaved rows with Philox).
enum class Z { Strided = 0, Gather = 1 };

// XS > 0: the input's stride is XS and every other stride 1, all known at compile time, so GCC emits
// packed loads/stores (XS = 3: RGB pixels interleaved, e.g. DALI's uint8 NHWC written to an NCHW x_t, are
// de-interleaved with permutes). XS = 0: runtime strides; that loop stays scalar (AVX2 has no scatter).
template <typename TX, typename TT, Z ZM, In MODE, int XS>
void pre_row(const TX* __restrict px, int64_t sx, const float* __restrict pn, int64_t sn, TT* __restrict pt,
             int64_t st, int64_t n, const float* __restrict mean, const float* __restrict stdv,
             const int32_t* __restrict zmap, float sa, float s1ma) {
  if constexpr (XS > 0) {
    sx = XS;
    sn = st = 1;
  }
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
    const float z = ZM == Z::Gather ? pn[zmap[j]] : pn[j * sn];
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
  const int64_t snj = NOISE ? (L.interleaved ? 1 : noise->stride(3)) : 1;
  const bool rest_unit = stj == 1 && snj == 1;
  const int xs = !rest_unit ? 0 : (sxj == 1 ? 1 : (sxj == 3 ? 3 : 0));
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    NoiseScratch S(NOISE ? 0 : L.pitch / 4, NOISE ? 0 : L.pitch);
    std::vector<float> zbuf(NOISE || !L.interleaved ? 0 : C * L.pitch);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H;
      const auto idx = [&](int64_t c) { return offset + static_cast<uint64_t>(((b * C + c) * H + h) * W); };
      if (!NOISE && L.interleaved) {  // every channel's W draws, to be read through zmap
        for (int64_t c = 0; c < C; ++c) {
          const float* z = philox_run(idx(c), W, seed, S);
          std::copy(z, z + W, zbuf.begin() + c * L.pitch);
        }
      }
      for (int64_t p = 0; p < parts; ++p) {  // p = channel in the planar layout
        const int64_t c = L.interleaved ? 0 : p;
        const TX* px = X + b * x.stride(0) + c * x.stride(1) + h * x.stride(2);
        TT* pt = XT + b * x_t.stride(0) + c * x_t.stride(1) + h * x_t.stride(2);
        const float *mp = L.mean[p].data(), *sp = L.stdv[p].data();
        const float* pn;
        if (NOISE) pn = N + b * noise->stride(0) + c * noise->stride(1) + h * noise->stride(2);
        else if (L.interleaved) pn = zbuf.data();
        else pn = philox_run(idx(c), W, seed, S);
        if (!NOISE && L.interleaved)
          pre_row<TX, TT, Z::Gather, MODE, 1>(px, 1, pn, 1, pt, 1, L.n, mp, sp, L.zmap.data(), sa[b], s1ma[b]);
        else if (xs == 1)
          pre_row<TX, TT, Z::Strided, MODE, 1>(px, 1, pn, 1, pt, 1, L.n, mp, sp, nullptr, sa[b], s1ma[b]);
        else if (xs == 3)
          pre_row<TX, TT, Z::Strided, MODE, 3>(px, 3, pn, 1, pt, 1, L.n, mp, sp, nullptr, sa[b], s1ma[b]);
        else
          pre_row<TX, TT, Z::Strided, MODE, 0>(px, sxj, pn, snj, pt, stj, L.n, mp, sp, nullptr, sa[b], s1ma[b]);
      }
    }
  });
}

void pre_cpu(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table, const std::optional<at::Tensor>& noise,
             const std::optional<at::Tensor>& philox, std::optional<c10::ArrayRef<double>> mean,
             std::optional<c10::ArrayRef<double>> stdv, at::Tensor& x_t) {
  check_pre(x, t, table, noise, philox, x_t);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const MeanStd ms = mean_std(mean, stdv, C);
  const bool il = interleaved(x) && interleaved(x_t) && (!noise || interleaved(*noise));
  const RowLayout L = make_layout(il, C, W, ms.mean, ms.stdv);
  const auto sa = gather(t, table, 0), s1ma = gather(t, table, 1);
  uint64_t seed = 0, offset = 0;
  if (philox) {
    auto ph = philox->contiguous();
    seed = static_cast<uint64_t>(ph.data_ptr<int64_t>()[0]);
    offset = static_cast<uint64_t>(ph.data_ptr<int64_t>()[1]);
  }
  at::Tensor xt = x_t;
  dispatch_pre(x, x_t, noise.has_value(), ms.given(), [&](auto tx, auto tt, auto noise_flag, auto mode) {
    pre_launch<decltype(tx), decltype(tt), decltype(noise_flag)::value, static_cast<In>(decltype(mode)::value)>(
        x, noise, xt, sa, s1ma, L, seed, offset);
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
  const MeanStd ms = mean_std(mean, stdv, C);
  // model_out has 2C channels with learned sigma: interleaved only when its pixel stride is C
  const bool il = interleaved(x_t) && interleaved(out) && model_out.stride(1) == 1 && model_out.stride(3) == C;
  const RowLayout L = make_layout(il, C, W, ms.mean, ms.stdv);
  const auto sr = gather(t, table, 2), srm1 = gather(t, table, 3);
  const bool norm = ms.given();
  at::Tensor o = out;
  dispatch_post(model_out, x_t, out, [&](auto tm, auto tt, auto to) {
    using TM = decltype(tm);
    using TT = decltype(tt);
    using TO = decltype(to);
    if (norm) post_launch<TM, TT, TO, true>(model_out, x_t, o, sr, srm1, L, clip);
    else post_launch<TM, TT, TO, false>(model_out, x_t, o, sr, srm1, L, clip);
  });
}

at::Tensor philox_normal_elementwise_cpu(const at::Tensor& idx, int64_t seed) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64");
  auto ic = idx.contiguous();
  auto out = at::empty(ic.sizes(), ic.options().dtype(at::kFloat));
  const int64_t* pi = ic.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  for (int64_t i = 0; i < ic.numel(); ++i)
    po[i] = philox_normal(static_cast<uint64_t>(pi[i]), static_cast<uint64_t>(seed));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffaug_fast_ext, CPU, m) {
  m.impl("pre", &pre_cpu);
  m.impl("post", &post_cpu);
  m.impl("philox_normal_elementwise", &philox_normal_elementwise_cpu);
}

}  // namespace diffaug
