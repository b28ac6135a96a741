// OBF's frozen blocks (Eq. 10) of BAME's evolve-phase mask update, on the CPU:
//
//   obf_freeze:     Top(O, floor(beta K)) & Top(W, floor(alpha K)) & (O > 0), the membership
//                   core.evolution.top_fraction gives (a sampled bracket, then an exact
//                   selection inside it);
//   top_fraction:   that membership alone.
//
// Loaded by bame_optim/kernels/evolve_cpu.py, which documents the equality contract (bit for
// bit the eager core functions).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "evolve_common.h"

namespace {

using namespace bame_evolve;

// core.evolution.top_fraction's membership: the count-th largest key of a [size] array and
// how many of the keys equal to it are in (the lowest indices first). As its _kth_largest: a
// sorted sample of every kSampleStride-th key brackets the answer, one pass (which also stores
// the keys) counts the keys above the bracket and collects those inside it (a few percent),
// and an exact selection among those finds it; where the bracket misses, among all keys.
constexpr int64_t kSampleStride = 64;
constexpr int64_t kParallelSelection = int64_t{1} << 17;  // blocks: below, one thread selects

template <typename S>
struct Threshold {
  using U = decltype(mono(S(0)));
  int64_t size = 0, count = 0;
  std::vector<U> keys;  // mono of every value
  U key = 0;            // the count-th largest key
  int64_t ties = 0;     // keys equal to `key` that are in
  bool all_ties = false;  // every key equal to `key` is in
};

// The need-th largest of pool (which holds every key equal to it).
template <typename S>
void select_key(std::vector<typename Threshold<S>::U>& pool, int64_t need, Threshold<S>& t) {
  using U = typename Threshold<S>::U;
  std::nth_element(pool.begin(), pool.begin() + (need - 1), pool.end(), std::greater<U>());
  t.key = pool[need - 1];
  int64_t above = 0, equal = 0;
  for (U k : pool) {
    above += k > t.key;
    equal += k == t.key;
  }
  t.ties = need - above;
  t.all_ties = t.ties == equal;
}

template <typename S>
Threshold<S> threshold(const S* values, int64_t size, double fraction) {
  using U = typename Threshold<S>::U;
  Threshold<S> t;
  t.size = size;
  t.count = static_cast<int64_t>(fraction * static_cast<double>(size));
  if (t.count <= 0 || t.count >= size) {  // nothing or everything in: the keys for cut_of only
    t.keys.resize(size);
    for (int64_t i = 0; i < size; ++i) t.keys[i] = mono(values[i]);
    return t;
  }
  std::vector<U> sample;
  for (int64_t i = 0; i < size; i += kSampleStride) sample.push_back(mono(values[i]));
  std::sort(sample.begin(), sample.end());
  const int64_t samples = static_cast<int64_t>(sample.size());
  const int64_t rank = (size - t.count) * samples / size;  // in the ascending sample
  const int64_t slack = 4 * static_cast<int64_t>(std::sqrt(static_cast<double>(samples))) + 1;
  const U lo = sample[std::max<int64_t>(rank - slack, 0)];
  const U hi = sample[std::min<int64_t>(rank + slack, samples - 1)];
  t.keys.resize(size);
  U* keys = t.keys.data();
  // The bracket's two ends are counted apart: on tied values (an EMA of flip counts holds a
  // handful of distinct values) each end is a whole class of equal keys, and the answer is
  // often one of them, found without a selection.
  int64_t above = 0, at_hi = 0, inside = 0, at_lo = 0;
  for (int64_t i = 0; i < size; ++i) {  // vectorised
    const U key = mono(values[i]);
    keys[i] = key;
    above += key > hi;
    at_hi += key == hi;
    inside += (key > lo) & (key < hi);
    at_lo += key == lo;
  }
  if (lo == hi) at_lo = 0;  // one class, counted in at_hi
  const int64_t need = t.count - above;
  if (0 < need && need <= at_hi) {
    t.key = hi;
    t.ties = need;
    t.all_ties = need == at_hi;
  } else if (at_hi + inside < need && need <= at_hi + inside + at_lo) {
    t.key = lo;
    t.ties = need - at_hi - inside;
    t.all_ties = t.ties == at_lo;
  } else if (at_hi < need && need <= at_hi + inside) {  // strictly inside: all its ties too
    std::vector<U> pool(inside + 1);
    int64_t at = 0;
    for (int64_t i = 0; i < size; ++i) {
      pool[at] = keys[i];  // kept only where strictly inside the bracket (no branch)
      at += (keys[i] > lo) & (keys[i] < hi);
    }
    pool.resize(inside);
    select_key(pool, need - at_hi, t);
  } else {
    std::vector<U> pool = t.keys;  // the bracket missed
    select_key(pool, t.count, t);
  }
  return t;
}

// A threshold's membership as one comparison per key: above `key`, or equal to it at an index
// below `split` (the ties that are in are the lowest-indexed ones). Nothing in: the largest key
// and split 0; everything: key 0 and split size. With `ties_out` the caller knows that the
// blocks tied at the threshold are out anyway, so no split is searched for.
template <typename U>
struct Cut {
  U key;
  int64_t split;
  bool in(U k, int64_t i) const { return (k > key) | ((k == key) & (i < split)); }
};

constexpr int64_t kTieRun = 256;  // keys counted per vectorised run when searching the split

template <typename S>
Cut<typename Threshold<S>::U> cut_of(const Threshold<S>& t, bool ties_out) {
  using U = typename Threshold<S>::U;
  if (t.count <= 0) return {std::numeric_limits<U>::max(), 0};
  if (t.count >= t.size) return {U(0), t.size};
  if (t.all_ties) return {t.key, t.size};
  if (ties_out) return {t.key, 0};
  const U* keys = t.keys.data();
  int64_t left = t.ties, i = 0;  // find the index after the t.ties-th key equal to t.key
  for (; left > 0 && i + kTieRun <= t.size; i += kTieRun) {
    int64_t equal = 0;
    for (int64_t j = i; j < i + kTieRun; ++j) equal += keys[j] == t.key;
    if (equal >= left) break;
    left -= equal;
  }
  for (; left > 0; ++i) left -= keys[i] == t.key;
  return {t.key, i};
}

template <typename S>
void obf_freeze_into(const S* osc, const S* norms, int64_t size, double alpha, double beta,
                     bool* out) {
  Threshold<S> by_osc, by_norm;
  // The two selections are independent: side by side where there are threads and enough work.
  at::parallel_for(0, 2, size >= kParallelSelection ? 1 : 2, [&](int64_t b, int64_t e) {
    for (int64_t which = b; which < e; ++which) {
      if (which == 0) {
        by_osc = threshold(osc, size, beta);
      } else {
        by_norm = threshold(norms, size, alpha);
      }
    }
  });
  // A threshold at or below +0 (most blocks never flipped: O = 0, and beta K of them reach
  // into the zeros) ties only blocks that O > 0 has already left out.
  const auto o = cut_of(by_osc, by_osc.key <= mono(S(0)));
  const auto w = cut_of(by_norm, false);
  const auto* osc_keys = by_osc.keys.data();
  const auto* norm_keys = by_norm.keys.data();
  for (int64_t i = 0; i < size; ++i) {  // one vectorised pass
    out[i] = (osc[i] > S(0)) & o.in(osc_keys[i], i) & w.in(norm_keys[i], i);
  }
}

}  // namespace

// Declared in module.cpp, which binds them.

// Eq. 10 per parameter: Top(O, floor(beta K)) & Top(norms, floor(alpha K)) & (O > 0), bool
// [K]; the parameters in parallel (one parameter: its two selections side by side).
std::vector<at::Tensor> obf_freeze(const std::vector<at::Tensor>& oscillations,
                                   const std::vector<at::Tensor>& norms, double alpha,
                                   double beta) {
  const int64_t items = static_cast<int64_t>(oscillations.size());
  TORCH_CHECK_VALUE(norms.size() == oscillations.size(),
                    "obf_freeze: one norms tensor per oscillation tensor");
  std::vector<at::Tensor> frozen(items);
  for (int64_t i = 0; i < items; ++i) {
    const at::Tensor& osc = oscillations[i];
    const at::Tensor& nrm = norms[i];
    TORCH_CHECK_VALUE(osc.device().is_cpu() && nrm.device().is_cpu() && osc.is_contiguous() &&
                          nrm.is_contiguous() && osc.dim() == 1 && nrm.sizes() == osc.sizes() &&
                          nrm.scalar_type() == osc.scalar_type(),
                      "oscillations[", i, "] and norms[", i,
                      "] must be contiguous [K] CPU tensors of one dtype");
    TORCH_CHECK_VALUE(osc.scalar_type() == at::kFloat || osc.scalar_type() == at::kDouble,
                      "unsupported dtype ", osc.scalar_type());
    frozen[i] = at::empty({osc.numel()}, osc.options().dtype(at::kBool));
  }
  // Largest first, each thread taking the next parameter as it finishes one: a contiguous
  // split of the list (layer sizes grow with depth in a ResNet) left one thread idle.
  std::vector<int64_t> order(items);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return oscillations[x].numel() > oscillations[y].numel();
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t taken = next++; taken < items; taken = next++) {
      const int64_t i = order[taken];
      const int64_t size = oscillations[i].numel();
      bool* out = frozen[i].data_ptr<bool>();
      if (oscillations[i].scalar_type() == at::kFloat) {
        obf_freeze_into(oscillations[i].data_ptr<float>(), norms[i].data_ptr<float>(), size,
                        alpha, beta, out);
      } else {
        obf_freeze_into(oscillations[i].data_ptr<double>(), norms[i].data_ptr<double>(), size,
                        alpha, beta, out);
      }
    }
  });
  return frozen;
}

// core.evolution.top_fraction of a contiguous [K] float32/float64 CPU tensor, bool [K].
at::Tensor top_fraction(const at::Tensor& values, double fraction) {
  TORCH_CHECK_VALUE(values.device().is_cpu() && values.is_contiguous() && values.dim() == 1,
                    "values must be a contiguous [K] CPU tensor");
  const int64_t size = values.numel();
  at::Tensor out = at::empty({size}, values.options().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  auto run = [&](const auto* v) {
    const auto t = threshold(v, size, fraction);
    const auto cut = cut_of(t, false);
    for (int64_t i = 0; i < size; ++i) o[i] = cut.in(t.keys[i], i);
  };
  if (values.scalar_type() == at::kFloat) {
    run(values.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(values.scalar_type() == at::kDouble, "unsupported dtype ",
                      values.scalar_type());
    run(values.data_ptr<double>());
  }
  return out;
}
