// nearest_code: index of the nearest codebook row (squared L2), the vector-quantisation
// lookup that multi-scale quantisation runs once per scale.
//
// Contract shared by the CPU and CUDA kernels:
//   x [N, C], codebook [V, C], same floating dtype (float32, float16 or bfloat16), same
//   device, N, V, C >= 1. Returns int64 [N] on x's device.
//   score(n, v) = |c_v|^2 - 2 <x_n, c_v>, accumulated in fp32 over k = 0..C-1 in order
//   (|x_n|^2 is the same for every v, so it does not change the argmin).
//   Ties go to the lowest index: a code only replaces the running best if its score is
//   strictly smaller. A row whose scores are all NaN gets index 0.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

// Dispatch over the three supported input dtypes only (no float64 instantiations).
#define SAR_FAST_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)    \
  AT_DISPATCH_SWITCH(                                     \
      TYPE, NAME,                                         \
      AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
      AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)            \
      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace sar_fast {

// Raises c10::ValueError / c10::TypeError (Python ValueError / TypeError) on bad input.
void check_nearest_code_inputs(const at::Tensor& x, const at::Tensor& codebook);

at::Tensor nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook);

#ifdef SAR_FAST_WITH_CUDA
at::Tensor nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook);
#endif

// True when this build contains the CUDA kernels (SAR_FAST_WITH_CUDA was defined).
bool cuda_compiled();

}  // namespace sar_fast
