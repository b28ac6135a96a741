// The streamed pass of kept_simd.h for convolutions: float, M = 4, ranked codes, count 1, 2
// or 4, 8 <= S <= 16 (3x3, 3x5, 4x4 kernels), AVX2; the whole output channels (rows of S B
// blocks) inside a thread's range.
//
// A block's M entries lie S apart, so the kept entries of one spatial position s are strided
// in memory while their compact state (block order o, s, b) is contiguous along b. For 8
// channels (a pair of blocks b, b + 1) and 8 spatial positions, the 8 rows of 8 floats are
// read whole and transposed in registers: column s then holds blocks (s, b) and (s, b + 1)
// as an 8-float vector of an S = 1 weight holds two adjacent blocks, and the paired gather's
// lane tables (kept_simd.h) compact kGroup / (2 count) such columns into the group vector,
// kGroup kept entries whose state is contiguous. After the update the columns get their kept
// lanes back (blend), are transposed again and written as whole rows (unchanged entries are
// written with the values read, in the thread's own rows). Spatial positions left over
// (S mod 8) go one entry at a time. Values move unchanged and the arithmetic is the update
// rule's on kGroup entries, as on a chunk, so results are bit for bit those of the chunked
// path (kept_move.h), which takes what this pass does not. Dispatch: kept_streams.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kept_simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace bame {

constexpr int64_t kTileWidth = 8;  // spatial positions (and channels) per transposed tile

// Whether stream_tiles may take whole rows of it (float, AVX2, code dtype and lanes aside):
// groups of kGroup / count blocks must tile a row's B blocks, and S be at most kTileSpatial.
// .. note:: rows further apart (5x5 kernels, S = 25; a transposed [in, out] view, S = out)
//    ran slower this way than as kept_move.h's tiles (measured: 8-13% at S = 25, 40-60% at
//    S = 2304), where a tile reads 16 spatial positions of one channel.
inline bool tiles_possible(const Blocks& it) {
  if (it.spatial < kTileWidth || it.spatial > kTileSpatial) return false;
  if (it.m != kPairM || it.table == nullptr) return false;
  if (it.count != 1 && it.count != 2 && it.count != 4) return false;
  const int64_t blocks_per_group = kGroup / it.count;  // 2 kSlots pairs
  return it.blocks_per_row % blocks_per_group == 0;
}

#if defined(__AVX2__)
// In each 128-bit half, the 4x4 transpose of the halves of x[0..3] (rows become columns).
inline void transpose_halves(__m256& x0, __m256& x1, __m256& x2, __m256& x3) {
  const __m256 t0 = _mm256_unpacklo_ps(x0, x1), t1 = _mm256_unpackhi_ps(x0, x1);
  const __m256 t2 = _mm256_unpacklo_ps(x2, x3), t3 = _mm256_unpackhi_ps(x2, x3);
  x0 = _mm256_shuffle_ps(t0, t2, 0x44);
  x1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  x2 = _mm256_shuffle_ps(t1, t3, 0x44);
  x3 = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// x[j] = column j of the 8x8 tile whose row r is p[r stride + 0..7].
inline void load_transposed(const float* p, int64_t stride, __m256 (&x)[8]) {
  for (int r = 0; r < 4; ++r) {  // x[r] = row r | row r + 4, columns 0-3; x[r + 4]: 4-7
    for (int c = 0; c < 8; c += 4) {
      x[r + c] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p + r * stride + c)),
                                      _mm_loadu_ps(p + (r + 4) * stride + c), 1);
    }
  }
  transpose_halves(x[0], x[1], x[2], x[3]);
  transpose_halves(x[4], x[5], x[6], x[7]);
}

// Writes columns x[0..7] (changed) back as rows p[r stride + 0..7].
inline void store_transposed(float* p, int64_t stride, __m256 (&x)[8]) {
  transpose_halves(x[0], x[1], x[2], x[3]);  // x[r] = row r | row r + 4, columns 0-3
  transpose_halves(x[4], x[5], x[6], x[7]);
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < 8; c += 4) {
      _mm_storeu_ps(p + r * stride + c, _mm256_castps256_ps128(x[r + c]));
      _mm_storeu_ps(p + (r + 4) * stride + c, _mm256_extractf128_ps(x[r + c], 1));
    }
  }
}

constexpr int64_t kStateAhead = 64;  // entries of compact state asked for ahead of a group
constexpr int64_t kTileAheadBytes = 1024;  // weights and gradients asked for ahead

// Whole rows: blocks [r0, r1), both multiples of S B, of an item tiles_possible takes with
// it.lanes set; fn(w, g, e, len) as for stream_pairs; ahead(e) asks for the compact state's cache
// lines at entry e (the group's 8 spatial rows of state are 8 streams the hardware
// prefetchers do not follow well).
template <typename Code, int N, typename Fn, typename Ahead>
void stream_tiles(const Blocks& it, int64_t r0, int64_t r1, Fn& fn, const Ahead& ahead) {
  constexpr int64_t kSlots = kGroup / (2 * N);  // pairs of blocks per group
  constexpr int64_t kBlocks = 2 * kSlots;
  float* param = static_cast<float*>(it.param);
  const float* grad = static_cast<const float*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t S = it.spatial, B = it.blocks_per_row, ranks = it.ranks;
  const int64_t row = S * B, row_stride = it.channels * S;
  const int64_t pair_stride = 2 * kPairM * S;  // entries between the first rows of two pairs
  const int64_t transposed = S / kTileWidth * kTileWidth;  // s below it: transposed tiles
  const __m256i slot_of_lane =
      _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), N == 1 ? 1 : 2);
  const int64_t run_bytes = 2 * kPairM * S * static_cast<int64_t>(sizeof(float));
  alignas(32) float w[kGroup], g[kGroup];
  __m256 cw[kSlots][kTileWidth], cg[kSlots][kTileWidth];
  for (int64_t o = r0 / row; o < r1 / row; ++o) {
    float* prow = param + o * row_stride;
    const int64_t k_row = o * row;  // block (o, 0, 0)
    for (int64_t b = 0; b < B; b += kBlocks) {
      float* group = prow + b * kPairM * S;  // first entry of channel b M
      for (int64_t s0 = 0; s0 < transposed; s0 += kTileWidth) {
        for (int64_t p = 0; p < kSlots; ++p) {
          const float* rows = group + p * pair_stride + s0;
          const float* grows = grad + (rows - param);
          {  // the pair's rows are one run of 8 S entries: fetch the run ahead
            const char* run = reinterpret_cast<const char*>(rows) + kTileAheadBytes;
            const std::ptrdiff_t to_grad = reinterpret_cast<const char*>(grows) -
                                           reinterpret_cast<const char*>(rows);
            for (int64_t off = 0; off < run_bytes; off += 64) {
              __builtin_prefetch(run + off);
              __builtin_prefetch(run + off + to_grad);
            }
          }
          __m256 x[8], y[8];
          load_transposed(rows, S, x);
          load_transposed(grows, S, y);
          for (int r = 0; r < 8; ++r) {
            cw[p][r] = x[r];
            cg[p][r] = y[r];
          }
        }
        for (int64_t s = 0; s < kTileWidth; ++s) {
          const int64_t k = k_row + (s0 + s) * B + b;  // the group's first block
          ahead(k * N + kStateAhead);
          const int32_t* entry[kSlots];
          __m256 wv = _mm256_setzero_ps(), gv = _mm256_setzero_ps();
          for (int64_t p = 0; p < kSlots; ++p) {
            const int64_t pair = static_cast<int64_t>(code[k + 2 * p]) * ranks +
                                 static_cast<int64_t>(code[k + 2 * p + 1]);
            entry[p] = it.lanes + (pair * kSlots + p) * kPairEntry;
            const __m256i to = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[p]));
            const __m256 wp = _mm256_permutevar8x32_ps(cw[p][s], to);
            const __m256 gp = _mm256_permutevar8x32_ps(cg[p][s], to);
            if constexpr (kSlots == 1) {
              wv = wp;
              gv = gp;
            } else {  // the slot's lanes of the group vector: [2 N p, 2 N (p + 1))
              const __m256 mine = _mm256_castsi256_ps(
                  _mm256_cmpeq_epi32(slot_of_lane, _mm256_set1_epi32(static_cast<int>(p))));
              wv = _mm256_blendv_ps(wv, wp, mine);
              gv = _mm256_blendv_ps(gv, gp, mine);
            }
          }
          _mm256_store_ps(w, wv);
          _mm256_store_ps(g, gv);
          fn(w, g, k * N, kGroup);
          wv = _mm256_load_ps(w);
          for (int64_t p = 0; p < kSlots; ++p) {
            const __m256i from =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[p] + kGroup));
            const __m256 kept = _mm256_castsi256_ps(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(entry[p] + 2 * kGroup)));
            cw[p][s] = _mm256_blendv_ps(cw[p][s], _mm256_permutevar8x32_ps(wv, from), kept);
          }
        }
        for (int64_t p = 0; p < kSlots; ++p) {
          float* rows = group + p * pair_stride + s0;
          __m256 x[8];
          for (int r = 0; r < 8; ++r) x[r] = cw[p][r];
          store_transposed(rows, S, x);
        }
      }
      for (int64_t s = transposed; s < S; ++s) {  // the rest, one entry at a time
        const int64_t k = k_row + s * B + b;
        ahead(k * N + kStateAhead);
        float* where[kGroup];
        for (int64_t i = 0; i < kBlocks; ++i) {
          const int32_t* pos = it.table + static_cast<int64_t>(code[k + i]) * N;
          float* base = group + i * kPairM * S + s;
          for (int64_t j = 0; j < N; ++j) {
            float* at = base + static_cast<int64_t>(pos[j]) * S;
            where[i * N + j] = at;
            w[i * N + j] = *at;
            g[i * N + j] = grad[at - param];
          }
        }
        fn(w, g, k * N, kGroup);
        for (int64_t i = 0; i < kGroup; ++i) *where[i] = w[i];
      }
    }
  }
}
#endif

}  // namespace bame
