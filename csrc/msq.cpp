// Input validation, the per-call orchestration shared by CPU and CUDA, and operator
// registration for sar_fast::msq_encode_flexvar and sar_fast::msq_var_step.
#include "msq.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <utility>

namespace sar_fast {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_codebook(const char* op, const at::Tensor& codebook, const at::Tensor& like,
                    const char* like_name) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must be 2-D [V, C], got shape ",
                    codebook.sizes());
  TORCH_CHECK_TYPE(is_supported_float(codebook.scalar_type()), op,
                   ": codebook must be float32, float16 or bfloat16, got ",
                   codebook.scalar_type());
  TORCH_CHECK_VALUE(codebook.device() == like.device(), op, ": codebook is on ",
                    codebook.device(), " but ", like_name, " is on ", like.device());
  TORCH_CHECK_VALUE(codebook.size(0) >= 1 && codebook.size(1) >= 1, op,
                    ": codebook must be non-empty [V, C], got shape ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) <= std::numeric_limits<int32_t>::max(), op,
                    ": codebook has ", codebook.size(0), " rows; at most 2^31 - 1 are supported");
  TORCH_CHECK_VALUE(codebook.size(1) == like.size(1), op, ": codebook has C=",
                    codebook.size(1), " features but ", like_name, " has C=", like.size(1),
                    " channels");
}

void check_side(const char* op, int64_t side, int64_t height, int64_t width) {
  TORCH_CHECK_VALUE(side >= 1 && side <= height && side <= width, op, ": scale side ", side,
                    " must lie in [1, min(H, W)] = [1, ", std::min(height, width), "]");
}

// The matching codebook (fp32, L2-normalised when asked, computed exactly as the
// reference does with ATen) and its squared row norms.
std::pair<at::Tensor, at::Tensor> matching_book(const at::Tensor& codebook, bool normalize) {
  at::Tensor book = codebook.to(at::kFloat);
  if (normalize) {
    book = book / at::linalg_vector_norm(book, 2, {-1}, true).clamp_min(1e-12);
  }
  at::Tensor norms = book.square().sum(1);
  return {book.contiguous(), norms.contiguous()};
}

// Codes of token rows [N, C]: optional L2 normalisation, squared norms, tiled search.
at::Tensor nearest_rows(at::Tensor rows, const at::Tensor& codebook, bool normalize) {
  if (normalize) {
    rows = rows / at::linalg_vector_norm(rows, 2, {-1}, true).clamp_min(1e-12);
  }
  rows = rows.contiguous();
  const at::Tensor row_norms = rows.square().sum(1).contiguous();
  const auto [book, book_norms] = matching_book(codebook, normalize);
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  // deliberate repeat: every op dispatches CPU / CUDA the same way; a macro would hide the TORCH_CHECK
  if (rows.is_cuda()) {
#ifdef SAR_FAST_WITH_CUDA
    nearest_rows_cuda(rows, row_norms, book, book_norms, out);
#else
    TORCH_CHECK(false, "sar_fast was built without CUDA kernels");
#endif
  } else {
    nearest_rows_cpu(rows, row_norms, book, book_norms, out);
  }
  return out;
}

void area_pool_rows(const at::Tensor& z, const std::vector<int64_t>& sides,
                    const std::vector<int64_t>& offsets, int64_t total_len, at::Tensor& out) {
  if (sides.empty()) {
    return;
  }
  if (z.is_cuda()) {
#ifdef SAR_FAST_WITH_CUDA
    area_pool_rows_cuda(z, sides, offsets, total_len, out);
#else
    TORCH_CHECK(false, "sar_fast was built without CUDA kernels");
#endif
  } else {
    area_pool_rows_cpu(z, sides, offsets, total_len, out);
  }
}

void embed_upsample(const at::Tensor& codes, const at::Tensor& raw_book, int64_t side,
                    bool upsample, const at::Tensor& target, const at::Tensor* rest) {
  if (target.is_cuda()) {
#ifdef SAR_FAST_WITH_CUDA
    embed_upsample_cuda(codes, raw_book, side, upsample, target, rest);
#else
    TORCH_CHECK(false, "sar_fast was built without CUDA kernels");
#endif
  } else {
    embed_upsample_cpu(codes, raw_book, side, upsample, target, rest);
  }
}

// PyTorch's area resize to 1x1 is a mean over H and W (adaptive_avg_pool2d special-cases
// it); reproduced with the same ATen call.
at::Tensor mean_cell(const at::Tensor& z) {
  return z.mean({-1, -2}, true).flatten(1);
}

}  // namespace

at::Tensor msq_encode_flexvar(const at::Tensor& latent, const at::Tensor& codebook,
                              at::IntArrayRef schedule, bool normalize) {
  const char* op = "msq_encode_flexvar";
  TORCH_CHECK_VALUE(latent.dim() == 4, op, ": latent must be 4-D [B, C, H, W], got shape ",
                    latent.sizes());
  TORCH_CHECK_TYPE(is_supported_float(latent.scalar_type()), op,
                   ": latent must be float32, float16 or bfloat16, got ", latent.scalar_type());
  TORCH_CHECK_VALUE(latent.numel() > 0, op, ": latent must be non-empty, got shape ",
                    latent.sizes());
  check_codebook(op, codebook, latent, "latent");
  TORCH_CHECK_VALUE(!schedule.empty(), op, ": schedule must hold at least one side");
  TORCH_CHECK_VALUE(static_cast<int64_t>(schedule.size()) <= kMaxScales, op,
                    ": schedule has ", schedule.size(), " scales; at most ", kMaxScales,
                    " are supported");
  const int64_t batch = latent.size(0), channels = latent.size(1);
  const int64_t height = latent.size(2), width = latent.size(3);
  for (const int64_t side : schedule) {
    check_side(op, side, height, width);
  }
  const c10::OptionalDeviceGuard guard(latent.device());

  const at::Tensor z = latent.to(at::kFloat);  // keeps the memory format, like .float()
  const at::Tensor z_nchw = z.contiguous();
  std::vector<int64_t> sides, offsets;
  int64_t total_len = 0;
  for (const int64_t side : schedule) {
    if (side > 1) {
      sides.push_back(side);
      offsets.push_back(total_len);
    }
    total_len += side * side;
  }
  at::Tensor rows = at::empty({batch * total_len, channels}, z.options());
  area_pool_rows(z_nchw, sides, offsets, total_len, rows);
  int64_t offset = 0;
  for (const int64_t side : schedule) {
    if (side == 1) {
      rows.view({batch, total_len, channels}).select(1, offset).copy_(mean_cell(z));
    }
    offset += side * side;
  }
  return nearest_rows(rows, codebook, normalize).view({batch, total_len});
}

std::tuple<at::Tensor, at::Tensor> msq_var_step(const at::Tensor& rest,
                                                const std::optional<at::Tensor>& f_hat,
                                                const at::Tensor& codebook, int64_t side,
                                                bool normalize, bool upsample) {
  const char* op = "msq_var_step";
  TORCH_CHECK_VALUE(rest.dim() == 4, op, ": rest must be 4-D [B, C, H, W], got shape ",
                    rest.sizes());
  TORCH_CHECK_TYPE(rest.scalar_type() == at::kFloat, op,
                   ": rest (the residual) must be float32, got ", rest.scalar_type());
  TORCH_CHECK_VALUE(rest.numel() > 0, op, ": rest must be non-empty, got shape ", rest.sizes());
  check_codebook(op, codebook, rest, "rest");
  const int64_t batch = rest.size(0), channels = rest.size(1);
  const int64_t height = rest.size(2), width = rest.size(3);
  check_side(op, side, height, width);
  TORCH_CHECK_VALUE(upsample || (side == height && side == width), op,
                    ": without upsample the scale side (", side, ") must equal H and W (",
                    height, "x", width, ")");
  if (f_hat.has_value()) {
    const at::Tensor& acc = *f_hat;
    TORCH_CHECK_VALUE(acc.sizes() == rest.sizes(), op, ": f_hat has shape ", acc.sizes(),
                      " but rest has ", rest.sizes());
    TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat, op, ": f_hat must be float32, got ",
                     acc.scalar_type());
    TORCH_CHECK_VALUE(acc.device() == rest.device(), op, ": f_hat is on ", acc.device(),
                      " but rest is on ", rest.device());
    TORCH_CHECK_VALUE(acc.is_non_overlapping_and_dense() && rest.is_non_overlapping_and_dense(),
                      op, ": f_hat and rest are updated in place and must be dense "
                      "(non-overlapping) tensors");
    TORCH_CHECK_VALUE(!acc.is_same(rest) && acc.data_ptr() != rest.data_ptr(), op,
                      ": f_hat and rest must be different tensors");
  }
  const c10::OptionalDeviceGuard guard(rest.device());

  const int64_t cells = side * side;
  at::Tensor rows;
  if (side == height && side == width) {  // the reference quantises the residual as is
    rows = rest.permute({0, 2, 3, 1}).reshape({batch * cells, channels});
  } else if (side == 1) {
    rows = mean_cell(rest);
  } else {
    rows = at::empty({batch * cells, channels}, rest.options());
    area_pool_rows(rest.contiguous(), {side}, {0}, cells, rows);
  }
  const at::Tensor codes = nearest_rows(rows, codebook, normalize);
  const at::Tensor raw_book = codebook.to(at::kFloat).contiguous();

  if (f_hat.has_value()) {
    embed_upsample(codes, raw_book, side, upsample, *f_hat, &rest);
    return {codes.view({batch, cells}), at::empty({0}, rest.options())};
  }
  // The reference's h is codebook[codes] [B, cells, C] viewed as [B, C, side, side]
  // (channels-last strides), and bicubic keeps that memory format: the Phi convolutions
  // that follow round differently on other layouts, so h is laid out the same way.
  at::Tensor h = at::empty({batch, cells, channels}, rest.options())
                     .transpose(1, 2)
                     .reshape({batch, channels, side, side});
  if (upsample) {
    h = at::empty({batch, channels, height, width},
                  rest.options().memory_format(h.suggest_memory_format()));
  }
  embed_upsample(codes, raw_book, side, upsample, h, nullptr);
  return {codes.view({batch, cells}), h};
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
  m.def("msq_encode_flexvar(Tensor latent, Tensor codebook, int[] schedule, bool normalize) -> Tensor");
  m.def(
      "msq_var_step(Tensor(a!) rest, Tensor(b!)? f_hat, Tensor codebook, int side, "
      "bool normalize, bool upsample) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sar_fast, CPU, m) {
  m.impl("msq_encode_flexvar", &sar_fast::msq_encode_flexvar);
  m.impl("msq_var_step", &sar_fast::msq_var_step);
}
