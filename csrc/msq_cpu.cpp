// CPU primitives of the multi-scale quantiser: area pooling into token rows, the tiled
// nearest-code search, and embed + bicubic upsample (+ accumulate). The two hot loops are
// compiled per instruction set (msq_cpu_kernels.inc) and picked at run time.
#include "msq.h"
#include "msq_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAR_FAST_X86_VARIANTS 1
#include <immintrin.h>
#else
#define SAR_FAST_X86_VARIANTS 0
#endif

#if SAR_FAST_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define SAR_FAST_SIMD 2
namespace sar_fast::cpu_avx512 {
#include "msq_cpu_kernels.inc"
}  // namespace sar_fast::cpu_avx512
#undef SAR_FAST_SIMD
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SAR_FAST_SIMD 1
namespace sar_fast::cpu_avx2 {
#include "msq_cpu_kernels.inc"
}  // namespace sar_fast::cpu_avx2
#undef SAR_FAST_SIMD
#pragma GCC pop_options
#endif

#define SAR_FAST_SIMD 0
namespace sar_fast::cpu_portable {
#include "msq_cpu_kernels.inc"
}  // namespace sar_fast::cpu_portable
#undef SAR_FAST_SIMD

namespace sar_fast {
namespace {

struct CpuVariant {
  const char* name;
  int strip_codes;
  int tile_rows;
  decltype(&cpu_portable::score_tile) score_tile;
  decltype(&cpu_portable::bicubic_rows) bicubic_rows;
  bool (*supported)();
};

bool always() { return true; }

#if SAR_FAST_X86_VARIANTS
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

// Best first.
const std::vector<CpuVariant>& variants() {
  static const std::vector<CpuVariant> all = {
#if SAR_FAST_X86_VARIANTS
      {"avx512", cpu_avx512::kStripCodes, cpu_avx512::kTileRows, &cpu_avx512::score_tile,
       &cpu_avx512::bicubic_rows, &has_avx512},
      {"avx2", cpu_avx2::kStripCodes, cpu_avx2::kTileRows, &cpu_avx2::score_tile,
       &cpu_avx2::bicubic_rows, &has_avx2},
#endif
      {"portable", cpu_portable::kStripCodes, cpu_portable::kTileRows,
       &cpu_portable::score_tile, &cpu_portable::bicubic_rows, &always},
  };
  return all;
}

size_t best_supported() {
  const auto& all = variants();
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].supported()) {
      return i;
    }
  }
  return all.size() - 1;
}

std::atomic<size_t>& selected() {
  static std::atomic<size_t> index{best_supported()};
  return index;
}

const CpuVariant& active() { return variants()[selected().load()]; }

// Rows handled per parallel task step; a chunk of the packed codebook of about this many
// bytes is reused by every row tile of the step while it sits in L2.
constexpr int64_t kGroupRows = 64;
constexpr int64_t kCodeChunkBytes = 256 * 1024;

}  // namespace

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const auto& v : variants()) {
    if (v.supported()) {
      names.emplace_back(v.name);
    }
  }
  return names;
}

std::string cpu_isa() { return active().name; }

void set_cpu_isa(const std::string& name) {
  const auto& all = variants();
  for (size_t i = 0; i < all.size(); ++i) {
    if (name == all[i].name) {
      TORCH_CHECK_VALUE(all[i].supported(), "set_cpu_isa: this CPU does not support '", name,
                        "'; supported: ", c10::Join(", ", cpu_isas()));
      selected().store(i);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "set_cpu_isa: unknown instruction set '", name,
                    "'; supported here: ", c10::Join(", ", cpu_isas()));
}

void area_pool_rows_cpu(const at::Tensor& z, const std::vector<int64_t>& sides,
                        const std::vector<int64_t>& offsets, int64_t total_len, at::Tensor& out) {
  const int64_t batch = z.size(0), channels = z.size(1), height = z.size(2), width = z.size(3);
  const float* in = z.const_data_ptr<float>();
  float* rows = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / channels, c = plane % channels;
      const float* src = in + plane * height * width;
      for (size_t i = 0; i < sides.size(); ++i) {
        const int64_t side = sides[i];
        float* dst = rows + (b * total_len + offsets[i]) * channels + c;
        for (int64_t oy = 0; oy < side; ++oy) {
          const int64_t y0 = area_bin_start(oy, side, height), y1 = area_bin_end(oy, side, height);
          for (int64_t ox = 0; ox < side; ++ox) {
            const int64_t x0 = area_bin_start(ox, side, width), x1 = area_bin_end(ox, side, width);
            float sum = 0.f;
            for (int64_t y = y0; y < y1; ++y) {
              for (int64_t x = x0; x < x1; ++x) {
                sum += src[y * width + x];
              }
            }
            dst[(oy * side + ox) * channels] =
                sum / static_cast<float>(y1 - y0) / static_cast<float>(x1 - x0);
          }
        }
      }
    }
  });
}

void nearest_rows_cpu(const at::Tensor& rows, const at::Tensor& row_norms,
                      const at::Tensor& book, const at::Tensor& book_norms, at::Tensor& out) {
  const CpuVariant& kernel = active();
  const int64_t num_rows = rows.size(0), dim = rows.size(1), num_codes = book.size(0);
  const int64_t strip_codes = kernel.strip_codes, tile_rows = kernel.tile_rows;
  const int64_t num_strips = (num_codes + strip_codes - 1) / strip_codes;

  // Codebook packed once per call as [strip][dim][strip_codes] (a strip's codes side by
  // side, so one vector load serves strip_codes/2 codes). Padding codes get norm +inf:
  // their score is +inf, which never beats a real code.
  std::vector<float> packed(static_cast<size_t>(num_strips * dim * strip_codes), 0.f);
  std::vector<float> packed_norms(static_cast<size_t>(num_strips * strip_codes),
                                  std::numeric_limits<float>::infinity());
  const float* codes = book.const_data_ptr<float>();
  const float* code_norms = book_norms.const_data_ptr<float>();
  for (int64_t v = 0; v < num_codes; ++v) {
    const int64_t strip = v / strip_codes, lane = v % strip_codes;
    for (int64_t k = 0; k < dim; ++k) {
      packed[(strip * dim + k) * strip_codes + lane] = codes[v * dim + k];
    }
    packed_norms[v] = code_norms[v];
  }
  const int64_t chunk_strips =
      std::max<int64_t>(1, kCodeChunkBytes / (dim * strip_codes * int64_t{sizeof(float)}));

  const float* z = rows.const_data_ptr<float>();
  const float* zz = row_norms.const_data_ptr<float>();
  int64_t* result = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, num_rows, 2 * tile_rows, [&](int64_t begin, int64_t end) {
    // Rows of one group, zero-padded to whole tiles (padding rows are scored, not kept).
    std::vector<float> z_group(static_cast<size_t>(kGroupRows * dim));
    std::vector<float> zz_group(static_cast<size_t>(kGroupRows));
    std::vector<float> best(static_cast<size_t>(kGroupRows * strip_codes));
    std::vector<int32_t> best_index(best.size());
    for (int64_t g0 = begin; g0 < end; g0 += kGroupRows) {
      const int64_t group_rows = std::min(kGroupRows, end - g0);
      const int64_t group_tiles = (group_rows + tile_rows - 1) / tile_rows;
      std::fill(z_group.begin(), z_group.end(), 0.f);
      std::fill(zz_group.begin(), zz_group.end(), 0.f);
      std::copy_n(z + g0 * dim, group_rows * dim, z_group.begin());
      std::copy_n(zz + g0, group_rows, zz_group.begin());
      std::fill(best.begin(), best.end(), std::numeric_limits<float>::infinity());
      std::fill(best_index.begin(), best_index.end(), 0);
      for (int64_t s0 = 0; s0 < num_strips; s0 += chunk_strips) {
        const int64_t s1 = std::min(num_strips, s0 + chunk_strips);
        for (int64_t t = 0; t < group_tiles; ++t) {
          kernel.score_tile(z_group.data() + t * tile_rows * dim, zz_group.data() + t * tile_rows,
                            packed.data(), packed_norms.data(), dim, s0, s1,
                            best.data() + t * tile_rows * strip_codes,
                            best_index.data() + t * tile_rows * strip_codes);
        }
      }
      // Each lane holds the first minimum of its codes; the lowest (score, index) over
      // the lanes is the first minimum over all codes.
      for (int64_t r = 0; r < group_rows; ++r) {
        const float* lane_best = best.data() + r * strip_codes;
        const int32_t* lane_index = best_index.data() + r * strip_codes;
        float score = lane_best[0];
        int32_t index = lane_index[0];
        for (int64_t j = 1; j < strip_codes; ++j) {
          if (lane_best[j] < score || (lane_best[j] == score && lane_index[j] < index)) {
            score = lane_best[j];
            index = lane_index[j];
          }
        }
        result[g0 + r] = index;
      }
    }
  });
}

void embed_upsample_cpu(const at::Tensor& codes, const at::Tensor& raw_book, int64_t side,
                        bool upsample, const at::Tensor& target, const at::Tensor* rest) {
  const CpuVariant& kernel = active();
  const int64_t batch = target.size(0), channels = target.size(1);
  const int64_t height = target.size(2), width = target.size(3);
  const int64_t cells = side * side;

  // Taps and weights per output row (from side rows) and per output column.
  std::vector<int64_t> taps_y(static_cast<size_t>(4 * height)), taps_x(static_cast<size_t>(4 * width));
  std::vector<float> weights_y(taps_y.size()), weights_x(taps_x.size());
  if (upsample) {
    for (int64_t y = 0; y < height; ++y) {
      bicubic_taps(y, side, height, &taps_y[4 * y], &weights_y[4 * y]);
    }
    for (int64_t x = 0; x < width; ++x) {
      bicubic_taps(x, side, width, &taps_x[4 * x], &weights_x[4 * x]);
    }
  }

  const int64_t* code = codes.const_data_ptr<int64_t>();
  const float* book = raw_book.const_data_ptr<float>();
  float* out = target.data_ptr<float>();
  float* residual = rest != nullptr ? rest->data_ptr<float>() : nullptr;
  const auto ts = target.strides();
  const std::vector<int64_t> rs = rest != nullptr ? rest->strides().vec() : std::vector<int64_t>(4, 0);

  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> small(static_cast<size_t>(cells));
    std::vector<float> wide_rows(static_cast<size_t>(side * width));  // horizontally resized
    std::vector<float> line(static_cast<size_t>(width));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / channels, c = plane % channels;
      for (int64_t p = 0; p < cells; ++p) {
        small[p] = book[code[b * cells + p] * channels + c];
      }
      if (upsample) {
        for (int64_t y = 0; y < side; ++y) {
          const float* src = small.data() + y * side;
          for (int64_t x = 0; x < width; ++x) {
            const int64_t* t = &taps_x[4 * x];
            wide_rows[y * width + x] =
                bicubic_sum(src[t[0]], src[t[1]], src[t[2]], src[t[3]], &weights_x[4 * x]);
          }
        }
      }
      float* out_plane = out + b * ts[0] + c * ts[1];
      float* rest_plane = residual != nullptr ? residual + b * rs[0] + c * rs[1] : nullptr;
      for (int64_t y = 0; y < height; ++y) {
        const float* values = small.data() + y * side;  // no upsample: height == side
        if (upsample) {
          const int64_t* t = &taps_y[4 * y];
          kernel.bicubic_rows(&wide_rows[t[0] * width], &wide_rows[t[1] * width],
                              &wide_rows[t[2] * width], &wide_rows[t[3] * width],
                              &weights_y[4 * y], width, line.data());
          values = line.data();
        }
        float* out_row = out_plane + y * ts[2];
        if (rest_plane == nullptr) {
          for (int64_t x = 0; x < width; ++x) {
            out_row[x * ts[3]] = values[x];
          }
        } else {
          float* rest_row = rest_plane + y * rs[2];
          for (int64_t x = 0; x < width; ++x) {
            out_row[x * ts[3]] += values[x];
            rest_row[x * rs[3]] -= values[x];
          }
        }
      }
    }
  });
}

}  // namespace sar_fast
