// Moving the kept entries of an N:M parameter between the parameter and per-thread chunk
// arrays in block order, for the fused kept-SGD and kept-AdamW CPU kernels: one block at a
// time (move_kept), or a tile at a time in memory order for S > 1 (move_tile); the streamed
// paths are in kept_simd.h.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kept_common.h"

namespace bame {

// Moves the kept entries of blocks [k0, k1) between the parameter and the chunk arrays (block
// order): SCATTER false copies weights and gradients into w and g, true writes w back. The
// positions are decoded again for the scatter (from L1) rather than stored.
template <typename T>
using MoveFn = void (*)(const Blocks&, int64_t, int64_t, T*, T*);

// GCC 12.2 hit an internal compiler error vectorising this loop (with a compile-time count);
// vectorising a gather gains nothing here anyway.
#if defined(__GNUC__) && !defined(__clang__)
#define BAME_NO_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define BAME_NO_VECTORIZE
#endif

constexpr int64_t kPrefetchBytes = 1024;

// Asks for the cache lines of [data, data + bytes) (the compact state of a chunk, fetched
// while its weights are gathered).
inline void prefetch_range(const void* data, int64_t bytes) {
  if (data == nullptr) return;
  const char* begin = static_cast<const char*>(data);
  bytes = std::min<int64_t>(bytes, 8192);  // more would only evict the chunk's weights
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(begin + offset, 1);
}

// N: the count as a compile-time constant (the inner loop unrolled), or 0 for it.count.
template <typename T, typename Code, bool RANKED, int N, bool SCATTER>
BAME_NO_VECTORIZE void move_kept(const Blocks& it, int64_t k0, int64_t k1, T* __restrict w,
                                 T* __restrict g) {
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t n = N > 0 ? N : it.count;
  const int64_t S = it.spatial, B = it.blocks_per_row;
  const int64_t row_stride = it.channels * S;  // entries per output channel
  const int64_t block_stride = it.m * S;       // entries between blocks along C
  int64_t o = k0 / (S * B);
  const int64_t rest = k0 % (S * B);
  int64_t s = rest / B;
  int64_t b = rest % B;
  int64_t e = 0;
  for (int64_t k = k0; k < k1;) {
    // The blocks of one (o, s) row: b, b + 1, ... block_stride apart.
    const int64_t b_end = std::min(B, b + (k1 - k));
    T* base = param + o * row_stride + s + b * block_stride;
    const T* gbase = grad + o * row_stride + s + b * block_stride;
    for (; b < b_end; ++b, ++k, base += block_stride, gbase += block_stride, e += n) {
      if constexpr (!SCATTER) {
        // Every iteration waits on two new cache lines at sparse patterns: fetch ahead.
        __builtin_prefetch(reinterpret_cast<const char*>(base) + kPrefetchBytes);
        __builtin_prefetch(reinterpret_cast<const char*>(gbase) + kPrefetchBytes);
      }
      for (int64_t j = 0; j < n; ++j) {
        int64_t pos;
        if constexpr (RANKED) {
          pos = it.table[static_cast<int64_t>(code[k]) * n + j];
        } else {
          pos = static_cast<int64_t>(code[k * n + j]);
        }
        const int64_t off = pos * S;
        if constexpr (SCATTER) {
          base[off] = w[e + j];
        } else {
          w[e + j] = base[off];
          g[e + j] = gbase[off];
        }
      }
    }
    b = 0;
    if (++s == S) {
      s = 0;
      ++o;
    }
  }
}

// Spatial positions per tile of a layout with S > 1 (16: a cache line of float per row).
constexpr int64_t kTileSpatial = 16;
constexpr int64_t kTileBlocks = 1024;  // blocks a tile of whole rows aims at
// Near rows: every line this far ahead is asked for into L2 (prefetcht1), not L1: the
// accesses of a tile's rows jump about inside each block's M S entries, which the hardware
// stream prefetchers do not follow, and prefetches into L1 are bounded by its few miss
// buffers. On ResNet-50's 3x3 weights at 1:16 (Zen 4) this took 0.80-0.91x the time of
// prefetcht0 at 4 KiB (0.85-0.90x at 4 KiB into L2); the streamed paths of kept_simd.h and
// kept_tiles512.h did not gain from it.
constexpr int64_t kTilePrefetchBytes = 8192;
constexpr int kIntoL2 = 2;  // __builtin_prefetch locality: prefetcht1

// Whole output channels (rows of S B blocks) per tile where S <= kTileSpatial, else 0.
inline int64_t tile_rows(const Blocks& it) {
  if (it.spatial > kTileSpatial) return 0;
  return std::max<int64_t>(1, kTileBlocks / (it.spatial * it.blocks_per_row));
}

// The end of the tile that holds block c0 (at most k1). S > 1 layouts are moved a tile at a
// time, a contiguous range of blocks: tile_rows whole output channels o where S is at most
// kTileSpatial (many small rows, as in ResNet-32, in one tile), else kTileSpatial spatial
// positions s of one output channel times every b.
inline int64_t tile_end(const Blocks& it, int64_t c0, int64_t k1) {
  const int64_t S = it.spatial, B = it.blocks_per_row;
  const int64_t row = S * B;
  const int64_t rows = tile_rows(it);
  if (rows > 0) return std::min(k1, (c0 / row / rows + 1) * rows * row);
  const int64_t o = c0 / row, s = (c0 % row) / B;
  const int64_t s_end = std::min(S, (s / kTileSpatial + 1) * kTileSpatial);
  return std::min(k1, o * row + s_end * B);
}

// As move_kept for blocks [k0, k1) inside one tile (tile_end), in memory order: o, then b,
// then s, so that the tile's memory (rows b M + pos of [C, S], columns of the tile) is read
// and written in one sweep instead of one strided pass per s. Chunk index: (k - k0) count + j.
// Ranked codes use it.offsets (positions times S), sorted positions multiply.
template <typename T, typename Code, bool RANKED, int N, bool SCATTER>
BAME_NO_VECTORIZE void move_tile(const Blocks& it, int64_t k0, int64_t k1, T* __restrict w,
                                 T* __restrict g) {
  if (k0 >= k1) return;
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t n = N > 0 ? N : it.count;
  const int64_t S = it.spatial, B = it.blocks_per_row;
  const int64_t row = S * B;
  const int64_t o0 = k0 / row, o1 = (k1 - 1) / row + 1;
  // Spatial range: all of it for whole-row tiles, else the tile's (one row).
  const int64_t s0 = o1 - o0 > 1 ? 0 : (k0 % row) / B;
  const int64_t s1 = o1 - o0 > 1 ? S : ((k1 - 1) % row) / B + 1;
  const int64_t block_stride = it.m * S;
  // Rows more than a cache line apart: fetch the next blocks' rows ahead.
  const bool far_rows = S * static_cast<int64_t>(sizeof(T)) >= 64;
  const std::ptrdiff_t to_grad =
      reinterpret_cast<const char*>(grad) - reinterpret_cast<const char*>(param);
  // Near rows: a block of rows is block_stride entries, often more than a line; every line
  // up to kTilePrefetchBytes ahead of the current block is asked for once.
  const char* ahead =
      reinterpret_cast<const char*>(param + o0 * it.channels * S + s0) + kTilePrefetchBytes;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t first = (o * S + s0) * B;  // block (o, s0, b = 0)
    const bool whole = k0 <= first && first + (s1 - s0) * B <= k1;  // no k checks needed
    for (int64_t b = 0; b < B; ++b) {
      T* base = param + o * it.channels * S + b * block_stride + s0;
      const T* gbase = grad + (base - param);
      if constexpr (!SCATTER) {
        if (far_rows) {
          if (b + 4 < B) {
            for (int64_t r = 0; r < it.m; ++r) {
              __builtin_prefetch(reinterpret_cast<const char*>(base + (4 * it.m + r) * S));
              __builtin_prefetch(reinterpret_cast<const char*>(gbase + (4 * it.m + r) * S));
            }
          }
        } else {
          const char* until =
              reinterpret_cast<const char*>(base + block_stride) + kTilePrefetchBytes;
          for (; ahead < until; ahead += 64) {
            __builtin_prefetch(ahead, 0, kIntoL2);
            __builtin_prefetch(ahead + to_grad, 0, kIntoL2);
          }
        }
      }
      if constexpr (RANKED) {
        if (whole) {  // the common case, without per-block index arithmetic
          const Code* c = code + first + b;
          const int64_t step = B * n;
          int64_t e = (first + b - k0) * n;
          for (int64_t s = 0; s < s1 - s0; ++s, c += B, e += step) {
            const int32_t* off = it.offsets + static_cast<int64_t>(*c) * n;
            for (int64_t j = 0; j < n; ++j) {
              if constexpr (SCATTER) {
                base[s + off[j]] = w[e + j];
              } else {
                w[e + j] = base[s + off[j]];
                g[e + j] = gbase[s + off[j]];
              }
            }
          }
          continue;
        }
      }
      int64_t k = first + b;
      for (int64_t s = s0; s < s1; ++s, k += B, ++base, ++gbase) {
        if (!whole && (k < k0 || k >= k1)) continue;
        const int64_t e = (k - k0) * n;
        for (int64_t j = 0; j < n; ++j) {
          int64_t off;
          if constexpr (RANKED) {
            off = it.offsets[static_cast<int64_t>(code[k]) * n + j];
          } else {
            off = static_cast<int64_t>(code[k * n + j]) * S;
          }
          if constexpr (SCATTER) {
            base[off] = w[e + j];
          } else {
            w[e + j] = base[off];
            g[e + j] = gbase[off];
          }
        }
      }
    }
  }
}

template <typename T, typename Code, bool RANKED, bool SCATTER>
MoveFn<T> pick_tile_count(int64_t count) {
  switch (count) {
    case 1:
      return &move_tile<T, Code, RANKED, 1, SCATTER>;
    case 2:
      return &move_tile<T, Code, RANKED, 2, SCATTER>;
    case 4:
      return &move_tile<T, Code, RANKED, 4, SCATTER>;
    default:
      return &move_tile<T, Code, RANKED, 0, SCATTER>;
  }
}

template <typename T, typename Code, bool RANKED, bool SCATTER>
MoveFn<T> pick_count(int64_t count) {
  switch (count) {
    case 1:
      return &move_kept<T, Code, RANKED, 1, SCATTER>;
    case 2:
      return &move_kept<T, Code, RANKED, 2, SCATTER>;
    case 4:
      return &move_kept<T, Code, RANKED, 4, SCATTER>;
    default:
      return &move_kept<T, Code, RANKED, 0, SCATTER>;
  }
}

// The gather (SCATTER false) or scatter of a code dtype, stored form and count; with TILED
// the tile-at-a-time form (move_tile) for S > 1.
template <typename T, bool SCATTER>
MoveFn<T> pick_move(at::ScalarType code_dtype, bool ranked, int64_t count, bool tiled = false) {
#define BAME_PICK_MOVE(Code)                                                          \
  if (tiled) {                                                                       \
    return ranked ? pick_tile_count<T, Code, true, SCATTER>(count)                   \
                  : pick_tile_count<T, Code, false, SCATTER>(count);                 \
  }                                                                                  \
  return ranked ? pick_count<T, Code, true, SCATTER>(count)                          \
                : pick_count<T, Code, false, SCATTER>(count);
  switch (code_dtype) {
    case at::kByte: {
      BAME_PICK_MOVE(uint8_t)
    }
    case at::kShort: {
      BAME_PICK_MOVE(int16_t)
    }
    case at::kLong: {
      BAME_PICK_MOVE(int64_t)
    }
    default:
      return nullptr;
  }
#undef BAME_PICK_MOVE
}

// The end of the next chunk of blocks from c0 (at most k1): a tile for S > 1, else `blocks`
// blocks.
inline int64_t chunk_end(const Blocks& it, int64_t c0, int64_t k1, int64_t blocks) {
  return it.spatial > 1 ? tile_end(it, c0, k1) : std::min(k1, c0 + blocks);
}

// Blocks per chunk (scratch entries / count): S = 1, about kChunkBytes of the parameter (its
// lines are still in L1 when the chunk is scattered back); S > 1, the largest tile.
constexpr int64_t kChunkBytes = 4096;
inline int64_t chunk_blocks(const Blocks& it, int64_t element_size) {
  if (it.spatial == 1) return std::max<int64_t>(2, kChunkBytes / (it.m * element_size));
  const int64_t rows = tile_rows(it);
  return (rows > 0 ? rows * it.spatial : kTileSpatial) * it.blocks_per_row;
}

}  // namespace bame
