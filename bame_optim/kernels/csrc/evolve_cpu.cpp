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

// ATen's L2 norm of one contiguous row (the last-dimension path of torch.linalg.vector_norm):
// `lanes` accumulators (acc = acc + x * x), folded left, then the scalar tail: groups of
// `group` entries added as rounded squares, the rest as sum = fma(x, x, sum) or not.
struct NormMode {
  int64_t lanes = 0;  // 0: no norms
  bool lane_fma = false;
  bool tail_fma = false;
  int64_t group = 0;
};

template <typename S>
inline S square_add(S sum, S v, bool fused) {
  if (fused) return std::fma(v, v, sum);
  const S sq = v * v;
  return sum + sq;
}

struct EvolveArgs {
  void* weight;
  const void* grad;
  Layout wl, gl;
  Codes kept;      // decoded
  Codes proposed;  // encoded into
  const void* osc_in;  // nullptr: zeros
  void* osc_out;
  void* norms;  // nullptr: none
  int64_t n, m;
  double lr, gamma;
  bool revive_adam;
  bool zero_pruned;
  NormMode norm;
  std::atomic<bool>* finite;  // cleared where the gradient holds NaN or inf
};

// ATen's norm (row_norm) of `count` contiguous rows of m, with the lane count fixed at
// compile time where it is one of the common widths.
template <typename S, int MT, int LANES>
void rows_norm(const S* rows, int64_t count, int64_t m_runtime, const NormMode& mode, S* out) {
  const int64_t m = MT > 0 ? MT : m_runtime;
  const int64_t lanes = LANES > 0 ? LANES : mode.lanes;
  const int64_t vectors = lanes <= m ? m / lanes : 0;
  const int64_t tail = m - vectors * lanes;
  const int64_t groups = mode.group > 0 ? tail / mode.group : 0;
  const int64_t grouped = groups * mode.group;
  for (int64_t r = 0; r < count; ++r) {
    const S* x = rows + r * m;
    S sum = S(0);  // the fold of lanes that saw no vector is +0.0
    if (vectors > 0) {
      S acc[LANES > 0 ? LANES : kMaxM];
      for (int64_t l = 0; l < lanes; ++l) acc[l] = S(0);
      for (int64_t v = 0; v < vectors; ++v) {
        for (int64_t l = 0; l < lanes; ++l) {
          acc[l] = square_add(acc[l], x[v * lanes + l], mode.lane_fma);
        }
      }
      sum = acc[0];
      for (int64_t l = 1; l < lanes; ++l) sum = sum + acc[l];
    }
    const S* t = x + vectors * lanes;
    for (int64_t d = 0; d < grouped; ++d) sum = square_add(sum, t[d], false);
    for (int64_t d = grouped; d < tail; ++d) sum = square_add(sum, t[d], mode.tail_fma);
    out[r] = std::sqrt(sum);
  }
}

template <typename S>
using NormFn = void (*)(const S*, int64_t, int64_t, const NormMode&, S*);

template <typename S, int MT>
NormFn<S> pick_norm(int64_t lanes) {
  switch (lanes) {
    case 4:
      return &rows_norm<S, MT, 4>;
    case 8:
      return &rows_norm<S, MT, 8>;
    case 16:
      return &rows_norm<S, MT, 16>;
    default:
      return &rows_norm<S, MT, 0>;
  }
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

// float32 blocks of M = MT in {4, 8, 16}: chunks of kChunk blocks in structure-of-arrays form
// ([entry][block]), so that every step is a loop over blocks the compiler vectorises, lane by
// lane the same operations as evolve_range. The selection compares unique 64-bit keys (score
// key, preferred flag, reversed index), so ties need no second pass.
constexpr int64_t kChunk = 64;
constexpr uint32_t kMagnitude = 0x7FFFFFFFu;  // all bits but the sign

template <typename Code, bool RANKED, typename PCode, bool PRANKED, int MT>
void evolve_chunks_f32(const EvolveArgs& a, int64_t k0, int64_t k1) {
  float* w_data = static_cast<float*>(a.weight);
  const float* g_data = static_cast<const float*>(a.grad);
  const float* osc_in = static_cast<const float*>(a.osc_in);
  float* osc_out = static_cast<float*>(a.osc_out);
  float* norms = static_cast<float*>(a.norms);
  const int64_t ws = a.wl.s_in, gs = a.gl.s_in;
  const bool adam = a.revive_adam;
  const float lr = static_cast<float>(a.lr);
  const float gamma = static_cast<float>(a.gamma);
  const float one_minus_gamma = static_cast<float>(1.0 - a.gamma);
  const int64_t n = a.n;
  const bool top = 2 * n <= MT;  // pick the n best, or drop the MT - n worst
  const int64_t rounds = top ? n : MT - n;
  alignas(64) float w[MT][kChunk];
  alignas(64) float g[MT][kChunk];
  alignas(64) int64_t key[MT][kChunk];
  alignas(64) uint32_t kept[kChunk];
  alignas(64) uint32_t chosen[kChunk];
  alignas(64) int64_t extreme[kChunk];
  alignas(64) float sum[kChunk];
  alignas(64) float acc[kMaxM][kChunk];
  bool nonfinite = false;  // a gradient entry is NaN or inf (exponent all ones)
  Cursor cur(a.wl, a.gl, k0);
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    const int64_t nb = std::min(kChunk, k1 - c0);
    for (int64_t b = 0; b < nb; ++b, cur.next()) {
      float* wp = w_data + cur.off_a;
      const float* gp = g_data + cur.off_b;
      const uint64_t bits = decode<Code, RANKED>(a.kept, c0 + b);
      kept[b] = static_cast<uint32_t>(bits);
      uint32_t dirty = 0;
      for (int64_t j = 0; j < MT; ++j) {
        const float wj = wp[j * ws];
        const float gj = gp[j * gs];
        w[j][b] = wj;
        g[j][b] = gj;
        dirty |= static_cast<uint32_t>(std::bit_cast<uint32_t>(wj) != 0) << j;
        nonfinite |= (std::bit_cast<uint32_t>(gj) & 0x7F800000u) == 0x7F800000u;
      }
      dirty &= ~kept[b];
      if (a.zero_pruned && dirty) {  // NMEngine.zero_pruned_ (rare: pruned weights are +0.0)
        for (; dirty; dirty &= dirty - 1) {
          const int64_t j = __builtin_ctz(dirty);
          w[j][b] = 0.0f;
          wp[j * ws] = 0.0f;
        }
      }
    }
    for (int64_t b = nb; b < kChunk; ++b) {  // a short last chunk: inert lanes
      kept[b] = 0;
      for (int64_t j = 0; j < MT; ++j) w[j][b] = g[j][b] = 0.0f;
    }
    for (int64_t j = 0; j < MT; ++j) {
      const int64_t index = 127 - j;
      for (int64_t b = 0; b < kChunk; ++b) {
        const uint32_t on = 0u - ((kept[b] >> j) & 1u);  // all ones where kept
        const float gj = g[j][b];
        const uint32_t prune = std::bit_cast<uint32_t>(gj * w[j][b]) & kMagnitude;  // |G W|
        const float magnitude = std::bit_cast<float>(std::bit_cast<uint32_t>(gj) & kMagnitude);
        const float sq = gj * gj;  // Eq. 5: eta G^2, G^2 rounded first; or eta |G|
        const uint32_t revive = std::bit_cast<uint32_t>((adam ? magnitude : sq) * lr);
        const uint32_t bits = (prune & on) | (revive & ~on);
        const float score = std::bit_cast<float>(bits);
        key[j][b] = (static_cast<int64_t>(mono(score)) << 8) |
                    static_cast<int64_t>(on & 128u) | index;
      }
    }
    for (int64_t b = 0; b < kChunk; ++b) chosen[b] = 0;
    if constexpr (MT <= 8) {
      // Entry j is in when fewer than n keys are above its own.
      for (int64_t j = 0; j < MT; ++j) {
        for (int64_t b = 0; b < kChunk; ++b) extreme[b] = 0;
        for (int64_t i = 0; i < MT; ++i) {
          for (int64_t b = 0; b < kChunk; ++b) extreme[b] += key[i][b] > key[j][b];
        }
        for (int64_t b = 0; b < kChunk; ++b) {
          chosen[b] |= static_cast<uint32_t>(extreme[b] < n) << j;
        }
      }
    } else {
      for (int64_t r = 0; r < rounds; ++r) {
        for (int64_t b = 0; b < kChunk; ++b) extreme[b] = top ? INT64_MIN : INT64_MAX;
        for (int64_t j = 0; j < MT; ++j) {
          for (int64_t b = 0; b < kChunk; ++b) {
            const int64_t v = key[j][b];
            extreme[b] = top ? (v > extreme[b] ? v : extreme[b]) : (v < extreme[b] ? v : extreme[b]);
          }
        }
        for (int64_t j = 0; j < MT; ++j) {
          for (int64_t b = 0; b < kChunk; ++b) {
            const bool hit = key[j][b] == extreme[b];
            chosen[b] |= static_cast<uint32_t>(hit) << j;
            key[j][b] = hit ? (top ? INT64_MIN : INT64_MAX) : key[j][b];
          }
        }
      }
      if (!top) {
        for (int64_t b = 0; b < kChunk; ++b) chosen[b] = static_cast<uint32_t>(full_bits(MT)) & ~chosen[b];
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k = c0 + b;
      encode<PCode, PRANKED>(a.proposed, chosen[b], k);
      const float divergence = static_cast<float>(__builtin_popcount(kept[b] ^ chosen[b]));
      const float before = osc_in == nullptr ? 0.0f : osc_in[k];
      const float decayed = before * gamma;  // Eq. 8, as update_oscillation rounds it
      const float added = divergence * one_minus_gamma;
      osc_out[k] = decayed + added;
    }
    if (norms == nullptr) continue;
    // ATen's norm (rows_norm), lane by lane.
    const NormMode& mode = a.norm;
    const int64_t lanes = mode.lanes;
    const int64_t vectors = lanes <= MT ? MT / lanes : 0;
    const int64_t tail = MT - vectors * lanes;
    const int64_t grouped = mode.group > 0 ? tail / mode.group * mode.group : 0;
    for (int64_t b = 0; b < kChunk; ++b) sum[b] = 0.0f;
    if (vectors > 0) {
      for (int64_t l = 0; l < lanes; ++l) {
        for (int64_t b = 0; b < kChunk; ++b) acc[l][b] = 0.0f;
        for (int64_t v = 0; v < vectors; ++v) {
          const float* x = w[v * lanes + l];
          if (mode.lane_fma) {
            for (int64_t b = 0; b < kChunk; ++b) acc[l][b] = std::fma(x[b], x[b], acc[l][b]);
          } else {
            for (int64_t b = 0; b < kChunk; ++b) acc[l][b] = acc[l][b] + x[b] * x[b];
          }
        }
      }
      for (int64_t b = 0; b < kChunk; ++b) sum[b] = acc[0][b];
      for (int64_t l = 1; l < lanes; ++l) {
        for (int64_t b = 0; b < kChunk; ++b) sum[b] = sum[b] + acc[l][b];
      }
    }
    for (int64_t d = vectors * lanes; d < MT; ++d) {
      const float* x = w[d];
      if (d - vectors * lanes >= grouped && mode.tail_fma) {
        for (int64_t b = 0; b < kChunk; ++b) sum[b] = std::fma(x[b], x[b], sum[b]);
      } else {
        for (int64_t b = 0; b < kChunk; ++b) sum[b] = sum[b] + x[b] * x[b];
      }
    }
    for (int64_t b = 0; b < nb; ++b) norms[c0 + b] = std::sqrt(sum[b]);
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
