// Fused passes of BAME's evolve-phase mask update on the CPU (LMA + OBF, Eq. 4-10).
//
// Loaded by bame_optim/kernels/evolve_cpu.py (JIT, on first use), which documents the passes
// and the equality contract: every result equals the eager core functions
// (bame_optim.core.evolution.evolve_mask, NMEngine.zero_pruned_ and NMEngine.apply_mask) bit
// for bit.
//
//   evolve_blocks:  per block, the pruned entries set to 0 (optional), LMA scores (Eq. 4, 5),
//                   the top-n proposal with the ties of core.nm.top_n_mask (Eq. 6), encoded
//                   as core.kept.encode_kept does, SAD (Eq. 7), the oscillation EMA (Eq. 8)
//                   and the block norm of Eq. 10: one read of weight, gradient and kept code.
//   (obf_freeze and apply_evolved, the passes after it: evolve_apply_cpu.cpp.)
//
// Rounding: scores, the EMA and the norm are computed operation by operation as ATen's CPU
// kernels round them (a product rounded, then the next operation; scalars cast to the tensor's
// dtype first). The file is compiled with -ffp-contract=off, so nothing is contracted that is
// not written as std::fma. The norm follows ATen's last-dimension L2 reduction, whose shape
// (lane width, fused multiply-adds, the grouping of its scalar tail) a probe in Python finds.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "evolve_common.h"
#include "evolve_chunks.h"

namespace {

using namespace bame_evolve;

// The n entries of a block first in core.nm.top_n_mask's order: score key descending, then
// the preferred (kept) entry, then the lower index. A strict total order, so any selection
// gives its mask: here min(n, m - n) rounds, each the extreme key of the block (a reduction
// the compiler vectorises) and its ties resolved on bit masks. Keys are > 0 and < ~0 except
// NaN's (all ones), so 0 marks a chosen entry in the rounds of the largest.
template <typename U, int MT>
inline uint64_t top_n(U* key, int64_t m_runtime, int64_t n, uint64_t preferred) {
  const int64_t m = MT > 0 ? MT : m_runtime;
  if (2 * n <= m) {
    uint64_t chosen = 0;
    for (int64_t r = 0; r < n; ++r) {
      U best = 0;
      for (int64_t j = 0; j < m; ++j) best = key[j] > best ? key[j] : best;
      uint64_t tied = 0;
      for (int64_t j = 0; j < m; ++j) tied |= static_cast<uint64_t>(key[j] == best) << j;
      tied &= ~chosen;
      const uint64_t both = tied & preferred;
      const uint64_t use = uint64_t{0} - static_cast<uint64_t>(both != 0);
      const uint64_t first = (both & use) | (tied & ~use);
      const int64_t at = __builtin_ctzll(first);
      chosen |= uint64_t{1} << at;
      key[at] = 0;
    }
    return chosen;
  }
  uint64_t dropped = 0;  // the m - n last, one round each: not preferred, then higher index
  for (int64_t r = 0; r < m - n; ++r) {
    U worst = ~U(0);
    for (int64_t j = 0; j < m; ++j) worst = key[j] < worst ? key[j] : worst;
    uint64_t tied = 0;
    for (int64_t j = 0; j < m; ++j) tied |= static_cast<uint64_t>(key[j] == worst) << j;
    tied &= ~dropped;
    const uint64_t other = tied & ~preferred;
    const uint64_t use = uint64_t{0} - static_cast<uint64_t>(other != 0);
    const uint64_t last = (other & use) | (tied & ~use);
    const int64_t at = 63 - __builtin_clzll(last);
    dropped |= uint64_t{1} << at;
    key[at] = ~U(0);
  }
  return full_bits(m) & ~dropped;
}

constexpr int64_t kRows = 128;  // blocks whose weights are kept for their norms at a time

// S: the weight's (and score) dtype, float or double; MT: M at compile time (0: a.m).
template <typename S, typename Code, bool RANKED, typename PCode, bool PRANKED, int MT>
void evolve_range(const EvolveArgs& a, int64_t k0, int64_t k1) {
  using U = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;
  constexpr int64_t kWidth = MT > 0 ? MT : kMaxM;
  S* w_data = static_cast<S*>(a.weight);
  const S* g_data = static_cast<const S*>(a.grad);
  const S* osc_in = static_cast<const S*>(a.osc_in);
  S* osc_out = static_cast<S*>(a.osc_out);
  S* norms = static_cast<S*>(a.norms);
  const int64_t m = MT > 0 ? MT : a.m;
  const int64_t ws = a.wl.s_in, gs = a.gl.s_in;
  const bool contiguous = ws == 1 && gs == 1;
  const bool adam = a.revive_adam;
  // Python floats as ATen casts a scalar operand to the tensor's dtype.
  const S lr = static_cast<S>(a.lr);
  const S gamma = static_cast<S>(a.gamma);
  const S one_minus_gamma = static_cast<S>(1.0 - a.gamma);
  const NormFn<S> norm_fn = norms != nullptr ? pick_norm<S, MT>(a.norm.lanes) : nullptr;
  S rows[kRows * kWidth];  // this chunk's weights, for the norms
  S g[kWidth];
  U key[kWidth];
  constexpr U kExponent = sizeof(S) == 4 ? U(0x7F800000u) : U(0x7FF0000000000000ull);
  bool nonfinite = false;  // a gradient entry is NaN or inf (exponent all ones)
  Cursor cur(a.wl, a.gl, k0);
  for (int64_t c0 = k0; c0 < k1; c0 += kRows) {
    const int64_t c1 = std::min(k1, c0 + kRows);
    for (int64_t k = c0; k < c1; ++k, cur.next()) {
      S* wp = w_data + cur.off_a;
      const S* gp = g_data + cur.off_b;
      S* w = rows + (k - c0) * m;
      const uint64_t kept = decode<Code, RANKED>(a.kept, k);
      if (contiguous) {
        for (int64_t j = 0; j < m; ++j) w[j] = wp[j];
        for (int64_t j = 0; j < m; ++j) g[j] = gp[j];
      } else {
        for (int64_t j = 0; j < m; ++j) w[j] = wp[j * ws];
        for (int64_t j = 0; j < m; ++j) g[j] = gp[j * gs];
      }
      for (int64_t j = 0; j < m; ++j) nonfinite |= (std::bit_cast<U>(g[j]) & kExponent) == kExponent;
      if (a.zero_pruned) {
        // NMEngine.zero_pruned_: a pruned entry holds +0.0 (all bits 0) afterwards. Written
        // only where it does not (rare).
        uint64_t dirty = 0;
        for (int64_t j = 0; j < m; ++j) {
          dirty |= static_cast<uint64_t>(std::bit_cast<U>(w[j]) != 0) << j;
        }
        for (dirty &= ~kept; dirty; dirty &= dirty - 1) {
          const int64_t j = __builtin_ctzll(dirty);
          w[j] = S(0);
          wp[j * ws] = S(0);
        }
      }
      for (int64_t j = 0; j < m; ++j) {
        const U on = U(0) - static_cast<U>((kept >> j) & 1);  // all ones where kept
        const S prune = std::abs(g[j] * w[j]);                 // Eq. 4: |G W|
        const S sq = g[j] * g[j];                              // Eq. 5: eta G^2, G^2 first
        const S revive = adam ? std::abs(g[j]) * lr : sq * lr;  // or eta |G|
        const U bits = (std::bit_cast<U>(prune) & on) | (std::bit_cast<U>(revive) & ~on);
        key[j] = mono(std::bit_cast<S>(bits));
      }
      const uint64_t proposal = top_n<U, MT>(key, m, a.n, kept);
      encode<PCode, PRANKED>(a.proposed, proposal, k);
      const S divergence = static_cast<S>(__builtin_popcountll(kept ^ proposal));  // Eq. 7
      const S before = osc_in == nullptr ? S(0) : osc_in[k];
      const S decayed = before * gamma;  // Eq. 8, as update_oscillation rounds it
      const S added = divergence * one_minus_gamma;
      osc_out[k] = decayed + added;
    }
    if (norm_fn != nullptr) norm_fn(rows, c1 - c0, m, a.norm, norms + c0);
  }
  if (nonfinite) a.finite->store(false, std::memory_order_relaxed);
}

using RangeFn = void (*)(const EvolveArgs&, int64_t, int64_t);

template <typename S, typename Code, bool RANKED, typename PCode, bool PRANKED>
RangeFn pick_m(int64_t m) {
  if constexpr (std::is_same_v<S, float>) {
    switch (m) {
      case 4:
        return &evolve_chunks_f32<Code, RANKED, PCode, PRANKED, 4>;
      case 8:
        return &evolve_chunks_f32<Code, RANKED, PCode, PRANKED, 8>;
      case 16:
        return &evolve_chunks_f32<Code, RANKED, PCode, PRANKED, 16>;
      default:
        return &evolve_range<S, Code, RANKED, PCode, PRANKED, 0>;
    }
  }
  switch (m) {
    case 4:
      return &evolve_range<S, Code, RANKED, PCode, PRANKED, 4>;
    case 8:
      return &evolve_range<S, Code, RANKED, PCode, PRANKED, 8>;
    case 16:
      return &evolve_range<S, Code, RANKED, PCode, PRANKED, 16>;
    default:
      return &evolve_range<S, Code, RANKED, PCode, PRANKED, 0>;
  }
}

// The instances: kept and proposal as encode_kept stores them (ranks in uint8 or int16 for
// the same count, or uint8 positions), any other combination through the generic decode.
template <typename S>
RangeFn pick_range(const Codes& kept, const Codes& proposed, int64_t m) {
  const bool same = kept.dtype == proposed.dtype && kept.ranked == proposed.ranked;
  if (same && kept.ranked && kept.dtype == at::kByte) {
    return pick_m<S, uint8_t, true, uint8_t, true>(m);
  }
  if (same && kept.ranked && kept.dtype == at::kShort) {
    return pick_m<S, int16_t, true, int16_t, true>(m);
  }
  if (same && !kept.ranked && kept.dtype == at::kByte) {
    return &evolve_range<S, uint8_t, false, uint8_t, false, 0>;
  }
  return nullptr;
}

}  // namespace

// Declared in module.cpp, which binds them.

// The passes over a list of parameters (one group: n, m and the hyper-parameters shared),
// parallel over all their blocks at once. Fills proposed[i] (kept's form for n; allocated by
// the caller) and returns {oscillation [K_i] per parameter, norms [K_i] (or empty: lanes 0),
// bool [items]: every gradient entry finite}; with zero_pruned the pruned entries of each
// weight are set to 0 first.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> evolve_blocks(
    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& grads,
    const std::vector<std::vector<int64_t>>& weight_layouts,
    const std::vector<std::vector<int64_t>>& grad_layouts, const std::vector<at::Tensor>& kept,
    const std::vector<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& counts,
    const std::vector<at::Tensor>& proposed, const std::vector<std::optional<at::Tensor>>& by_bits,
    const std::vector<std::optional<at::Tensor>>& binomials,
    const std::vector<std::optional<at::Tensor>>& oscillations,
    const std::vector<std::vector<int64_t>>& norm_modes, int64_t n, int64_t m, double lr,
    double gamma, bool revive_adam, bool zero_pruned) {
  const size_t items = weights.size();
  TORCH_CHECK_VALUE(grads.size() == items && weight_layouts.size() == items &&
                        grad_layouts.size() == items && kept.size() == items &&
                        masks.size() == items && counts.size() == items &&
                        proposed.size() == items && by_bits.size() == items &&
                        binomials.size() == items && oscillations.size() == items &&
                        norm_modes.size() == items,
                    "evolve_blocks: every list needs one entry per parameter");
  TORCH_CHECK_VALUE(2 <= m && m <= kMaxM, "Invalid m value: ", m, " (2 <= m <= ", kMaxM, ")");
  TORCH_CHECK_VALUE(0 <= n && n <= m, "Invalid n value: ", n);
  std::vector<EvolveArgs> args(items);
  std::vector<RangeFn> fns(items);
  std::vector<int64_t> starts{0};
  std::vector<at::Tensor> osc_out(items), norms(items);
  std::vector<std::atomic<bool>> finite(items);
  for (size_t i = 0; i < items; ++i) {
    const at::Tensor& weight = weights[i];
    const at::ScalarType dt = check_pair(weight, grads[i]);
    const std::vector<int64_t>& mode = norm_modes[i];
    TORCH_CHECK_VALUE(mode.size() == 4 && 0 <= mode[0] && mode[0] <= kMaxM && 0 <= mode[3] &&
                          mode[3] <= kMaxM,
                      "norm_modes[", i, "] must be [lanes, lane_fma, tail_fma, group], lanes <= 64");
    const int64_t blocks = weight.numel() / m;
    EvolveArgs& a = args[i];
    a.wl = make_layout(weight, weight_layouts[i], m, "weight");
    a.gl = make_layout(grads[i], grad_layouts[i], m, "grad");
    a.kept = make_codes(kept[i], masks[i], counts[i], blocks, m, "kept", true);
    a.proposed = make_codes(proposed[i], std::nullopt, n, blocks, m, "proposed", false);
    if (a.proposed.ranked) {
      if (m <= 16) {
        const std::optional<at::Tensor>& table = by_bits[i];
        TORCH_CHECK_VALUE(table.has_value() && table->scalar_type() == proposed[i].scalar_type() &&
                              table->numel() == (int64_t{1} << m) && table->is_contiguous(),
                          "by_bits ([2^m] ranks in the code dtype) is required for m <= 16");
        a.proposed.by_bits = table->data_ptr();
      } else {
        const std::optional<at::Tensor>& table = binomials[i];
        TORCH_CHECK_VALUE(table.has_value() && table->scalar_type() == at::kLong &&
                              table->dim() == 2 && table->size(0) == m &&
                              table->size(1) == m + 1 && table->is_contiguous(),
                          "binomials (int64 [m, m + 1]) are required for m > 16");
        a.proposed.binomials = table->data_ptr<int64_t>();
      }
    }
    const int64_t lanes = mode[0];
    osc_out[i] = at::empty({blocks}, weight.options().memory_format(at::MemoryFormat::Contiguous));
    norms[i] = at::empty({lanes ? blocks : 0}, osc_out[i].options());
    a.osc_in = nullptr;
    if (oscillations[i].has_value()) {
      const at::Tensor& osc = *oscillations[i];
      TORCH_CHECK_VALUE(osc.scalar_type() == dt && osc.dim() == 1 && osc.size(0) == blocks &&
                            osc.is_contiguous() && osc.device().is_cpu(),
                        "oscillations[", i, "] must be a contiguous [", blocks, "] CPU tensor of ",
                        dt);
      a.osc_in = osc.data_ptr();
    }
    a.weight = weight.data_ptr();
    a.grad = grads[i].data_ptr();
    a.osc_out = osc_out[i].data_ptr();
    a.norms = lanes ? norms[i].data_ptr() : nullptr;
    a.n = n;
    a.m = m;
    a.lr = lr;
    a.gamma = gamma;
    a.revive_adam = revive_adam;
    a.zero_pruned = zero_pruned;
    a.norm = NormMode{lanes, mode[1] != 0, mode[2] != 0, mode[3]};
    a.flat = weight.is_contiguous() && grads[i].is_contiguous() &&
             weight.numel() == weight.size(0) * weight.size(1);
    finite[i].store(true);
    a.finite = &finite[i];
    fns[i] = dt == at::kFloat ? pick_range<float>(a.kept, a.proposed, m)
                              : pick_range<double>(a.kept, a.proposed, m);
    TORCH_CHECK_VALUE(fns[i] != nullptr, "kept[", i, "] (", kept[i].scalar_type(),
                      ") and proposed (", proposed[i].scalar_type(),
                      ") must be in one stored form: uint8/int16 ranks or uint8 positions");
    starts.push_back(starts.back() + blocks);
  }
  // One parallel loop over the blocks of all parameters.
  at::parallel_for(0, starts.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; begin < end && i < items; ++i) {
      const int64_t stop = std::min(end, starts[i + 1]);
      if (stop > begin) fns[i](args[i], begin - starts[i], stop - starts[i]);
      begin = std::max(begin, stop);
    }
  });
  at::Tensor all_finite = at::empty({static_cast<int64_t>(items)}, at::kBool);
  for (size_t i = 0; i < items; ++i) {
    all_finite.data_ptr<bool>()[i] = finite[i].load();
    if (zero_pruned) bump_version(weights[i]);
  }
  return {osc_out, norms, all_finite};
}

// ATen's norm model on the rows of a contiguous [K, M] tensor, for the probe.
at::Tensor probe_norm(const at::Tensor& rows, const std::vector<int64_t>& norm_mode) {
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.is_contiguous() && rows.dim() == 2 &&
                        rows.size(1) <= kMaxM && norm_mode.size() == 4 && norm_mode[0] >= 1 &&
                        norm_mode[0] <= kMaxM && norm_mode[3] >= 0 && norm_mode[3] <= kMaxM,
                    "probe_norm: a contiguous [K, M <= 64] CPU tensor and a valid norm_mode");
  const NormMode mode{norm_mode[0], norm_mode[1] != 0, norm_mode[2] != 0, norm_mode[3]};
  at::Tensor out = at::empty({rows.size(0)}, rows.options());
  const int64_t m = rows.size(1);
  if (rows.scalar_type() == at::kFloat) {
    pick_norm<float, 0>(mode.lanes)(rows.data_ptr<float>(), rows.size(0), m, mode,
                                    out.data_ptr<float>());
  } else {
    TORCH_CHECK_VALUE(rows.scalar_type() == at::kDouble, "probe_norm: float32 or float64");
    pick_norm<double, 0>(mode.lanes)(rows.data_ptr<double>(), rows.size(0), m, mode,
                                     out.data_ptr<double>());
  }
  return out;
}
