r"""Fused CPU kernel for the ordinary step of compact N:M state: AdamW on kept entries only.

The optimizer stores, per sparse parameter ``p``, the kept set of every block (``kept``, see
:mod:`bame_optim.core.kept`) and the moments of kept weights only, ``[K, count]`` in block
order. The eager ordinary step is, per parameter::

    pos = kept_indices(kept, count, m)
    w, g = gather_kept(p, pos, m), gather_kept(p.grad, pos, m)
    torch.optim.adamw.adamw([w], [g], [exp_avg], [exp_avg_sq], ..., [step], ...)
    scatter_kept_(p, pos, w, m)

:func:`fused_kept_adamw_` does the same in one native pass over the kept entries of a whole
list of parameters: parallel over blocks (``at::parallel_for``), a few thousand kept entries
at a time gathered into per-thread scratch arrays (L1-resident), updated with ATen's
``at::vec::Vectorized`` together with the compact moments, and scattered back; no
parameter-sized copies. For each kept entry, with :math:`\gamma` = ``lr``, :math:`\lambda` =
``weight_decay`` and :math:`t` the parameter's step after the increment (as
:class:`torch.optim.AdamW`):

.. math::
    \begin{aligned}
    g_t &\leftarrow -g_t \ \text{if maximize} \\
    \theta_t &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \\
    m_t &\leftarrow \operatorname{lerp}(m_{t-1}, g_t, 1 - \beta_1), \quad
    v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \ \text{if amsgrad, else } v_t \\
    \theta_t &\leftarrow \theta_t - \frac{\gamma}{1 - \beta_1^t} \cdot
        \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
    \end{aligned}

Rounding: float32/float64 go through the operations of torch's single-tensor AdamW in its
order, each rounded as ATen's CPU kernel rounds it (``lerp`` as ``fmadd(w, end - self,
self)``, ``addcmul`` as ``self + (value * t1) * t2`` with the last multiply-add fused or not as
ATen is on this machine, found by a probe on first use), with the bias corrections computed in
Python exactly as torch computes them. So the moments (and ``amsgrad``'s maxima) are
**bit-identical** to ``torch.optim.adamw.adamw`` on the gathered weights, single-tensor and
``foreach``. The weights can differ by an ulp: the kernel's square root is IEEE's (correctly
rounded, as in torch's own ``fused=True`` CPU kernel), while ``Tensor.sqrt`` on CPU builds with
MKL (x86) is not always; the tests hold the weights to the tolerance torch's
``test_fused_matches_forloop`` allows between fused and for-loop AdamW (``assert_close``'s
defaults: rtol 1.3e-6 / atol 1e-5 for float32, 1e-7 / 1e-7 for float64). float16/bfloat16
are not handled (the eager path is used).

Built on first use by :mod:`bame_optim.kernels.native` (one extension with the kept-SGD
kernel); ``BAME_OPTIM_NO_NATIVE`` disables it. Tensors are handled as
:func:`bame_optim.kernels.kept_sgd_cpu.supports` describes (contiguous, channels-last, or the
transposed view of a contiguous 2-D tensor), float32/float64 only (:func:`supports`).
"""

from __future__ import annotations

import threading
from numbers import Real
from types import ModuleType

import torch
from torch import Tensor

from bame_optim.kernels import kept_sgd_cpu, native
from bame_optim.kernels.native import DISABLE_ENV, disabled

__all__ = ["DISABLE_ENV", "DTYPES", "available", "disabled", "first_unsupported",
           "fma_addcmul", "fused_kept_adamw_", "supports"]

DTYPES = (torch.float32, torch.float64)
"""Parameter dtypes the kernel handles (bit-identical to the eager path)."""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fma_addcmul" (the probe's answer), "error"


def available() -> bool:
    """Whether :func:`fused_kept_adamw_` can run: not disabled, compiled, and its rounding
    matches ATen's on this machine (builds on the first call; the result is cached)."""
    return _load() is not None  # None when disabled (read once, per call)


def error() -> str | None:
    """Why the kernel is unavailable (``None`` if it is, or was not tried)."""
    return kept_sgd_cpu.error() or _state.get("error")  # type: ignore[return-value]


def supports(param: Tensor, grad: Tensor | None) -> bool:
    """Whether the kernel handles the sparse parameter ``param`` and its ``grad``
    (:func:`bame_optim.kernels.kept_sgd_cpu.supports` with a dtype in :data:`DTYPES`)."""
    return kept_sgd_cpu.first_unsupported([param], [grad], DTYPES) < 0


def first_unsupported(params: list[Tensor], grads: list[Tensor | None]) -> int:
    """The index of the first pair :func:`supports` rejects, or -1."""
    return kept_sgd_cpu.first_unsupported(params, grads, DTYPES)


def fused_kept_adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    avx512: bool | None = None,
) -> None:
    """AdamW on the kept entries of N:M sparse ``params``, in place on ``params``, the moments
    and ``state_steps`` (each advanced by one first, as :func:`torch.optim.adamw.adamw`
    does); see the module docstring.

    Args:
        params: sparse parameters (``[out, in]`` or ``[out, in, *k]``), float32/float64 CPU
            tensors as :func:`supports` describes.
        grads: their gradients, same shape, dtype and strides.
        exp_avgs, exp_avg_sqs: compact moments ``[K, count]`` (contiguous, the parameter's
            dtype), one per parameter.
        max_exp_avg_sqs: compact running maxima ``[K, count]`` with ``amsgrad``, else ignored
            (may be empty).
        state_steps: one CPU scalar step tensor per parameter (as :class:`torch.optim.AdamW`
            keeps it).
        kept, counts, m: the stored kept sets (:func:`bame_optim.core.kept.encode_kept`), the
            number kept per block and the block size ``M``.
        amsgrad, beta1, beta2, lr, weight_decay, eps, maximize: as
            :func:`torch.optim.adamw.adamw`; a Tensor ``lr`` / betas (one element, CPU) is
            read as a Python float, as torch's non-capturable paths do.
        avx512: as for :func:`bame_optim.kernels.kept_sgd_cpu.fused_kept_sgd_`.

    Raises:
        ValueError: on unsupported or inconsistent input (checked before anything is written;
            the step counts are advanced only after the checks pass).
        RuntimeError: if the kernel is disabled or unavailable (check :func:`available`).
    """
    module = _load()  # None when disabled
    if module is None:
        if disabled():
            raise RuntimeError(f"native kernels are disabled ({DISABLE_ENV} is set)")
        raise RuntimeError(f"the fused kept-AdamW kernel is unavailable: {error()}")
    size = len(params)
    lengths = [len(grads), len(exp_avgs), len(exp_avg_sqs), len(state_steps), len(kept),
               len(counts)]
    if amsgrad:
        lengths.append(len(max_exp_avg_sqs))
    if any(length != size for length in lengths):
        raise ValueError(
            "params, grads, exp_avgs, exp_avg_sqs, state_steps, kept, counts (and "
            f"max_exp_avg_sqs with amsgrad) must have equal lengths, got {size}, {lengths}"
        )
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m value: {m!r} (a positive integer is required)")
    hyper = {}
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2),
                        ("weight_decay", weight_decay), ("eps", eps)):
        hyper[name] = _scalar(name, value)
    # The extension reads plain CPU step tensors (one item() each here), the rest here.
    other, steps = module.read_steps(state_steps) if type(state_steps) is list else (0, [])
    if other >= 0:
        for i, step in enumerate(state_steps):
            if not isinstance(step, Tensor) or step.numel() != 1 or step.device.type != "cpu":
                raise ValueError(f"Invalid state_steps[{i}]: a one-element CPU tensor is required")
    tables, _ = kept_sgd_cpu.tables_for(kept, counts, m)
    if other >= 0:
        # torch's non-capturable AdamW: step_t += 1, then bias corrections from step_t.item().
        steps = [float(step.item()) + 1 for step in state_steps]
    beta1_, beta2_, lr_ = hyper["beta1"], hyper["beta2"], hyper["lr"]
    step_sizes = [lr_ / (1 - beta1_**step) for step in steps]
    bc2_sqrts = [(1 - beta2_**step) ** 0.5 for step in steps]
    module.fused_kept_adamw(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], kept, tables,
        list(counts), step_sizes, bc2_sqrts, m, lr_, beta1_, beta2_, hyper["weight_decay"],
        hyper["eps"], bool(amsgrad), bool(maximize), kept_sgd_cpu.fma(),
        _state["fma_addcmul"], native.avx512_allowed(avx512),
    )
    if other < 0:
        module.advance_steps(state_steps)  # as below, without an add_ per tensor
    elif state_steps:
        torch._foreach_add_(state_steps, 1)


def fma_addcmul() -> bool:
    """Whether ATen's CPU ``addcmul`` fuses its multiply-add here (the probe's answer, as
    :func:`bame_optim.kernels.kept_sgd_cpu.fma` is for ``add``; :func:`available` must be
    True)."""
    return bool(_state["fma_addcmul"])


def _scalar(name: str, value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            raise ValueError(f"Invalid {name} value: a Tensor {name} must be one CPU element")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"Invalid {name} value: {value!r} (a real number is required)")
    return float(value)


def _load() -> ModuleType | None:
    return native.probe_once(kept_sgd_cpu._load, _state, _lock, "fma_addcmul", _probe_addcmul,
                             "the fused kept-AdamW kernel is")


def _probe_addcmul(module: ModuleType) -> bool:
    """Whether ATen's CPU ``addcmul(a, b, b, value)`` fuses its last multiply-add here (body
    and scalar tail); raises if neither rounding reproduces it."""
    generator = torch.Generator().manual_seed(0)
    modes = []
    for dtype in DTYPES:
        # 1000 + 7 entries: several vector chunks and a scalar tail at any vector width.
        a = torch.rand(1007, generator=generator, dtype=torch.float64).to(dtype)
        b = torch.randn(1007, generator=generator, dtype=torch.float64).to(dtype)
        values = (1 - 0.999, 1 - 0.95, 0.37)
        expected = [a.clone().addcmul_(b, b, value=value) for value in values]
        modes.append([
            all(torch.equal(module.probe_addcmul(a, b, value, fused), e)
                for value, e in zip(values, expected, strict=True))
            for fused in (True, False)
        ])
    if all(fused for fused, _ in modes):
        return True
    if all(unfused for _, unfused in modes):
        return False
    raise RuntimeError(
        "ATen's CPU addcmul rounds neither as a fused nor as an unfused multiply-add "
        f"(float32, float64: {modes}), so the kernel could not be bit-identical"
    )
