// Multi-scale quantisation (FlexVAR's independent scales, VAR's residual scales): the ops
// sar_fast::msq_encode_flexvar and sar_fast::msq_var_step, registered for CPU and CUDA.
//
// Semantics are those of sar_fast.ops.reference.msq_encode, and the arithmetic mirrors it
// so that codes come out identical:
//   - each scale is the area-downsampled latent (PyTorch's adaptive average pooling; a 1x1
//     scale is `mean` over H and W, as in PyTorch), optionally L2-normalised (ATen's own
//     normalisation, so identical by construction);
//   - score(n, v) = (|z_n|^2 + |e_v|^2) - 2 <z_n, e_v> in fp32, the norms by ATen, the dot
//     product as one fused multiply-add per feature in feature order (what MKL's sgemm
//     does); the argmin keeps the lowest index on ties;
//   - VAR embeds the raw codebook rows and resizes them with PyTorch's bicubic rounding
//     (msq_common.h).
// No [N, V] score matrix is formed: the codebook is streamed past tiles of rows and each
// row keeps a running argmin.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace sar_fast {

// Longest schedule the ops accept (the CUDA pooling kernel takes the scales by value).
constexpr int64_t kMaxScales = 64;

// True when the CUDA kernels were compiled into this build.
bool cuda_compiled();

// All scales of `schedule` in one call. latent [B, C, H, W] and codebook [V, C] in
// float32/float16/bfloat16 on one device; every side in [1, min(H, W)]. Returns the codes
// [B, L] (int64, L = sum of side^2), scale after scale, row-major within a scale.
at::Tensor msq_encode_flexvar(const at::Tensor& latent, const at::Tensor& codebook,
                              at::IntArrayRef schedule, bool normalize);

// One scale of VAR's residual quantiser: pools `rest` [B, C, H, W] (float32) to side x side,
// finds the codes, embeds the raw codebook rows and (with `upsample`) resizes them to
// H x W by bicubic interpolation; without `upsample` side must equal H and W.
// With f_hat: f_hat += h and rest -= h in place, and the returned h is empty. Without:
// h is returned (laid out as the reference's h, which matters for the convolutions that
// follow) and nothing is modified. Returns (codes [B, side^2] int64, h).
std::tuple<at::Tensor, at::Tensor> msq_var_step(const at::Tensor& rest,
                                                const std::optional<at::Tensor>& f_hat,
                                                const at::Tensor& codebook, int64_t side,
                                                bool normalize, bool upsample);

// ---- backend primitives: inputs already validated, float32, on the primitive's device.

// Area-pools z (contiguous NCHW [B, C, H, W]) to each side in `sides` and writes scale i's
// cell (y, x) of sample b to row b * total_len + offsets[i] + y * side + x of out
// [B * total_len, C].
void area_pool_rows_cpu(const at::Tensor& z, const std::vector<int64_t>& sides,
                        const std::vector<int64_t>& offsets, int64_t total_len, at::Tensor& out);

// out[n] = argmin_v (row_norms[n] + book_norms[v]) - 2 <rows[n], book[v]>, lowest index on
// ties. rows [N, C], book [V, C] contiguous; out int64 [N].
void nearest_rows_cpu(const at::Tensor& rows, const at::Tensor& row_norms,
                      const at::Tensor& book, const at::Tensor& book_norms, at::Tensor& out);

// h[b, c] = the side x side map of raw_book[codes[b, :], c], bicubic-resized to target's
// H x W when `upsample`. rest == nullptr: target = h; else target += h and *rest -= h.
// codes int64 [B * side^2]; raw_book contiguous [V, C]; target/rest any strides.
void embed_upsample_cpu(const at::Tensor& codes, const at::Tensor& raw_book, int64_t side,
                        bool upsample, const at::Tensor& target, const at::Tensor* rest);

// deliberate repeat: each CPU primitive above has a CUDA twin with the same signature.
#ifdef SAR_FAST_WITH_CUDA
void area_pool_rows_cuda(const at::Tensor& z, const std::vector<int64_t>& sides,
                         const std::vector<int64_t>& offsets, int64_t total_len, at::Tensor& out);
void nearest_rows_cuda(const at::Tensor& rows, const at::Tensor& row_norms,
                       const at::Tensor& book, const at::Tensor& book_norms, at::Tensor& out);
void embed_upsample_cuda(const at::Tensor& codes, const at::Tensor& raw_book, int64_t side,
                         bool upsample, const at::Tensor& target, const at::Tensor* rest);
#endif

// The CPU kernels come in several instruction-set variants that give identical results:
// "avx512", "avx2" (x86-64 with GCC) and "portable". The best one the CPU supports is used
// unless set_cpu_isa picks another (tests use this to check that they agree).
std::vector<std::string> cpu_isas();  // supported here, best first
std::string cpu_isa();                // in use
void set_cpu_isa(const std::string& name);

}  // namespace sar_fast
