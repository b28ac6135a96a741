// Fused SGD step on the kept entries of N:M sparse parameters (CPU).
//
// One call updates a list of parameters in one pass over their kept entries, parallel over
// blocks with at::parallel_for. Loaded by bame_optim/kernels/kept_sgd_cpu.py (JIT, on first
// use); the math and the rounding contract are documented there.
//
// Rounding contract: every operation rounds exactly as the eager composition
// (kept_indices -> gather_kept -> torch.optim.sgd.sgd -> scatter_kept_) does with ATen's CPU
// kernels (their vectorised loops; for float16/bfloat16 ATen's scalar tail rounds twice):
//   add(a, b, alpha) = fmadd(b, alpha, a), alpha cast to the tensor's dtype first
//                      (fused or not: the FMA template flag, chosen by a probe in Python);
//   mul(a, s)        = a * s, s cast to the op-math type (float for half/bfloat16);
//   every intermediate tensor of the eager path is rounded to the parameter's dtype.
// The file must be compiled with -ffp-contract=off so that the unfused form stays unfused.

// Few headers on purpose: they are most of the build time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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

// One parameter. Sparse: its contiguous [out, C, *k] data seen as K blocks (o, s, b) in block
// order, s < S = prod(k), b < B = C / M; entry j of a block is at o*C*S + (b*M + pos_j)*S + s,
// and the work units are blocks. Dense (no kept set): every entry, the units are entries.
struct Item {
  void* param;
  const void* grad;
  void* buffer;            // sparse: [K, count] in block order; dense: param-shaped; or nullptr
  const void* code;        // [K] colex ranks, or [K, count] sorted positions; dense: nullptr
  const int32_t* table;    // [C, count] positions per rank; nullptr for positions
  int64_t count;
  int64_t m;
  int64_t channels;        // C
  int64_t spatial;         // S
  int64_t blocks_per_row;  // B
  bool first;              // momentum buffer created by this call
  SegmentFn fn;
  void* gather;            // GatherFn<T> of the item's dtype (sparse only)
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
  // vectorisable: w = weights, g = gradients (scratch, overwritten), b = momentum.
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

constexpr int64_t kChunkElements = 2048;  // scratch per thread: a few L1-resident arrays

// Copies the kept weights and gradients of blocks [k0, k1) into w and g (block order) and
// their element offsets into offsets.
template <typename T>
using GatherFn = void (*)(const Item&, int64_t, int64_t, T*, T*, int64_t*);

// GCC 12.2 hit an internal compiler error vectorising this loop (with a compile-time count);
// vectorising a gather gains nothing here anyway.
#if defined(__GNUC__) && !defined(__clang__)
#define BAME_NO_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define BAME_NO_VECTORIZE
#endif

template <typename T, typename Code, bool RANKED>
BAME_NO_VECTORIZE void gather(const Item& it, int64_t k0, int64_t k1, T* __restrict w,
                              T* __restrict g, int64_t* __restrict offsets) {
  const T* param = static_cast<const T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  const Code* code = static_cast<const Code*>(it.code);
  const int64_t n = it.count;
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
    int64_t base = o * row_stride + s + b * block_stride;
    for (; b < b_end; ++b, ++k, base += block_stride) {
      if constexpr (RANKED) {
        const int32_t* row = it.table + static_cast<int64_t>(code[k]) * n;
        for (int64_t j = 0; j < n; ++j, ++e) {
          const int64_t off = base + static_cast<int64_t>(row[j]) * S;
          offsets[e] = off;
          w[e] = param[off];
          g[e] = grad[off];
        }
      } else {
        const Code* row = code + k * n;
        for (int64_t j = 0; j < n; ++j, ++e) {
          const int64_t off = base + static_cast<int64_t>(row[j]) * S;
          offsets[e] = off;
          w[e] = param[off];
          g[e] = grad[off];
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

// Sparse: blocks [k0, k1) a chunk at a time: gather the kept weights and gradients, update
// them with the momentum (already contiguous in block order), scatter the weights back.
template <typename T, bool FMA>
void run_sparse(const Item& it, int64_t k0, int64_t k1, const Hyper& hyper) {
  const Update<T, FMA> update(hyper);
  const auto gather_fn = reinterpret_cast<GatherFn<T>>(it.gather);
  T* param = static_cast<T*>(it.param);
  T* buffer = static_cast<T*>(it.buffer);
  const int64_t n = it.count;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkElements / n);
  std::vector<T> w(chunk_blocks * n), g(chunk_blocks * n), scratch;
  std::vector<int64_t> offsets(chunk_blocks * n);
  if (buffer == nullptr) scratch.resize(chunk_blocks * n);
  for (int64_t c0 = k0; c0 < k1; c0 += chunk_blocks) {
    const int64_t c1 = std::min(k1, c0 + chunk_blocks);
    const int64_t len = (c1 - c0) * n;
    gather_fn(it, c0, c1, w.data(), g.data(), offsets.data());
    update(w.data(), g.data(), buffer ? buffer + c0 * n : scratch.data(), len, it.first);
    for (int64_t i = 0; i < len; ++i) param[offsets[i]] = w[i];
  }
}

// Dense: entries [e0, e1), in place, a chunk at a time (the gradient is copied: it is
// overwritten by maximize and weight decay, as eager does on new tensors).
template <typename T, bool FMA>
void run_dense(const Item& it, int64_t e0, int64_t e1, const Hyper& hyper) {
  const Update<T, FMA> update(hyper);
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  T* buffer = static_cast<T*>(it.buffer);
  std::vector<T> g(kChunkElements), scratch;
  if (buffer == nullptr) scratch.resize(kChunkElements);
  for (int64_t c0 = e0; c0 < e1; c0 += kChunkElements) {
    const int64_t len = std::min(e1, c0 + kChunkElements) - c0;
    std::copy(grad + c0, grad + c0 + len, g.data());
    update(param + c0, g.data(), buffer ? buffer + c0 : scratch.data(), len, it.first);
  }
}

template <typename T>
void* pick_gather(at::ScalarType code_dtype, bool ranked) {
  switch (code_dtype) {
    case at::kByte:
      return ranked ? reinterpret_cast<void*>(&gather<T, uint8_t, true>)
                    : reinterpret_cast<void*>(&gather<T, uint8_t, false>);
    case at::kShort:
      return ranked ? reinterpret_cast<void*>(&gather<T, int16_t, true>)
                    : reinterpret_cast<void*>(&gather<T, int16_t, false>);
    case at::kLong:
      return ranked ? reinterpret_cast<void*>(&gather<T, int64_t, true>)
                    : reinterpret_cast<void*>(&gather<T, int64_t, false>);
    default:
      return nullptr;
  }
}

// Fills it.fn and, for sparse items, it.gather; false for an unsupported dtype.
bool pick(Item& it, at::ScalarType dtype, at::ScalarType code_dtype, bool dense, bool fma) {
#define BAME_PICK(T)                                                            \
  it.fn = dense ? (fma ? &run_dense<T, true> : &run_dense<T, false>)            \
                : (fma ? &run_sparse<T, true> : &run_sparse<T, false>);         \
  it.gather = dense ? nullptr : pick_gather<T>(code_dtype, it.table != nullptr); \
  return dense || it.gather != nullptr;
  switch (dtype) {
    case at::kFloat: {
      BAME_PICK(float)
    }
    case at::kDouble: {
      BAME_PICK(double)
    }
    case at::kHalf: {
      BAME_PICK(at::Half)
    }
    case at::kBFloat16: {
      BAME_PICK(at::BFloat16)
    }
    default:
      return false;
  }
#undef BAME_PICK
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool supported_code(at::ScalarType t) {
  return t == at::kByte || t == at::kShort || t == at::kLong;
}

void check_plain(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK_VALUE(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK_VALUE(!t.key_set().has(c10::DispatchKey::Python), what, "[", i,
                    "] is a tensor subclass with __torch_dispatch__ (e.g. DTensor)");
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
    default:
      return codes_in_range<int64_t>(code.data_ptr(), numel, limit);
  }
}

}  // namespace

// Returns, per parameter, the momentum buffer this call created (first step), else None.
// kept[i] None: a dense parameter (every entry, param-shaped momentum; counts[i] ignored).
std::vector<std::optional<at::Tensor>> fused_kept_sgd(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& buffers,
    const std::vector<std::optional<at::Tensor>>& kept,
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
  std::vector<int64_t> check_index;  // sparse items, for the code check
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
    const bool dense = !(kept[i].has_value() && kept[i]->defined());
    Item it{p.data_ptr(), g.data_ptr(), nullptr, nullptr, nullptr, 1, m, 1, 1, 1, false,
            nullptr, nullptr};
    int64_t buffer_rows = p.numel();
    int64_t work = p.numel();
    if (!dense) {
      TORCH_CHECK_VALUE(p.dim() >= 2, "params[", i, "] must have ndim >= 2, got shape ",
                        p.sizes());
      TORCH_CHECK_VALUE(p.size(1) % m == 0, "params[", i, "] shape ", p.sizes(),
                        ": dim 1 is not divisible by m=", m);
      const int64_t count = counts[i];
      TORCH_CHECK_VALUE(0 <= count && count <= m, "Invalid counts[", i, "] value: ", count,
                        " (0 <= count <= m=", m, " is required)");
      const int64_t K = p.numel() / m;
      const at::Tensor& code = *kept[i];
      check_plain(code, "kept", i);
      TORCH_CHECK_VALUE(supported_code(code.scalar_type()), "kept[", i,
                        "] has unsupported dtype ", code.scalar_type(),
                        " (uint8, int16, int64)");
      if (code.dim() == 1) {
        TORCH_CHECK_VALUE(code.size(0) == K, "kept[", i, "] has shape ", code.sizes(),
                          ", expected [", K, "] ranks");
        TORCH_CHECK_VALUE(tables[i].has_value(), "tables[", i, "] is required for ranks");
        const at::Tensor& table = *tables[i];
        check_plain(table, "tables", i);
        TORCH_CHECK_VALUE(table.scalar_type() == at::kInt && table.dim() == 2 &&
                              table.size(1) == count && table.size(0) >= 1,
                          "tables[", i, "] must be int32 [C, count]");
        it.table = table.data_ptr<int32_t>();
        code_limits.push_back(table.size(0));
      } else {
        TORCH_CHECK_VALUE(code.dim() == 2 && code.size(0) == K && code.size(1) == count,
                          "kept[", i, "] has shape ", code.sizes(), ", expected [", K,
                          "] or [", K, ", ", count, "]");
        code_limits.push_back(m);
      }
      check_index.push_back(i);
      it.code = code.numel() ? code.data_ptr() : nullptr;
      it.count = count;
      it.channels = p.size(1);
      for (int64_t d = 2; d < p.dim(); ++d) it.spatial *= p.size(d);
      it.blocks_per_row = p.size(1) / m;
      buffer_rows = K;
      work = count == 0 ? 0 : K;
    }
    if (has_momentum) {
      if (buffers[i].has_value() && buffers[i]->defined()) {
        const at::Tensor& buf = *buffers[i];
        check_plain(buf, "momentum_buffers", i);
        const bool shape_ok = dense ? buf.sizes() == p.sizes()
                                    : buf.dim() == 2 && buf.size(0) == buffer_rows &&
                                          buf.size(1) == it.count;
        TORCH_CHECK_VALUE(buf.scalar_type() == p.scalar_type() && shape_ok,
                          "momentum_buffers[", i, "] must be ", p.scalar_type(), " of shape ",
                          dense ? p.sizes() : at::IntArrayRef({buffer_rows, it.count}),
                          ", got ", buf.scalar_type(), " ", buf.sizes());
        it.buffer = buf.data_ptr();
      } else {
        at::Tensor buf = dense ? at::empty(p.sizes(), p.options())
                               : at::empty({buffer_rows, it.count}, p.options());
        created[i] = buf;
        it.buffer = buf.data_ptr();
        it.first = true;
      }
    }
    const at::ScalarType code_dtype = dense ? at::kByte : kept[i]->scalar_type();
    TORCH_CHECK(pick(it, p.scalar_type(), code_dtype, dense, fma),
                "no kernel for this dtype combination");
    items.push_back(it);
    starts.push_back(starts.back() + work);
  }

  // Every code is checked before anything is written, so bad input leaves all untouched.
  const int64_t n_checks = static_cast<int64_t>(check_index.size());
  std::vector<char> bad(n_checks, 0);
  at::parallel_for(0, n_checks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      bad[c] = codes_ok(*kept[check_index[c]], code_limits[c]) ? 0 : 1;
    }
  });
  for (int64_t c = 0; c < n_checks; ++c) {
    TORCH_CHECK_VALUE(!bad[c], "kept[", check_index[c], "] holds a code outside [0, ",
                      code_limits[c], ") (a rank beyond the table or a position >= m)");
  }

  // One parallel loop over the work units (blocks, or entries of dense items) of all items.
  const int64_t total = starts.back();
  constexpr int64_t kGrainUnits = 4096;
  at::parallel_for(0, total, kGrainUnits, [&](int64_t begin, int64_t end) {
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

  // As in-place ops do (inference tensors keep no version counter).
  auto bump = [](const at::Tensor& t) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  };
  for (int64_t i = 0; i < n_params; ++i) {
    bump(params[i]);
    if (has_momentum && !created[i].has_value()) bump(*buffers[i]);
  }
  return created;
}

// add(a, b, alpha) exactly as the kernel computes it, for the rounding probe.
at::Tensor probe_add(const at::Tensor& a, const at::Tensor& b, double alpha, bool fma) {
  TORCH_CHECK_VALUE(a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes() &&
                        a.scalar_type() == b.scalar_type() && a.device().is_cpu(),
                    "probe_add: contiguous CPU tensors of one shape and dtype required");
  at::Tensor out = at::empty(a.sizes(), a.options());
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
  // The GIL is released while the step runs (tensors only; as torch's own ops do).
  module.def("fused_kept_sgd", &fused_kept_sgd, "Fused SGD step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("probe_add", &probe_add, "add(a, b, alpha) with the kernel's rounding");
}
