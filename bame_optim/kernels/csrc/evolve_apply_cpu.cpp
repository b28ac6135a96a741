// The last pass of BAME's evolve-phase mask update (after evolve_cpu.cpp's scores and
// evolve_obf_cpu.cpp's frozen blocks), on the CPU, and NMEngine.zero_pruned_:
//
//   apply_evolved:  frozen blocks keep their kept set, the others take the proposal; newly
//                   pruned weights set to 0 and the compact buffers' rows of the changed blocks
//                   remapped in place (NMEngine.apply_mask);
//   zero_pruned:    pruned weights that are not +0.0 set to +0.0.
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
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "evolve_common.h"

namespace {

using namespace bame_evolve;

constexpr int64_t kApplyRun = 64;  // blocks whose codes apply_range compares in one loop
constexpr int64_t kApplyGrain = 4;  // chunks of kGrain blocks per task of apply_evolved

// The stored forms apply_evolved and zero_pruned take: uint8 or int16 ranks, uint8 positions.
inline bool taken_form(const Codes& c) {
  return c.ranked ? (c.dtype == at::kByte || c.dtype == at::kShort) : c.dtype == at::kByte;
}
constexpr const char* kTakenForms = "ranks must be uint8 or int16, positions uint8";

// run.template operator()<Code, RANKED>() for the stored form of c (one taken_form accepts).
template <typename F>
void with_form(const Codes& c, F&& run) {
  if (!c.ranked) {
    run.template operator()<uint8_t, false>();
  } else if (c.dtype == at::kByte) {
    run.template operator()<uint8_t, true>();
  } else {
    run.template operator()<int16_t, true>();
  }
}

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
  with_form(it.old_codes, [&]<typename Code, bool RANKED>() {
    it.dtype == at::kFloat ? apply_item<float, Code, RANKED>(it, k0, k1, flips)
                           : apply_item<double, Code, RANKED>(it, k0, k1, flips);
  });
}

}  // namespace

// Declared in module.cpp, which binds them.

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
    TORCH_CHECK_VALUE(taken_form(it.old_codes), "kept[", i, "]: ", kTakenForms);
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
  bool wrote = false;
  with_form(kept, [&]<typename Code, bool RANKED>() {
    wrote = zero_range<T, Code, RANKED>(weight, wl, kept, k0, k1);
  });
  return wrote;
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
  TORCH_CHECK_VALUE(taken_form(codes), "kept: ", kTakenForms);
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
