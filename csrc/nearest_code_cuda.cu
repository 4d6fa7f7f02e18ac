// CUDA kernels for sar_fast::nearest_code. One thread per row of x; the codebook is
// streamed through shared memory in tiles; each thread keeps its running argmin in
// registers, so no [N, V] buffer is ever formed.
#include "nearest_code.h"

// Only c10/cuda headers (CUDA runtime API): ATen/cuda/CUDAContext.h would also need the
// cuBLAS/cuSPARSE headers, which a minimal toolkit does not ship.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace sar_fast {
namespace {

constexpr int kThreads = 128;      // rows per block
constexpr int kTileFloats = 8192;  // 32 KiB of fp32 codebook per shared-memory tile

// x row held in registers, zero-padded to DIM_PAD >= dim; codebook tiles zero-padded
// the same way, so the unrolled dot product needs no bounds checks (0 * 0 adds nothing).
template <typename scalar_t, int DIM_PAD>
__global__ void __launch_bounds__(kThreads) nearest_code_tiled_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ codebook,
    int64_t* __restrict__ out,
    int64_t num_rows,
    int64_t num_codes,
    int dim) {
  constexpr int kTileCodes = kTileFloats / DIM_PAD;
  __shared__ float tile[kTileCodes * DIM_PAD];
  __shared__ float tile_norms[kTileCodes];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < num_rows;

  float x_reg[DIM_PAD];
#pragma unroll
  for (int k = 0; k < DIM_PAD; ++k) {
    x_reg[k] = (active && k < dim) ? static_cast<float>(x[row * dim + k]) : 0.f;
  }

  float best_score = INFINITY;
  int64_t best_index = 0;
  for (int64_t v0 = 0; v0 < num_codes; v0 += kTileCodes) {
    const int codes_here = static_cast<int>(min(static_cast<int64_t>(kTileCodes), num_codes - v0));
    __syncthreads();  // every thread is done with the previous tile
    for (int i = threadIdx.x; i < kTileCodes * DIM_PAD; i += kThreads) {
      const int j = i / DIM_PAD;
      const int k = i % DIM_PAD;
      tile[i] = (j < codes_here && k < dim)
          ? static_cast<float>(codebook[(v0 + j) * dim + k])
          : 0.f;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < codes_here; j += kThreads) {
      float norm = 0.f;
#pragma unroll
      for (int k = 0; k < DIM_PAD; ++k) {
        norm += tile[j * DIM_PAD + k] * tile[j * DIM_PAD + k];
      }
      tile_norms[j] = norm;
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < codes_here; ++j) {
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < DIM_PAD; ++k) {
          dot += x_reg[k] * tile[j * DIM_PAD + k];  // same address across the warp: broadcast
        }
        const float score = tile_norms[j] - 2.f * dot;
        if (score < best_score) {  // strict: ties keep the lower index
          best_score = score;
          best_index = v0 + j;
        }
      }
    }
  }
  if (active) {
    out[row] = best_index;
  }
}

// Fallback for dim > 128 (too wide for registers): reads x and the codebook through
// the cache, one code at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nearest_code_wide_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ codebook,
    int64_t* __restrict__ out,
    int64_t num_rows,
    int64_t num_codes,
    int64_t dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= num_rows) {
    return;
  }
  const scalar_t* x_row = x + row * dim;
  float best_score = INFINITY;
  int64_t best_index = 0;
  for (int64_t v = 0; v < num_codes; ++v) {
    const scalar_t* code = codebook + v * dim;
    float norm = 0.f;
    float dot = 0.f;
    for (int64_t k = 0; k < dim; ++k) {
      const float c = static_cast<float>(code[k]);
      norm += c * c;
      dot += static_cast<float>(x_row[k]) * c;
    }
    const float score = norm - 2.f * dot;
    if (score < best_score) {
      best_score = score;
      best_index = v;
    }
  }
  out[row] = best_index;
}

template <typename scalar_t, int DIM_PAD>
void launch_tiled(const at::Tensor& x, const at::Tensor& codebook, at::Tensor& out,
                  cudaStream_t stream) {
  const int64_t num_rows = x.size(0);
  const unsigned blocks = static_cast<unsigned>((num_rows + kThreads - 1) / kThreads);
  nearest_code_tiled_kernel<scalar_t, DIM_PAD><<<blocks, kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), codebook.const_data_ptr<scalar_t>(),
      out.mutable_data_ptr<int64_t>(), num_rows, codebook.size(0),
      static_cast<int>(x.size(1)));
}

}  // namespace

at::Tensor nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook) {
  check_nearest_code_inputs(x, codebook);
  TORCH_CHECK_VALUE(x.is_cuda(), "nearest_code_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor codes = codebook.contiguous();
  at::Tensor out = at::empty({x_c.size(0)}, x_c.options().dtype(at::kLong));
  const int64_t dim = x_c.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  SAR_FAST_DISPATCH_FLOAT_TYPES(x_c.scalar_type(), "nearest_code_cuda", [&] {
    if (dim <= 8) {
      launch_tiled<scalar_t, 8>(x_c, codes, out, stream);
    } else if (dim <= 16) {
      launch_tiled<scalar_t, 16>(x_c, codes, out, stream);
    } else if (dim <= 32) {
      launch_tiled<scalar_t, 32>(x_c, codes, out, stream);
    } else if (dim <= 64) {
      launch_tiled<scalar_t, 64>(x_c, codes, out, stream);
    } else if (dim <= 128) {
      launch_tiled<scalar_t, 128>(x_c, codes, out, stream);
    } else {
      const int64_t num_rows = x_c.size(0);
      const unsigned blocks = static_cast<unsigned>((num_rows + kThreads - 1) / kThreads);
      nearest_code_wide_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          x_c.const_data_ptr<scalar_t>(), codes.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<int64_t>(), num_rows, codes.size(0), dim);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace sar_fast

TORCH_LIBRARY_IMPL(sar_fast, CUDA, m) {
  m.impl("nearest_code", &sar_fast::nearest_code_cuda);
}
