// Row-wise lazy Adam on CPU, in place: memlayers_cpu::rowwise_adam_(...).
//
// The update of pretrain/parallel/sparse_adamw.py's "row" second moment for the U rows
// a step read (rows unique), one pass over them:
//     m_r = m_r + (1 - b1) (g_r - m_r)          (stored fp32 or bf16, rounded to nearest)
//     v_r = b2 v_r + (1 - b2) gsq_r             (gsq_r: mean of g_r^2 over the full row)
//     x_r = x_r - lr / (1 - b1^t) * m_r / (sqrt(v_r / (1 - b2^t)) + eps)
// In torch ops this is three gathers and three scatters of random rows (at 16.7M slots
// x v_dim 64 the rows are scattered over 4 GB and each row costs a DRAM round trip per
// move); here each row is read and written once, and the rows a few iterations ahead
// are prefetched so that their memory latencies overlap.
// Built with -ffp-contract=off: no fused multiply-add but the explicit ones, so every
// machine and instruction set computes the same bits.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

// Rows ahead: enough misses in flight to overlap DRAM latencies (16.7M slots x v_dim 64,
// 120K rows: 35 ms without prefetching, 23 ms with; distances 4-32 measure alike).
constexpr int64_t kPrefetchDistance = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + offset);
}

// The scalars come from Python as torch's own ops receive them (each a double rounded to
// fp32 once): weight = 1 - b1, one_minus_beta2 = 1 - b2, bias2 = 1 - b2^t,
// step_size = -lr / (1 - b1^t).
struct Hyper {
  float weight, beta2, one_minus_beta2, bias2, eps, step_size;
};

// The arithmetic of the torch ops it replaces (their vectorised CPU kernels): lerp_ =
// fma(weight, end - self, self); add_(alpha) = fma(other, alpha, self); addcdiv_ =
// self + (value * t1) / t2; so the moments come out bitwise the same. The square root is
// IEEE's, correctly rounded, where torch's vectorised one can be one ulp off: values may
// then differ in their last bits. std::fma is exactly rounded on every machine (one
// instruction with FMA, a library call without), so the bits do not depend on the CPU.
template <typename moment_t>
__attribute__((always_inline)) inline void update_rows(float* x, moment_t* m, float* v, const int64_t* rows,
                                                       const float* grad, const float* grad_sq, int64_t n_rows,
                                                       int64_t d, const Hyper& h) {
  for (int64_t i = 0; i < n_rows; ++i) {
    if (i + kPrefetchDistance < n_rows) {
      const int64_t ahead = rows[i + kPrefetchDistance];
      prefetch_row(x + ahead * d, d * int64_t(sizeof(float)));
      prefetch_row(m + ahead * d, d * int64_t(sizeof(moment_t)));
      __builtin_prefetch(v + ahead);
    }
    const int64_t r = rows[i];
    float* xr = x + r * d;
    moment_t* mr = m + r * d;
    const float* g = grad + i * d;
    const float vr = std::fma(grad_sq[i], h.one_minus_beta2, v[r] * h.beta2);
    v[r] = vr;
    const float denom = std::sqrt(vr / h.bias2) + h.eps;
    for (int64_t j = 0; j < d; ++j) {
      const float old = static_cast<float>(mr[j]);
      const float updated = std::fma(h.weight, g[j] - old, old);
      mr[j] = static_cast<moment_t>(updated);  // bf16: rounded to nearest even
      xr[j] = xr[j] + (h.step_size * updated) / denom;  // the full-precision momentum moves the value
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MEMLAYERS_FMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEMLAYERS_FMA_CLONES
#endif

MEMLAYERS_FMA_CLONES void update_rows_f32(float* x, float* m, float* v, const int64_t* rows, const float* grad,
                                          const float* grad_sq, int64_t n_rows, int64_t d, const Hyper& h) {
  update_rows(x, m, v, rows, grad, grad_sq, n_rows, d, h);
}

MEMLAYERS_FMA_CLONES void update_rows_bf16(float* x, c10::BFloat16* m, float* v, const int64_t* rows,
                                           const float* grad, const float* grad_sq, int64_t n_rows, int64_t d,
                                           const Hyper& h) {
  update_rows(x, m, v, rows, grad, grad_sq, n_rows, d, h);
}

void rowwise_adam_(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq_row, const at::Tensor& rows,
                   const at::Tensor& grad, const at::Tensor& grad_sq, double weight, double beta2,
                   double one_minus_beta2, double bias2, double eps, double step_size) {
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous() && param.scalar_type() == at::kFloat,
              "rowwise_adam_: param must be a contiguous fp32 (N, d) table");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg.is_contiguous() &&
                  (exp_avg.scalar_type() == at::kFloat || exp_avg.scalar_type() == at::kBFloat16),
              "rowwise_adam_: exp_avg must be a contiguous fp32 or bf16 tensor shaped like param");
  TORCH_CHECK(exp_avg_sq_row.dim() == 1 && exp_avg_sq_row.size(0) == param.size(0) &&
                  exp_avg_sq_row.is_contiguous() && exp_avg_sq_row.scalar_type() == at::kFloat,
              "rowwise_adam_: exp_avg_sq_row must be a contiguous fp32 (N,) tensor");
  const int64_t n_rows = rows.numel(), d = param.size(1);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rowwise_adam_: rows must be int64 (U,)");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 2 && grad.size(0) == n_rows && grad.size(1) == d,
              "rowwise_adam_: grad must be fp32 (U, d)");
  TORCH_CHECK(grad_sq.scalar_type() == at::kFloat && grad_sq.numel() == n_rows,
              "rowwise_adam_: grad_sq must be fp32 (U,)");
  const at::Tensor rows_c = rows.contiguous(), grad_c = grad.contiguous(), grad_sq_c = grad_sq.contiguous();
  if (n_rows > 0) {
    const int64_t lo = rows_c.min().item<int64_t>(), hi = rows_c.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < param.size(0), "rowwise_adam_: rows must lie in [0, ", param.size(0), ")");
  }
  const Hyper h{float(weight), float(beta2), float(one_minus_beta2), float(bias2), float(eps), float(step_size)};
  const int64_t* r = rows_c.const_data_ptr<int64_t>();
  const float *g = grad_c.const_data_ptr<float>(), *gsq = grad_sq_c.const_data_ptr<float>();
  float *x = param.mutable_data_ptr<float>(), *v = exp_avg_sq_row.mutable_data_ptr<float>();
  if (exp_avg.scalar_type() == at::kFloat)
    update_rows_f32(x, exp_avg.mutable_data_ptr<float>(), v, r, g, gsq, n_rows, d, h);
  else
    update_rows_bf16(x, exp_avg.mutable_data_ptr<c10::BFloat16>(), v, r, g, gsq, n_rows, d, h);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def(
      "rowwise_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq_row, Tensor rows, Tensor grad, "
      "Tensor grad_sq, float weight, float beta2, float one_minus_beta2, float bias2, float eps, float step_size) -> ()");
}

TORCH_LIBRARY_IMPL(memlayers_cpu, CPU, m) {
  m.impl("rowwise_adam_", &rowwise_adam_);
}
