// Shared by the fused kept-SGD and kept-AdamW CPU kernels: the block layout of an N:M
// parameter, the gather of its kept entries, input checks and the parallel driver.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace bame {

template <bool FMA, typename A>
inline A madd(A a, A b, A c) {
  if constexpr (FMA) {
    return std::fma(a, b, c);
  } else {
    A product = a * b;
    return product + c;
  }
}

// A sparse parameter's data seen as K blocks (o, s, b) in block order, s < S, b < B = C / M:
// entry j of a block is at o*C*S + (b*M + pos_j)*S + s. A contiguous [out, C, *k] tensor has
// S = prod(k); the transposed view p.t() of a contiguous [C, out] tensor is one "o" with
// S = out (its block order, o-major then b, is the same).
struct Blocks {
  void* param = nullptr;
  const void* grad = nullptr;
  const void* code = nullptr;        // [K] colex ranks, or [K, count] sorted positions
  const int32_t* table = nullptr;    // [C_ranks, count] positions per rank; nullptr: positions
  int64_t count = 1;
  int64_t m = 1;
  int64_t channels = 1;        // C
  int64_t spatial = 1;         // S
  int64_t blocks_per_row = 1;  // B
  int64_t blocks = 0;          // K
  int64_t ranks = 0;           // rows of table (ranked codes only)
  at::ScalarType code_dtype = at::kByte;
  const int32_t* lanes = nullptr;  // kept_simd.h's pair table (S = 1, M = 4, ranked), or nullptr
  const int32_t* offsets = nullptr;  // table * S (S > 1, ranked), or nullptr
};

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
constexpr int64_t kTilePrefetchBytes = 4096;

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
            __builtin_prefetch(ahead);
            __builtin_prefetch(ahead + to_grad);
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

inline void check_plain(const at::Tensor& t, const char* what, int64_t i,
                        bool allow_transposed = false) {
  TORCH_CHECK_VALUE(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(!t.key_set().has(c10::DispatchKey::Python), what, "[", i,
                    "] is a tensor subclass with __torch_dispatch__ (e.g. DTensor)");
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage(),
                    what, "[", i, "] must be a strided CPU tensor with storage");
  const bool transposed = allow_transposed && t.dim() == 2 && t.stride(0) == 1 &&
                          t.stride(1) == t.size(0);
  TORCH_CHECK_VALUE(t.is_contiguous() || transposed, what, "[", i, "] must be contiguous",
                    allow_transposed ? " or the transposed view of a contiguous 2-D tensor"
                                     : "");
  TORCH_CHECK_VALUE(!t.is_neg() && !t.is_conj(), what, "[", i, "] has a neg/conj bit set");
}

inline bool supported_code(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kLong;
}

// Fills b from a sparse parameter p (already checked with check_plain(..., true)) and its
// stored kept set; appends the limit its codes must stay below to code_limits.
inline void setup_blocks(Blocks& b, const at::Tensor& p, const at::Tensor& grad,
                         const at::Tensor& code, const std::optional<at::Tensor>& table,
                         int64_t count, int64_t m, int64_t i,
                         std::vector<int64_t>& code_limits) {
  TORCH_CHECK_VALUE(p.dim() >= 2, "params[", i, "] must have ndim >= 2, got shape ",
                    p.sizes());
  TORCH_CHECK_VALUE(p.size(1) % m == 0, "params[", i, "] shape ", p.sizes(),
                    ": dim 1 is not divisible by m=", m);
  TORCH_CHECK_VALUE(0 <= count && count <= m, "Invalid counts[", i, "] value: ", count,
                    " (0 <= count <= m=", m, " is required)");
  TORCH_CHECK_VALUE(p.strides() == grad.strides(), "grads[", i,
                    "] must have the strides of params[", i, "]");
  const int64_t K = p.numel() / m;
  check_plain(code, "kept", i);
  TORCH_CHECK_VALUE(supported_code(code.scalar_type()), "kept[", i, "] has unsupported dtype ",
                    code.scalar_type(), " (uint8, int16, int64)");
  if (code.dim() == 1) {
    TORCH_CHECK_VALUE(code.size(0) == K, "kept[", i, "] has shape ", code.sizes(),
                      ", expected [", K, "] ranks");
    TORCH_CHECK_VALUE(table.has_value(), "tables[", i, "] is required for ranks");
    check_plain(*table, "tables", i);
    TORCH_CHECK_VALUE(table->scalar_type() == at::kInt && table->dim() == 2 &&
                          table->size(1) == count && table->size(0) >= 1,
                      "tables[", i, "] must be int32 [C, count]");
    b.table = table->data_ptr<int32_t>();
    b.ranks = table->size(0);
    code_limits.push_back(table->size(0));
  } else {
    TORCH_CHECK_VALUE(code.dim() == 2 && code.size(0) == K && code.size(1) == count, "kept[",
                      i, "] has shape ", code.sizes(), ", expected [", K, "] or [", K, ", ",
                      count, "]");
    code_limits.push_back(m);
  }
  b.code_dtype = code.scalar_type();
  b.param = p.data_ptr();
  b.grad = grad.data_ptr();
  b.code = code.numel() ? code.data_ptr() : nullptr;
  b.count = count;
  b.m = m;
  b.channels = p.size(1);
  b.blocks = K;
  if (p.is_contiguous()) {
    for (int64_t d = 2; d < p.dim(); ++d) b.spatial *= p.size(d);
  } else {  // the transposed view of a contiguous [C, out] tensor
    b.spatial = p.size(0);
  }
  b.blocks_per_row = p.size(1) / m;
}

template <typename Code>
bool codes_in_range(const void* data, int64_t numel, int64_t limit) {
  // Smallest and largest code in loops the compiler vectorises (a check per code is a
  // noticeable part of a step otherwise).
  const Code* code = static_cast<const Code*>(data);
  Code low = 0, high = 0;
  if (numel) low = high = code[0];
  for (int64_t i = 0; i < numel; ++i) {  // not std::min/max: GCC 12 vectorises this form only
    const Code c = code[i];
    low = c < low ? c : low;
    high = c > high ? c : high;
  }
  return numel == 0 || (static_cast<int64_t>(low) >= 0 && static_cast<int64_t>(high) < limit);
}

inline bool codes_ok(const at::Tensor& code, int64_t limit) {
  const int64_t numel = code.numel();
  switch (code.scalar_type()) {
    case at::kByte:
      return codes_in_range<uint8_t>(code.data_ptr(), numel, limit);
    case at::kShort:
      return codes_in_range<int16_t>(code.data_ptr(), numel, limit);
    default:
      return codes_in_range<int64_t>(code.data_ptr(), numel, limit);
  }
}

constexpr int64_t kParallelCheckBytes = int64_t{1} << 20;

// Every code is checked (in parallel for large models) before anything is written, so bad
// input leaves all untouched.
inline void check_codes(const std::vector<std::optional<at::Tensor>>& kept,
                        const std::vector<int64_t>& check_index,
                        const std::vector<int64_t>& code_limits) {
  const int64_t n_checks = static_cast<int64_t>(check_index.size());
  std::vector<char> bad(n_checks, 0);
  int64_t bytes = 0;
  for (int64_t c = 0; c < n_checks; ++c) bytes += kept[check_index[c]]->nbytes();
  auto check = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      bad[c] = codes_ok(*kept[check_index[c]], code_limits[c]) ? 0 : 1;
    }
  };
  // A vectorised check reads tens of bytes a cycle: threads only pay for megabytes of codes.
  if (bytes < kParallelCheckBytes) {
    check(0, n_checks);
  } else {
    at::parallel_for(0, n_checks, 1, check);
  }
  for (int64_t c = 0; c < n_checks; ++c) {
    TORCH_CHECK_VALUE(!bad[c], "kept[", check_index[c], "] holds a code outside [0, ",
                      code_limits[c], ") (a rank beyond the table or a position >= m)");
  }
}

// One parallel loop over the work units of all items: units [starts[i], starts[i + 1]) are
// item i's; run(i, begin, end) gets item-local unit ranges.
template <typename Run>
void for_each_unit(const std::vector<int64_t>& starts, int64_t grain, const Run& run) {
  const int64_t n_items = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, starts.back(), grain, [&](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    while (begin < end && i < n_items) {
      const int64_t item_end = starts[i + 1];
      if (item_end > begin) {
        const int64_t stop = std::min(end, item_end);
        run(i, begin - starts[i], stop - starts[i]);
        begin = stop;
      }
      ++i;
    }
  });
}

inline void bump_version(const at::Tensor& t) {
  // As in-place ops do (inference tensors keep no version counter).
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace bame
