// Shared by the fused evolve passes (evolve_cpu.cpp, evolve_apply_cpu.cpp): the block layout
// of a strided parameter, the stored kept sets (decode / encode), order keys of scores, checks.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <bit>
#include <cstdint>
#include <optional>
#include <vector>

#include "kept_common.h"

namespace bame_evolve {

constexpr int64_t kMaxM = 64;
constexpr int64_t kGrain = 2048;  // blocks per parallel task

// The blocks of a strided tensor in block order (core.nm.block_view): the dimensions other
// than 1 folded into three (n0, n1, n2) with strides (s0, s1, s2) by the Python side, then
// per_row = C / M blocks along dimension 1, whose entries are s_in apart.
struct Layout {
  int64_t per_row = 1, n1 = 1, n2 = 1, s0 = 0, s1 = 0, s2 = 0, s_in = 1, m = 1;
};

inline Layout make_layout(const at::Tensor& t, const std::vector<int64_t>& folded, int64_t m,
                   const char* what) {
  TORCH_CHECK_VALUE(folded.size() == 6, what,
                    ": the layout needs 6 values (n1, n2, s0, s1, s2, s_in)");
  TORCH_CHECK_VALUE(t.dim() >= 2 && t.size(1) % m == 0, what, " of shape ", t.sizes(),
                    ": dim 1 is not divisible by m=", m);
  Layout l;
  l.per_row = t.size(1) / m;
  l.n1 = folded[0];
  l.n2 = folded[1];
  l.s0 = folded[2];
  l.s1 = folded[3];
  l.s2 = folded[4];
  l.s_in = folded[5];
  l.m = m;
  TORCH_CHECK_VALUE(l.n1 >= 1 && l.n2 >= 1 && l.per_row * l.n1 * l.n2 >= 1, what,
                    ": invalid folded sizes");
  return l;
}

// Where block k is: its indices and its offsets in two tensors of one shape (weight and
// gradient), advanced block by block without a multiplication.
struct Cursor {
  const Layout& a;
  const Layout& b;
  int64_t ib = 0, i2 = 0, i1 = 0, i0 = 0;
  int64_t off_a = 0, off_b = 0;
  Cursor(const Layout& la, const Layout& lb, int64_t k) : a(la), b(lb) { seek(k); }
  void seek(int64_t k) {  // to block k (divisions: next() is cheaper to the following block)
    ib = k % a.per_row;
    int64_t outer = k / a.per_row;
    i2 = outer % a.n2;
    outer /= a.n2;
    i1 = outer % a.n1;
    i0 = outer / a.n1;
    place();
  }
  void place() {
    off_a = i0 * a.s0 + i1 * a.s1 + i2 * a.s2 + ib * a.m * a.s_in;
    off_b = i0 * b.s0 + i1 * b.s1 + i2 * b.s2 + ib * b.m * b.s_in;
  }
  void next() {
    if (++ib < a.per_row) {
      off_a += a.m * a.s_in;
      off_b += b.m * b.s_in;
      return;
    }
    ib = 0;
    if (++i2 >= a.n2) {
      i2 = 0;
      if (++i1 >= a.n1) {
        i1 = 0;
        ++i0;
      }
    }
    place();
  }
};

inline uint64_t full_bits(int64_t m) { return m >= 64 ? ~uint64_t{0} : (uint64_t{1} << m) - 1; }

// A stored form of kept sets (core.kept.encode_kept): colex ranks [K] (with masks, the bit
// pattern of each rank, and for encoding by_bits / binomials), or sorted positions [K, count].
struct Codes {
  void* data = nullptr;
  at::ScalarType dtype = at::kByte;
  bool ranked = true;
  int64_t count = 0;
  int64_t m = 0;
  const int64_t* masks = nullptr;      // decoding (ranked)
  const void* by_bits = nullptr;       // encoding, M <= 16: [2^M] ranks in the code dtype
  const int64_t* binomials = nullptr;  // encoding, M > 16: [M, M + 1] binom(j, i)
};

template <typename Code, bool RANKED>
inline uint64_t decode(const Codes& c, int64_t k) {
  const Code* d = static_cast<const Code*>(c.data);
  if constexpr (RANKED) {
    return static_cast<uint64_t>(c.masks[static_cast<int64_t>(d[k])]);
  } else {
    uint64_t bits = 0;
    for (int64_t i = 0; i < c.count; ++i) {
      bits |= uint64_t{1} << static_cast<int64_t>(d[k * c.count + i]);
    }
    return bits;
  }
}

template <typename Code, bool RANKED>
inline void encode(const Codes& c, uint64_t bits, int64_t k) {
  Code* o = static_cast<Code*>(c.data);
  if constexpr (!RANKED) {
    int64_t i = 0;
    for (uint64_t b = bits; b; b &= b - 1) o[k * c.count + i++] = static_cast<Code>(__builtin_ctzll(b));
  } else {
    if (c.by_bits != nullptr) {
      o[k] = static_cast<const Code*>(c.by_bits)[bits];
      return;
    }
    int64_t rank = 0, i = 1;
    for (uint64_t b = bits; b; b &= b - 1, ++i) {
      rank += c.binomials[__builtin_ctzll(b) * (c.m + 1) + i];
    }
    o[k] = static_cast<Code>(rank);
  }
}

inline bool supported_code(at::ScalarType dt) {
  return dt == at::kByte || dt == at::kShort || dt == at::kLong;
}

// Checks a stored form and its tables and fills a Codes; with check_values every code is
// checked before anything is read through it.
inline Codes make_codes(const at::Tensor& kept, const std::optional<at::Tensor>& masks, int64_t count,
                 int64_t blocks, int64_t m, const char* what, bool check_values) {
  // Without check_values the codes are only written (no masks needed).
  TORCH_CHECK_VALUE(kept.device().is_cpu() && kept.is_contiguous() &&
                        !kept.key_set().has(c10::DispatchKey::Python),
                    what, " must be a contiguous CPU tensor");
  const at::ScalarType dt = kept.scalar_type();
  TORCH_CHECK_VALUE(supported_code(dt), what, " has unsupported dtype ", dt,
                    " (uint8, int16, int64)");
  TORCH_CHECK_VALUE(0 <= count && count <= m, "Invalid count value: ", count);
  Codes c;
  c.data = kept.data_ptr();
  c.dtype = dt;
  c.count = count;
  c.m = m;
  c.ranked = kept.dim() == 1;
  int64_t limit = m;
  if (c.ranked) {
    TORCH_CHECK_VALUE(kept.size(0) == blocks, what, " has shape ", kept.sizes(), ", expected [",
                      blocks, "] ranks");
    if (check_values) {
      TORCH_CHECK_VALUE(masks.has_value() && masks->scalar_type() == at::kLong &&
                            masks->dim() == 1 && masks->is_contiguous() && masks->size(0) >= 1,
                        "masks (int64 [C], the bit pattern of each rank) are required for ranks");
      c.masks = masks->data_ptr<int64_t>();
      limit = masks->size(0);
    }
  } else {
    TORCH_CHECK_VALUE(kept.dim() == 2 && kept.size(0) == blocks && kept.size(1) == count, what,
                      " has shape ", kept.sizes(), ", expected [", blocks, "] or [", blocks,
                      ", ", count, "]");
  }
  if (check_values && kept.numel()) {
    // One serial pass (kept_common.h's, vectorised: smallest and largest code), a byte or two
    // per block, cheaper than a parallel region.
    const bool ok = bame::codes_ok(kept, limit);
    TORCH_CHECK_VALUE(ok, what, " holds a code outside [0, ", limit,
                      ") (a rank beyond the table or a position >= m)");
  }
  return c;
}

// Order-preserving unsigned keys of scores, compared as torch.sort compares them: -0.0 equals
// 0.0, NaN ranks above +inf and all NaNs are equal.
inline uint32_t mono(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  u &= 0u - static_cast<uint32_t>(magnitude != 0);  // -0.0 as 0.0
  const uint32_t key = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return key | (0u - static_cast<uint32_t>(magnitude > 0x7F800000u));  // NaN: all ones
}

inline uint64_t mono(double x) {
  uint64_t u = std::bit_cast<uint64_t>(x);
  const uint64_t magnitude = u & 0x7FFFFFFFFFFFFFFFull;
  u &= uint64_t{0} - static_cast<uint64_t>(magnitude != 0);
  const uint64_t key =
      u ^ (static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (uint64_t{1} << 63));
  return key | (uint64_t{0} - static_cast<uint64_t>(magnitude > 0x7FF0000000000000ull));
}

inline at::ScalarType check_pair(const at::Tensor& weight, const at::Tensor& grad) {
  for (const at::Tensor* t : {&weight, &grad}) {
    TORCH_CHECK_VALUE(t->defined() && t->device().is_cpu() && t->layout() == at::kStrided &&
                          t->has_storage() && !t->key_set().has(c10::DispatchKey::Python),
                      "weight and grad must be plain strided CPU tensors");
    TORCH_CHECK_VALUE(!t->is_neg() && !t->is_conj(), "weight and grad must not be neg/conj views");
  }
  const at::ScalarType dt = weight.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble, "weight has unsupported dtype ", dt,
                    " (float32, float64)");
  TORCH_CHECK_VALUE(grad.scalar_type() == dt && grad.sizes() == weight.sizes(),
                    "grad must match weight in dtype and shape");
  return dt;
}

inline void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace bame_evolve
