// The evolve pass's arguments (EvolveArgs) and its float32 structure-of-arrays form for M in
// {4, 8, 16} (evolve_chunks_f32), which evolve_cpu.cpp dispatches to beside its generic
// evolve_range; the same operations lane by lane, so the same bits.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "evolve_common.h"
#include "evolve_norm.h"

namespace bame_evolve {

// One parameter of evolve_blocks: its block layouts, codes, oscillation and outputs.
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
  bool flat;  // weight and grad contiguous, dimension 1 the last one of size > 1: block k at k m
  std::atomic<bool>* finite;  // cleared where the gradient holds NaN or inf
};

// float32 blocks of M = MT in {4, 8, 16}: chunks of kChunk blocks in structure-of-arrays form
// ([entry][block]), so that every step is a loop over blocks the compiler vectorises, lane by
// lane the same operations as evolve_range. The selection compares unique 64-bit keys (score
// key, preferred flag, reversed index), so ties need no second pass.
constexpr int64_t kChunk = 64;
constexpr uint32_t kMagnitude = 0x7FFFFFFFu;  // all bits but the sign

// NMEngine.zero_pruned_ for block b of a chunk (rare: pruned weights are +0.0): +0.0 in the
// weight (entry j at at[j * stride]) and in the chunk's copy w wherever `dirty` has a bit.
template <int MT>
inline void zero_dirty(uint32_t dirty, float* at, int64_t stride, float (&w)[MT][kChunk],
                       int64_t b) {
  for (; dirty; dirty &= dirty - 1) {
    const int64_t j = __builtin_ctz(dirty);
    w[j][b] = 0.0f;
    at[j * stride] = 0.0f;
  }
}

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
  // Block k at offset k * MT in both tensors (a.flat): the chunk is read as two runs of floats
  // and transposed, the checks vectorised.
  const bool flat = a.flat;
  alignas(64) uint32_t nonzero[kChunk];
  Cursor cur(a.wl, a.gl, k0);
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    const int64_t nb = std::min(kChunk, k1 - c0);
    if (flat) {
      float* wc = w_data + c0 * MT;
      const float* gc = g_data + c0 * MT;
      for (int64_t b = 0; b < nb; ++b) {
        kept[b] = static_cast<uint32_t>(decode<Code, RANKED>(a.kept, c0 + b));
      }
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t j = 0; j < MT; ++j) {
          w[j][b] = wc[b * MT + j];
          g[j][b] = gc[b * MT + j];
        }
      }
      uint32_t exponent = 0;  // a gradient entry is NaN or inf (exponent all ones)
      for (int64_t i = 0; i < nb * MT; ++i) {
        exponent |= static_cast<uint32_t>(
            (std::bit_cast<uint32_t>(gc[i]) & 0x7F800000u) == 0x7F800000u);
      }
      nonfinite |= exponent != 0;
      for (int64_t b = 0; b < nb; ++b) nonzero[b] = 0;
      for (int64_t j = 0; j < MT; ++j) {
        for (int64_t b = 0; b < nb; ++b) {
          nonzero[b] |= static_cast<uint32_t>(std::bit_cast<uint32_t>(w[j][b]) != 0) << j;
        }
      }
      if (a.zero_pruned) {
        for (int64_t b = 0; b < nb; ++b) zero_dirty(nonzero[b] & ~kept[b], wc + b * MT, 1, w, b);
      }
    } else {
      for (int64_t b = 0; b < nb; ++b, cur.next()) {
        float* wp = w_data + cur.off_a;
        const float* gp = g_data + cur.off_b;
        const uint64_t bits = decode<Code, RANKED>(a.kept, c0 + b);
        kept[b] = static_cast<uint32_t>(bits);
        uint32_t nonzero_bits = 0;
        for (int64_t j = 0; j < MT; ++j) {
          const float wj = wp[j * ws];
          const float gj = gp[j * gs];
          w[j][b] = wj;
          g[j][b] = gj;
          nonzero_bits |= static_cast<uint32_t>(std::bit_cast<uint32_t>(wj) != 0) << j;
          nonfinite |= (std::bit_cast<uint32_t>(gj) & 0x7F800000u) == 0x7F800000u;
        }
        if (a.zero_pruned) zero_dirty(nonzero_bits & ~kept[b], wp, ws, w, b);
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
      // Entry j is in when fewer than n keys are above its own (the count in a register).
      for (int64_t j = 0; j < MT; ++j) {
        for (int64_t b = 0; b < kChunk; ++b) {
          int64_t above = 0;
          for (int64_t i = 0; i < MT; ++i) above += key[i][b] > key[j][b];
          chosen[b] |= static_cast<uint32_t>(above < n) << j;
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
    // A vector square root (std::sqrt's scalar one waits on errno handling): exact either way.
    using Vec = at::vec::Vectorized<float>;
    int64_t b = 0;
    for (; b + Vec::size() <= nb; b += Vec::size()) Vec::loadu(sum + b).sqrt().store(norms + c0 + b);
    for (; b < nb; ++b) norms[c0 + b] = std::sqrt(sum[b]);
  }
  if (nonfinite) a.finite->store(false, std::memory_order_relaxed);
}

}  // namespace bame_evolve
