// The streamed pass of kept_tiles.h for 3x3 convolutions with AVX-512 (S = 9, float, M = 4,
// ranked codes, count 1, 2 or 4), chosen at run time: compiled with a target attribute, taken
// only where the caller allows it (Blocks::avx512) and the CPU has AVX-512 F/BW/DQ/VL.
//
// 16 input channels (4 blocks) of one output channel are 144 consecutive floats, 9 full
// 512-bit vectors. Two rounds of a 3-way de-interleave (2 permutes per output vector: one
// two-source vpermt2ps, one masked vpermps) turn them into the 9 columns s, each the 16
// channels' entries at kernel position s, without the lane waste of an 8-wide transpose
// and without the one-entry-at-a-time leftover column (S mod 8) of the AVX2 tiles. A column
// holds 4 blocks (s, b .. b + 3), whose kept entries, 4 count, are contiguous in the compact
// state: vcompressps packs them (mask from the codes), the update rule runs on them, and
// vexpandps puts them back in their lanes; the columns are interleaved again and written as
// whole rows. Values move unchanged and the arithmetic is the update rule's on kGroup
// entries, so results are bit for bit those of the AVX2 tiles and the chunked path.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kept_simd.h"
#include "kept_tiles.h"  // kStateAhead

#if defined(__AVX2__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BAME_HAVE_AVX512 1
#include <immintrin.h>
// The AVX-512 functions only; the rest of the extension keeps the build's flags (AVX2).
#define BAME_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#else
#define BAME_HAVE_AVX512 0
#endif

namespace bame {

// Whether this CPU runs the AVX-512 paths (F, BW, DQ, VL; always false where they are not
// compiled in).
inline bool cpu_has_avx512() {
#if BAME_HAVE_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

constexpr int64_t kTile9 = 9;             // S of the AVX-512 tiles (3x3 kernels)
constexpr int64_t kTile9Blocks = 4;       // blocks (of kPairM channels) per tile: 16 lanes
constexpr int64_t kTile9MaxRanks = 6;     // C(4, 2): the most ranks an M = 4 table has
// Kept entries per s updated at once (2 tiles at 2:4). Longer runs amortise the update's
// set-up but lengthen the phases (read, update, write) the out-of-order window must bridge:
// on ResNet-50's 3x3 weights at 2:4 (one thread, Zen 4) runs of 8 or 16 took 0.7-0.8 of the
// AVX2 tiles' time, runs of 64 0.92-0.97.
constexpr int64_t kTile9Run = 16;

// Whether stream_tiles9 may take whole rows of it (float and the code dtype aside).
inline bool tiles9_possible(const Blocks& it) {
  return it.avx512 && it.spatial == kTile9 && it.m == kPairM && it.table != nullptr &&
         (it.count == 1 || it.count == 2 || it.count == 4) && it.ranks <= kTile9MaxRanks &&
         it.blocks_per_row % kTile9Blocks == 0;
}

#if BAME_HAVE_AVX512
// Lane tables of the 3-way de-interleave (y_t[i] = x[3 i + t] of the 48 floats x0 x1 x2)
// and its inverse. One index vector serves both permutes of an output: vpermt2ps reads its
// low 5 bits (x0 or x1), the masked vpermps for the lanes from x2 its low 4.
struct Deinterleave3 {
  __m512i index[3];     // de-interleave: 3 i + t
  __mmask16 high[3];    // lanes taken from x2 (3 i + t >= 32)
  __m512i back[3];      // interleave, output k: lane l = 16 k + l = 3 i + t takes y_t[i]
  __mmask16 third[3];   // lanes from y2 (t = 2)

  BAME_AVX512 Deinterleave3() {
    alignas(64) int32_t lanes[16];
    for (int t = 0; t < 3; ++t) {
      high[t] = 0;
      for (int i = 0; i < 16; ++i) {
        lanes[i] = 3 * i + t;
        if (3 * i + t >= 32) high[t] = static_cast<__mmask16>(high[t] | (1u << i));
      }
      index[t] = _mm512_load_si512(lanes);
    }
    for (int k = 0; k < 3; ++k) {
      third[k] = 0;
      for (int l = 0; l < 16; ++l) {
        const int f = 16 * k + l, t = f % 3, i = f / 3;
        lanes[l] = i + (t == 1 ? 16 : 0);
        if (t == 2) third[k] = static_cast<__mmask16>(third[k] | (1u << l));
      }
      back[k] = _mm512_load_si512(lanes);
    }
  }

  // y[t] = entries t, t + 3, ... of x0 x1 x2.
  BAME_AVX512 BAME_ALWAYS_INLINE void split(__m512 x0, __m512 x1, __m512 x2, __m512& y0,
                                            __m512& y1, __m512& y2) const {
    __m512* y[3] = {&y0, &y1, &y2};
    for (int t = 0; t < 3; ++t) {
      *y[t] = _mm512_mask_permutexvar_ps(_mm512_permutex2var_ps(x0, index[t], x1), high[t],
                                         index[t], x2);
    }
  }

  // The inverse of split.
  BAME_AVX512 BAME_ALWAYS_INLINE void join(__m512 y0, __m512 y1, __m512 y2, __m512& x0,
                                           __m512& x1, __m512& x2) const {
    __m512* x[3] = {&x0, &x1, &x2};
    for (int k = 0; k < 3; ++k) {
      *x[k] = _mm512_mask_permutexvar_ps(_mm512_permutex2var_ps(y0, back[k], y1), third[k],
                                         back[k], y2);
    }
  }

  // col[s] = the 16 entries s, s + 9, ... of the tile's 144 (x[0..8], in memory order).
  BAME_AVX512 BAME_ALWAYS_INLINE void columns(const __m512 (&x)[9], __m512 (&col)[9]) const {
    __m512 u[3][3];  // u[t][v]: entries 3 q + t, q = 16 v .. 16 v + 15
    for (int v = 0; v < 3; ++v) {
      split(x[3 * v], x[3 * v + 1], x[3 * v + 2], u[0][v], u[1][v], u[2][v]);
    }
    for (int t = 0; t < 3; ++t) split(u[t][0], u[t][1], u[t][2], col[t], col[3 + t], col[6 + t]);
  }

  // The inverse of columns.
  BAME_AVX512 BAME_ALWAYS_INLINE void rows(const __m512 (&col)[9], __m512 (&x)[9]) const {
    __m512 u[3][3];
    for (int t = 0; t < 3; ++t) join(col[t], col[3 + t], col[6 + t], u[t][0], u[t][1], u[t][2]);
    for (int v = 0; v < 3; ++v) {
      join(u[0][v], u[1][v], u[2][v], x[3 * v], x[3 * v + 1], x[3 * v + 2]);
    }
  }
};

// Lane indices first, first + 1, ... (a permute by them moves lane first + l to lane l).
BAME_AVX512 BAME_ALWAYS_INLINE __m512i lanes_from(int64_t first) {
  return _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                          _mm512_set1_epi32(static_cast<int>(first)));
}

// Tile t's column packed into quarter t of a run (count 1), half t (count 2), or the run
// itself (count 4).
template <int N>
BAME_AVX512 BAME_ALWAYS_INLINE void pack(__m512& run, int64_t t, __mmask16 kept, __m512 col) {
  if constexpr (N == kPairM) {
    run = col;
  } else if constexpr (N == 1) {
    const __m512 packed = _mm512_maskz_compress_ps(kept, col);  // lanes 0-3
    run = _mm512_mask_permutexvar_ps(run, static_cast<__mmask16>(0xFu << (4 * t)),
                                     lanes_from(-4 * t), packed);
  } else {
    const __m512 packed = _mm512_maskz_compress_ps(kept, col);
    run = t == 0 ? packed : _mm512_insertf32x8(run, _mm512_castps512_ps256(packed), 1);
  }
}

// The inverse of pack: tile t's kept entries of the run, in lanes 0 .. 4 N - 1.
template <int N>
BAME_AVX512 BAME_ALWAYS_INLINE __m512 unpack(__m512 run, int64_t t) {
  if constexpr (N == 1) {
    return _mm512_permutexvar_ps(lanes_from(4 * t), run);
  } else {
    return t == 0 ? run : _mm512_shuffle_f32x4(run, run, 0xEE);
  }
}

// Whole rows: blocks [r0, r1), both multiples of 9 B, of an item tiles9_possible takes, N
// kept per block; fn and ahead as for stream_tiles (kept_tiles.h). Up to kStrip tiles along
// the channels go together: for each s their columns' kept entries are one contiguous run
// of compact state, so the update runs once per s on up to kStrip 4 N entries.
template <typename Code, int N, typename Fn, typename Ahead>
BAME_AVX512 void stream_tiles9(const Blocks& it, int64_t r0, int64_t r1, Fn& fn,
                               const Ahead& ahead) {
  constexpr int64_t kKept = kTile9Blocks * N;  // kept entries of a column
  constexpr int64_t kStrip = kTile9Run > kKept ? kTile9Run / kKept : 1;  // tiles per strip
  constexpr int64_t kTileFloats = kTile9 * kTile9Blocks * kPairM;  // 144
  constexpr int64_t kAheadFloats = 2 * kTileFloats;  // weights and gradients asked for ahead
  constexpr int64_t kRun = kStrip * kKept;  // kept entries per s of a strip
  static_assert(kRun == 16 && kRun <= kMaxRun, "one vector per run");

  float* param = static_cast<float*>(it.param);
  const float* grad = static_cast<const float*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t B = it.blocks_per_row, ranks = it.ranks;
  const int64_t row = kTile9 * B, row_stride = it.channels * kTile9;
  // Kept lanes of two blocks by their pair of ranks (block 0: bits 0-3).
  uint8_t pair_mask[kTile9MaxRanks * kTile9MaxRanks];
  for (int64_t a = 0; a < ranks; ++a) {
    for (int64_t c = 0; c < ranks; ++c) {
      unsigned bits = 0;
      for (int64_t j = 0; j < N; ++j) {
        bits |= 1u << it.table[a * N + j];
        bits |= 1u << (kPairM + it.table[c * N + j]);
      }
      pair_mask[a * ranks + c] = static_cast<uint8_t>(bits);
    }
  }
  const Deinterleave3 lanes;
  // Per s, the strip's kept weights and gradients (a run of compact state); the columns of
  // weights as read (their other lanes are written back unchanged) and the kept masks.
  alignas(64) float w[kTile9][kRun], g[kTile9][kRun];
  __m512 wpack[kTile9], gpack[kTile9];  // the runs being packed
  __m512 cols[kStrip][kTile9];
  __mmask16 kept[kStrip][kTile9];
  for (int64_t o = r0 / row; o < r1 / row; ++o) {
    const int64_t k_row = o * row;  // block (o, 0, 0)
    float* prow = param + o * row_stride;
    for (int64_t b0 = 0; b0 < B; b0 += kStrip * kTile9Blocks) {
      const int64_t tiles = std::min(kStrip, (B - b0) / kTile9Blocks);
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t b = b0 + t * kTile9Blocks;
        float* tile = prow + b * kPairM * kTile9;
        const float* gtile = grad + (tile - param);
        for (int64_t off = 0; off < kTileFloats; off += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(tile + kAheadFloats + off), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(gtile + kAheadFloats + off), _MM_HINT_T0);
        }
        for (int64_t s = 0; s < kTile9; ++s) {
          if constexpr (N == kPairM) {
            kept[t][s] = 0xFFFF;
          } else {
            const Code* c = code + k_row + s * B + b;
            const int64_t p0 = static_cast<int64_t>(c[0]) * ranks + static_cast<int64_t>(c[1]);
            const int64_t p1 = static_cast<int64_t>(c[2]) * ranks + static_cast<int64_t>(c[3]);
            kept[t][s] = static_cast<__mmask16>(pair_mask[p0] | (pair_mask[p1] << 8));
          }
        }
        __m512 x[kTile9], col[kTile9];
        for (int64_t v = 0; v < kTile9; ++v) x[v] = _mm512_loadu_ps(gtile + 16 * v);
        lanes.columns(x, col);
        for (int64_t s = 0; s < kTile9; ++s) pack<N>(gpack[s], t, kept[t][s], col[s]);
        for (int64_t v = 0; v < kTile9; ++v) x[v] = _mm512_loadu_ps(tile + 16 * v);
        lanes.columns(x, cols[t]);
        for (int64_t s = 0; s < kTile9; ++s) pack<N>(wpack[s], t, kept[t][s], cols[t][s]);
      }
      // One whole-vector store per run: the update's 16-float loads would not be forwarded
      // from two 8-float stores (a stall of tens of cycles each, measured).
      for (int64_t s = 0; s < kTile9; ++s) {
        _mm512_store_ps(w[s], wpack[s]);
        _mm512_store_ps(g[s], gpack[s]);
      }
      const int64_t len = tiles * kKept;
      for (int64_t s = 0; s < kTile9; ++s) {
        const int64_t e = (k_row + s * B + b0) * N;  // the run's first compact entry
        for (int64_t x = 0; x < len; x += 16) ahead(e + x + kStateAhead);
        fn(w[s], g[s], e, len);
      }
      for (int64_t s = 0; s < kTile9; ++s) wpack[s] = _mm512_load_ps(w[s]);
      for (int64_t t = 0; t < tiles; ++t) {
        __m512 x[kTile9], col[kTile9];
        for (int64_t s = 0; s < kTile9; ++s) {
          if constexpr (N == kPairM) {
            col[s] = wpack[s];
          } else {
            col[s] = _mm512_mask_expand_ps(cols[t][s], kept[t][s], unpack<N>(wpack[s], t));
          }
        }
        lanes.rows(col, x);
        float* tile = prow + (b0 + t * kTile9Blocks) * kPairM * kTile9;
        for (int64_t v = 0; v < kTile9; ++v) _mm512_storeu_ps(tile + 16 * v, x[v]);
      }
    }
  }
}
#endif

}  // namespace bame
