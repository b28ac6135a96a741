// Shared by the fused kept-SGD and kept-AdamW CPU kernels: the block layout of an N:M
// parameter, input checks and the parallel driver (moving kept entries: kept_move.h).
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

#if defined(__GNUC__)
#define BAME_ALWAYS_INLINE __attribute__((always_inline)) inline
#define BAME_INLINED_LAMBDA __attribute__((always_inline))  // after a lambda's parameters
#else
#define BAME_ALWAYS_INLINE inline
#define BAME_INLINED_LAMBDA
#endif

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
// S = out (its block order, o-major then b, is the same); a channels-last [out, C, *k] tensor
// (channels_last_rows) is a contiguous [out * prod(k), C] one: S = 1, an "o" per (out, k).
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
  // kept_simd.h's pair table (ranked codes; M = 4 at S = 1 or 8..16, M = 8 at S = 1)
  const int32_t* lanes = nullptr;
  const int32_t* offsets = nullptr;  // table * S (S > 1, ranked), or nullptr
  bool avx512 = false;  // the AVX-512 paths may run (the caller allows it, the CPU has them)
};

// Whether t.movedim(1, -1) is contiguous while t is not 2-D: dim 1 innermost (stride 1), the
// other dimensions in order outside it, as in a channels_last or channels_last_3d convolution
// weight. Its blocks along dim 1 are then contiguous rows of C entries, in block order.
inline bool channels_last_rows(const at::Tensor& t) {
  const int64_t dims = t.dim();
  if (dims < 3) return false;  // a 2-D one is contiguous
  int64_t expected = 1;
  for (int64_t k = 0; k < dims; ++k) {
    const int64_t d = k == 0 ? 1 : (k == dims - 1 ? 0 : dims - k);  // 1, dims - 1, .., 2, 0
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// The layouts Blocks reads besides a contiguous one: channels-last rows, and the transposed
// view of a contiguous 2-D tensor.
inline bool readable_view(const at::Tensor& t) {
  return (t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0)) ||
         channels_last_rows(t);
}

// With block_views (a sparse parameter or its gradient) also the readable_view layouts.
inline void check_plain(const at::Tensor& t, const char* what, int64_t i,
                        bool block_views = false) {
  TORCH_CHECK_VALUE(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(!t.key_set().has(c10::DispatchKey::Python), what, "[", i,
                    "] is a tensor subclass with __torch_dispatch__ (e.g. DTensor)");
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage(),
                    what, "[", i, "] must be a strided CPU tensor with storage");
  TORCH_CHECK_VALUE(t.is_contiguous() || (block_views && readable_view(t)), what, "[", i,
                    "] must be contiguous",
                    block_views ? ", channels-last or the transposed view of a contiguous "
                                  "2-D tensor"
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
  } else if (!channels_last_rows(p)) {  // the transposed view of a contiguous [C, out] tensor
    b.spatial = p.size(0);
  }  // channels-last: S = 1
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
