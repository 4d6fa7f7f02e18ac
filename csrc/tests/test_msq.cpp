// ctest unit test for the CPU kernels of the multi-scale quantiser (csrc/msq*.cpp):
//   - area pooling == ATen's adaptive_avg_pool2d, bit for bit (NCHW and channels last);
//   - embed + bicubic upsample (+ accumulate) == ATen's upsample_bicubic2d, bit for bit;
//   - the tiled nearest-code search == a scalar loop with the same rounding (exact, ties
//     included) and == the true nearest code (float64) up to fp32 rounding;
//   - every instruction-set variant gives identical results;
//   - the ops == the same pipeline composed from ATen ops (the Python reference's recipe);
//   - bad input throws c10::ValueError / c10::TypeError.
// Exits non-zero on any failure; prints the seed.
#include "msq.h"

#include "check.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using sar_fast_test::expect;
using sar_fast_test::expect_throws;
using sar_fast_test::failures;

bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) {
    return false;
  }
  const at::Tensor ai = a.contiguous().view(at::kInt), bi = b.contiguous().view(at::kInt);
  return at::equal(ai, bi);
}

std::string shape(int64_t b, int64_t c, int64_t h, int64_t w) {
  return "[" + std::to_string(b) + "," + std::to_string(c) + "," + std::to_string(h) + "," +
         std::to_string(w) + "]";
}

void test_area_pool(int64_t h, int64_t w, int64_t side, bool channels_last) {
  const int64_t b = 2, c = 5;
  at::Tensor z = at::randn({b, c, h, w});
  if (channels_last) {
    z = z.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const at::Tensor want = at::adaptive_avg_pool2d(z, {side, side});  // [b, c, s, s]
  at::Tensor rows = at::empty({b * side * side, c});
  sar_fast::area_pool_rows_cpu(z.contiguous(), {side}, {0}, side * side, rows);
  const at::Tensor got = rows.view({b, side, side, c}).permute({0, 3, 1, 2});
  expect(bit_equal(got, want), "area pool " + shape(b, c, h, w) + " -> " + std::to_string(side) +
                                   (channels_last ? " channels-last" : ""));
}

// Several scales into one row buffer: each lands at its offset.
void test_area_pool_offsets() {
  const int64_t b = 3, c = 4, h = 16;
  const std::vector<int64_t> sides = {2, 5, 13, 16}, offsets = {1, 5, 30, 199};
  const int64_t total = 455;
  const at::Tensor z = at::randn({b, c, h, h});
  at::Tensor rows = at::full({b * total, c}, std::nan(""));
  sar_fast::area_pool_rows_cpu(z, sides, offsets, total, rows);
  const at::Tensor per_sample = rows.view({b, total, c});
  for (size_t i = 0; i < sides.size(); ++i) {
    const int64_t s = sides[i];
    const at::Tensor want = at::adaptive_avg_pool2d(z, {s, s}).permute({0, 2, 3, 1}).reshape({b, s * s, c});
    expect(bit_equal(per_sample.narrow(1, offsets[i], s * s), want),
           "pooled scale " + std::to_string(s) + " at its offset");
  }
  expect(at::isnan(per_sample.narrow(1, 0, 1)).all().item<bool>(), "rows outside the scales untouched");
}

void test_embed_upsample(int64_t side, int64_t h, int64_t w) {
  const int64_t b = 2, c = 3, v = 11;
  const at::Tensor book = at::randn({v, c});
  const at::Tensor codes = at::randint(0, v, {b * side * side}, at::kLong);
  const at::Tensor small = book.index_select(0, codes).view({b, side, side, c}).permute({0, 3, 1, 2});
  const at::Tensor want = at::upsample_bicubic2d(small, {h, w}, false);
  at::Tensor got = at::full({b, c, h, w}, std::nan(""));
  sar_fast::embed_upsample_cpu(codes, book, side, true, got, nullptr);
  expect(bit_equal(got, want), "bicubic " + std::to_string(side) + " -> " + std::to_string(h) +
                                   "x" + std::to_string(w) + " (" + sar_fast::cpu_isa() + ")");

  // accumulate: f_hat += h, rest -= h (channels-last f_hat: strided writes)
  const at::Tensor f_hat0 = at::randn({b, c, h, w}), rest0 = at::randn({b, c, h, w});
  at::Tensor f_hat = f_hat0.contiguous(at::MemoryFormat::ChannelsLast), rest = rest0.clone();
  sar_fast::embed_upsample_cpu(codes, book, side, true, f_hat, &rest);
  expect(bit_equal(f_hat, f_hat0 + want) && bit_equal(rest, rest0 - want),
         "bicubic accumulate into f_hat / rest");
}

void test_embed_only() {
  const int64_t b = 2, c = 3, side = 4, v = 7;
  const at::Tensor book = at::randn({v, c});
  const at::Tensor codes = at::randint(0, v, {b * side * side}, at::kLong);
  const at::Tensor want = book.index_select(0, codes).view({b, side, side, c}).permute({0, 3, 1, 2});
  at::Tensor got = at::full({b, c, side, side}, std::nan(""));
  sar_fast::embed_upsample_cpu(codes, book, side, false, got, nullptr);
  expect(bit_equal(got, want), "embed without upsample");
}

// The search's arithmetic written as a plain loop: ((|z|^2 + |e|^2) - 2 * dot) with the
// dot product as sequential fmaf; first minimum wins.
std::vector<int64_t> scalar_search(const at::Tensor& rows, const at::Tensor& zz,
                                   const at::Tensor& book, const at::Tensor& ee) {
  const int64_t n = rows.size(0), v = book.size(0), c = rows.size(1);
  const float* z = rows.const_data_ptr<float>();
  const float* e = book.const_data_ptr<float>();
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float best = std::numeric_limits<float>::infinity();
    int64_t index = 0;
    for (int64_t j = 0; j < v; ++j) {
      float dot = 0.f;
      for (int64_t k = 0; k < c; ++k) {
        dot = std::fma(z[i * c + k], e[j * c + k], dot);
      }
      const float score = (zz.const_data_ptr<float>()[i] + ee.const_data_ptr<float>()[j]) - 2.f * dot;
      if (score < best) {
        best = score;
        index = j;
      }
    }
    out[i] = index;
  }
  return out;
}

void test_search(int64_t n, int64_t v, int64_t c, bool integer_valued) {
  at::Tensor rows = integer_valued ? at::randint(-2, 3, {n, c}).to(at::kFloat) : at::randn({n, c});
  at::Tensor book = integer_valued ? at::randint(-2, 3, {v, c}).to(at::kFloat) : at::randn({v, c});
  if (!integer_valued && v >= 4) {  // duplicated rows: exact ties
    book.narrow(0, v / 2, v / 4).copy_(book.narrow(0, 0, v / 4));
  }
  const at::Tensor zz = rows.square().sum(1), ee = book.square().sum(1);
  at::Tensor got = at::empty({n}, at::kLong);
  sar_fast::nearest_rows_cpu(rows, zz, book, ee, got);
  const std::vector<int64_t> want = scalar_search(rows, zz, book, ee);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    mismatches += got[i].item<int64_t>() != want[i];
  }
  const std::string name = "search n=" + std::to_string(n) + " v=" + std::to_string(v) + " c=" +
                           std::to_string(c) + (integer_valued ? " integer" : "") + " (" +
                           sar_fast::cpu_isa() + ")";
  expect(mismatches == 0, name + ": " + std::to_string(mismatches) + " rows differ from the scalar loop");

  // and the chosen code is the nearest one (float64) up to fp32 rounding
  const at::Tensor d = at::cdist(rows.to(at::kDouble), book.to(at::kDouble)).square();
  const at::Tensor chosen = d.gather(1, got.unsqueeze(1)).squeeze(1);
  const at::Tensor best = std::get<0>(d.min(1));
  const at::Tensor tol = 1e-5 * (rows.to(at::kDouble).square().sum(1) + book.to(at::kDouble).square().sum(1).max());
  expect((chosen <= best + tol).all().item<bool>(), name + ": not the nearest code");
}

// The ops against the Python reference's recipe composed from ATen ops.
at::Tensor aten_flexvar(const at::Tensor& latent, const at::Tensor& codebook,
                        const std::vector<int64_t>& schedule, bool normalize) {
  const at::Tensor z = latent.to(at::kFloat);
  at::Tensor book = codebook.to(at::kFloat);
  if (normalize) {
    book = book / at::linalg_vector_norm(book, 2, {-1}, true).clamp_min(1e-12);
  }
  std::vector<at::Tensor> codes;
  for (const int64_t s : schedule) {
    at::Tensor zs = at::adaptive_avg_pool2d(z, {s, s}).permute({0, 2, 3, 1}).reshape({-1, z.size(1)});
    if (normalize) {
      zs = zs / at::linalg_vector_norm(zs, 2, {-1}, true).clamp_min(1e-12);
    }
    const at::Tensor d = zs.square().sum(1, true) + book.square().sum(1) - 2.0 * at::mm(zs, book.t());
    codes.push_back(d.argmin(1).view({z.size(0), s * s}));
  }
  return at::cat(codes, 1);
}

void test_flexvar_op(bool normalize) {
  const std::vector<int64_t> schedule = {1, 2, 3, 5, 7, 9};
  const at::Tensor latent = at::randn({3, 6, 9, 9});
  const at::Tensor codebook = at::randn({301, 6});
  const at::Tensor got = sar_fast::msq_encode_flexvar(latent, codebook, schedule, normalize);
  const at::Tensor want = aten_flexvar(latent, codebook, schedule, normalize);
  expect(got.sizes() == want.sizes() && at::equal(got, want),
         std::string("msq_encode_flexvar == ATen recipe, normalize=") + (normalize ? "true" : "false"));
}

void test_var_op() {
  const std::vector<int64_t> schedule = {1, 2, 4, 6};
  const int64_t b = 2, c = 4, h = 6;
  const at::Tensor latent = at::randn({b, c, h, h});
  const at::Tensor codebook = at::randn({37, c}) * 0.5;
  at::Tensor rest = latent.clone(), f_hat = at::zeros_like(latent);
  at::Tensor rest_ref = latent.clone(), f_hat_ref = at::zeros_like(latent);
  for (size_t i = 0; i < schedule.size(); ++i) {
    const int64_t s = schedule[i];
    const bool last = i + 1 == schedule.size();
    const auto [codes, empty] = sar_fast::msq_var_step(rest, f_hat, codebook, s, false, !last);
    expect(empty.numel() == 0, "fused var step returns an empty h");
    // reference: pool the residual, nearest code, embed, bicubic, accumulate
    at::Tensor zs = last ? rest_ref : at::adaptive_avg_pool2d(rest_ref, {s, s});
    zs = zs.permute({0, 2, 3, 1}).reshape({-1, c});
    const at::Tensor d = zs.square().sum(1, true) + codebook.square().sum(1) - 2.0 * at::mm(zs, codebook.t());
    const at::Tensor want = d.argmin(1).view({b, s * s});
    expect(at::equal(codes, want), "var step codes, scale " + std::to_string(s));
    at::Tensor hs = codebook.index_select(0, want.flatten()).view({b, s * s, c}).transpose(1, 2).reshape({b, c, s, s});
    if (!last) {
      hs = at::upsample_bicubic2d(hs, {h, h}, false);
    }
    f_hat_ref = f_hat_ref + hs;
    rest_ref = rest_ref - hs;
  }
  expect(bit_equal(f_hat, f_hat_ref) && bit_equal(rest, rest_ref), "var f_hat and residual");
}

void test_bad_inputs() {
  using sar_fast::msq_encode_flexvar;
  using sar_fast::msq_var_step;
  const at::Tensor z = at::randn({2, 4, 5, 5}), book = at::randn({9, 4});
  const std::vector<int64_t> sched = {1, 2, 5};
  expect_throws<c10::ValueError>("latent rank", [&] { msq_encode_flexvar(at::randn({2, 4, 5}), book, sched, true); });
  expect_throws<c10::TypeError>("latent dtype", [&] { msq_encode_flexvar(z.to(at::kDouble), book, sched, true); });
  expect_throws<c10::TypeError>("codebook dtype", [&] { msq_encode_flexvar(z, book.to(at::kInt), sched, true); });
  expect_throws<c10::ValueError>("codebook rank", [&] { msq_encode_flexvar(z, at::randn({9}), sched, true); });
  expect_throws<c10::ValueError>("C mismatch", [&] { msq_encode_flexvar(z, at::randn({9, 3}), sched, true); });
  expect_throws<c10::ValueError>("empty codebook", [&] { msq_encode_flexvar(z, at::randn({0, 4}), sched, true); });
  expect_throws<c10::ValueError>("empty latent", [&] { msq_encode_flexvar(at::randn({0, 4, 5, 5}), book, sched, true); });
  expect_throws<c10::ValueError>("empty schedule", [&] { msq_encode_flexvar(z, book, {}, true); });
  expect_throws<c10::ValueError>("side > H", [&] { msq_encode_flexvar(z, book, {1, 6}, true); });
  expect_throws<c10::ValueError>("side 0", [&] { msq_encode_flexvar(z, book, {0, 5}, true); });
  expect_throws<c10::ValueError>("too many scales", [&] {
    msq_encode_flexvar(z, book, std::vector<int64_t>(sar_fast::kMaxScales + 1, 1), true);
  });
  at::Tensor rest = z.clone(), f_hat = at::zeros_like(z);
  expect_throws<c10::TypeError>("rest dtype", [&] { msq_var_step(z.to(at::kHalf), std::nullopt, book, 2, false, true); });
  expect_throws<c10::ValueError>("rest rank", [&] { msq_var_step(at::randn({4, 5, 5}), std::nullopt, book, 2, false, true); });
  expect_throws<c10::ValueError>("var side > H", [&] { msq_var_step(rest, std::nullopt, book, 6, false, true); });
  expect_throws<c10::ValueError>("no upsample below H", [&] { msq_var_step(rest, std::nullopt, book, 3, false, false); });
  expect_throws<c10::ValueError>("f_hat shape", [&] { msq_var_step(rest, at::zeros({2, 4, 5, 4}), book, 2, false, true); });
  expect_throws<c10::TypeError>("f_hat dtype", [&] { msq_var_step(rest, f_hat.to(at::kHalf), book, 2, false, true); });
  expect_throws<c10::ValueError>("f_hat aliases rest", [&] { msq_var_step(rest, rest, book, 2, false, true); });
  expect_throws<c10::ValueError>("f_hat overlapping", [&] {
    msq_var_step(rest, at::zeros({1, 1, 1, 1}).expand({2, 4, 5, 5}), book, 2, false, true);
  });
  expect_throws<c10::ValueError>("var C mismatch", [&] { msq_var_step(rest, std::nullopt, at::randn({9, 2}), 2, false, true); });
  expect_throws<c10::ValueError>("unknown isa", [] { sar_fast::set_cpu_isa("sse9"); });
}

}  // namespace

int main() {
  const uint64_t seed = std::random_device{}();
  at::manual_seed(seed);
  std::cout << "test_msq: seed " << seed << ", CPU variants:";
  for (const auto& isa : sar_fast::cpu_isas()) {
    std::cout << " " << isa;
  }
  std::cout << "\n";
  expect(sar_fast::cuda_compiled() == SAR_FAST_EXPECT_CUDA, "cuda_compiled() flag");

  for (const bool channels_last : {false, true}) {
    test_area_pool(16, 16, 13, channels_last);  // non-integer ratio
    test_area_pool(16, 16, 5, channels_last);
    test_area_pool(13, 13, 4, channels_last);   // odd H
    test_area_pool(15, 11, 7, channels_last);   // H != W
    test_area_pool(7, 7, 7, channels_last);     // identity
  }
  test_area_pool_offsets();
  test_embed_only();

  const std::string best = sar_fast::cpu_isa();
  for (const auto& isa : sar_fast::cpu_isas()) {
    sar_fast::set_cpu_isa(isa);
    for (const auto& [side, h, w] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
             {1, 16, 16}, {2, 16, 16}, {13, 16, 16}, {4, 13, 13}, {5, 13, 11}, {3, 7, 9}, {6, 33, 33}}) {
      test_embed_upsample(side, h, w);
    }
    for (const int64_t n : {1, 7, 8, 65, 300}) {
      for (const int64_t v : {1, 5, 33, 517}) {
        for (const int64_t c : {1, 3, 32}) {
          test_search(n, v, c, false);
        }
      }
    }
    test_search(200, 300, 3, true);
    test_search(64, 1000, 2, true);
  }
  sar_fast::set_cpu_isa(best);
  test_flexvar_op(true);
  test_flexvar_op(false);
  test_var_op();
  test_bad_inputs();

  if (failures != 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "test_msq: all checks passed\n";
  return 0;
}
