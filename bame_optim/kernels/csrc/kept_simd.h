// One streaming pass over the kept entries of a sparse parameter: kGroup kept entries at a
// time are gathered into registers (or a few stack slots), handed to the update rule with
// the compact state at their offset, and written back, so the weight, gradient and state
// streams advance together (the hardware prefetchers see all of them) and no chunk is read
// twice. Two gathers:
//
// * Paired (float, S = 1, M = 4 or 8: Linear weights, 1x1 convolutions; count 1, 2 or 4): two
//   adjacent blocks of 4 (or one block of 8) fill one 8-lane AVX2 vector; a table indexed by
//   their pair of ranks (or the rank) gives the lane permutation that moves their kept
//   entries into the group's compact vector, and the one (with the blend mask of kept lanes)
//   that puts them back. Whole vectors are read and written.
// * Scalar (S = 1, any M, ranked codes, a count dividing kGroup): one entry at a time.
//
// Values move unchanged (bit for bit); the arithmetic is the update rule's, on kGroup
// contiguous entries, exactly as on a chunk. Blocks a stream leaves at the end of a range
// (fewer than a group) go through the chunked path. Convolutions (8 <= S <= 16) reuse the
// paired gather's tables through transposed tiles: kept_tiles.h.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "kept_move.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace bame {

constexpr int64_t kGroup = 8;  // kept entries per streamed group (one AVX2 float vector)
constexpr int64_t kMaxRun = 16;  // the most kept entries a stream hands its update at once
constexpr int64_t kPairM = 4;  // block size of the paired gather
constexpr int64_t kPairEntry = 3 * kGroup;  // int32 per (pair, slot): to, from, mask

// The paired gather's table for count entries kept per block of m (kPairM: a pair of blocks
// per vector; 2 kPairM: one block): for every pair of ranks (r0, r1), or rank r0, and slot p
// (the vector's place in its group: kGroup / (8 / m count) vectors fill a group) the lanes
// "to" that move the vector's kept entries (block 0's, then block 1's, in order) to lanes
// [8 / m count p, 8 / m count (p + 1)) of the group vector, the lanes "from" that bring them
// back, and the mask (-1) of the vector's kept lanes. positions: [ranks, count].
inline std::vector<int32_t> pair_lanes(const int32_t* positions, int64_t ranks, int64_t count,
                                       int64_t m) {
  const int64_t per_vector = kGroup / m;  // blocks: 2 or 1
  const int64_t slots = kGroup / (per_vector * count);
  const int64_t tuples = per_vector == 2 ? ranks * ranks : ranks;
  std::vector<int32_t> lanes(tuples * slots * kPairEntry, 0);
  for (int64_t tuple = 0; tuple < tuples; ++tuple) {
    const int64_t rank[2] = {per_vector == 2 ? tuple / ranks : tuple, tuple % ranks};
    for (int64_t p = 0; p < slots; ++p) {
      int32_t* entry = lanes.data() + (tuple * slots + p) * kPairEntry;
      for (int64_t half = 0; half < per_vector; ++half) {
        for (int64_t j = 0; j < count; ++j) {
          const auto lane = static_cast<int32_t>(half * m + positions[rank[half] * count + j]);
          const auto slot = static_cast<int32_t>(per_vector * count * p + half * count + j);
          entry[slot] = lane;
          entry[kGroup + lane] = slot;
          entry[2 * kGroup + lane] = -1;
        }
      }
    }
  }
  return lanes;
}

// 8 <= S <= 16 layouts of blocks of kPairM read the pair tables too, through transposed tiles
// (kept_tiles.h).
inline bool pairs_possible(const Blocks& it) {
  const bool pairs =
      it.m == kPairM && (it.spatial == 1 || (it.spatial >= 8 && it.spatial <= kTileSpatial));
  const bool eights = it.m == 2 * kPairM && it.spatial == 1;
  return (pairs || eights) && it.table != nullptr &&
         (it.count == 1 || it.count == 2 || it.count == 4);
}

// Tables an item's moves read, built once per call and decoding table: `lanes` the pair
// tables, `offsets` positions times S (key: decoding table and S).
struct Tables {
  std::map<const int32_t*, std::vector<int32_t>> lanes;
  std::map<std::pair<const int32_t*, int64_t>, std::vector<int32_t>> offsets;
};

// Points it.lanes at the pair table of its decoding table where the paired gather may take
// it, and it.offsets at positions times S for S > 1 (ranked codes).
inline void attach_tables(Blocks& it, Tables& store) {
  if (it.table == nullptr) return;
  if (pairs_possible(it)) {
    auto found = store.lanes.find(it.table);
    if (found == store.lanes.end()) {
      found = store.lanes.emplace(it.table, pair_lanes(it.table, it.ranks, it.count, it.m))
                  .first;
    }
    it.lanes = found->second.data();
  }
  if (it.spatial > 1) {
    auto key = std::make_pair(it.table, it.spatial);
    auto found = store.offsets.find(key);
    if (found == store.offsets.end()) {
      std::vector<int32_t> offsets(it.ranks * it.count);
      for (size_t i = 0; i < offsets.size(); ++i) {
        offsets[i] = static_cast<int32_t>(it.table[i] * it.spatial);
      }
      found = store.offsets.emplace(key, std::move(offsets)).first;
    }
    it.offsets = found->second.data();
  }
}

#if defined(__AVX2__)
// Blocks [k0, k1) of a float S = 1 item with blocks of 8 / PER_VECTOR (4 or 8) and N kept per
// block, a group (8 / N blocks) at a time: fn(w, g, e, len) updates the group's len = kGroup
// kept weights w (in place) and gradients g, whose compact state starts at entry e. Returns
// the first block not handled.
template <typename Code, int N, int PER_VECTOR, typename Fn>
int64_t stream_pairs(const Blocks& it, int64_t k0, int64_t k1, Fn& fn) {
  constexpr int64_t kSlots = kGroup / (PER_VECTOR * N);
  constexpr int64_t kBlocks = PER_VECTOR * kSlots;  // per group
  constexpr int kSlotShift = PER_VECTOR * N == 1 ? 0 : PER_VECTOR * N == 2 ? 1 : 2;
  float* param = static_cast<float*>(it.param);
  const float* grad = static_cast<const float*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t ranks = it.ranks;
  alignas(32) float w[kGroup], g[kGroup];
  int64_t k = k0;
  for (; k + kBlocks <= k1; k += kBlocks) {
    float* p = param + k * (kGroup / PER_VECTOR);
    const float* q = grad + (p - param);
    const int32_t* entry[kSlots];
    __m256 weights[kSlots];
    __m256 wv = _mm256_setzero_ps(), gv = _mm256_setzero_ps();
    for (int64_t s = 0; s < kSlots; ++s) {
      // A vector is 32 bytes: every line is asked for (some twice).
      _mm_prefetch(reinterpret_cast<const char*>(p + s * kGroup) + kPrefetchBytes,
                   _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + s * kGroup) + kPrefetchBytes,
                   _MM_HINT_T0);
      int64_t pair = static_cast<int64_t>(code[k + PER_VECTOR * s]);
      if constexpr (PER_VECTOR == 2) {
        pair = pair * ranks + static_cast<int64_t>(code[k + 2 * s + 1]);
      }
      entry[s] = it.lanes + (pair * kSlots + s) * kPairEntry;
      const __m256i to = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[s]));
      weights[s] = _mm256_loadu_ps(p + s * kGroup);
      const __m256 wp = _mm256_permutevar8x32_ps(weights[s], to);
      const __m256 gp = _mm256_permutevar8x32_ps(_mm256_loadu_ps(q + s * kGroup), to);
      if constexpr (kSlots == 1) {
        wv = wp;
        gv = gp;
      } else {  // the slot's lanes of the group vector: [PER_VECTOR N s, PER_VECTOR N (s + 1))
        const __m256 mine = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
            _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), kSlotShift),
            _mm256_set1_epi32(static_cast<int>(s))));
        wv = _mm256_blendv_ps(wv, wp, mine);
        gv = _mm256_blendv_ps(gv, gp, mine);
      }
    }
    _mm256_store_ps(w, wv);
    _mm256_store_ps(g, gv);
    fn(w, g, k * N, kGroup);
    wv = _mm256_load_ps(w);
    for (int64_t s = 0; s < kSlots; ++s) {
      const __m256i from =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[s] + kGroup));
      const __m256 kept = _mm256_castsi256_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[s] + 2 * kGroup)));
      _mm256_storeu_ps(p + s * kGroup,
                       _mm256_blendv_ps(weights[s], _mm256_permutevar8x32_ps(wv, from), kept));
    }
  }
  return k;
}
#endif

// Blocks [k0, k1) of any item with ranked codes and N kept per block (N divides kGroup), one
// entry at a time in block order; fn as for stream_pairs. Returns the first block not handled.
template <typename T, typename Code, int N, typename Fn>
int64_t stream_scalar(const Blocks& it, int64_t k0, int64_t k1, Fn& fn) {
  constexpr int64_t kBlocks = kGroup / N;
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t S = it.spatial, B = it.blocks_per_row;
  const int64_t row_stride = it.channels * S;
  const int64_t block_stride = it.m * S;
  int64_t o = k0 / (S * B);
  const int64_t rest = k0 % (S * B);
  int64_t s = rest / B, b = rest % B;
  T* base = param + o * row_stride + s + b * block_stride;
  alignas(64) T w[kGroup], g[kGroup];
  std::array<T*, kGroup> where;
  // .. note:: one entry per block of a cache line or more (1:16) runs without software
  //    prefetch, which the hardware prefetchers cover: fetching 1 KiB ahead of every block
  //    took 6-15% more time there at one thread and 1-19% at two in five of six runs
  //    (benchmarks.kernel_ab, Zen 4, DeiT-small and GPT-2 Linear shapes), while it saved
  //    5-10% at 1:8 and 6-14% at 2:16 at one thread.
  const bool fetch = N > 1 || it.m * static_cast<int64_t>(sizeof(T)) < 64;
  int64_t k = k0;
  for (; k + kBlocks <= k1; k += kBlocks) {
    for (int64_t i = 0; i < kBlocks; ++i) {
      const T* gbase = grad + (base - param);
      if (fetch) {
        __builtin_prefetch(reinterpret_cast<const char*>(base) + kPrefetchBytes);
        __builtin_prefetch(reinterpret_cast<const char*>(gbase) + kPrefetchBytes);
      }
      const int32_t* pos = it.table + static_cast<int64_t>(code[k + i]) * N;
      for (int64_t j = 0; j < N; ++j) {
        const int64_t off = static_cast<int64_t>(pos[j]) * S;
        where[i * N + j] = base + off;
        w[i * N + j] = base[off];
        g[i * N + j] = gbase[off];
      }
      if (++b == B) {  // the next (o, s) row of blocks
        b = 0;
        if (++s == S) {
          s = 0;
          ++o;
        }
        base = param + o * row_stride + s;
      } else {
        base += block_stride;
      }
    }
    fn(w, g, k * N, kGroup);
    for (int64_t i = 0; i < kGroup; ++i) *where[i] = w[i];
  }
  return k;
}

template <typename T, typename Code, typename Fn>
int64_t stream_code(const Blocks& it, int64_t k0, int64_t k1, Fn& fn) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (it.lanes != nullptr) {
      const bool pairs = it.m == kPairM;  // else one block of 8 per vector
      switch (it.count) {
        case 1:
          return pairs ? stream_pairs<Code, 1, 2>(it, k0, k1, fn)
                       : stream_pairs<Code, 1, 1>(it, k0, k1, fn);
        case 2:
          return pairs ? stream_pairs<Code, 2, 2>(it, k0, k1, fn)
                       : stream_pairs<Code, 2, 1>(it, k0, k1, fn);
        case 4:
          return pairs ? stream_pairs<Code, 4, 2>(it, k0, k1, fn)
                       : stream_pairs<Code, 4, 1>(it, k0, k1, fn);
        default:
          break;
      }
    }
  }
#endif
  switch (it.count) {
    case 1:
      return stream_scalar<T, Code, 1>(it, k0, k1, fn);
    case 2:
      return stream_scalar<T, Code, 2>(it, k0, k1, fn);
    case 4:
      return stream_scalar<T, Code, 4>(it, k0, k1, fn);
    case 8:
      return stream_scalar<T, Code, 8>(it, k0, k1, fn);
    default:
      return k0;
  }
}

// Streams what it can of blocks [k0, k1) (float and double, ranked codes); fn(w, g, e, len) as for
// stream_pairs. Returns the first block not handled (k0 where no stream applies).
template <typename T, typename Fn>
int64_t stream(const Blocks& it, int64_t k0, int64_t k1, Fn& fn) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (it.table == nullptr || it.spatial > 1) return k0;  // S > 1: tiles (kept_move.h)
    switch (it.code_dtype) {
      case at::kByte:
        return stream_code<T, uint8_t>(it, k0, k1, fn);
      case at::kShort:
        return stream_code<T, int16_t>(it, k0, k1, fn);
      default:
        return k0;
    }
  }
  return k0;
}

}  // namespace bame
