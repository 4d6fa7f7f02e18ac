// sar_fast::sample_survivors on the CPU: classifier-free-guidance mixing, top-k, top-p and
// an inverse-CDF draw, fused per row so the vocabulary is read once and only the k
// candidates are sorted. The distribution and the tie rules are those of
// sar_fast.sampling.sample_survivors (the PyTorch path, which CUDA tensors use):
//   candidates  the top_k largest mixed logits (all V when top_k is 0 or >= V), most
//               likely first; among equal logits the lower token id first;
//   probs       softmax over the candidates (fp32);
//   nucleus     (0 < top_p < 1) keep candidate i when its probability plus that of every
//               less likely candidate exceeds 1 - top_p; the first is always kept;
//   draw        the first kept candidate whose cumulative probability (fp64) exceeds
//               u * the kept total, clamped to the last kept one.
// A row whose probabilities are not finite (NaN logits, or every logit -inf) returns its
// first candidate instead of reading past its end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace sar_fast {
namespace {

// Order keys: unsigned integers whose order is the logits' (larger = more likely), so the
// selection and the sort below are radix passes rather than comparison sorts: NaN ranks
// above +inf (as torch.topk ranks it) and -0.0 equals +0.0.
inline uint32_t order_key(float logit) {
  if (std::isnan(logit)) return 0xFFFFFFFFu;
  uint32_t bits = 0;
  if (logit != 0.0f) std::memcpy(&bits, &logit, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct Workspace {
  explicit Workspace(int64_t vocab)
      : mixed(vocab), key(vocab), pool(vocab), next_pool(vocab), token(vocab), token_tmp(vocab),
        sort_key(vocab), sort_key_tmp(vocab), prob(vocab) {}
  std::vector<float> mixed;
  std::vector<uint32_t> key;
  std::vector<int32_t> pool, next_pool;      // radix select: tokens still tied on the key prefix
  std::vector<int32_t> token, token_tmp;     // the candidates, most likely first once sorted
  std::vector<uint32_t> sort_key, sort_key_tmp;
  std::vector<float> prob;
  uint32_t hist[2048];
};

// The `count` largest keys' tokens into ws.token[0, count) (ties at the k-th: the lowest
// ids), by an MSD radix select over 11 + 11 + 10 key bits. Tokens of equal key land in
// ascending id order, which the stable sort that follows keeps.
void select_top(Workspace& ws, int64_t vocab, int64_t count) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr int kBits[3] = {11, 11, 10};
  const uint32_t* key = ws.key.data();
  int64_t chosen = 0, need = count, pooled = vocab;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = (1u << kBits[level]) - 1u;
    const int bins = 1 << kBits[level];
    std::fill(ws.hist, ws.hist + bins, 0u);
    // level 0 reads the vocabulary in order; later levels the tokens tied so far
    auto at = [&](int64_t i) -> int32_t { return level == 0 ? static_cast<int32_t>(i) : ws.pool[i]; };
    for (int64_t i = 0; i < pooled; ++i) ++ws.hist[(key[at(i)] >> shift) & mask];
    int boundary = bins - 1;
    int64_t above = 0;
    while (above + ws.hist[boundary] < need) above += ws.hist[boundary--];
    int64_t tied = 0;
    for (int64_t i = 0; i < pooled; ++i) {
      const int32_t t = at(i);
      const uint32_t bin = (key[t] >> shift) & mask;
      if (bin > static_cast<uint32_t>(boundary)) {
        ws.token[chosen++] = t;
      } else if (bin == static_cast<uint32_t>(boundary)) {
        ws.next_pool[tied++] = t;
      }
    }
    std::swap(ws.pool, ws.next_pool);
    pooled = tied;
    need -= above;
    if (need == pooled) break;
  }
  // what is left shares the whole key (or is wanted entirely): the lowest ids first
  for (int64_t i = 0; i < need; ++i) ws.token[chosen++] = ws.pool[i];
}

// Stable LSD radix sort of ws.token[0, count) by descending key, 4 passes of 8 bits
// (passes where every key has the same digit are skipped).
void sort_descending(Workspace& ws, int64_t count) {
  uint32_t* k = ws.sort_key.data();
  uint32_t* k_tmp = ws.sort_key_tmp.data();
  int32_t* t = ws.token.data();
  int32_t* t_tmp = ws.token_tmp.data();
  for (int64_t i = 0; i < count; ++i) k[i] = ~ws.key[t[i]];  // ascending ~key = descending key
  for (int shift = 0; shift < 32; shift += 8) {
    uint32_t hist[256] = {0};
    for (int64_t i = 0; i < count; ++i) ++hist[(k[i] >> shift) & 0xFFu];
    if (hist[(k[0] >> shift) & 0xFFu] == static_cast<uint32_t>(count)) continue;
    uint32_t start = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t n = hist[d];
      hist[d] = start;
      start += n;
    }
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t dst = hist[(k[i] >> shift) & 0xFFu]++;
      k_tmp[dst] = k[i];
      t_tmp[dst] = t[i];
    }
    std::swap(k, k_tmp);
    std::swap(t, t_tmp);
  }
  if (t != ws.token.data()) std::copy(t, t + count, ws.token.data());
}

template <typename scalar_t>
void sample_rows(const scalar_t* logits, const scalar_t* uncond, double guidance, int64_t rows,
                 int64_t vocab, int64_t top_k, double top_p, const double* uniforms,
                 int64_t* out) {
  const bool by_k = top_k > 0 && top_k < vocab;
  const bool nucleus = top_p > 0.0 && top_p < 1.0;
  const bool sorted = by_k || nucleus;
  const int64_t count = by_k ? top_k : vocab;
  // the threshold the PyTorch path compares fp32 tail masses with
  const float tail_limit = static_cast<float>(1.0 - top_p);
  // mixed = torch.lerp(uncond, logits, weight = 1 + guidance), with lerp's two formulas
  const float weight = static_cast<float>(1.0 + guidance);
  const bool from_end = std::abs(weight) >= 0.5f;

  // grain: a row is O(V) work, tens of microseconds; 8 rows amortise the task overhead
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    Workspace ws(vocab);
    float* mixed = ws.mixed.data();
    float* prob = ws.prob.data();
    const int32_t* token = ws.token.data();
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = logits + r * vocab;
      if (uncond != nullptr) {
        const scalar_t* base = uncond + r * vocab;
        for (int64_t v = 0; v < vocab; ++v) {
          const float c = static_cast<float>(row[v]), b = static_cast<float>(base[v]);
          const float diff = c - b;
          mixed[v] = from_end ? c - diff * (1.0f - weight) : b + weight * diff;
        }
      } else {
        for (int64_t v = 0; v < vocab; ++v) mixed[v] = static_cast<float>(row[v]);
      }

      float top = -std::numeric_limits<float>::infinity();
      if (sorted) {
        for (int64_t v = 0; v < vocab; ++v) ws.key[v] = order_key(mixed[v]);
        if (by_k) {
          select_top(ws, vocab, count);
        } else {
          std::iota(ws.token.begin(), ws.token.begin() + count, 0);
        }
        sort_descending(ws, count);
        top = mixed[token[0]];
      } else {
        std::iota(ws.token.begin(), ws.token.begin() + count, 0);
        for (int64_t v = 0; v < vocab; ++v) top = std::max(top, mixed[v]);
      }

      float total = 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        prob[i] = std::exp(mixed[token[i]] - top);
        total += prob[i];
      }
      if (!std::isfinite(total) || !(total > 0.0f)) {
        out[r] = token[0];
        continue;
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < count; ++i) prob[i] *= inv;

      int64_t kept = count;
      if (nucleus) {
        // tail mass from the least likely candidate up; the kept ones are a prefix
        double tail = 0.0;
        kept = 1;
        for (int64_t i = count - 1; i >= 1; --i) {
          tail += prob[i];
          if (static_cast<float>(tail) > tail_limit) {
            kept = i + 1;
            break;
          }
        }
      }
      double kept_total = 0.0;
      for (int64_t i = 0; i < kept; ++i) kept_total += prob[i];
      const double target = uniforms[r] * kept_total;
      double cdf = 0.0;
      int64_t pick = kept - 1;
      for (int64_t i = 0; i < kept; ++i) {
        cdf += prob[i];
        if (cdf > target) {
          pick = i;
          break;
        }
      }
      out[r] = token[pick];
    }
  });
}

at::Tensor sample_survivors_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& uncond,
                                double guidance, int64_t top_k, double top_p,
                                const at::Tensor& uniforms) {
  constexpr const char* op = "sample_survivors";
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [rows, vocab], got shape ",
                    logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), op, ": logits must be on the CPU, got ",
                    logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= std::numeric_limits<int32_t>::max(), op,
                    ": vocab size must lie in [1, 2^31 - 1], got ", vocab);
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p >= 0.0 && top_p <= 1.0, op, ": top_p must be in [0, 1], got ", top_p);
  TORCH_CHECK_VALUE(std::isfinite(guidance), op, ": guidance must be finite, got ", guidance);
  if (uncond.has_value()) {
    TORCH_CHECK_VALUE(uncond->sizes() == logits.sizes(), op, ": uncond must have the logits' shape ",
                      logits.sizes(), ", got ", uncond->sizes());
    TORCH_CHECK_TYPE(uncond->scalar_type() == dtype, op, ": uncond must have the logits' dtype ",
                     dtype, ", got ", uncond->scalar_type());
    TORCH_CHECK_VALUE(uncond->device().is_cpu(), op, ": uncond must be on the CPU, got ",
                      uncond->device());
  }
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == rows, op,
                    ": uniforms must be 1-D [rows] = [", rows, "], got shape ", uniforms.sizes());
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kDouble, op, ": uniforms must be float64, got ",
                   uniforms.scalar_type());
  TORCH_CHECK_VALUE(uniforms.device().is_cpu(), op, ": uniforms must be on the CPU, got ",
                    uniforms.device());

  const at::Tensor x = logits.contiguous();
  const at::Tensor base = uncond.has_value() ? uncond->contiguous() : at::Tensor();
  const at::Tensor u = uniforms.contiguous();
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sample_survivors", [&] {
    sample_rows<scalar_t>(x.data_ptr<scalar_t>(),
                          base.defined() ? base.data_ptr<scalar_t>() : nullptr, guidance, rows,
                          vocab, top_k, top_p, u.data_ptr<double>(), out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace
}  // namespace sar_fast

TORCH_LIBRARY_FRAGMENT(sar_fast, m) {
  m.def(
      "sample_survivors(Tensor logits, Tensor? uncond, float guidance, int top_k, float top_p, "
      "Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(sar_fast, CPU, m) {
  m.impl("sample_survivors", &sar_fast::sample_survivors_cpu);
}
