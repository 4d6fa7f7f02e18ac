// CPU kernel, input validation and operator registration for sar_fast::nearest_code.
#include "nearest_code.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

namespace sar_fast {
namespace {

// Rows scored together against one codebook row: the codebook is streamed once per
// block instead of once per row, and the block's accumulators stay in registers.
constexpr int64_t kRowBlock = 16;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

template <typename scalar_t>
void nearest_code_rows(
    const scalar_t* x,
    const float* codebook,
    const float* code_norms,
    int64_t* out,
    int64_t row_begin,
    int64_t row_end,
    int64_t num_codes,
    int64_t dim) {
  // x block stored feature-major ([dim][kRowBlock]) so the inner loop over rows is
  // contiguous and vectorises; padding rows are zero and never written out.
  std::vector<float> x_block(static_cast<size_t>(dim * kRowBlock));
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, row_end - r0);
    std::fill(x_block.begin(), x_block.end(), 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* x_row = x + (r0 + r) * dim;
      for (int64_t k = 0; k < dim; ++k) {
        x_block[k * kRowBlock + r] = static_cast<float>(x_row[k]);
      }
    }

    std::array<float, kRowBlock> best_score;
    std::array<int64_t, kRowBlock> best_index;
    best_score.fill(std::numeric_limits<float>::infinity());
    best_index.fill(0);

    for (int64_t v = 0; v < num_codes; ++v) {
      const float* code = codebook + v * dim;
      std::array<float, kRowBlock> dot{};
      for (int64_t k = 0; k < dim; ++k) {
        const float c = code[k];
        const float* xk = x_block.data() + k * kRowBlock;
#pragma omp simd
        for (int64_t r = 0; r < kRowBlock; ++r) {
          dot[r] += xk[r] * c;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float score = code_norms[v] - 2.f * dot[r];
        if (score < best_score[r]) {  // strict: ties keep the lower index
          best_score[r] = score;
          best_index[r] = v;
        }
      }
    }
    std::copy_n(best_index.begin(), rows, out + r0);
  }
}

}  // namespace

void check_nearest_code_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(
      x.dim() == 2, "nearest_code: x must be 2-D [N, C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      codebook.dim() == 2,
      "nearest_code: codebook must be 2-D [V, C], got shape ", codebook.sizes());
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()),
      "nearest_code: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(
      codebook.scalar_type() == x.scalar_type(),
      "nearest_code: codebook dtype ", codebook.scalar_type(),
      " must match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(
      x.device() == codebook.device(),
      "nearest_code: x and codebook must be on the same device, got x on ", x.device(),
      " and codebook on ", codebook.device());
  TORCH_CHECK_VALUE(
      x.size(1) == codebook.size(1),
      "nearest_code: x has C=", x.size(1), " features per row but codebook has C=",
      codebook.size(1));
  TORCH_CHECK_VALUE(
      x.size(0) >= 1 && x.size(1) >= 1,
      "nearest_code: x must be non-empty (N >= 1, C >= 1), got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      codebook.size(0) >= 1,
      "nearest_code: codebook must have at least one row (V >= 1), got shape ",
      codebook.sizes());
}

at::Tensor nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook) {
  check_nearest_code_inputs(x, codebook);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "nearest_code_cpu: x must be a CPU tensor");

  const at::Tensor x_c = x.contiguous();
  // The codebook is converted to fp32 once and its squared norms computed once; both
  // are reused by every row.
  const at::Tensor codes = codebook.to(at::kFloat).contiguous();
  const int64_t num_rows = x_c.size(0);
  const int64_t num_codes = codes.size(0);
  const int64_t dim = codes.size(1);

  std::vector<float> code_norms(static_cast<size_t>(num_codes));
  const float* code_data = codes.const_data_ptr<float>();
  for (int64_t v = 0; v < num_codes; ++v) {
    float sum = 0.f;
    for (int64_t k = 0; k < dim; ++k) {
      const float c = code_data[v * dim + k];
      sum += c * c;
    }
    code_norms[v] = sum;
  }

  at::Tensor out = at::empty({num_rows}, x.options().dtype(at::kLong));
  int64_t* out_data = out.mutable_data_ptr<int64_t>();
  // About 2^18 multiply-adds per task, so small problems stay on one thread.
  const int64_t grain = std::max<int64_t>(kRowBlock, (int64_t{1} << 18) / (num_codes * dim));

  SAR_FAST_DISPATCH_FLOAT_TYPES(x_c.scalar_type(), "nearest_code_cpu", [&] {
    const scalar_t* x_data = x_c.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
      nearest_code_rows<scalar_t>(
          x_data, code_data, code_norms.data(), out_data, begin, end, num_codes, dim);
    });
  });
  return out;
}

bool cuda_compiled() {
#ifdef SAR_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace sar_fast

TORCH_LIBRARY(sar_fast, m) {
  m.def("nearest_code(Tensor x, Tensor codebook) -> Tensor");
}

TORCH_LIBRARY_IMPL(sar_fast, CPU, m) {
  m.impl("nearest_code", &sar_fast::nearest_code_cpu);
}
