// Fused AdamW step on the kept entries of N:M sparse parameters (CPU).
//
// One call updates a list of parameters in one pass over their kept entries, parallel over
// blocks with at::parallel_for: a chunk of blocks is gathered into per-thread scratch arrays
// (L1-resident), updated with at::vec::Vectorized together with the compact moments, and the
// weights are scattered back. Loaded by bame_optim/kernels/kept_sgd_cpu.py; the math is
// documented in bame_optim/kernels/kept_adamw_cpu.py.
//
// Rounding: each element goes through the operations of torch.optim.adamw.adamw's
// single-tensor path in its order, each rounded to the parameter's dtype as ATen's CPU kernels
// round them (float32/float64 only):
//   param.mul_(1 - lr * wd)         w * s
//   exp_avg.lerp_(grad, 1 - beta1)  fmadd(c, g - m, base): c = w, base = m if |w| < 0.5,
//                                   else c = w - 1, base = g (ATen's lerp_vec)
//   exp_avg_sq.mul_(beta2)          v * beta2
//   .addcmul_(grad, grad, 1 - beta2) v + (s * g) * g, the last multiply-add fused or not
//   denom = sqrt(v) / bc2_sqrt + eps
//   param.addcdiv_(m, denom, -step_size)  w + (-step_size * m) / denom
// Whether a multiply-add is fused follows ATen on this machine (flags found by probes).
// The file must be compiled with -ffp-contract=off so that unfused forms stay unfused.

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include "kept_common.h"
#include "kept_simd.h"
#include "kept_streams.h"

namespace {

using bame::Blocks;
using bame::madd;

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kNativeFma = true;
#else
constexpr bool kNativeFma = false;
#endif

template <bool FMA, typename T>
inline at::vec::Vectorized<T> vmadd(const at::vec::Vectorized<T>& a,
                                    const at::vec::Vectorized<T>& b,
                                    const at::vec::Vectorized<T>& c) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (!FMA) {
    const Vec product = a * b;
    return product + c;
  } else if constexpr (kNativeFma) {
    return at::vec::fmadd(a, b, c);
  } else {  // the generic Vectorized: fused lane by lane
    T x[Vec::size()], y[Vec::size()], z[Vec::size()];
    a.store(x);
    b.store(y);
    c.store(z);
    for (int64_t i = 0; i < Vec::size(); ++i) x[i] = std::fma(x[i], y[i], z[i]);
    return Vec::loadu(x);
  }
}

template <typename T>
inline T nan_max(T a, T b) {  // torch.maximum: NaN propagates
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

struct Hyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize;
};

// Per-parameter scalars, each cast to T as ATen casts a Python scalar.
template <typename T>
struct Scalars {
  T decay;       // 1 - lr * weight_decay
  T lerp_coeff;  // lerp weight (small) or weight - 1
  bool lerp_small;
  T beta2;
  T sq_weight;   // 1 - beta2
  T bc2_sqrt;
  T eps;
  T neg_step;    // -lr / (1 - beta1^step)
  bool has_weight_decay, amsgrad, maximize;

  Scalars(const Hyper& h, double step_size, double bc2_sqrt_)
      : decay(static_cast<T>(1.0 - h.lr * h.weight_decay)),
        beta2(static_cast<T>(h.beta2)),
        sq_weight(static_cast<T>(1.0 - h.beta2)),
        bc2_sqrt(static_cast<T>(bc2_sqrt_)),
        eps(static_cast<T>(h.eps)),
        neg_step(static_cast<T>(-step_size)),
        has_weight_decay(h.weight_decay != 0),
        amsgrad(h.amsgrad),
        maximize(h.maximize) {
    const T weight = static_cast<T>(1.0 - h.beta1);
    lerp_small = std::abs(weight) < T(0.5);
    lerp_coeff = lerp_small ? weight : weight - T(1);
  }
};

// The update of len entries: w, g (gathered scratch, w overwritten), m, v, vmax (compact
// state, vmax nullptr without amsgrad).
// Inlined into every stream (a call per group of 8, and its scalars broadcast again, cost a
// fifth of an S = 1 step once the streams of kept_tiles.h had grown run_sparse).
template <typename T, bool FMA, bool FMA_ADDCMUL>
BAME_ALWAYS_INLINE void update(const Scalars<T>& c, T* __restrict w, const T* __restrict g,
                               T* __restrict m, T* __restrict v, T* __restrict vmax,
                               int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec decay(c.decay), coeff(c.lerp_coeff), beta2(c.beta2), sq_weight(c.sq_weight),
      bc2(c.bc2_sqrt), eps(c.eps), neg_step(c.neg_step);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    Vec gv = Vec::loadu(g + i);
    if (c.maximize) gv = gv.neg();
    Vec wv = Vec::loadu(w + i);
    if (c.has_weight_decay) wv = wv * decay;
    Vec mv = Vec::loadu(m + i);
    mv = vmadd<FMA>(coeff, gv - mv, c.lerp_small ? mv : gv);
    Vec vv = Vec::loadu(v + i) * beta2;
    vv = vmadd<FMA_ADDCMUL>(sq_weight * gv, gv, vv);
    mv.store(m + i);
    vv.store(v + i);
    if (c.amsgrad) {
      vv = at::vec::maximum(Vec::loadu(vmax + i), vv);
      vv.store(vmax + i);
    }
    const Vec denom = vv.sqrt() / bc2 + eps;
    wv = wv + (neg_step * mv) / denom;
    wv.store(w + i);
  }
  for (; i < len; ++i) {
    T gs = c.maximize ? -g[i] : g[i];
    T ws = c.has_weight_decay ? w[i] * c.decay : w[i];
    const T ms = madd<FMA, T>(c.lerp_coeff, gs - m[i], c.lerp_small ? m[i] : gs);
    T vs = v[i] * c.beta2;
    vs = madd<FMA_ADDCMUL, T>(c.sq_weight * gs, gs, vs);
    m[i] = ms;
    v[i] = vs;
    if (c.amsgrad) vs = vmax[i] = nan_max(vmax[i], vs);
    const T denom = std::sqrt(vs) / c.bc2_sqrt + c.eps;
    const T step = c.neg_step * ms;
    w[i] = ws + step / denom;
  }
}



struct Item : Blocks {
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;
  double step_size = 0;
  double bc2_sqrt = 1;
  void (*fn)(const Item&, int64_t, int64_t, const Hyper&) = nullptr;
  void* gather = nullptr;   // bame::MoveFn<T>
  void* scatter = nullptr;
};

template <typename T, bool FMA, bool FMA_ADDCMUL>
void run_sparse(const Item& it, int64_t k0, int64_t k1, const Hyper& hyper) {
  const Scalars<T> scalars(hyper, it.step_size, it.bc2_sqrt);
  T* m = static_cast<T*>(it.exp_avg);
  T* v = static_cast<T*>(it.exp_avg_sq);
  T* vmax = static_cast<T*>(it.max_exp_avg_sq);
  // Inlined into the streams: a group's update is one dependency chain of about 50 cycles
  // (square root, two divisions), which the out-of-order core overlaps with the next group's
  // gather only inside one loop body. GCC called it instead: 1.29x the time on DeiT-small's
  // and GPT-2's weights at 2:4 at one thread, 1.07-1.22x at two (benchmarks.kernel_ab, Zen 4);
  // 1:16, memory-bound, is unchanged.
  auto step = [&](T* w, T* g, int64_t e, int64_t len) BAME_INLINED_LAMBDA {
    update<T, FMA, FMA_ADDCMUL>(scalars, w, g, m + e, v + e, vmax ? vmax + e : nullptr, len);
  };
  // The blocks no stream takes go in chunks.
  auto chunks = [&](int64_t b0, int64_t b1) {
    if (b0 >= b1) return;
    const auto gather_fn = reinterpret_cast<bame::MoveFn<T>>(it.gather);
    const auto scatter_fn = reinterpret_cast<bame::MoveFn<T>>(it.scatter);
    const int64_t n = it.count;
    const int64_t blocks = std::min(b1 - b0, bame::chunk_blocks(it, sizeof(T)));
    std::vector<T> w(blocks * n), g(blocks * n);
    for (int64_t c0 = b0, c1; c0 < b1; c0 = c1) {
      c1 = bame::chunk_end(it, c0, b1, blocks);
      const int64_t len = (c1 - c0) * n;
      bame::prefetch_range(m + c0 * n, len * sizeof(T));
      bame::prefetch_range(v + c0 * n, len * sizeof(T));
      if (vmax) bame::prefetch_range(vmax + c0 * n, len * sizeof(T));
      gather_fn(it, c0, c1, w.data(), g.data());
      update<T, FMA, FMA_ADDCMUL>(scalars, w.data(), g.data(), m + c0 * n, v + c0 * n,
                                  vmax ? vmax + c0 * n : nullptr, len);
      scatter_fn(it, c0, c1, w.data(), nullptr);
    }
  };
  auto ahead = [&](int64_t e) {
    __builtin_prefetch(m + e, 1);
    __builtin_prefetch(v + e, 1);
    if (vmax) __builtin_prefetch(vmax + e, 1);
  };
  bame::run_streams<T>(it, k0, k1, step, ahead, chunks);
}

template <typename T>
bool pick(Item& it, at::ScalarType code_dtype, bool fma, bool fma_addcmul) {
  it.gather = reinterpret_cast<void*>(bame::pick_move<T, false>(code_dtype, it.table != nullptr, it.count, it.spatial > 1));
  it.scatter = reinterpret_cast<void*>(bame::pick_move<T, true>(code_dtype, it.table != nullptr, it.count, it.spatial > 1));
  it.fn = fma ? (fma_addcmul ? &run_sparse<T, true, true> : &run_sparse<T, true, false>)
              : (fma_addcmul ? &run_sparse<T, false, true> : &run_sparse<T, false, false>);
  return it.gather != nullptr;
}

void check_state(const std::optional<at::Tensor>& t, const char* what, int64_t i,
                 const at::Tensor& p, int64_t rows, int64_t count) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), what, "[", i, "] is required");
  bame::check_plain(*t, what, i);
  TORCH_CHECK_VALUE(t->scalar_type() == p.scalar_type() && t->dim() == 2 &&
                        t->size(0) == rows && t->size(1) == count,
                    what, "[", i, "] must be ", p.scalar_type(), " of shape [", rows, ", ",
                    count, "], got ", t->scalar_type(), " ", t->sizes());
}

}  // namespace

// Declared in module.cpp, which binds it. step_sizes[i] = lr / (1 - beta1^step_i) and
// bias_correction2_sqrts[i] = sqrt(1 - beta2^step_i), with the step already advanced (Python
// computes them as torch does); max_exp_avg_sqs is used with amsgrad only.
void fused_kept_adamw(const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<std::optional<at::Tensor>>& exp_avgs,
                      const std::vector<std::optional<at::Tensor>>& exp_avg_sqs,
                      const std::vector<std::optional<at::Tensor>>& max_exp_avg_sqs,
                      const std::vector<std::optional<at::Tensor>>& kept,
                      const std::vector<std::optional<at::Tensor>>& tables,
                      const std::vector<int64_t>& counts,
                      const std::vector<double>& step_sizes,
                      const std::vector<double>& bias_correction2_sqrts, int64_t m,
                      double lr, double beta1, double beta2, double weight_decay, double eps,
                      bool amsgrad, bool maximize, bool fma, bool fma_addcmul, bool avx512) {
  const size_t size = params.size();
  TORCH_CHECK_VALUE(grads.size() == size && exp_avgs.size() == size &&
                        exp_avg_sqs.size() == size && kept.size() == size &&
                        tables.size() == size && counts.size() == size &&
                        step_sizes.size() == size && bias_correction2_sqrts.size() == size &&
                        (!amsgrad || max_exp_avg_sqs.size() == size),
                    "params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (amsgrad), "
                    "state_steps, kept and counts must have equal lengths");
  TORCH_CHECK_VALUE(m >= 1, "Invalid m value: ", m);
  const Hyper hyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize};
  const int64_t n_params = static_cast<int64_t>(size);
  std::vector<Item> items(n_params);
  std::vector<int64_t> check_index, code_limits, starts{0};
  bame::Tables tables_of_call;  // kept_simd.h's lane and offset tables
  const bool wide = avx512 && bame::cpu_has_avx512();
  for (int64_t i = 0; i < n_params; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    bame::check_plain(p, "params", i, true);
    bame::check_plain(g, "grads", i, true);
    TORCH_CHECK_VALUE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                      "params[", i, "] has unsupported dtype ", p.scalar_type(),
                      " (float32, float64)");
    TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(), "grads[", i,
                      "] must match params[", i, "] in dtype and shape");
    TORCH_CHECK_VALUE(kept[i].has_value() && kept[i]->defined(), "kept[", i,
                      "] is required (dense parameters go through torch's AdamW)");
    Item& it = items[i];
    bame::setup_blocks(it, p, g, *kept[i], tables[i], counts[i], m, i, code_limits);
    bame::attach_tables(it, tables_of_call);
    it.avx512 = wide;
    check_index.push_back(i);
    check_state(exp_avgs[i], "exp_avgs", i, p, it.blocks, it.count);
    check_state(exp_avg_sqs[i], "exp_avg_sqs", i, p, it.blocks, it.count);
    it.exp_avg = exp_avgs[i]->data_ptr();
    it.exp_avg_sq = exp_avg_sqs[i]->data_ptr();
    if (amsgrad) {
      check_state(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, it.blocks, it.count);
      it.max_exp_avg_sq = max_exp_avg_sqs[i]->data_ptr();
    }
    it.step_size = step_sizes[i];
    it.bc2_sqrt = bias_correction2_sqrts[i];
    const bool ok = p.scalar_type() == at::kFloat
                        ? pick<float>(it, kept[i]->scalar_type(), fma, fma_addcmul)
                        : pick<double>(it, kept[i]->scalar_type(), fma, fma_addcmul);
    TORCH_CHECK(ok, "no kernel for this dtype combination");
    starts.push_back(starts.back() + (it.count == 0 ? 0 : it.blocks));
  }
  bame::check_codes(kept, check_index, code_limits);

  bame::for_each_unit(starts, 2048, [&](int64_t i, int64_t begin, int64_t end) {
    const Item& it = items[i];
    it.fn(it, begin, end, hyper);
  });

  for (int64_t i = 0; i < n_params; ++i) {
    bame::bump_version(params[i]);
    bame::bump_version(*exp_avgs[i]);
    bame::bump_version(*exp_avg_sqs[i]);
    if (amsgrad) bame::bump_version(*max_exp_avg_sqs[i]);
  }
}

// addcmul(a, b, b, value) exactly as the kernel computes it (v + (s * g) * g), for the probe.
at::Tensor probe_addcmul(const at::Tensor& a, const at::Tensor& b, double value, bool fma) {
  TORCH_CHECK_VALUE(a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                        a.scalar_type() == b.scalar_type() && a.device().is_cpu() &&
                        (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
                    "probe_addcmul: contiguous float32/float64 CPU tensors of one shape");
  at::Tensor out = a.clone();
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T s = static_cast<T>(value);
    const T* pb = b.data_ptr<T>();
    T* po = out.data_ptr<T>();
    for (int64_t i = 0; i < a.numel(); ++i) {
      po[i] = fma ? madd<true, T>(s * pb[i], pb[i], po[i]) : madd<false, T>(s * pb[i], pb[i], po[i]);
    }
  };
  if (a.scalar_type() == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return out;
}
