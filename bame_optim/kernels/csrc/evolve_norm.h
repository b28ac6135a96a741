// ATen's last-dimension L2 norm (the path torch.linalg.vector_norm takes over contiguous rows),
// modelled for the evolve pass's block norms (evolve_cpu.cpp) and its probe: the lane count and
// fused multiply-adds come from a probe in Python (bame_optim/kernels/evolve_cpu.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "evolve_common.h"  // kMaxM

namespace bame_evolve {

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

}  // namespace bame_evolve
