// Which streamed pass takes the blocks of a sparse item: the AVX-512 tiles of 3x3
// convolutions (kept_tiles512.h) where the CPU has AVX-512 and the caller allows them, the
// AVX2 tiles (kept_tiles.h) for other 8 <= S <= 16 layouts, the paired and scalar streams
// (kept_simd.h) for S = 1, and the chunked path (kept_move.h) for the rest.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kept_simd.h"
#include "kept_tiles.h"
#include "kept_tiles512.h"

namespace bame {

// Blocks [k0, k1) of a sparse item: the whole rows inside through a tiled stream where one
// applies (ahead as for stream_tiles), the rest through kept_simd.h's stream and
// chunks(c0, c1) (the chunked path, for what no stream takes; it may get empty ranges).
template <typename T, typename Fn, typename Ahead, typename Chunks>
void run_streams(const Blocks& it, int64_t k0, int64_t k1, Fn& fn, const Ahead& ahead,
                 const Chunks& chunks) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const bool ranked_codes = it.code_dtype == at::kByte || it.code_dtype == at::kShort;
#if BAME_HAVE_AVX512
    const bool wide = ranked_codes && tiles9_possible(it);
#else
    const bool wide = false;
#endif
    if (ranked_codes && it.spatial > 1 && (wide || (it.lanes != nullptr && tiles_possible(it)))) {
      const int64_t row = it.spatial * it.blocks_per_row;
      const int64_t r0 = (k0 + row - 1) / row * row, r1 = k1 / row * row;
      if (r0 < r1) {
        chunks(k0, r0);
        auto tiles = [&](auto zero_code) {
          using Code = decltype(zero_code);
#if BAME_HAVE_AVX512
          if (wide) {
            if (it.count == 1) return stream_tiles9<Code, 1>(it, r0, r1, fn, ahead);
            if (it.count == 2) return stream_tiles9<Code, 2>(it, r0, r1, fn, ahead);
            return stream_tiles9<Code, 4>(it, r0, r1, fn, ahead);
          }
#endif
          switch (it.count) {
            case 1:
              return stream_tiles<Code, 1>(it, r0, r1, fn, ahead);
            case 2:
              return stream_tiles<Code, 2>(it, r0, r1, fn, ahead);
            default:
              return stream_tiles<Code, 4>(it, r0, r1, fn, ahead);
          }
        };
        if (it.code_dtype == at::kByte) {
          tiles(uint8_t{0});
        } else {
          tiles(int16_t{0});
        }
        chunks(r1, k1);
        return;
      }
    }
  }
#endif
  chunks(stream<T>(it, k0, k1, fn), k1);
}

}  // namespace bame
