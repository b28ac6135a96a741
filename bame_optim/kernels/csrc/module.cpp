// Python bindings of the fused kept-SGD and kept-AdamW CPU kernels (one extension).

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

std::vector<std::optional<at::Tensor>> fused_kept_sgd(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<std::optional<at::Tensor>>& buffers,
    const std::vector<std::optional<at::Tensor>>& kept,
    const std::vector<std::optional<at::Tensor>>& tables, const std::vector<int64_t>& counts,
    int64_t m, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize, bool fma);
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
                      bool amsgrad, bool maximize, bool fma, bool fma_addcmul);
at::Tensor probe_addcmul(const at::Tensor& a, const at::Tensor& b, double value, bool fma);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // The GIL is released while a step runs (tensors only; as torch's own ops do).
  module.def("fused_kept_sgd", &fused_kept_sgd, "Fused SGD step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("fused_kept_adamw", &fused_kept_adamw,
             "Fused AdamW step on kept N:M entries (CPU)",
             py::call_guard<py::gil_scoped_release>());
  module.def("probe_add", &probe_add, "add(a, b, alpha) with the kernel's rounding");
  module.def("probe_addcmul", &probe_addcmul, "addcmul(a, b, b, value) with the kernel's rounding");
}
