"""Slow, readable references of the peers' optimizers on float64 dense weights: SR-STE
(:class:`ReferenceSRSTE`) and LBC (:class:`ReferenceLBC`), written out per step and per block,
with :func:`sgd_step` (one :class:`torch.optim.SGD` step written out) as their update."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import torch
from torch import Tensor

from .evolution import to_blocks, to_param

__all__ = [
    "ReferenceLBC",
    "ReferenceSRSTE",
    "lbc_combinations",
    "lbc_keep_best",
    "lbc_remaining",
    "lbc_union",
    "sgd_step",
    "srste_mask",
]


def sgd_step(
    weight: Tensor,
    direction: Tensor,
    buffer: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> tuple[Tensor, Tensor | None]:
    """One :class:`torch.optim.SGD` step written out; ``direction`` is the gradient, already
    negated for ``maximize``. Returns ``(new_weight, new_buffer)``."""
    d = direction + weight_decay * weight
    if momentum:
        buffer = d.clone() if buffer is None else momentum * buffer + (1 - dampening) * d
        d = d + momentum * buffer if nesterov else buffer
    return weight - lr * d, buffer


def srste_mask(weight: Tensor, old: Tensor, n: int) -> Tensor:
    """Per block of ``[K, M]``: the ``n`` largest ``|w|``, ties to the currently kept weight,
    then the lower index."""
    new = torch.zeros_like(old)
    for k in range(old.shape[0]):
        order = sorted(
            range(old.shape[1]),
            key=lambda j: (-abs(float(weight[k, j])), not bool(old[k, j]), j),
        )
        new[k, order[:n]] = True
    return new


class _DenseSGD:
    """Dense float64 weights, masks and SGD buffers of a list of parameters."""

    def __init__(self, params: list[Tensor], *, m: int, momentum: float, dampening: float,
                 weight_decay: float, nesterov: bool, maximize: bool) -> None:
        self.m = m
        self.hyper = {"momentum": momentum, "dampening": dampening,
                      "weight_decay": weight_decay, "nesterov": nesterov}
        self.maximize = maximize
        self.weights = [p.detach().clone() for p in params]
        self.masks = [torch.ones(p.numel() // m, m, dtype=torch.bool) for p in params]
        self.buffers: list[Tensor | None] = [None] * len(params)

    def param(self, i: int) -> Tensor:
        """What the parameter holds: the dense weight times its mask."""
        return self.weights[i] * to_param(self.masks[i], self.weights[i].shape)


class ReferenceSRSTE(_DenseSGD):
    """SR-STE (Zhou et al., ICLR 2021): SGD on the dense weight with the gradient of the masked
    weight plus ``decay`` times the pruned weights, then the mask of the ``n`` largest
    ``|w|`` per block (:func:`srste_mask`)."""

    def __init__(self, params: list[Tensor], *, n: int, m: int, decay: float,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, maximize: bool = False) -> None:
        super().__init__(params, m=m, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.n, self.decay = n, decay

    def step(self, grads: list[Tensor], lr: float) -> None:
        for i, (w, g) in enumerate(zip(self.weights, grads, strict=True)):
            pruned = ~to_param(self.masks[i], w.shape)
            direction = (-g if self.maximize else g) + self.decay * pruned.double() * w
            self.weights[i], self.buffers[i] = sgd_step(
                w, direction, self.buffers[i], lr=lr, **self.hyper
            )
            self.masks[i] = srste_mask(to_blocks(self.weights[i], self.m), self.masks[i], self.n)


def lbc_remaining(t: int, c: int, t_f: int) -> int:
    """Combinations left per block after the step with counter ``t``:
    ``1 + floor((C - 1)(1 - t / t_f)^3)`` before ``t_f``, 1 from ``t_f`` on (exact)."""
    if t >= t_f:
        return 1
    return 1 + math.floor((c - 1) * (1 - Fraction(t, t_f)) ** 3)


def lbc_combinations(n: int, m: int) -> list[list[int]]:
    """The ``n``-subsets of ``range(m)`` in lexicographic order."""
    return [list(c) for c in combinations(range(m), n)]


def lbc_union(remaining: Tensor, combos: list[list[int]], m: int) -> Tensor:
    """``[K, M]``: the entries of each block covered by a remaining combination."""
    mask = torch.zeros(remaining.shape[0], m, dtype=torch.bool)
    for k in range(remaining.shape[0]):
        for c in range(len(combos)):
            if remaining[k, c]:
                mask[k, combos[c]] = True
    return mask


def lbc_keep_best(scores: Tensor, remaining: Tensor, count: int) -> Tensor:
    """Per block, the ``count`` highest scores among the remaining combinations; ties to the
    lower index."""
    new = torch.zeros_like(remaining)
    for k in range(remaining.shape[0]):
        alive = [c for c in range(remaining.shape[1]) if remaining[k, c]]
        alive.sort(key=lambda c: (-float(scores[k, c]), c))
        new[k, alive[:count]] = True
    return new


class ReferenceLBC(_DenseSGD):
    """LBC (Zhang et al., NeurIPS 2022): until ``t_f`` each combination's score falls by
    ``η`` (``score_lr``, else the step's learning rate) times the sum of ``G W`` over its
    weights, the dense weight takes an SGD step, the ``lbc_remaining`` best combinations stay
    and the mask is their union."""

    def __init__(self, params: list[Tensor], *, n: int, m: int, t_f: int,
                 score_lr: float | None = None, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False) -> None:
        super().__init__(params, m=m, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self.n, self.t_f, self.score_lr = n, t_f, score_lr
        self.combos = lbc_combinations(n, m)
        c = len(self.combos)
        self.scores = [torch.zeros(p.numel() // m, c, dtype=torch.float64) for p in params]
        self.remaining = [torch.ones(p.numel() // m, c, dtype=torch.bool) for p in params]
        self.t = 0

    def step(self, grads: list[Tensor], lr: float) -> None:
        t = self.t
        for i, (w, g) in enumerate(zip(self.weights, grads, strict=True)):
            if t <= self.t_f:
                gw = to_blocks(g, self.m) * to_blocks(w, self.m)
                eta = lr if self.score_lr is None else self.score_lr
                sign = -1.0 if self.maximize else 1.0
                for c, combo in enumerate(self.combos):
                    self.scores[i][:, c] -= sign * eta * gw[:, combo].sum(dim=1)
            self.weights[i], self.buffers[i] = sgd_step(
                w, -g if self.maximize else g, self.buffers[i], lr=lr, **self.hyper
            )
            if t <= self.t_f:
                count = lbc_remaining(t, len(self.combos), self.t_f)
                self.remaining[i] = lbc_keep_best(self.scores[i], self.remaining[i], count)
                self.masks[i] = lbc_union(self.remaining[i], self.combos, self.m)
        self.t += 1
