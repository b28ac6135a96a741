// The passes of BAME's evolve-phase mask update after the scores (evolve_cpu.cpp), on the CPU:
//
//   obf_freeze:     Eq. 10's Top(O, floor(beta K)) & Top(W, floor(alpha K)) & (O > 0), the
//                   membership core.evolution.top_fraction gives (a sampled bracket, then an
//                   exact selection inside it);
//   apply_evolved:  frozen blocks keep their kept set, the others take the proposal; newly
//                   pruned weights set to 0 and the compact buffers' rows of the changed blocks
//                   remapped in place (NMEngine.apply_mask).
//
// Loaded by bame_optim/kernels/evolve_cpu.py, which documents the equality contract (bit for
// bit the eager core functions).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "evolve_common.h"

namespace {

using namespace bame_evolve;

constexpr int64_t kApplyRun = 64;  // blocks whose codes apply_range compares in one loop

template <typename T, typename Code, bool RANKED>
void apply_range(T* weight, const Layout& wl, const std::vector<T*>& buffers, const Codes& kept,
                 const Codes& proposed, const bool* frozen, const Codes& out, int64_t k0,
                 int64_t k1, int64_t& flips) {
  const int64_t count = kept.count;
  const Code* old_codes = static_cast<const Code*>(kept.data);
  const Code* new_codes = static_cast<const Code*>(proposed.data);
  Code* out_codes = static_cast<Code*>(out.data);
  T row[kMaxM];
  // Block k, its weights at offset off, takes the proposed kept set.
  auto move = [&](int64_t k, int64_t off) {
    const uint64_t old = decode<Code, RANKED>(kept, k);
    const uint64_t now = decode<Code, RANKED>(proposed, k);
    flips += __builtin_popcountll(now ^ old);
    T* wp = weight + off;
    for (uint64_t pruned = old & ~now; pruned; pruned &= pruned - 1) {
      wp[__builtin_ctzll(pruned) * wl.s_in] = T(0);
    }
    for (T* buffer : buffers) {
      T* values = buffer + k * count;
      std::memcpy(row, values, count * sizeof(T));
      int64_t i = 0;
      for (uint64_t b = now; b; b &= b - 1, ++i) {
        const uint64_t bit = b & (~b + 1);
        // Kept by both: the value moves to its new slot; revived: 0 (core.kept.remap_kept).
        values[i] = (old & bit) ? row[__builtin_popcountll(old & (bit - 1))] : T(0);
      }
    }
  };
  if constexpr (RANKED) {
    // One code per block: a run of kApplyRun blocks has its codes chosen and compared in one
    // vectorised loop (__restrict: byte-sized codes could otherwise alias anything), and only
    // the blocks whose kept set changed are visited (usually a few percent after the first
    // update), the cursor stepped to them or placed anew over long gaps.
    const Code* __restrict was = old_codes;
    const Code* __restrict fresh = new_codes;
    const uint8_t* __restrict keep = reinterpret_cast<const uint8_t*>(frozen);  // 0 or 1
    Code* __restrict now = out_codes;
    alignas(64) uint8_t changed[kApplyRun];
    Cursor cur(wl, wl, k0);
    int64_t at = k0;
    for (int64_t r0 = k0; r0 < k1; r0 += kApplyRun) {
      const int64_t len = std::min(kApplyRun, k1 - r0);
      uint8_t any = 0;
      for (int64_t i = 0; i < len; ++i) {
        const Code before = was[r0 + i];
        const Code frozen_bits = static_cast<Code>(Code(0) - static_cast<Code>(keep[r0 + i]));
        const Code code = static_cast<Code>((before & frozen_bits) | (fresh[r0 + i] & ~frozen_bits));
        now[r0 + i] = code;  // a select, not a branch: frozen is ~20% of blocks, unpredictable
        changed[i] = code != before;
        any |= changed[i];
      }
      if (!any) continue;
      for (int64_t i = 0; i < len; ++i) {
        if (!changed[i]) continue;
        const int64_t k = r0 + i;
        if (k - at > kApplyRun) {
          cur.seek(k);
          at = k;
        }
        for (; at < k; ++at) cur.next();
        move(k, cur.off_a);
      }
    }
  } else {
    Cursor cur(wl, wl, k0);
    for (int64_t k = k0; k < k1; ++k, cur.next()) {
      const Code* source = (frozen[k] ? old_codes : new_codes) + k * count;
      bool same = true;
      for (int64_t i = 0; i < count; ++i) {
        out_codes[k * count + i] = source[i];
        same &= source[i] == old_codes[k * count + i];
      }
      if (!same) move(k, cur.off_a);
    }
  }
}

// core.evolution.top_fraction's membership: the count-th largest key of a [size] array and
// how many of the keys equal to it are in (the lowest indices first). As its _kth_largest: a
// sorted sample of every kSampleStride-th key brackets the answer, one pass (which also stores
// the keys) counts the keys above the bracket and collects those inside it (a few percent),
// and an exact selection among those finds it; where the bracket misses, among all keys.
constexpr int64_t kSampleStride = 64;
constexpr int64_t kParallelSelection = int64_t{1} << 17;  // blocks: below, one thread selects
constexpr int64_t kApplyGrain = 4;  // chunks of kGrain blocks per task of apply_evolved

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

// Writes (or with `both` ANDs into) out the membership of a threshold, bool [size]. With
// `ties_out` the caller knows that out is already false wherever a key equals t.key, so which
// of those ties are in does not matter: a comparison (vectorised) instead of counting them.
template <typename S>
void members(const Threshold<S>& t, bool* out, bool both, bool ties_out = false) {
  if (t.count <= 0 || t.count >= t.size) {
    const bool all = t.count >= t.size;
    for (int64_t i = 0; i < t.size; ++i) out[i] = (both ? out[i] : true) & all;
    return;
  }
  const auto* keys = t.keys.data();
  if (t.all_ties) {  // no tie left out: a comparison (vectorised)
    for (int64_t i = 0; i < t.size; ++i) out[i] = (both ? out[i] : true) & (keys[i] >= t.key);
    return;
  }
  if (ties_out) {
    for (int64_t i = 0; i < t.size; ++i) out[i] = (both ? out[i] : true) & (keys[i] > t.key);
    return;
  }
  int64_t ties_left = t.ties;
  for (int64_t i = 0; i < t.size; ++i) {
    const auto key = keys[i];
    const bool tie = (key == t.key) & (ties_left > 0);
    ties_left -= tie;
    const bool in = (key > t.key) | tie;
    out[i] = (both ? out[i] : true) & in;
  }
}

// A threshold's membership as one comparison per key: above `key`, or equal to it at an index
// below `split` (the ties that are in are the lowest-indexed ones). Nothing in: the largest key
// and split 0; everything: key 0 and split size. With `ties_out` the caller knows that the
// blocks tied at the threshold are out anyway, so no split is searched for.
template <typename U>
struct Cut {
  U key;
  int64_t split;
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
    const bool in_osc = (osc_keys[i] > o.key) | ((osc_keys[i] == o.key) & (i < o.split));
    const bool in_norm = (norm_keys[i] > w.key) | ((norm_keys[i] == w.key) & (i < w.split));
    out[i] = (osc[i] > S(0)) & in_osc & in_norm;
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
  auto run = [&](const auto* v) { members(threshold(v, size, fraction), o, false); };
  if (values.scalar_type() == at::kFloat) {
    run(values.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(values.scalar_type() == at::kDouble, "unsupported dtype ",
                      values.scalar_type());
    run(values.data_ptr<double>());
  }
  return out;
}

namespace {

// One parameter of apply_evolved.
struct ApplyItem {
  at::Tensor weight;
  Layout layout;
  std::vector<at::Tensor> buffers;
  Codes old_codes, new_codes, out_codes;
  const bool* frozen = nullptr;
  at::ScalarType dtype = at::kFloat;
};

template <typename T, typename Code, bool RANKED>
void apply_item(const ApplyItem& it, int64_t k0, int64_t k1, int64_t& flips) {
  std::vector<T*> bufs;
  for (const at::Tensor& b : it.buffers) bufs.push_back(static_cast<T*>(b.data_ptr()));
  apply_range<T, Code, RANKED>(static_cast<T*>(it.weight.data_ptr()), it.layout, bufs,
                               it.old_codes, it.new_codes, it.frozen, it.out_codes, k0, k1,
                               flips);
}

void apply_blocks(const ApplyItem& it, int64_t k0, int64_t k1, int64_t& flips) {
  const bool f32 = it.dtype == at::kFloat;
  if (!it.old_codes.ranked) {
    f32 ? apply_item<float, uint8_t, false>(it, k0, k1, flips)
        : apply_item<double, uint8_t, false>(it, k0, k1, flips);
  } else if (it.old_codes.dtype == at::kByte) {
    f32 ? apply_item<float, uint8_t, true>(it, k0, k1, flips)
        : apply_item<double, uint8_t, true>(it, k0, k1, flips);
  } else {
    f32 ? apply_item<float, int16_t, true>(it, k0, k1, flips)
        : apply_item<double, int16_t, true>(it, k0, k1, flips);
  }
}

}  // namespace

// Per parameter (one group: m shared): the new stored kept sets (kept's form and dtype), and
// the flips (int64 [items]); writes 0 to the newly pruned weights and remaps the buffers'
// changed rows, in place. Every input is checked before anything is written.
std::tuple<std::vector<at::Tensor>, at::Tensor> apply_evolved(
    const std::vector<at::Tensor>& weights, const std::vector<std::vector<int64_t>>& layouts,
    const std::vector<std::vector<at::Tensor>>& buffers, const std::vector<at::Tensor>& kept,
    const std::vector<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& counts,
    const std::vector<at::Tensor>& proposed, const std::vector<at::Tensor>& frozen, int64_t m) {
  const size_t items = weights.size();
  TORCH_CHECK_VALUE(layouts.size() == items && buffers.size() == items && kept.size() == items &&
                        masks.size() == items && counts.size() == items &&
                        proposed.size() == items && frozen.size() == items,
                    "apply_evolved: every list needs one entry per parameter");
  TORCH_CHECK_VALUE(2 <= m && m <= kMaxM, "Invalid m value: ", m, " (2 <= m <= ", kMaxM, ")");
  std::vector<ApplyItem> its(items);
  std::vector<at::Tensor> out(items);
  std::vector<int64_t> starts{0};  // in chunks of kGrain blocks
  for (size_t i = 0; i < items; ++i) {
    const at::Tensor& weight = weights[i];
    ApplyItem& it = its[i];
    it.dtype = check_pair(weight, weight);
    const int64_t count = counts[i];
    const int64_t blocks = weight.numel() / m;
    it.weight = weight;
    it.layout = make_layout(weight, layouts[i], m, "weight");
    it.old_codes = make_codes(kept[i], masks[i], count, blocks, m, "kept", true);
    it.new_codes = make_codes(proposed[i], masks[i], count, blocks, m, "proposed", true);
    TORCH_CHECK_VALUE(proposed[i].scalar_type() == kept[i].scalar_type() &&
                          proposed[i].dim() == kept[i].dim(),
                      "proposed[", i, "] must be in kept's stored form");
    TORCH_CHECK_VALUE(it.old_codes.ranked ? (kept[i].scalar_type() == at::kByte ||
                                             kept[i].scalar_type() == at::kShort)
                                          : kept[i].scalar_type() == at::kByte,
                      "kept[", i, "]: ranks must be uint8 or int16, positions uint8");
    const at::Tensor& f = frozen[i];
    TORCH_CHECK_VALUE(f.scalar_type() == at::kBool && f.dim() == 1 && f.size(0) == blocks &&
                          f.is_contiguous() && f.device().is_cpu(),
                      "frozen[", i, "] must be contiguous bool [", blocks, "]");
    it.frozen = f.data_ptr<bool>();
    for (const at::Tensor& b : buffers[i]) {
      TORCH_CHECK_VALUE(b.scalar_type() == it.dtype && b.device().is_cpu() && b.is_contiguous() &&
                            b.dim() == 2 && b.size(0) == blocks && b.size(1) == count &&
                            !b.key_set().has(c10::DispatchKey::Python),
                        "buffers[", i, "] must be contiguous [", blocks, ", ", count,
                        "] CPU tensors of the weight's dtype");
    }
    it.buffers = buffers[i];
    out[i] = at::empty(kept[i].sizes(), kept[i].options());
    it.out_codes = it.old_codes;
    it.out_codes.data = out[i].data_ptr();
    starts.push_back(starts.back() + (blocks + kGrain - 1) / kGrain);
  }
  std::vector<int64_t> chunk_flips(starts.back(), 0);
  // One parallel loop over the chunks of all parameters.
  at::parallel_for(0, starts.back(), kApplyGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const size_t i = std::upper_bound(starts.begin(), starts.end(), c) - starts.begin() - 1;
      const int64_t blocks = weights[i].numel() / m;
      const int64_t k0 = (c - starts[i]) * kGrain;
      apply_blocks(its[i], k0, std::min(blocks, k0 + kGrain), chunk_flips[c]);
    }
  });
  at::Tensor flips = at::zeros({static_cast<int64_t>(items)}, at::kLong);
  for (size_t i = 0; i < items; ++i) {
    int64_t total = 0;
    for (int64_t c = starts[i]; c < starts[i + 1]; ++c) total += chunk_flips[c];
    flips.data_ptr<int64_t>()[i] = total;
    bump_version(weights[i]);
    for (const at::Tensor& b : buffers[i]) bump_version(b);
  }
  return {out, flips};
}

namespace {

// Blocks k0..k1 of zero_pruned: whether an entry was written.
template <typename T, typename Code, bool RANKED>
bool zero_range(T* weight, const Layout& wl, const Codes& kept, int64_t k0, int64_t k1) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const uint64_t all = full_bits(wl.m);
  bool wrote = false;
  Cursor cur(wl, wl, k0);
  for (int64_t k = k0; k < k1; ++k, cur.next()) {
    T* wp = weight + cur.off_a;
    for (uint64_t pruned = all & ~decode<Code, RANKED>(kept, k); pruned; pruned &= pruned - 1) {
      T& w = wp[__builtin_ctzll(pruned) * wl.s_in];
      if (std::bit_cast<Bits>(w) != 0) {  // +0.0 stays as it is (the usual case)
        w = T(0);
        wrote = true;
      }
    }
  }
  return wrote;
}

template <typename T>
bool zero_blocks(T* weight, const Layout& wl, const Codes& kept, int64_t k0, int64_t k1) {
  if (!kept.ranked) return zero_range<T, uint8_t, false>(weight, wl, kept, k0, k1);
  return kept.dtype == at::kByte ? zero_range<T, uint8_t, true>(weight, wl, kept, k0, k1)
                                 : zero_range<T, int16_t, true>(weight, wl, kept, k0, k1);
}

}  // namespace

// NMEngine.zero_pruned_ of one parameter: every pruned entry whose bits are not all 0 set to
// +0.0, kept entries untouched (NaN payloads included); whether an entry was written.
bool zero_pruned(const at::Tensor& weight, const std::vector<int64_t>& layout,
                 const at::Tensor& kept, const std::optional<at::Tensor>& masks, int64_t count,
                 int64_t m) {
  TORCH_CHECK_VALUE(2 <= m && m <= kMaxM, "Invalid m value: ", m, " (2 <= m <= ", kMaxM, ")");
  const at::ScalarType dt = check_pair(weight, weight);
  const int64_t blocks = weight.numel() / m;
  const Layout wl = make_layout(weight, layout, m, "weight");
  const Codes codes = make_codes(kept, masks, count, blocks, m, "kept", true);
  TORCH_CHECK_VALUE(codes.ranked ? (codes.dtype == at::kByte || codes.dtype == at::kShort)
                                 : codes.dtype == at::kByte,
                    "kept: ranks must be uint8 or int16, positions uint8");
  std::atomic<bool> wrote{false};
  at::parallel_for(0, blocks, kGrain * kApplyGrain, [&](int64_t k0, int64_t k1) {
    const bool here = dt == at::kFloat
                          ? zero_blocks(weight.data_ptr<float>(), wl, codes, k0, k1)
                          : zero_blocks(weight.data_ptr<double>(), wl, codes, k0, k1);
    if (here) wrote.store(true, std::memory_order_relaxed);
  });
  const bool any = wrote.load();
  if (any) bump_version(weight);
  return any;
}
