// Python bindings of the fused kept-SGD and kept-AdamW CPU kernels (one extension).

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "kept_common.h"  // readable_view

std::vector<std::optional<at::Tensor>> fused_kept_sgd(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& buffers,
    const std::vector<std::optional<at::Tensor>>& kept,
    const std::vector<std::optional<at::Tensor>>& tables, const std::vector<int64_t>& counts,
    int64_t m, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool fma, bool avx512);
at::Tensor probe_add(const at::Tensor& a, const at::Tensor& b, double alpha, bool fma);
void fused_kept_adamw(const std::vector<at::Tensor>& params,
                      const std::vector<at::Tensor>& grads,
                      const std::vector<std::optional<at::Tensor>>& exp_avgs,
                      const std::vector<std::optional<at::Tensor>>& exp_avg_sqs,
                      const std::vector<std::optional<at::Tensor>>& max_exp_avg_sqs,
                      const std::vector<std::optional<at::Tensor>>& kept,
                      const std::vector<std::optional<at::Tensor>>& tables,
                      const std::vector<int64_t>& counts,
                      const std::vector<double>& step_sizes,
                      const std::vector<double>& bias_correction2_sqrts, int64_t m,
                      double lr, double beta1, double beta2, double weight_decay, double eps,
                      bool amsgrad, bool maximize, bool fma, bool fma_addcmul, bool avx512);
at::Tensor probe_addcmul(const at::Tensor& a, const at::Tensor& b, double value, bool fma);
// evolve_cpu.cpp, evolve_apply_cpu.cpp: the fused passes of the evolve-phase mask update,
// over the parameters of one group at a time.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> evolve_blocks(
    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& grads,
    const std::vector<std::vector<int64_t>>& weight_layouts,
    const std::vector<std::vector<int64_t>>& grad_layouts, const std::vector<at::Tensor>& kept,
    const std::vector<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& counts,
    const std::vector<at::Tensor>& proposed, const std::vector<std::optional<at::Tensor>>& by_bits,
    const std::vector<std::optional<at::Tensor>>& binomials,
    const std::vector<std::optional<at::Tensor>>& oscillations,
    const std::vector<std::vector<int64_t>>& norm_modes, int64_t n, int64_t m, double lr,
    double gamma, bool revive_adam, bool zero_pruned);
std::vector<at::Tensor> obf_freeze(const std::vector<at::Tensor>& oscillations,
                                   const std::vector<at::Tensor>& norms, double alpha,
                                   double beta);
at::Tensor top_fraction(const at::Tensor& values, double fraction);
std::tuple<std::vector<at::Tensor>, at::Tensor> apply_evolved(
    const std::vector<at::Tensor>& weights, const std::vector<std::vector<int64_t>>& layouts,
    const std::vector<std::vector<at::Tensor>>& buffers, const std::vector<at::Tensor>& kept,
    const std::vector<std::optional<at::Tensor>>& masks, const std::vector<int64_t>& counts,
    const std::vector<at::Tensor>& proposed, const std::vector<at::Tensor>& frozen, int64_t m);
bool zero_pruned(const at::Tensor& weight, const std::vector<int64_t>& layout,
                 const at::Tensor& kept, const std::optional<at::Tensor>& masks, int64_t count,
                 int64_t m);
at::Tensor probe_norm(const at::Tensor& rows, const std::vector<int64_t>& norm_mode);
bool cpu_has_avx512();  // kept_sgd_cpu.cpp

// kept_sgd_cpu.first_unsupported's test of a step's (param, grad) pairs, here so that it costs
// no Python attribute lookups (a dozen per pair there): the index of the first pair that is not
// two plain (Tensor or Parameter, no subclass) strided CPU tensors of one dtype (float32,
// float64; with half also float16, bfloat16), shape and strides, contiguous, channels-last
// or the transposed view of a contiguous 2-D tensor (bame::readable_view), without a
// neg/conj bit; or -1. As zip(strict=True), lists of different lengths raise ValueError once
// the shorter one is exhausted.
static int64_t first_unsupported(const py::list& params, const py::list& grads, bool half) {
  const Py_ssize_t size = std::min(PyList_GET_SIZE(params.ptr()), PyList_GET_SIZE(grads.ptr()));
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* param_object = PyList_GET_ITEM(params.ptr(), i);
    PyObject* grad_object = PyList_GET_ITEM(grads.ptr(), i);
    if (grad_object == Py_None || !THPVariable_CheckExact(param_object) ||
        !THPVariable_CheckExact(grad_object)) {
      return i;
    }
    const at::Tensor& param = THPVariable_Unpack(param_object);
    const at::Tensor& grad = THPVariable_Unpack(grad_object);
    const at::ScalarType dtype = param.scalar_type();
    const bool dtype_ok = dtype == at::kFloat || dtype == at::kDouble ||
                          (half && (dtype == at::kHalf || dtype == at::kBFloat16));
    if (!param.device().is_cpu() || !grad.device().is_cpu() || !dtype_ok ||
        grad.scalar_type() != dtype || param.layout() != at::kStrided ||
        grad.layout() != at::kStrided) {
      return i;
    }
    if (param.strides() != grad.strides() || param.sizes() != grad.sizes()) {
      return i;
    }
    if (!param.is_contiguous() && !bame::readable_view(param)) {
      return i;
    }
    if (param.is_neg() || param.is_conj() || grad.is_neg() || grad.is_conj()) {
      return i;
    }
  }
  if (PyList_GET_SIZE(params.ptr()) != PyList_GET_SIZE(grads.ptr())) {
    throw py::value_error("first_unsupported: params and grads have different lengths");
  }
  return -1;
}

// kept_adamw_cpu's step counts, read and advanced here (an item() and an add_ per parameter
// there). The plain (Tensor, no subclass) one-element strided CPU tensors of a floating or
// integral (not bool) dtype that do not require grad are "here" (the others keep Python's
// checks and errors); read_steps returns the index of the first other entry (or -1) and
// float(step.item()) + 1 of each entry before it, as Python computes it.
static bool step_here(PyObject* object) {
  if (!THPVariable_CheckExact(object)) return false;
  const at::Tensor& step = THPVariable_Unpack(object);
  const at::ScalarType dtype = step.scalar_type();
  return step.numel() == 1 && step.device().is_cpu() && step.layout() == at::kStrided &&
         !step.requires_grad() &&
         (at::isFloatingType(dtype) || at::isIntegralType(dtype, /*includeBool=*/false));
}

static std::tuple<int64_t, std::vector<double>> read_steps(const py::list& steps) {
  std::vector<double> next;
  const Py_ssize_t size = PyList_GET_SIZE(steps.ptr());
  next.reserve(size);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* object = PyList_GET_ITEM(steps.ptr(), i);
    if (!step_here(object)) return {i, next};
    next.push_back(THPVariable_Unpack(object).item().toDouble() + 1);
  }
  return {-1, next};
}

// step += 1 in place on entries read_steps took, as torch._foreach_add_(steps, 1) does on the
// CPU (add_ per tensor; float32/float64 written directly, the version bumped as add_ does: one
// rounding of step + 1 either way).
static void advance_steps(const py::list& steps) {
  const Py_ssize_t size = PyList_GET_SIZE(steps.ptr());
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* object = PyList_GET_ITEM(steps.ptr(), i);
    TORCH_CHECK_VALUE(step_here(object), "advance_steps: steps[", i,
                      "] is not a plain one-element CPU tensor");
  }
  for (Py_ssize_t i = 0; i < size; ++i) {
    at::Tensor step = THPVariable_Unpack(PyList_GET_ITEM(steps.ptr(), i));
    if (step.is_inference()) {  // no version counter: add_ says where it may be written
      step.add_(1);
    } else if (step.scalar_type() == at::kFloat) {
      float* value = step.data_ptr<float>();
      *value = *value + 1.0f;
      torch::autograd::impl::bump_version(step);
    } else if (step.scalar_type() == at::kDouble) {
      double* value = step.data_ptr<double>();
      *value = *value + 1.0;
      torch::autograd::impl::bump_version(step);
    } else {
      step.add_(1);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is released while a step runs (tensors only; as torch's own ops do).
  module.def("fused_kept_sgd", &fused_kept_sgd, "Fused SGD step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("fused_kept_adamw", &fused_kept_adamw,
             "Fused AdamW step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("first_unsupported", &first_unsupported,
             "The index of the first (param, grad) pair the fused kept kernels do not take, or -1");
  module.def("read_steps", &read_steps, "AdamW's step counts + 1, up to the first not taken");
  module.def("advance_steps", &advance_steps, "AdamW's step counts += 1");
  module.def("probe_add", &probe_add, "add(a, b, alpha) with the kernel's rounding");
  module.def("probe_addcmul", &probe_addcmul, "addcmul(a, b, b, value) with the kernel's rounding");
  module.def("evolve_blocks", &evolve_blocks,
             "LMA scores, top-n proposal, SAD, oscillation EMA and block norms (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("obf_freeze", &obf_freeze, "OBF's frozen blocks (Eq. 10) (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("top_fraction", &top_fraction, "core.evolution.top_fraction (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("apply_evolved", &apply_evolved,
             "New kept sets, newly pruned weights zeroed, compact buffers remapped (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("zero_pruned", &zero_pruned,
             "Pruned weights not +0.0 set to +0.0, in place; whether one was (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("cpu_has_avx512", &cpu_has_avx512,
             "Whether this CPU runs the kernels' AVX-512 paths (F, BW, DQ, VL)");
  module.def("probe_norm", &probe_norm, "ATen's last-dim L2 norm model, for the probe");
}
