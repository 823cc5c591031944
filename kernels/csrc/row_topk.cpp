// Row-wise top-k indices on CPU: memlayers_cpu::row_topk(scores (R, n), k) -> (R, k) int64.
//
// The half-key search of the PyTorch path (kernels/reference.py) takes the top k of
// n_keys scores for every (token, head) row. torch's CPU topk spends ~2 us of fixed work
// per row plus several ns per element (a partial sort of a copied row); at 16.7M slots it
// was the largest part of the step that grows with the pool. Here a row costs one
// vectorised pass plus the sort of ~k candidates:
//   1. the maxima of 2k blocks of the row;
//   2. t = the k-th largest of those maxima: a lower bound of the k-th largest score,
//      since k distinct blocks each hold a score >= t;
//   3. the scores >= t of the blocks whose maximum is >= t (every score of the top k,
//      ties included, is among them: ~1.4k of them for random scores) are sorted.
// Order: descending, the lower index first among ties; NaN ranks above every number, as
// in torch.topk (a row holding a NaN takes a plain sort). The values are the caller's
// to gather (scores.gather(-1, indices) equals torch.topk's values bit for bit), which
// keeps autograd in Python.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
// One clone per instruction set, picked when the library loads: the block maxima
// vectorise 8-wide with AVX2, and the library still runs on any x86-64.
#define MEMLAYERS_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEMLAYERS_VECTOR_CLONES
#endif

namespace {

// Sort keys in the top-k order: a smaller key ranks first. The float's bits are mapped to
// an unsigned integer that grows with the value (negative numbers flip all bits, the
// others the sign bit; NaN above +inf), then inverted; the index breaks ties.
inline uint32_t rank_key(float v) {
  if (std::isnan(v)) return 0;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if (v == 0) bits = 0;  // -0.0 ties with +0.0, as their comparison says
  return ~((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u));
}

inline uint64_t rank_key(double v) {
  if (std::isnan(v)) return 0;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if (v == 0) bits = 0;
  constexpr uint64_t sign = uint64_t{1} << 63;
  return ~((bits & sign) ? ~bits : (bits | sign));
}


// Maxima of the row's blocks of `width` scores (NaN ignored); returns whether the row
// holds a NaN. Generic form: any floating dtype, one score at a time.
template <typename scalar_t>
bool block_maxima(const scalar_t* x, int64_t n, int64_t width, float* maxima) {
  bool any_nan = false;
  for (int64_t begin = 0, b = 0; begin < n; begin += width, ++b) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = begin; j < std::min(n, begin + width); ++j) {
      const float v = static_cast<float>(x[j]);
      m = v > m ? v : m;
      any_nan |= v != v;
    }
    maxima[b] = m;
  }
  return any_nan;
}

// fp32, the dtype of training: 8 lanes at a time (GCC/Clang vector extensions; compilers
// leave the scalar loop above unvectorised because of its NaN test).
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

MEMLAYERS_VECTOR_CLONES bool block_maxima_f32(const float* x, int64_t n, int64_t width, float* maxima) {
  const float lowest = -std::numeric_limits<float>::infinity();
  Int8 nan_lanes = {};
  bool any_nan = false;
  for (int64_t begin = 0, b = 0; begin < n; begin += width, ++b) {
    const int64_t end = std::min(n, begin + width);
    Float8 lanes = {lowest, lowest, lowest, lowest, lowest, lowest, lowest, lowest};
    int64_t j = begin;
    for (; j + 8 <= end; j += 8) {
      Float8 v;
      std::memcpy(&v, x + j, sizeof v);
      lanes = v > lanes ? v : lanes;
      nan_lanes |= v != v;
    }
    float m = lowest;
    for (int l = 0; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
    for (; j < end; ++j) {
      m = x[j] > m ? x[j] : m;
      any_nan |= x[j] != x[j];
    }
    maxima[b] = m;
  }
  for (int l = 0; l < 8; ++l) any_nan |= nan_lanes[l] != 0;
  return any_nan;
}

// Appends (rank key, index) of the scores >= threshold in the blocks whose maximum is
// >= threshold; returns how many. Generic form first; fp32 below skips groups of 8
// without one with a vector comparison.
template <typename scalar_t, typename Key>
int64_t collect(const scalar_t* x, int64_t n, int64_t width, const float* maxima, float threshold,
                std::pair<Key, int64_t>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t count = 0;
  for (int64_t begin = 0, b = 0; begin < n; begin += width, ++b) {
    if (maxima[b] < threshold) continue;
    for (int64_t j = begin; j < std::min(n, begin + width); ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      if (static_cast<float>(v) >= threshold) out[count++] = {rank_key(v), j};
    }
  }
  return count;
}

MEMLAYERS_VECTOR_CLONES int64_t collect_f32(const float* x, int64_t n, int64_t width, const float* maxima,
                                            float threshold, std::pair<uint32_t, int64_t>* out) {
  const Float8 t = {threshold, threshold, threshold, threshold, threshold, threshold, threshold, threshold};
  int64_t count = 0;
  for (int64_t begin = 0, b = 0; begin < n; begin += width, ++b) {
    if (maxima[b] < threshold) continue;
    const int64_t end = std::min(n, begin + width);
    int64_t j = begin;
    for (; j + 8 <= end; j += 8) {
      Float8 v;
      std::memcpy(&v, x + j, sizeof v);
      const Int8 hit = v >= t;
      uint64_t words[4];
      std::memcpy(words, &hit, sizeof words);
      if (!(words[0] | words[1] | words[2] | words[3])) continue;
      for (int64_t l = j; l < j + 8; ++l)
        if (x[l] >= threshold) out[count++] = {rank_key(x[l]), l};
    }
    for (; j < end; ++j)
      if (x[j] >= threshold) out[count++] = {rank_key(x[j]), j};
  }
  return count;
}

template <>
int64_t collect<float, uint32_t>(const float* x, int64_t n, int64_t width, const float* maxima, float threshold,
                                 std::pair<uint32_t, int64_t>* out) {
  return collect_f32(x, n, width, maxima, threshold, out);
}

template <>
bool block_maxima<float>(const float* x, int64_t n, int64_t width, float* maxima) {
  return block_maxima_f32(x, n, width, maxima);
}

template <typename acc_t>
struct Scratch {
  std::vector<float> maxima, kth;
  std::vector<std::pair<decltype(rank_key(acc_t{})), int64_t>> candidates;  // (rank key, index)
};

template <typename scalar_t, typename acc_t>
void topk_row(const scalar_t* x, int64_t n, int64_t k, int64_t width, Scratch<acc_t>& s, int64_t* out) {
  const int64_t blocks = (n + width - 1) / width;
  s.maxima.resize(blocks);
  s.candidates.resize(n);
  int64_t count = 0;
  if (block_maxima(x, n, width, s.maxima.data())) {
    for (int64_t j = 0; j < n; ++j) s.candidates[count++] = {rank_key(static_cast<acc_t>(x[j])), j};
  } else {
    float threshold = -std::numeric_limits<float>::infinity();
    if (blocks > k) {
      s.kth.assign(s.maxima.begin(), s.maxima.end());
      std::nth_element(s.kth.begin(), s.kth.begin() + (k - 1), s.kth.end(), std::greater<float>());
      threshold = s.kth[k - 1];
    }
    count = collect(x, n, width, s.maxima.data(), threshold, s.candidates.data());
  }
  const auto first = s.candidates.begin();
  if (count > k) std::nth_element(first, first + (k - 1), first + count);
  std::sort(first, first + k);
  for (int64_t j = 0; j < k; ++j) out[j] = s.candidates[j].second;
}

at::Tensor row_topk(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2, "row_topk: scores must be (rows, n), got ", scores.sizes());
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "row_topk: k=", k, " must lie in [1, n=", scores.size(1), "]");
  const at::Tensor x = scores.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, k}, x.options().dtype(at::kLong));
  // 2k blocks: for random scores ~1.4k of them then pass the threshold
  const int64_t width = std::max<int64_t>(1, n / (2 * k));
  // rows are independent: split over torch's intra-op threads (the demo's 2 cores), each
  // range with its own scratch, so the result does not depend on the thread count
  const int64_t grain = std::max<int64_t>(1, 65536 / n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "row_topk", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* base = x.const_data_ptr<scalar_t>();
    int64_t* out_base = out.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t r = begin; r < end; ++r) topk_row(base + r * n, n, k, width, scratch, out_base + r * k);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(memlayers_cpu, m) {
  m.def("row_topk(Tensor scores, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(memlayers_cpu, CPU, m) {
  m.impl("row_topk", &row_topk);
}
