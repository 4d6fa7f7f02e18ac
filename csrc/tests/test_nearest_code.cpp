// ctest unit test for the CPU kernel of sar_fast::nearest_code: compares it against a
// brute-force double-precision loop, checks the lowest-index tie rule exactly, and checks
// that bad input throws the documented error types. Exits non-zero on any failure.
#include "nearest_code.h"

#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
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

// Squared distances in double from the inputs as stored (after rounding to their dtype).
std::vector<double> brute_force_distances(const at::Tensor& x, const at::Tensor& codebook) {
  const at::Tensor xd = x.to(at::kDouble).contiguous();
  const at::Tensor cd = codebook.to(at::kDouble).contiguous();
  const int64_t n = xd.size(0), v = cd.size(0), c = xd.size(1);
  const double* xp = xd.const_data_ptr<double>();
  const double* cp = cd.const_data_ptr<double>();
  std::vector<double> dist(static_cast<size_t>(n * v));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) {
      double sum = 0.0;
      for (int64_t k = 0; k < c; ++k) {
        const double d = xp[i * c + k] - cp[j * c + k];
        sum += d * d;
      }
      dist[i * v + j] = sum;
    }
  }
  return dist;
}

// First index of the minimum: the lowest-index tie rule.
std::vector<int64_t> brute_force_argmin(const at::Tensor& x, const at::Tensor& codebook) {
  const std::vector<double> dist = brute_force_distances(x, codebook);
  const int64_t n = x.size(0), v = codebook.size(0);
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int64_t best = 0;
    for (int64_t j = 1; j < v; ++j) {
      if (dist[i * v + j] < dist[i * v + best]) {
        best = j;
      }
    }
    out[i] = best;
  }
  return out;
}

at::Tensor call_through_dispatcher(const at::Tensor& x, const at::Tensor& codebook) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sar_fast::nearest_code", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, codebook);
}

// Random continuous inputs: the chosen code must be within fp32 rounding of the minimum.
void test_random(int64_t n, int64_t v, int64_t c, at::ScalarType dtype) {
  const at::Tensor x = at::randn({n, c}).to(dtype);
  const at::Tensor codebook = at::randn({v, c}).to(dtype);
  const at::Tensor got = sar_fast::nearest_code_cpu(x, codebook);
  const std::string name = "random n=" + std::to_string(n) + " v=" + std::to_string(v) +
                           " c=" + std::to_string(c) + " " + c10::toString(dtype);
  expect(got.scalar_type() == at::kLong && got.dim() == 1 && got.size(0) == n, name + ": shape/dtype");
  expect(at::equal(got, call_through_dispatcher(x, codebook)), name + ": dispatcher result differs");

  const std::vector<double> dist = brute_force_distances(x, codebook);
  const at::Tensor xd = x.to(at::kDouble), cd = codebook.to(at::kDouble);
  const double code_norm_max = cd.pow(2).sum(1).max().item<double>();
  const int64_t* idx = got.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    double best = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < v; ++j) {
      best = std::min(best, dist[i * v + j]);
    }
    const double tol = 1e-5 * (xd[i].pow(2).sum().item<double>() + code_norm_max);
    expect(idx[i] >= 0 && idx[i] < v && dist[i * v + idx[i]] <= best + tol,
           name + ": row " + std::to_string(i) + " is not nearest");
  }
}

// Small integer inputs: every distance is exact in fp32, so ties are exact and the
// result must equal the brute-force first argmin element for element.
void test_exact_ties(int64_t n, int64_t v, int64_t c, at::ScalarType dtype) {
  const at::Tensor x = at::randint(-2, 3, {n, c}).to(dtype);
  const at::Tensor codebook = at::randint(-2, 3, {v, c}).to(dtype);
  const at::Tensor got = sar_fast::nearest_code_cpu(x, codebook);
  const std::vector<int64_t> want = brute_force_argmin(x, codebook);
  const int64_t* idx = got.const_data_ptr<int64_t>();
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    mismatches += idx[i] != want[i];
  }
  expect(mismatches == 0, "ties n=" + std::to_string(n) + " v=" + std::to_string(v) + " c=" +
                              std::to_string(c) + " " + c10::toString(dtype) + ": " +
                              std::to_string(mismatches) + " rows differ from first argmin");
}

void test_bad_inputs() {
  const at::Tensor x = at::randn({3, 4});
  const at::Tensor codebook = at::randn({5, 4});
  expect_throws<c10::ValueError>("x rank", [&] { sar_fast::nearest_code_cpu(at::randn({4}), codebook); });
  expect_throws<c10::ValueError>("codebook rank", [&] { sar_fast::nearest_code_cpu(x, at::randn({2, 5, 4})); });
  expect_throws<c10::TypeError>("dtype mismatch", [&] { sar_fast::nearest_code_cpu(x, codebook.to(at::kHalf)); });
  expect_throws<c10::ValueError>("C mismatch", [&] { sar_fast::nearest_code_cpu(x, at::randn({5, 6})); });
  expect_throws<c10::ValueError>("empty x", [&] { sar_fast::nearest_code_cpu(at::randn({0, 4}), codebook); });
  expect_throws<c10::ValueError>("empty codebook", [&] { sar_fast::nearest_code_cpu(x, at::randn({0, 4})); });
  expect_throws<c10::TypeError>("integer dtype", [&] {
    sar_fast::nearest_code_cpu(x.to(at::kInt), codebook.to(at::kInt));
  });
  expect_throws<c10::TypeError>("float64", [&] {
    sar_fast::nearest_code_cpu(x.to(at::kDouble), codebook.to(at::kDouble));
  });
}

}  // namespace

int main() {
  const uint64_t seed = std::random_device{}();
  at::manual_seed(seed);
  std::cout << "test_nearest_code: seed " << seed << "\n";
  for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const int64_t n : {1, 37, 1001}) {
      for (const int64_t v : {1, 5, 257}) {
        for (const int64_t c : {3, 32}) {
          test_random(n, v, c, dtype);
          test_exact_ties(n, v, c, dtype);
        }
      }
    }
  }
  test_bad_inputs();
  expect(sar_fast::cuda_compiled() == SAR_FAST_EXPECT_CUDA, "cuda_compiled() flag");
  if (failures != 0) {
    std::cerr << failures << " check(s) failed\n";
    return 1;
  }
  std::cout << "test_nearest_code: all checks passed\n";
  return 0;
}
