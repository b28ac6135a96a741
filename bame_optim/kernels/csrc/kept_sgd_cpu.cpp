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
#include <optional>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include "kept_common.h"
#include "kept_simd.h"
#include "kept_streams.h"

namespace {

using bame::Blocks;
using bame::check_plain;
using bame::madd;

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

// One parameter. Sparse: the blocks of Blocks are the work units. Dense (no kept set): every
// entry, the units are entries (only param, grad of Blocks are set).
struct Item : Blocks {
  void* buffer = nullptr;  // sparse: [K, count] in block order; dense: param-shaped; or nullptr
  bool first = false;      // momentum buffer created by this call
  SegmentFn fn = nullptr;
  void* gather = nullptr;   // bame::MoveFn<T> of the item's dtype (sparse only)
  void* scatter = nullptr;  // likewise
};

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


// Sparse: blocks [k0, k1) a chunk at a time: gather the kept weights and gradients, update
// them with the momentum (already contiguous in block order), scatter the weights back.
template <typename T, bool FMA>
void run_sparse(const Item& it, int64_t k0, int64_t k1, const Hyper& hyper) {
  const Update<T, FMA> update(hyper);
  T* buffer = static_cast<T*>(it.buffer);
  T none[bame::kMaxRun];  // the momentum of a run without momentum (unused)
  auto step = [&](T* w, T* g, int64_t e, int64_t len) {
    update(w, g, buffer ? buffer + e : none, len, it.first);
  };
  // The blocks no stream takes go in chunks.
  auto chunks = [&](int64_t b0, int64_t b1) {
    if (b0 >= b1) return;
    const auto gather_fn = reinterpret_cast<bame::MoveFn<T>>(it.gather);
    const auto scatter_fn = reinterpret_cast<bame::MoveFn<T>>(it.scatter);
    const int64_t n = it.count;
    const int64_t blocks = std::min(b1 - b0, bame::chunk_blocks(it, sizeof(T)));
    const int64_t size = blocks * n;
    std::vector<T> w(size), g(size), scratch;
    if (buffer == nullptr) scratch.resize(size);
    for (int64_t c0 = b0, c1; c0 < b1; c0 = c1) {
      c1 = bame::chunk_end(it, c0, b1, blocks);
      const int64_t len = (c1 - c0) * n;
      if (buffer && !it.first) bame::prefetch_range(buffer + c0 * n, len * sizeof(T));
      gather_fn(it, c0, c1, w.data(), g.data());
      update(w.data(), g.data(), buffer ? buffer + c0 * n : scratch.data(), len, it.first);
      scatter_fn(it, c0, c1, w.data(), nullptr);
    }
  };
  auto ahead = [&](int64_t e) {
    if (buffer) __builtin_prefetch(buffer + e, 1);
  };
  bame::run_streams<T>(it, k0, k1, step, ahead, chunks);
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

// Fills it.fn and, for sparse items, it.gather; false for an unsupported dtype.
bool pick(Item& it, at::ScalarType dtype, at::ScalarType code_dtype, bool dense, bool fma) {
#define BAME_PICK(T)                                                            \
  it.fn = dense ? (fma ? &run_dense<T, true> : &run_dense<T, false>)            \
                : (fma ? &run_sparse<T, true> : &run_sparse<T, false>);         \
  if (!dense) {                                                                \
    it.gather = reinterpret_cast<void*>(bame::pick_move<T, false>(code_dtype, it.table != nullptr, it.count, it.spatial > 1)); \
    it.scatter = reinterpret_cast<void*>(bame::pick_move<T, true>(code_dtype, it.table != nullptr, it.count, it.spatial > 1)); \
  }                                                                           \
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

}  // namespace

// Declared in module.cpp, which binds it.
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
    bool fma,
    bool avx512) {
  const int64_t n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(grads.size() == params.size() && buffers.size() == params.size() &&
                        kept.size() == params.size() && tables.size() == params.size() &&
                        counts.size() == params.size(),
                    "params, grads, momentum_buffers, kept and counts must have equal lengths");
  TORCH_CHECK_VALUE(m >= 1, "Invalid m value: ", m);
  const bool has_momentum = momentum != 0;
  const Hyper hyper{lr, momentum, dampening, weight_decay, nesterov, maximize};

  std::vector<Item> items(n_params);
  std::vector<std::optional<at::Tensor>> created(n_params);
  std::vector<int64_t> check_index;  // sparse items, for the code check
  std::vector<int64_t> code_limits;
  std::vector<int64_t> starts{0};
  bame::Tables tables_of_call;  // kept_simd.h's lane and offset tables
  const bool wide = avx512 && bame::cpu_has_avx512();
  for (int64_t i = 0; i < n_params; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const bool dense = !(kept[i].has_value() && kept[i]->defined());
    check_plain(p, "params", i, !dense);
    check_plain(g, "grads", i, !dense);
    TORCH_CHECK_VALUE(supported_dtype(p.scalar_type()), "params[", i, "] has unsupported dtype ",
                      p.scalar_type(), " (float32, float64, float16, bfloat16)");
    TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(), "grads[", i,
                      "] must match params[", i, "] in dtype and shape");
    Item& it = items[i];
    it.param = p.data_ptr();
    it.grad = g.data_ptr();
    int64_t buffer_rows = p.numel();
    int64_t work = p.numel();
    if (!dense) {
      bame::setup_blocks(it, p, g, *kept[i], tables[i], counts[i], m, i, code_limits);
      bame::attach_tables(it, tables_of_call);
      it.avx512 = wide;
      check_index.push_back(i);
      buffer_rows = it.blocks;
      work = it.count == 0 ? 0 : it.blocks;
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
    starts.push_back(starts.back() + work);
  }
  bame::check_codes(kept, check_index, code_limits);

  // One parallel loop over the work units (blocks, or entries of dense items) of all items.
  bame::for_each_unit(starts, 4096, [&](int64_t i, int64_t begin, int64_t end) {
    const Item& it = items[i];
    it.fn(it, begin, end, hyper);
  });

  for (int64_t i = 0; i < n_params; ++i) {
    bame::bump_version(params[i]);
    if (has_momentum && !created[i].has_value()) bame::bump_version(*buffers[i]);
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

// Bound in module.cpp (the tests compare the AVX-512 and AVX2 paths where both run).
bool cpu_has_avx512() { return bame::cpu_has_avx512(); }
