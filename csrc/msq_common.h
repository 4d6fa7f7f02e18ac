// Geometry and rounding helpers shared by the CPU and CUDA multi-scale quantisation
// kernels, so both backends compute area bins and bicubic weights identically.
//
// The arithmetic follows PyTorch's CPU kernels step for step (as measured against
// torch 2.x's AVX2/AVX-512 builds, which contract some multiply-adds into FMAs):
//   area (adaptive average pooling): bin [floor(i*in/out), ceil((i+1)*in/out)), fp32 sum
//     in row-major order, then `sum / kh / kw` (NCHW and channels-last kernels alike);
//   bicubic (align_corners=False, A = -0.75, border taps clamped): source index
//     fma(scale, i + 0.5, -0.5) with scale = in/out in fp32, weights below, and 4-tap sums
//     o = fma(t0, w0, t1 * w1); o = fma(t2, w2, o); o = fma(t3, w3, o).
// Host code must be compiled with -ffp-contract=off so that the plain `*` and `+` below
// stay unfused (setup.py and CMakeLists.txt pass it); device code uses the _rn intrinsics,
// which nvcc never contracts.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SAR_FAST_HD __host__ __device__ __forceinline__
#else
#define SAR_FAST_HD inline
#endif

namespace sar_fast {

SAR_FAST_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SAR_FAST_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SAR_FAST_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// First input row/column of output bin `i` when `in` cells are pooled into `out` bins.
SAR_FAST_HD int64_t area_bin_start(int64_t i, int64_t out, int64_t in) {
  return (i * in) / out;
}

// One past the last input row/column of output bin `i`.
SAR_FAST_HD int64_t area_bin_end(int64_t i, int64_t out, int64_t in) {
  return ((i + 1) * in + out - 1) / out;
}

// Keys' cubic convolution kernel with A = -0.75, for |x| <= 1 (near) and 1 < |x| < 2 (far).
constexpr float kCubicA = -0.75f;

SAR_FAST_HD float cubic_near(float x) {
  const float inner = fma_rn(kCubicA + 2.f, x, -(kCubicA + 3.f));
  return add_rn(mul_rn(mul_rn(inner, x), x), 1.f);
}

SAR_FAST_HD float cubic_far(float x) {
  const float inner = fma_rn(fma_rn(kCubicA, x, -5.f * kCubicA), x, 8.f * kCubicA);
  return add_rn(mul_rn(inner, x), -4.f * kCubicA);
}

// The 4 taps (clamped source indices) and weights of output position `i` when a line of
// `in` samples is resized to `out` samples by bicubic interpolation.
SAR_FAST_HD void bicubic_taps(int64_t i, int64_t in, int64_t out, int64_t taps[4],
                              float weights[4]) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const float src = fma_rn(scale, add_rn(static_cast<float>(i), 0.5f), -0.5f);
  int64_t base = static_cast<int64_t>(floorf(src));
  base = base < in - 1 ? base : in - 1;
  float t = add_rn(src, -static_cast<float>(base));
  t = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);

  const float u = add_rn(1.f, -t);
  weights[0] = cubic_far(add_rn(t, 1.f));
  weights[1] = cubic_near(t);
  weights[2] = cubic_near(u);
  weights[3] = cubic_far(add_rn(u, 1.f));
  for (int j = 0; j < 4; ++j) {
    int64_t tap = base + j - 1;
    tap = tap < in - 1 ? tap : in - 1;
    taps[j] = tap > 0 ? tap : 0;
  }
}

// PyTorch's 4-tap interpolation sum (see the header comment for the rounding order).
SAR_FAST_HD float bicubic_sum(float t0, float t1, float t2, float t3, const float w[4]) {
  float o = mul_rn(t1, w[1]);
  o = fma_rn(t0, w[0], o);
  o = fma_rn(t2, w[2], o);
  return fma_rn(t3, w[3], o);
}

}  // namespace sar_fast
