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
  if (clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
  return x0;
}

// [-1, 1] -> [0, 1] -> classifier normalization ((x0 + 1) / 2 - mean) / std
DA_HD float unit_to_normalized(float x0, float mean, float stdv) { return ((x0 + 1.0f) / 2.0f - mean) / stdv; }

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011), the generator of curand and Triton's tl.randint4x: counter
// (lo(idx), hi(idx), 0, 0), key (lo(seed), hi(seed)). Element idx = offset + logical NCHW index, so the
// noise of an element does not depend on memory layout, backend or launch geometry.

DA_HD uint32_t mulhi32(uint32_t a, uint32_t b) { return static_cast<uint32_t>((uint64_t(a) * b) >> 32); }

DA_HD void philox4x32_10(uint64_t idx, uint64_t seed, uint32_t& r0, uint32_t& r1) {
  uint32_t c0 = static_cast<uint32_t>(idx), c1 = static_cast<uint32_t>(idx >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  r0 = c0;
  r1 = c1;
}

// One N(0, 1) draw per element: Box-Muller (cosine branch) on the first two Philox words, with
// u1 = (r0 >> 8 + 1) / 2^24 in (0, 1] (log never sees 0) and u2 = (r1 >> 8) / 2^24 in [0, 1); both exact
// in float32. |z| <= sqrt(-2 ln 2^-24) = 5.77.
DA_HD float philox_normal(uint64_t idx, uint64_t seed) {
  uint32_t r0, r1;
  philox4x32_10(idx, seed, r0, r1);
  const float u1 = static_cast<float>((r0 >> 8) + 1u) * 5.9604644775390625e-8f;
  const float u2 = static_cast<float>(r1 >> 8) * 5.9604644775390625e-8f;
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795865f * u2);
#else
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795865f * u2);
#endif
}

}  // namespace diffaug
