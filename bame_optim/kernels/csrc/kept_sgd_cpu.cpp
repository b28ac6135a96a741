// Fused SGD step on the kept entries of N:M sparse parameters (CPU).
//
// One call updates a list of parameters in one pass over their kept entries, parallel over
// blocks with at::parallel_for. Loaded by bame_optim/kernels/kept_sgd_cpu.py (JIT, on first
// use); the math and the rounding contract are documented there.
//
// Rounding contract: every operation rounds exactly as the eager composition
// (kept_indices -> gather_kept -> masked_sgd -> scatter_kept_) does with ATen's CPU kernels:
//   add(a, b, alpha) = fmadd(b, alpha, a), alpha cast to the tensor's dtype first
//                      (fused or not: the FMA template flag, chosen by a probe in Python);
//   mul(a, s)        = a * s, s cast to the op-math type (float for half/bfloat16);
//   every intermediate tensor of the eager path is rounded to the parameter's dtype.
// The file must be compiled with -ffp-contract=off so that the unfused form stays unfused.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif

namespace {

struct Hyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
};

struct Item;
using SegmentFn = void (*)(const Item&, int64_t, int64_t, const Hyper&);

// One parameter: its contiguous [out, C, *k] data seen as blocks (out, s, b), s < S = prod(k),
// b < B = C / M; element j of a block is at o*C*S + (b*M + pos_j)*S + s.
struct Item {
  void* param;
  const void* grad;
  void* buffer;           // [K, count], block order; nullptr without momentum
  const void* code;       // [K] colex ranks, or [K, count] sorted positions
  const int32_t* table;   // [C, count] positions per rank; nullptr for positions
  int64_t count;
  int64_t m;
  int64_t channels;       // C
  int64_t spatial;        // S
  int64_t blocks_per_row; // B
  int64_t num_blocks;     // K
  bool first;             // momentum buffer created by this call
  SegmentFn fn;
};

template <bool FMA, typename A>
inline A madd(A a, A b, A c) {
  if constexpr (FMA) {
    return std::fma(a, b, c);
  } else {
    A product = a * b;
    return product + c;
  }
}

template <typename T, bool FMA>
struct Update {
  using A = at::opmath_type<T>;
  A weight_decay;    // grad.add(param, alpha=weight_decay): alpha cast to T
  A momentum_mul;    // buffer.mul_(momentum): the scalar in op-math precision
  A damp_alpha;      // buffer.add_(grad, alpha=1 - dampening)
  A nesterov_alpha;  // grad.add(buffer, alpha=momentum)
  A lr_alpha;        // param.add_(grad, alpha=-lr)
  bool has_weight_decay;
  bool has_momentum;
  bool nesterov;
  bool maximize;

  explicit Update(const Hyper& h)
      : weight_decay(static_cast<A>(static_cast<T>(h.weight_decay))),
        momentum_mul(static_cast<A>(h.momentum)),
        damp_alpha(static_cast<A>(static_cast<T>(1.0 - h.dampening))),
        nesterov_alpha(static_cast<A>(static_cast<T>(h.momentum))),
        lr_alpha(static_cast<A>(static_cast<T>(-h.lr))),
        has_weight_decay(h.weight_decay != 0),
        has_momentum(h.momentum != 0),
        nesterov(h.nesterov),
        maximize(h.maximize) {}

  // The eager ops one after the other over contiguous (L1-resident) arrays, each loop
  // vectorisable: w = kept weights, g = kept gradients (both scratch), b = momentum.
  void operator()(T* __restrict w, T* __restrict g, T* __restrict b, int64_t len,
                  bool first) const {
    if (maximize) {
      for (int64_t i = 0; i < len; ++i) g[i] = static_cast<T>(-g[i]);
    }
    if (has_weight_decay) {
      const A wd = weight_decay;
      for (int64_t i = 0; i < len; ++i) {
        g[i] = static_cast<T>(madd<FMA, A>(static_cast<A>(w[i]), wd, static_cast<A>(g[i])));
      }
    }
    const T* d = g;
    if (has_momentum) {
      if (first) {
        std::copy(g, g + len, b);
      } else {
        const A mul = momentum_mul, damp = damp_alpha;
        for (int64_t i = 0; i < len; ++i) {
          const T decayed = static_cast<T>(static_cast<A>(b[i]) * mul);
          b[i] = static_cast<T>(madd<FMA, A>(static_cast<A>(g[i]), damp,
                                             static_cast<A>(decayed)));
        }
      }
      if (nesterov) {
        const A mom = nesterov_alpha;
        for (int64_t i = 0; i < len; ++i) {
          g[i] = static_cast<T>(madd<FMA, A>(static_cast<A>(b[i]), mom, static_cast<A>(g[i])));
        }
      } else {
        d = b;
      }
    }
    const A alpha = lr_alpha;
    for (int64_t i = 0; i < len; ++i) {
      w[i] = static_cast<T>(madd<FMA, A>(static_cast<A>(d[i]), alpha, static_cast<A>(w[i])));
    }
  }
};

// Blocks [k0, k1) of one parameter, in block order, a chunk at a time: gather the kept
// weights and gradients of the chunk into scratch arrays, update them with the momentum
// (already contiguous in block order), scatter the weights back.
template <typename T, bool FMA, typename Code, bool RANKED>
void run_segment(const Item& it, int64_t k0, int64_t k1, const Hyper& hyper) {
  constexpr int64_t kChunkElements = 2048;
  constexpr int64_t kPrefetchBytes = PREFETCH_BYTES;
  const Update<T, FMA> update(hyper);
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  T* buffer = static_cast<T*>(it.buffer);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t n = it.count, m = it.m, S = it.spatial, B = it.blocks_per_row;
  const int64_t row_stride = it.channels * S;  // elements per output channel
  const int64_t block_stride = m * S;          // elements between blocks along C
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkElements / n);
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (block_stride * int64_t(sizeof(T))));
  std::vector<T> w(chunk_blocks * n), g(chunk_blocks * n), scratch;
  std::vector<int64_t> offsets(chunk_blocks * n);
  if (buffer == nullptr) scratch.resize(chunk_blocks * n);
  int64_t o = k0 / (S * B);
  int64_t rest = k0 % (S * B);
  int64_t s = rest / B;
  int64_t b = rest % B;
  for (int64_t c0 = k0; c0 < k1; c0 += chunk_blocks) {
    const int64_t c1 = std::min(k1, c0 + chunk_blocks);
    int64_t e = 0;
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t block = o * row_stride + s + b * block_stride;
      if (b + ahead < B) {  // software prefetch along the row (measured: helps)
        __builtin_prefetch(param + block + ahead * block_stride, 1);
        __builtin_prefetch(grad + block + ahead * block_stride, 0);
      }
      if constexpr (RANKED) {
        const int32_t* row = it.table + static_cast<int64_t>(code[k]) * n;
        for (int64_t j = 0; j < n; ++j, ++e) {
          const int64_t off = block + static_cast<int64_t>(row[j]) * S;
          offsets[e] = off;
          w[e] = param[off];
          g[e] = grad[off];
        }
      } else {
        const Code* row = code + k * n;
        for (int64_t j = 0; j < n; ++j, ++e) {
          const int64_t off = block + static_cast<int64_t>(row[j]) * S;
          offsets[e] = off;
          w[e] = param[off];
          g[e] = grad[off];
        }
      }
      if (++b == B) {
        b = 0;
        if (++s == S) {
          s = 0;
          ++o;
        }
      }
    }
    update(w.data(), g.data(), buffer ? buffer + c0 * n : scratch.data(), e, it.first);
    for (int64_t i = 0; i < e; ++i) param[offsets[i]] = w[i];
  }
}

template <typename T, bool FMA>
SegmentFn pick_code(at::ScalarType code_dtype, bool ranked) {
#define BAME_PICK(CT, C_TYPE)                                                          \
  case at::ScalarType::CT:                                                             \
    return ranked ? &run_segment<T, FMA, C_TYPE, true> : &run_segment<T, FMA, C_TYPE, false>;
  switch (code_dtype) {
    BAME_PICK(Byte, uint8_t)
    BAME_PICK(Short, int16_t)
    BAME_PICK(Int, int32_t)
    BAME_PICK(Long, int64_t)
    default:
      return nullptr;
  }
#undef BAME_PICK
}

template <bool FMA>
SegmentFn pick(at::ScalarType dtype, at::ScalarType code_dtype, bool ranked) {
  switch (dtype) {
    case at::ScalarType::Float:
      return pick_code<float, FMA>(code_dtype, ranked);
    case at::ScalarType::Double:
      return pick_code<double, FMA>(code_dtype, ranked);
    case at::ScalarType::Half:
      return pick_code<at::Half, FMA>(code_dtype, ranked);
    case at::ScalarType::BFloat16:
      return pick_code<at::BFloat16, FMA>(code_dtype, ranked);
    default:
      return nullptr;
  }
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool supported_code(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_plain(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK_VALUE(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage(),
                    what, "[", i, "] must be a strided CPU tensor with storage");
  TORCH_CHECK_VALUE(t.is_contiguous(), what, "[", i, "] must be contiguous");
  TORCH_CHECK_VALUE(!t.is_neg() && !t.is_conj(), what, "[", i, "] has a neg/conj bit set");
}

template <typename Code>
bool codes_in_range(const void* data, int64_t numel, int64_t limit) {
  const Code* code = static_cast<const Code*>(data);
  bool ok = true;
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t c = static_cast<int64_t>(code[i]);
    ok &= (c >= 0) & (c < limit);
  }
  return ok;
}

bool codes_ok(const at::Tensor& code, int64_t limit) {
  const int64_t numel = code.numel();
  switch (code.scalar_type()) {
    case at::kByte:
      return codes_in_range<uint8_t>(code.data_ptr(), numel, limit);
    case at::kShort:
      return codes_in_range<int16_t>(code.data_ptr(), numel, limit);
    case at::kInt:
      return codes_in_range<int32_t>(code.data_ptr(), numel, limit);
    default:
      return codes_in_range<int64_t>(code.data_ptr(), numel, limit);
  }
}

}  // namespace

// Returns, per parameter, the momentum buffer this call created (first step), else None.
std::vector<std::optional<at::Tensor>> fused_kept_sgd(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& buffers,
    const std::vector<at::Tensor>& kept,
    const std::vector<std::optional<at::Tensor>>& tables,
    const std::vector<int64_t>& counts,
    int64_t m,
    double lr,
    double momentum,
    double dampening,
    double weight_decay,
    bool nesterov,
    bool maximize,
    bool fma) {
  const int64_t n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(grads.size() == params.size() && buffers.size() == params.size() &&
                        kept.size() == params.size() && tables.size() == params.size() &&
                        counts.size() == params.size(),
                    "params, grads, momentum_buffers, kept and counts must have equal lengths");
  TORCH_CHECK_VALUE(m >= 1, "Invalid m value: ", m);
  const bool has_momentum = momentum != 0;
  const Hyper hyper{lr, momentum, dampening, weight_decay, nesterov, maximize};

  std::vector<Item> items;
  items.reserve(n_params);
  std::vector<std::optional<at::Tensor>> created(n_params);
  std::vector<at::Tensor> codes_to_check;
  std::vector<int64_t> code_limits;
  std::vector<int64_t> starts{0};
  for (int64_t i = 0; i < n_params; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    check_plain(p, "params", i);
    check_plain(g, "grads", i);
    TORCH_CHECK_VALUE(supported_dtype(p.scalar_type()), "params[", i, "] has unsupported dtype ",
                      p.scalar_type(), " (float32, float64, float16, bfloat16)");
    TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(), "grads[", i,
                      "] must match params[", i, "] in dtype and shape");
    TORCH_CHECK_VALUE(p.dim() >= 2, "params[", i, "] must have ndim >= 2, got shape ",
                      p.sizes());
    TORCH_CHECK_VALUE(p.size(1) % m == 0, "params[", i, "] shape ", p.sizes(),
                      ": dim 1 is not divisible by m=", m);
    const int64_t count = counts[i];
    TORCH_CHECK_VALUE(0 <= count && count <= m, "Invalid counts[", i, "] value: ", count,
                      " (0 <= count <= m=", m, " is required)");
    const int64_t K = p.numel() / m;
    const at::Tensor& code = kept[i];
    check_plain(code, "kept", i);
    TORCH_CHECK_VALUE(supported_code(code.scalar_type()), "kept[", i,
                      "] has unsupported dtype ", code.scalar_type());
    const bool ranked = code.dim() == 1;
    const int32_t* table_ptr = nullptr;
    if (ranked) {
      TORCH_CHECK_VALUE(code.size(0) == K, "kept[", i, "] has shape ", code.sizes(),
                        ", expected [", K, "] ranks");
      TORCH_CHECK_VALUE(tables[i].has_value(), "tables[", i, "] is required for ranks");
      const at::Tensor& table = *tables[i];
      check_plain(table, "tables", i);
      TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 &&
                            table.size(1) == count && table.size(0) >= 1,
                        "tables[", i, "] must be int32 [C, count]");
      table_ptr = table.data_ptr<int32_t>();
      codes_to_check.push_back(code);
      code_limits.push_back(table.size(0));
    } else {
      TORCH_CHECK_VALUE(code.dim() == 2 && code.size(0) == K && code.size(1) == count, "kept[",
                        i, "] has shape ", code.sizes(), ", expected [", K, "] or [", K, ", ",
                        count, "]");
      codes_to_check.push_back(code);
      code_limits.push_back(m);
    }
    void* buffer_ptr = nullptr;
    bool first = false;
    if (has_momentum) {
      if (buffers[i].has_value() && buffers[i]->defined()) {
        const at::Tensor& buf = *buffers[i];
        check_plain(buf, "momentum_buffers", i);
        TORCH_CHECK_VALUE(buf.scalar_type() == p.scalar_type() && buf.dim() == 2 &&
                              buf.size(0) == K && buf.size(1) == count,
                          "momentum_buffers[", i, "] must be ", p.scalar_type(), " [", K, ", ",
                          count, "], got ", buf.scalar_type(), " ", buf.sizes());
        buffer_ptr = buf.data_ptr();
      } else {
        at::Tensor buf = at::empty({K, count}, p.options());
        created[i] = buf;
        buffer_ptr = buf.data_ptr();
        first = true;
      }
    }
    int64_t spatial = 1;
    for (int64_t d = 2; d < p.dim(); ++d) spatial *= p.size(d);
    SegmentFn fn = fma ? pick<true>(p.scalar_type(), code.scalar_type(), ranked)
                       : pick<false>(p.scalar_type(), code.scalar_type(), ranked);
    TORCH_CHECK(fn != nullptr, "no kernel for this dtype combination");
    const int64_t work = count == 0 ? 0 : K;
    items.push_back(Item{p.data_ptr(), g.data_ptr(), buffer_ptr,
                         code.numel() ? code.data_ptr() : nullptr, table_ptr, count, m,
                         p.size(1), spatial, p.size(1) / m, K, first, fn});
    starts.push_back(starts.back() + work);
  }

  // Every code is checked before anything is written, so bad input leaves all untouched.
  const int64_t n_checks = static_cast<int64_t>(codes_to_check.size());
  std::vector<char> bad(n_checks, 0);
  at::parallel_for(0, n_checks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      bad[c] = codes_ok(codes_to_check[c], code_limits[c]) ? 0 : 1;
    }
  });
  for (int64_t c = 0; c < n_checks; ++c) {
    TORCH_CHECK_VALUE(!bad[c], "kept[", c, "] holds a code outside [0, ", code_limits[c],
                      ") (a rank beyond the table or a position >= m)");
  }

  const int64_t total = starts.back();
  constexpr int64_t kGrainBlocks = 4096;
  at::parallel_for(0, total, kGrainBlocks, [&](int64_t begin, int64_t end) {
    // First item whose range ends after begin.
    int64_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    while (begin < end && i < n_params) {
      const int64_t item_end = starts[i + 1];
      if (item_end > begin) {
        const int64_t stop = std::min(end, item_end);
        const Item& it = items[i];
        it.fn(it, begin - starts[i], stop - starts[i], hyper);
        begin = stop;
      }
      ++i;
    }
  });

  for (int64_t i = 0; i < n_params; ++i) {
    torch::autograd::impl::bump_version(params[i]);
    if (has_momentum && !created[i].has_value()) {
      torch::autograd::impl::bump_version(*buffers[i]);
    }
  }
  return created;
}

// add(a, b, alpha) exactly as the kernel computes it, for the rounding probe.
at::Tensor probe_add(const at::Tensor& a, const at::Tensor& b, double alpha, bool fma) {
  TORCH_CHECK_VALUE(a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                        a.scalar_type() == b.scalar_type() && a.device().is_cpu(),
                    "probe_add: contiguous CPU tensors of one shape and dtype required");
  at::Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "probe_add", [&] {
    using A = at::opmath_type<scalar_t>;
    const A s = static_cast<A>(static_cast<scalar_t>(alpha));
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < a.numel(); ++i) {
      po[i] = static_cast<scalar_t>(fma ? madd<true, A>(pb[i], s, pa[i])
                                        : madd<false, A>(pb[i], s, pa[i]));
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fused_kept_sgd", &fused_kept_sgd, "Fused SGD step on kept N:M entries (CPU)");
  module.def("probe_add", &probe_add, "add(a, b, alpha) with the kernel's rounding");
}
