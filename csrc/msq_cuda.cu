// CUDA primitives of the multi-scale quantiser and the CUDA registration of its ops.
//   area pooling: one launch pools every scale into token rows;
//   nearest code: one thread per row keeps the row in registers and its running argmin
//     in registers; a block streams the codebook once through shared memory in tiles
//     (no [N, V] buffer); the dot product is one fmaf per feature in feature order and the
//     score ((|z|^2 + |e|^2) - 2 z.e) is rounded like the CPU kernel's;
//   embed + bicubic upsample + accumulate: one thread per output element, with the CPU
//     kernel's weights and rounding (msq_common.h), so CPU and CUDA agree bit for bit on
//     this step.
#include "msq.h"
#include "msq_common.h"

// Only c10/cuda headers (CUDA runtime API): ATen/cuda/CUDAContext.h would also need the
// cuBLAS/cuSPARSE headers, which a minimal toolkit does not ship.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace sar_fast {
namespace {

constexpr int kThreads = 128;      // rows (search) or outputs (others) per block
constexpr int kTileFloats = 8192;  // 32 KiB of fp32 codebook per shared-memory tile

unsigned blocks_for(int64_t work) {
  // Grid-stride loops cover the rest; 2^20 blocks keep the grid well inside its limits.
  return static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// The scales a pooling launch handles; first_output[i] counts the outputs (B * C * side^2
// per scale) of the scales before i.
struct PoolScales {
  int count;
  int64_t side[kMaxScales];
  int64_t offset[kMaxScales];
  int64_t first_output[kMaxScales + 1];
};

__global__ void area_pool_kernel(const float* __restrict__ z, float* __restrict__ rows,
                                 PoolScales scales, int64_t channels, int64_t height,
                                 int64_t width, int64_t total_len) {
  const int64_t total = scales.first_output[scales.count];
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int i = 0;
    while (idx >= scales.first_output[i + 1]) {
      ++i;
    }
    const int64_t side = scales.side[i], cells = side * side;
    // (b, cell, c) order: consecutive threads write consecutive features of a row.
    const int64_t local = idx - scales.first_output[i];
    const int64_t c = local % channels;
    const int64_t cell = (local / channels) % cells;
    const int64_t b = local / (channels * cells);
    const int64_t oy = cell / side, ox = cell % side;
    const int64_t y0 = area_bin_start(oy, side, height), y1 = area_bin_end(oy, side, height);
    const int64_t x0 = area_bin_start(ox, side, width), x1 = area_bin_end(ox, side, width);
    const float* src = z + (b * channels + c) * height * width;
    float sum = 0.f;
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        sum = __fadd_rn(sum, src[y * width + x]);
      }
    }
    rows[(b * total_len + scales.offset[i] + cell) * channels + c] =
        __fdiv_rn(__fdiv_rn(sum, static_cast<float>(y1 - y0)), static_cast<float>(x1 - x0));
  }
}

// The score of one code, rounded as on the CPU: (zz + ee) - 2 * dot.
__device__ __forceinline__ float code_score(float row_norm, float code_norm, float dot) {
  return __fsub_rn(__fadd_rn(row_norm, code_norm), __fmul_rn(2.f, dot));
}

// Rows held in registers, zero-padded to DIM_PAD >= dim; codebook tiles zero-padded the
// same way (fmaf(0, 0, acc) leaves acc unchanged).
template <int DIM_PAD>
__global__ void __launch_bounds__(kThreads) nearest_rows_tiled_kernel(
    const float* __restrict__ rows, const float* __restrict__ row_norms,
    const float* __restrict__ book, const float* __restrict__ book_norms,
    int64_t* __restrict__ out, int64_t num_rows, int64_t num_codes, int dim) {
  constexpr int kTileCodes = kTileFloats / DIM_PAD;
  __shared__ float tile[kTileCodes * DIM_PAD];
  __shared__ float tile_norms[kTileCodes];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = row < num_rows;
  float z[DIM_PAD];
#pragma unroll
  for (int k = 0; k < DIM_PAD; ++k) {
    z[k] = (active && k < dim) ? rows[row * dim + k] : 0.f;
  }
  const float row_norm = active ? row_norms[row] : 0.f;

  float best_score = INFINITY;
  int64_t best_index = 0;
  for (int64_t v0 = 0; v0 < num_codes; v0 += kTileCodes) {
    const int codes_here = static_cast<int>(min(static_cast<int64_t>(kTileCodes), num_codes - v0));
    __syncthreads();  // every thread is done with the previous tile
    for (int i = threadIdx.x; i < kTileCodes * DIM_PAD; i += kThreads) {
      const int j = i / DIM_PAD, k = i % DIM_PAD;
      tile[i] = (j < codes_here && k < dim) ? book[(v0 + j) * dim + k] : 0.f;
    }
    for (int j = threadIdx.x; j < codes_here; j += kThreads) {
      tile_norms[j] = book_norms[v0 + j];
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < codes_here; ++j) {
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < DIM_PAD; ++k) {
          dot = __fmaf_rn(z[k], tile[j * DIM_PAD + k], dot);  // same address across the warp
        }
        const float score = code_score(row_norm, tile_norms[j], dot);
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

// dim > 128 (too wide for registers): rows and codes read through the cache.
__global__ void __launch_bounds__(kThreads) nearest_rows_wide_kernel(
    const float* __restrict__ rows, const float* __restrict__ row_norms,
    const float* __restrict__ book, const float* __restrict__ book_norms,
    int64_t* __restrict__ out, int64_t num_rows, int64_t num_codes, int64_t dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= num_rows) {
    return;
  }
  const float* z = rows + row * dim;
  float best_score = INFINITY;
  int64_t best_index = 0;
  for (int64_t v = 0; v < num_codes; ++v) {
    const float* code = book + v * dim;
    float dot = 0.f;
    for (int64_t k = 0; k < dim; ++k) {
      dot = __fmaf_rn(z[k], code[k], dot);
    }
    const float score = code_score(row_norms[row], book_norms[v], dot);
    if (score < best_score) {
      best_score = score;
      best_index = v;
    }
  }
  out[row] = best_index;
}

template <int DIM_PAD>
void launch_tiled(const at::Tensor& rows, const at::Tensor& row_norms, const at::Tensor& book,
                  const at::Tensor& book_norms, at::Tensor& out, cudaStream_t stream) {
  const int64_t num_rows = rows.size(0);
  const unsigned blocks = static_cast<unsigned>((num_rows + kThreads - 1) / kThreads);
  nearest_rows_tiled_kernel<DIM_PAD><<<blocks, kThreads, 0, stream>>>(
      rows.const_data_ptr<float>(), row_norms.const_data_ptr<float>(),
      book.const_data_ptr<float>(), book_norms.const_data_ptr<float>(),
      out.mutable_data_ptr<int64_t>(), num_rows, book.size(0), static_cast<int>(rows.size(1)));
}

struct Strides4 {
  int64_t s[4];
};

__global__ void embed_upsample_kernel(const int64_t* __restrict__ codes,
                                      const float* __restrict__ book, float* target,
                                      float* rest, Strides4 ts, Strides4 rs, int64_t batch,
                                      int64_t channels, int64_t height, int64_t width,
                                      int64_t side, bool upsample) {
  const int64_t total = batch * channels * height * width;
  const int64_t cells = side * side;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = idx % width, y = (idx / width) % height;
    const int64_t c = (idx / (width * height)) % channels, b = idx / (width * height * channels);
    const int64_t* map = codes + b * cells;
    const auto small = [&](int64_t yy, int64_t xx) { return book[map[yy * side + xx] * channels + c]; };
    float value;
    if (!upsample) {
      value = small(y, x);
    } else {
      int64_t ty[4], tx[4];
      float wy[4], wx[4];
      bicubic_taps(y, side, height, ty, wy);
      bicubic_taps(x, side, width, tx, wx);
      float wide[4];  // horizontal pass on the 4 source rows, then the vertical one
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        wide[a] = bicubic_sum(small(ty[a], tx[0]), small(ty[a], tx[1]), small(ty[a], tx[2]),
                              small(ty[a], tx[3]), wx);
      }
      value = bicubic_sum(wide[0], wide[1], wide[2], wide[3], wy);
    }
    float* out = target + b * ts.s[0] + c * ts.s[1] + y * ts.s[2] + x * ts.s[3];
    if (rest == nullptr) {
      *out = value;
    } else {
      *out = __fadd_rn(*out, value);
      float* r = rest + b * rs.s[0] + c * rs.s[1] + y * rs.s[2] + x * rs.s[3];
      *r = __fsub_rn(*r, value);
    }
  }
}

Strides4 strides_of(const at::Tensor& t) {
  Strides4 s{};
  for (int i = 0; i < 4; ++i) {
    s.s[i] = t.stride(i);
  }
  return s;
}

}  // namespace

void area_pool_rows_cuda(const at::Tensor& z, const std::vector<int64_t>& sides,
                         const std::vector<int64_t>& offsets, int64_t total_len, at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t batch = z.size(0), channels = z.size(1);
  PoolScales scales{};
  scales.count = static_cast<int>(sides.size());
  scales.first_output[0] = 0;
  for (size_t i = 0; i < sides.size(); ++i) {
    scales.side[i] = sides[i];
    scales.offset[i] = offsets[i];
    scales.first_output[i + 1] = scales.first_output[i] + batch * channels * sides[i] * sides[i];
  }
  const int64_t total = scales.first_output[scales.count];
  area_pool_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      z.const_data_ptr<float>(), out.mutable_data_ptr<float>(), scales, channels, z.size(2),
      z.size(3), total_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void nearest_rows_cuda(const at::Tensor& rows, const at::Tensor& row_norms,
                       const at::Tensor& book, const at::Tensor& book_norms, at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t dim = rows.size(1);
  if (dim <= 8) {
    launch_tiled<8>(rows, row_norms, book, book_norms, out, stream);
  } else if (dim <= 16) {
    launch_tiled<16>(rows, row_norms, book, book_norms, out, stream);
  } else if (dim <= 32) {
    launch_tiled<32>(rows, row_norms, book, book_norms, out, stream);
  } else if (dim <= 64) {
    launch_tiled<64>(rows, row_norms, book, book_norms, out, stream);
  } else if (dim <= 128) {
    launch_tiled<128>(rows, row_norms, book, book_norms, out, stream);
  } else {
    const int64_t num_rows = rows.size(0);
    const unsigned blocks = static_cast<unsigned>((num_rows + kThreads - 1) / kThreads);
    nearest_rows_wide_kernel<<<blocks, kThreads, 0, stream>>>(
        rows.const_data_ptr<float>(), row_norms.const_data_ptr<float>(),
        book.const_data_ptr<float>(), book_norms.const_data_ptr<float>(),
        out.mutable_data_ptr<int64_t>(), num_rows, book.size(0), dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void embed_upsample_cuda(const at::Tensor& codes, const at::Tensor& raw_book, int64_t side,
                         bool upsample, const at::Tensor& target, const at::Tensor* rest) {
  const c10::cuda::CUDAGuard device_guard(target.device());
  const int64_t total = target.numel();
  embed_upsample_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.const_data_ptr<int64_t>(), raw_book.const_data_ptr<float>(),
      target.data_ptr<float>(), rest != nullptr ? rest->data_ptr<float>() : nullptr,
      strides_of(target), rest != nullptr ? strides_of(*rest) : Strides4{}, target.size(0),
      target.size(1), target.size(2), target.size(3), side, upsample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sar_fast

TORCH_LIBRARY_IMPL(sar_fast, CUDA, m) {
  m.impl("msq_encode_flexvar", &sar_fast::msq_encode_flexvar);
  m.impl("msq_var_step", &sar_fast::msq_var_step);
}
