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
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#include "evolve_common.h"

namespace {

using namespace bame_evolve;

template <typename T, typename Code, bool RANKED>
void apply_range(T* weight, const Layout& wl, const std::vector<T*>& buffers, const Codes& kept,
                 const Codes& proposed, const bool* frozen, const Codes& out, int64_t k0,
                 int64_t k1, int64_t& flips) {
  const int64_t count = kept.count;
  const Code* old_codes = static_cast<const Code*>(kept.data);
  const Code* new_codes = static_cast<const Code*>(proposed.data);
  Code* out_codes = static_cast<Code*>(out.data);
  const int64_t width = RANKED ? 1 : count;  // code entries per block
  T row[kMaxM];
  Cursor cur(wl, wl, k0);
  for (int64_t k = k0; k < k1; ++k, cur.next()) {
    const Code* source = (frozen[k] ? old_codes : new_codes) + k * width;
    bool same = true;
    for (int64_t i = 0; i < width; ++i) {
      out_codes[k * width + i] = source[i];
      same &= source[i] == old_codes[k * width + i];
    }
    if (same) continue;
    const uint64_t old = decode<Code, RANKED>(kept, k);
    const uint64_t now = decode<Code, RANKED>(proposed, k);
    flips += __builtin_popcountll(now ^ old);
    T* wp = weight + cur.off_a;
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
  }
}

// core.evolution.top_fraction's membership: the count-th largest key of a [size] array and
// how many of the keys equal to it are in (the lowest indices first). As its _kth_largest: a
// sorted sample of every kSampleStride-th key brackets the answer, one pass (which also stores
// the keys) counts the keys above the bracket and collects those inside it (a few percent),
// and an exact selection among those finds it; where the bracket misses, among all keys.
constexpr int64_t kSampleStride = 64;

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
  if (t.count <= 0 || t.count >= size) return t;
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
  int64_t above = 0, found = 0;
  for (int64_t i = 0; i < size; ++i) {  // vectorised
    const U key = mono(values[i]);
    keys[i] = key;
    above += key > hi;
    found += (key >= lo) & (key <= hi);
  }
  const int64_t need = t.count - above;
  std::vector<U> pool;
  if (0 < need && need <= found) {
    pool.resize(found + 1);
    int64_t at = 0;
    for (int64_t i = 0; i < size; ++i) {
      pool[at] = keys[i];  // kept only where inside the bracket (no branch)
      at += (keys[i] >= lo) & (keys[i] <= hi);
    }
    pool.resize(found);
    select_key(pool, need, t);
  } else {
    pool = t.keys;  // the bracket missed
    select_key(pool, t.count, t);
  }
  return t;
}

// Writes (or with `both` ANDs into) out the membership of a threshold, bool [size].
template <typename S>
void members(const Threshold<S>& t, bool* out, bool both) {
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
  int64_t ties_left = t.ties;
  for (int64_t i = 0; i < t.size; ++i) {
    const auto key = keys[i];
    const bool tie = (key == t.key) & (ties_left > 0);
    ties_left -= tie;
    const bool in = (key > t.key) | tie;
    out[i] = (both ? out[i] : true) & in;
  }
}

template <typename S>
void obf_freeze_into(const S* osc, const S* norms, int64_t size, double alpha, double beta,
                     bool* out) {
  Threshold<S> by_osc, by_norm;
  // The two selections are independent: side by side where there are threads.
  at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
    for (int64_t which = b; which < e; ++which) {
      if (which == 0) {
        by_osc = threshold(osc, size, beta);
      } else {
        by_norm = threshold(norms, size, alpha);
      }
    }
  });
  for (int64_t i = 0; i < size; ++i) out[i] = osc[i] > S(0);
  members(by_osc, out, true);
  members(by_norm, out, true);
}

}  // namespace

// Declared in module.cpp, which binds them.

// Eq. 10: Top(O, floor(beta K)) & Top(norms, floor(alpha K)) & (O > 0), bool [K].
at::Tensor obf_freeze(const at::Tensor& oscillation, const at::Tensor& norms, double alpha,
                      double beta) {
  TORCH_CHECK_VALUE(oscillation.device().is_cpu() && norms.device().is_cpu() &&
                        oscillation.is_contiguous() && norms.is_contiguous() &&
                        oscillation.dim() == 1 && norms.sizes() == oscillation.sizes() &&
                        norms.scalar_type() == oscillation.scalar_type(),
                    "oscillation and norms must be contiguous [K] CPU tensors of one dtype");
  const at::ScalarType dt = oscillation.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble, "unsupported dtype ", dt);
  const int64_t size = oscillation.numel();
  at::Tensor frozen = at::empty({size}, oscillation.options().dtype(at::kBool));
  if (dt == at::kFloat) {
    obf_freeze_into(oscillation.data_ptr<float>(), norms.data_ptr<float>(), size, alpha, beta,
                    frozen.data_ptr<bool>());
  } else {
    obf_freeze_into(oscillation.data_ptr<double>(), norms.data_ptr<double>(), size, alpha, beta,
                    frozen.data_ptr<bool>());
  }
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

// Returns {the new stored kept sets (kept's form and dtype), flips (int64 scalar tensor)};
// writes 0 to the newly pruned weights and remaps the buffers' changed rows, in place.
std::vector<at::Tensor> apply_evolved(const at::Tensor& weight,
                                      const std::vector<int64_t>& weight_layout,
                                      const std::vector<at::Tensor>& buffers,
                                      const at::Tensor& kept,
                                      const std::optional<at::Tensor>& masks, int64_t count,
                                      const at::Tensor& proposed, const at::Tensor& frozen,
                                      int64_t m) {
  const at::ScalarType dt = check_pair(weight, weight);
  TORCH_CHECK_VALUE(2 <= m && m <= kMaxM, "Invalid m value: ", m, " (2 <= m <= ", kMaxM, ")");
  const int64_t blocks = weight.numel() / m;
  const Layout wl = make_layout(weight, weight_layout, m, "weight");
  const Codes old_codes = make_codes(kept, masks, count, blocks, m, "kept", true);
  const Codes new_codes = make_codes(proposed, masks, count, blocks, m, "proposed", true);
  TORCH_CHECK_VALUE(proposed.scalar_type() == kept.scalar_type() && proposed.dim() == kept.dim(),
                    "proposed must be in kept's stored form");
  TORCH_CHECK_VALUE(frozen.scalar_type() == at::kBool && frozen.dim() == 1 &&
                        frozen.size(0) == blocks && frozen.is_contiguous() &&
                        frozen.device().is_cpu(),
                    "frozen must be contiguous bool [", blocks, "]");
  for (const at::Tensor& b : buffers) {
    TORCH_CHECK_VALUE(b.scalar_type() == dt && b.device().is_cpu() && b.is_contiguous() &&
                          b.dim() == 2 && b.size(0) == blocks && b.size(1) == count &&
                          !b.key_set().has(c10::DispatchKey::Python),
                      "buffers must be contiguous [", blocks, ", ", count,
                      "] CPU tensors of the weight's dtype");
  }
  at::Tensor out = at::empty(kept.sizes(), kept.options());
  Codes out_codes = old_codes;
  out_codes.data = out.data_ptr();
  const int64_t chunks = std::max<int64_t>(1, (blocks + kGrain - 1) / kGrain);
  std::vector<int64_t> flips(chunks, 0);
  const bool* frz = frozen.data_ptr<bool>();
  auto run = [&](auto zero, auto code, auto ranked) {
    using T = decltype(zero);
    using Code = decltype(code);
    constexpr bool RANKED = decltype(ranked)::value;
    std::vector<T*> bufs;
    for (const at::Tensor& b : buffers) bufs.push_back(static_cast<T*>(b.data_ptr()));
    T* w = static_cast<T*>(weight.data_ptr());
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        apply_range<T, Code, RANKED>(w, wl, bufs, old_codes, new_codes, frz, out_codes,
                                     c * kGrain, std::min(blocks, (c + 1) * kGrain), flips[c]);
      }
    });
  };
  auto by_code = [&](auto zero) {
    if (!old_codes.ranked) {
      TORCH_CHECK_VALUE(kept.scalar_type() == at::kByte, "positions must be uint8");
      run(zero, uint8_t(0), std::false_type{});
    } else if (kept.scalar_type() == at::kByte) {
      run(zero, uint8_t(0), std::true_type{});
    } else {
      TORCH_CHECK_VALUE(kept.scalar_type() == at::kShort, "ranks must be uint8 or int16");
      run(zero, int16_t(0), std::true_type{});
    }
  };
  if (dt == at::kFloat) {
    by_code(float(0));
  } else {
    by_code(double(0));
  }
  bump_version(weight);
  for (const at::Tensor& b : buffers) bump_version(b);
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += flips[c];
  at::Tensor flipped = at::empty({}, kept.options().dtype(at::kLong));
  *flipped.data_ptr<int64_t>() = total;
  return {out, flipped};
}

