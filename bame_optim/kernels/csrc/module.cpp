// Python bindings of the fused kept-SGD and kept-AdamW CPU kernels (one extension).

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
#include <vector>

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
at::Tensor probe_norm(const at::Tensor& rows, const std::vector<int64_t>& norm_mode);
bool cpu_has_avx512();  // kept_sgd_cpu.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is released while a step runs (tensors only; as torch's own ops do).
  module.def("fused_kept_sgd", &fused_kept_sgd, "Fused SGD step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("fused_kept_adamw", &fused_kept_adamw,
             "Fused AdamW step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
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
  module.def("cpu_has_avx512", &cpu_has_avx512,
             "Whether this CPU runs the kernels' AVX-512 paths (F, BW, DQ, VL)");
  module.def("probe_norm", &probe_norm, "ATen's last-dim L2 norm model, for the probe");
}
