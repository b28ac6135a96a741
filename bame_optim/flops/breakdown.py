"""The composition of the two halves: per-layer FLOPs (:mod:`.layers`) times per-profile
densities (:mod:`.profiles`), summed over the layers, as a ratio to dense training."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import TypedDict

from torch import nn

from bame_optim.core.nm import check_nm
from bame_optim.core.schedule import DEFAULT_DELTA_T
from bame_optim.core.validation import check_int
from bame_optim.flops.layers import LayerFlops, layer_flops
from bame_optim.flops.profiles import resolve_profile, step_density_sums
from bame_optim.methods import FlopsProfile

__all__ = ["FlopsBreakdown", "flops_breakdown", "training_flops_ratio"]

_PRODUCTS = ("forward", "input_grad", "weight_grad")


class FlopsBreakdown(TypedDict):
    """What :func:`flops_breakdown` returns. FLOPs are per sample, summed over the run (times
    the batch size for absolute numbers); the ``*_ratio`` entries divide by ``dense_total``."""

    method: str
    steps: int
    dense_total: int
    forward: float
    input_grad: float
    weight_grad: float
    forward_ratio: float
    input_grad_ratio: float
    weight_grad_ratio: float
    sparse_share: float
    ratio: float
    ratio_exact: Fraction


def flops_breakdown(
    layers: Sequence[LayerFlops],
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    sparsity_schedule: str | None = None,
) -> FlopsBreakdown:
    """Training FLOPs of ``method`` on ``layers`` (from :func:`layer_flops` with the same
    ``n, m``), per product, and their ratio to ``total_steps`` of dense training.

    ``pretrain_steps`` and ``finetune_steps`` (default ``total_steps`` each) are for ``asp``
    only, ``sparsity_schedule`` for ``maxq`` only; any other method raises ``ValueError`` if
    they are given.
    """
    profile = resolve_profile(method)
    check_nm(n, m)
    total_steps = check_int("total_steps", total_steps, 1)
    for layer in layers:
        if layer.sparse and layer.pattern != (n, m):
            raise ValueError(
                f"Invalid layers value: layer {layer.name!r} was marked sparse for pattern "
                f"{layer.pattern}, not n:m = {n}:{m} (call layer_flops with the same n, m)"
            )
    extra = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps}
    if profile is FlopsProfile.PRETRAIN_FIXED:
        pretrain = total_steps if pretrain_steps is None else pretrain_steps
        finetune = total_steps if finetune_steps is None else finetune_steps
        pretrain = check_int("pretrain_steps", pretrain, 0)
        finetune = check_int("finetune_steps", finetune, 1)
    else:
        for name, value in extra.items():
            if value is not None:
                raise ValueError(f"Invalid {name} value: {value!r} (only method 'asp' uses it)")
        pretrain, finetune = 0, total_steps

    sums = {
        has_mask: step_density_sums(
            method,
            n=n,
            m=m,
            total_steps=finetune,
            t_i=t_i if profile is not FlopsProfile.PRETRAIN_FIXED else None,
            t_f=t_f if profile is not FlopsProfile.PRETRAIN_FIXED else None,
            delta_t=delta_t,
            backward_mask=has_mask,
            sparsity_schedule=sparsity_schedule,
        )
        for has_mask in (False, True)
    }
    totals = dict.fromkeys(_PRODUCTS, Fraction(0))
    dense_step = 0
    sparse_step = 0
    for layer in layers:
        dense = (layer.forward, layer.input_grad, layer.weight_grad)
        dense_step += sum(dense)
        densities = (
            sums[layer.backward_mask] if layer.sparse else (Fraction(finetune),) * len(_PRODUCTS)
        )
        if layer.sparse:
            sparse_step += sum(dense)
        for product, flops, density in zip(_PRODUCTS, dense, densities, strict=True):
            totals[product] += flops * (density + pretrain)
    if not dense_step:
        raise ValueError("Invalid layers value: [] (no Linear or ConvNd layer to count)")
    dense_total = dense_step * total_steps
    exact = sum(totals.values(), Fraction(0)) / dense_total
    return FlopsBreakdown(
        method=method,
        steps=pretrain + finetune,
        dense_total=dense_total,
        forward=float(totals["forward"]),
        input_grad=float(totals["input_grad"]),
        weight_grad=float(totals["weight_grad"]),
        forward_ratio=float(totals["forward"] / dense_total),
        input_grad_ratio=float(totals["input_grad"] / dense_total),
        weight_grad_ratio=float(totals["weight_grad"] / dense_total),
        sparse_share=sparse_step / dense_step,
        ratio=float(exact),
        ratio_exact=exact,
    )


def training_flops_ratio(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    exclude: Sequence[str] | str | None = None,
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    sparsity_schedule: str | None = None,
) -> float:
    """Training FLOPs of ``method`` relative to ``total_steps`` steps of dense training.

    ``model`` and ``input_shape`` (one sample, no batch dimension) give the layers
    (:func:`layer_flops`); ``n, m, exclude`` choose the sparse ones exactly as
    :func:`~bame_optim.nm_param_groups` does; ``t_i, t_f`` default to ``T // 3`` and
    ``2T // 3`` (``maxq``: ``t_i`` defaults to ``T // 4``); ``pretrain_steps`` /
    ``finetune_steps`` are ASP's phases (default ``total_steps`` each), ``sparsity_schedule``
    MaxQ's ramp. Method profiles: docs/flops.md. Raises ``ValueError`` naming the
    argument for an unknown method, an invalid pattern or schedule.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    >>> training_flops_ratio(net, (16,), "srste", n=1, m=4, total_steps=10, exclude=())
    0.75
    """
    resolve_profile(method)
    check_nm(n, m)
    layers = layer_flops(model, input_shape, n=n, m=m, exclude=exclude)
    return flops_breakdown(
        layers,
        method,
        n=n,
        m=m,
        total_steps=total_steps,
        t_i=t_i,
        t_f=t_f,
        delta_t=delta_t,
        pretrain_steps=pretrain_steps,
        finetune_steps=finetune_steps,
        sparsity_schedule=sparsity_schedule,
    )["ratio"]
