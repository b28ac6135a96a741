"""The SGD arithmetic of :class:`bame_optim.BAMESGD`, restricted to kept weights.

Pure, keyword-only functions in the shape of ``torch.optim.sgd``: a simple per-tensor loop
and a multi-tensor (``torch._foreach_*``) path that must agree with it. With every mask
``None`` they are exactly :class:`torch.optim.SGD`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_sgd"]


def masked_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kept: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool = False,
) -> None:
    """Masked SGD update, in place on ``params`` and ``momentum_buffers`` (a ``None`` buffer is
    replaced by a new one, as in :func:`torch.optim.sgd.sgd`).

    ``kept[i]`` is ``None`` for a dense parameter (then this is exactly ``torch.optim.SGD``)
    or a bool tensor of the parameter's shape: the gradient is zeroed outside it before decay
    and momentum, so nothing moves at pruned entries.
    """
    fn = _multi_tensor_masked_sgd if foreach else _single_tensor_masked_sgd
    fn(
        params,
        grads,
        momentum_buffers,
        kept,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )


def _masked(grad: Tensor, kept: Tensor | None) -> Tensor:
    # where, not multiply: a NaN gradient at a pruned entry must not reach the weight.
    return grad if kept is None else torch.where(kept, grad, 0.0)


def _single_tensor_masked_sgd(
    params,
    grads,
    momentum_buffers,
    kept,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
) -> None:
    for i, param in enumerate(params):
        grad = _masked(grads[i] if not maximize else -grads[i], kept[i])
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = momentum_buffers[i]
            if buffer is None:
                buffer = torch.clone(grad).detach()
                momentum_buffers[i] = buffer
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
        param.add_(grad, alpha=-lr)


def _multi_tensor_masked_sgd(
    params,
    grads,
    momentum_buffers,
    kept,
    *,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
) -> None:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        buckets.setdefault((param.device, param.dtype), []).append(i)
    for indices in buckets.values():
        bucket_params = [params[i] for i in indices]
        bucket_grads = [_masked(grads[i], kept[i]) for i in indices]
        if maximize:
            bucket_grads = torch._foreach_neg(bucket_grads)
        if weight_decay != 0:
            bucket_grads = torch._foreach_add(bucket_grads, bucket_params, alpha=weight_decay)
        if momentum != 0:
            buffers = [momentum_buffers[i] for i in indices]
            if all(b is not None for b in buffers):
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, bucket_grads, alpha=1 - dampening)
            else:
                for j, i in enumerate(indices):
                    if buffers[j] is None:
                        buffers[j] = momentum_buffers[i] = torch.clone(bucket_grads[j]).detach()
                    else:
                        buffers[j].mul_(momentum).add_(bucket_grads[j], alpha=1 - dampening)
            if nesterov:
                bucket_grads = torch._foreach_add(bucket_grads, buffers, alpha=momentum)
            else:
                bucket_grads = buffers
        torch._foreach_add_(bucket_params, bucket_grads, alpha=-lr)
