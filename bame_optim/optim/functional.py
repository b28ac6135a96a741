r"""The update rules of the engine's optimizers as pure functions over compact state:
:func:`kept_sgd` and :func:`kept_adamw`.

:func:`kept_sgd` is SGD restricted to the kept weights of N:M sparse parameters. For each
parameter with kept set :math:`B` (stored form ``kept``, ``count`` kept per block) it runs

.. math::
    w \leftarrow W[B],\quad g \leftarrow G[B],\quad
    (w, b) \leftarrow \text{SGD}(w, g, b),\quad W[B] \leftarrow w

where :math:`b` is the compact momentum ``[K, count]`` and SGD is exactly
:func:`torch.optim.sgd.sgd` (weight decay, momentum, dampening, Nesterov, maximize) on the
gathered ``[K, count]`` copies: the same arithmetic, element by element, as
:class:`torch.optim.SGD` on the kept entries, and nothing moves at pruned entries.
Dense parameters are not handled here: the optimizers pass them to
:func:`torch.optim.sgd.sgd` directly.

Paths, chosen by ``fused`` (as ``foreach`` chooses in torch): the fused native kernels of
:mod:`bame_optim.kernels.kept_sgd_cpu` and :mod:`bame_optim.kernels.kept_adamw_cpu` where
they are available and support every tensor (``fused=None`` tries them), else gather,
:func:`torch.optim.sgd.sgd` / :func:`torch.optim.adamw.adamw` (per-tensor or ``foreach``) and
scatter. The SGD paths agree bit for bit; the AdamW paths agree bit for bit on the moments and
within the tolerance torch allows between its fused and for-loop AdamW on the weights (see
:mod:`bame_optim.kernels.kept_adamw_cpu`; tested). On CUDA both functions run the Triton
kernels of :mod:`bame_optim.kernels.triton_kept` (as the ``torch.library`` ops of
:mod:`bame_optim.kernels.ops`) where they support the tensors, unless ``fused=False``.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from bame_optim.core.kept import gather_kept, kept_indices, scatter_kept_
from bame_optim.kernels import kept_adamw_cpu, kept_sgd_cpu

__all__ = ["kept_adamw", "kept_sgd"]


def kept_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """SGD on the kept weights, in place on ``params`` and ``momentum_buffers`` (a ``None``
    buffer is replaced by a new ``[K, count]`` one, as :func:`torch.optim.sgd.sgd` does).

    Args:
        params, grads: parameter-shaped tensors (this rank's part of a sharded parameter).
        momentum_buffers: compact momentum ``[K, count]`` per parameter, or ``None``.
        kept, counts: the stored kept sets (:func:`bame_optim.core.kept.encode_kept`) and the
            number kept per block.
        m: block size ``M``.
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as
            :func:`torch.optim.sgd.sgd`.
        fused: ``True`` requires the fused kernel (native on the CPU, Triton on CUDA),
            ``False`` never uses it, ``None`` uses it where it is available and supports the
            tensors.
    """
    if not params:
        return
    if fused is not False and params[0].is_cuda:
        from bame_optim.kernels import ops  # the Triton kernels, as a torch.library op

        if ops.usable(params, grads, fused):
            ops.kept_sgd_(
                params, grads, momentum_buffers, kept, counts, m=m, lr=lr, momentum=momentum,
                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                maximize=maximize,
            )
            return
    if fused is not False and _use_fused(kept_sgd_cpu, "kept-SGD", params, grads, fused):
        kept_sgd_cpu.fused_kept_sgd_(
            params, grads, momentum_buffers, kept, counts, m=m, lr=float(lr),
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize,
        )
        return
    positions, kept_params, kept_grads = _gather(params, grads, kept, counts, m)
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    sgd(
        kept_params,
        kept_grads,
        momentum_buffers,
        foreach=foreach,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
    )
    _scatter(params, positions, kept_params, m)


def kept_adamw(
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
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    r"""AdamW on the kept weights, in place on ``params``, the moments and ``state_steps``.

    For each parameter, :math:`w \leftarrow W[B],\ g \leftarrow G[B]`, then
    :func:`torch.optim.adamw.adamw` on ``w`` with the compact moments ``[K, count]``
    (:math:`w \leftarrow w(1 - \eta\lambda)`, :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`w \leftarrow w - \eta \hat m / (\sqrt{\hat v} + \epsilon)` with the bias
    corrections of the parameter's step count), and :math:`W[B] \leftarrow w`: the arithmetic
    of :class:`torch.optim.AdamW` on the kept entries, and nothing moves at pruned entries.

    Args:
        params, grads: parameter-shaped tensors (this rank's part of a sharded parameter).
        exp_avgs, exp_avg_sqs: compact moments ``[K, count]``, one per parameter.
        max_exp_avg_sqs: compact running maxima ``[K, count]`` (``amsgrad`` only, else empty).
        state_steps: one scalar step tensor per parameter (advanced here).
        kept, counts, m: as :func:`kept_sgd`.
        amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, foreach: as
            :func:`torch.optim.adamw.adamw`.
        fused: ``True`` requires the fused kernel (native on the CPU for float32/float64,
            Triton on CUDA), ``False`` never uses it, ``None`` uses it where it is available and
            supports the tensors.
    """
    if not params:
        return
    if fused is not False and params[0].is_cuda:
        from bame_optim.kernels import ops  # the Triton kernels, as a torch.library op

        if ops.usable(params, grads, fused):
            ops.kept_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kept,
                counts, m=m, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
                weight_decay=weight_decay, eps=eps, maximize=maximize,
            )
            return
    if fused is not False and _use_fused(kept_adamw_cpu, "kept-AdamW", params, grads, fused):
        kept_adamw_cpu.fused_kept_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kept, counts,
            m=m, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
            eps=eps, maximize=maximize,
        )
        return
    positions, kept_params, kept_grads = _gather(params, grads, kept, counts, m)
    adamw(
        kept_params,
        kept_grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=foreach,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
    )
    _scatter(params, positions, kept_params, m)


def _use_fused(
    kernel: ModuleType, what: str, params: list[Tensor], grads: list[Tensor], fused: bool | None
) -> bool:
    """Whether ``kernel`` runs this step; with ``fused=True`` a ``ValueError`` naming the
    first tensor it cannot take (device, dtype, layout) or why it is unavailable. The tensors
    are checked first, so that no step on tensors it cannot take builds the kernel."""
    i = kernel.first_unsupported(params, grads)
    if i >= 0:
        if fused:
            p, g = params[i], grads[i]
            grad = "None" if g is None else f"{g.device} {g.dtype}, strides {g.stride()}"
            raise ValueError(
                f"Invalid fused value: True (the fused {what} CPU kernel does not support "
                f"params[{i}]: {type(p).__name__} on {p.device} of dtype {p.dtype}, strides "
                f"{p.stride()}, grad {grad}; it takes plain CPU float32/float64 tensors, "
                "contiguous, channels-last or a transposed 2-D view, the gradient with the "
                "parameter's strides)"
            )
        return False
    if not kernel.available():
        if fused:
            raise ValueError(
                f"Invalid fused value: True (the fused {what} CPU kernel is unavailable: "
                f"{kernel.error() or 'disabled by ' + kernel.DISABLE_ENV})"
            )
        return False
    return True


def _gather(
    params: list[Tensor], grads: list[Tensor], kept: list[Tensor], counts: list[int], m: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Kept positions, and compact copies ``[K, count]`` of the kept weights and gradients."""
    positions = [kept_indices(k, c, m) for k, c in zip(kept, counts, strict=True)]
    kept_params = [gather_kept(p, i, m) for p, i in zip(params, positions, strict=True)]
    kept_grads = [gather_kept(g, i, m) for g, i in zip(grads, positions, strict=True)]
    return positions, kept_params, kept_grads


def _scatter(params: list[Tensor], positions: list[Tensor], values: list[Tensor], m: int) -> None:
    for p, i, w in zip(params, positions, values, strict=True):
        scatter_kept_(p, i, w, m)
