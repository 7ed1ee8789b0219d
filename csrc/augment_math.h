// Per-element DiffAug math, written once and compiled for both the CPU kernel (augment_cpu.cpp) and the
// CUDA kernel (augment_cuda.cu). Every function follows diffaug_fast/ops/reference.py operation by
// operation in float32 (same order, same roundings); the build turns off FMA contraction
// (-ffp-contract=off, nvcc --fmad=false) because at t = 999 the x0 step multiplies a one-ulp difference
// in x_t by sqrt(1/abar) ~ 157 (SPEC section 1), which would break the 1e-6 parity with the reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DA_HD __host__ __device__ __forceinline__
#else
#define DA_HD inline
#endif

namespace diffaug {

// ---------------------------------------------------------------------------------------------------
// input mapping to [-1, 1]

// uint8 pixels: 2 * (p / 255) - 1, torchvision's ToTensor followed by 2x - 1 (the DiffAug reference
// pipeline). Differs from p / 127.5 - 1 by at most one ulp; the reference uses this exact expression.
DA_HD float pixel_to_unit(float p) { return 2.0f * (p / 255.0f) - 1.0f; }

// classifier-normalized input (x - mean) / std  ->  [0, 1]  ->  [-1, 1]
DA_HD float normalized_to_unit(float x, float mean, float stdv) { return 2.0f * (x * stdv + mean) - 1.0f; }

// ---------------------------------------------------------------------------------------------------
// the two DiffAug steps

// x_t = sqrt(abar) * x0 + sqrt(1 - abar) * z  (GaussianDiffusion.q_sample order)
DA_HD float q_sample(float x0, float z, float sqrt_abar, float sqrt_1m_abar) {
  return sqrt_abar * x0 + sqrt_1m_abar * z;
}

// x0 = sqrt(1/abar) * x_t - sqrt(1/abar - 1) * eps, then clamp to [-1, 1] (NaN propagates like torch.clamp)
DA_HD float predict_x0(float x_t, float eps, float sqrt_recip, float sqrt_recipm1, bool clip) {
  float x0 = sqrt_recip * x_t - sqrt_recipm1 * eps;
  if (clip) {  // selects, not fminf/fmaxf, so NaN passes through like torch.clamp. GCC vectorizes them
    x0 = x0 < -1.0f ? -1.0f : x0;  // only with -fno-trapping-math: otherwise a mispredicted branch per
    x0 = x0 > 1.0f ? 1.0f : x0;    // element (post, B=64 at 224: 85 ms instead of 7 ms)
  }
  return x0;
}

// [-1, 1] -> [0, 1] -> classifier normalization ((x0 + 1) / 2 - mean) / std
DA_HD float unit_to_normalized(float x0, float mean, float stdv) { return ((x0 + 1.0f) / 2.0f - mean) / stdv; }

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011), the generator of curand and Triton's tl.randint4x: counter
// (lo(g), hi(g), 0, 0), key (lo(seed), hi(seed)). One Philox block gives four normals (two Box-Muller
// pairs), so element idx = offset + its logical NCHW index takes block g = idx / 4 and lane idx % 4: the
// noise of an element does not depend on memory layout, backend or launch geometry.

DA_HD uint32_t mulhi32(uint32_t a, uint32_t b) { return static_cast<uint32_t>((uint64_t(a) * b) >> 32); }

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

DA_HD void philox4x32_10(uint64_t g, uint64_t seed, uint32_t r[4]) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mulhi32(kPhiloxMulB, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(kPhiloxMulA, c0) ^ c3 ^ k1;
    c1 = kPhiloxMulB * c2;
    c3 = kPhiloxMulA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  r[0] = c0;
  r[1] = c1;
  r[2] = c2;
  r[3] = c3;
}

// float bits <-> uint32 without aliasing UB; both forms vectorize
DA_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}
DA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// ln(u) for normal u > 0: Cephes logf (frexp, one rational step, degree-8 polynomial), ~1 ulp. Written
// out instead of calling logf so the CPU loop vectorizes (glibc has vector logf only under -ffast-math;
// scalar libm made the Philox path 470 ms for B=64 at 224) and CPU and GPU draw bit-identical noise.
DA_HD float log_approx(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int>((bits >> 23) & 0xffu) - 126);
  float m = bits_float((bits & 0x807fffffu) | 0x3f000000u);  // in [0.5, 1)
  const bool low = m < 0.70710678118654752f;
  e = low ? e - 1.0f : e;
  const float x = low ? (m + m) - 1.0f : m - 1.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = p * x * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (x + y) + e * 0.693359375f;
}

// sin and cos of 2 pi u for u in [0, 1): quadrant reduction to a = 2 pi f, |f| <= 1/8, then Cephes
// sinf/cosf polynomials on [-pi/4, pi/4] (~1 ulp).
DA_HD void sincos_2pi_approx(float u, float& sin_out, float& cos_out) {
  const float q = static_cast<float>(static_cast<int>(u * 4.0f + 0.5f));  // nearest quarter turn, 0..4
  const float a = (u - q * 0.25f) * 6.2831853071795865f;
  const float a2 = a * a;
  const float s = a + a * a2 * (-1.6666654611e-1f + a2 * (8.3321608736e-3f + a2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * a2 + a2 * a2 * (4.166664568298827e-2f + a2 * (-1.388731625493765e-3f +
                                                                            a2 * 2.443315711809948e-5f));
  const int k = static_cast<int>(q) & 3;  // (sin, cos)(a + k pi / 2)
  cos_out = k == 0 ? c : (k == 1 ? -s : (k == 2 ? -c : s));
  sin_out = k == 0 ? s : (k == 1 ? c : (k == 2 ? -s : -c));
}

// Box-Muller on two Philox words: u1 = (a >> 8 + 1) / 2^24 in (0, 1] (log never sees 0), u2 = (b >> 8) / 2^24
// in [0, 1), both exact in float32; z_cos = r cos(2 pi u2), z_sin = r sin(2 pi u2), r = sqrt(-2 ln u1), so
// |z| <= sqrt(-2 ln 2^-24) = 5.77.
DA_HD void box_muller(uint32_t a, uint32_t b, float& z_cos, float& z_sin) {
  const float u1 = static_cast<float>(static_cast<int32_t>((a >> 8) + 1u)) * 5.9604644775390625e-8f;
  const float u2 = static_cast<float>(static_cast<int32_t>(b >> 8)) * 5.9604644775390625e-8f;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * log_approx(u1));
#else
  const float r = std::sqrt(-2.0f * log_approx(u1));
#endif
  float s, c;
  sincos_2pi_approx(u2, s, c);
  z_cos = r * c;
  z_sin = r * s;
}

// The four N(0, 1) draws of Philox block g: lanes 0, 1 = (cos, sin) of words (0, 1); lanes 2, 3 = of (2, 3).
DA_HD void philox_normal4(uint64_t g, uint64_t seed, float z[4]) {
  uint32_t r[4];
  philox4x32_10(g, seed, r);
  box_muller(r[0], r[1], z[0], z[1]);
  box_muller(r[2], r[3], z[2], z[3]);
}

// The draw of element idx alone (the GPU kernels: one thread per element). Equals lane idx % 4 of
// philox_normal4(idx / 4, seed) bit for bit.
DA_HD float philox_normal(uint64_t idx, uint64_t seed) {
  uint32_t r[4];
  philox4x32_10(idx >> 2, seed, r);
  const int lane = static_cast<int>(idx & 3);
  float zc, zs;
  box_muller(lane < 2 ? r[0] : r[2], lane < 2 ? r[1] : r[3], zc, zs);
  return (lane & 1) ? zs : zc;
}

}  // namespace diffaug
