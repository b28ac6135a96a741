r"""LBC: learning the best N:M combination (Zhang et al., NeurIPS 2022, "Learning Best
Combination for Efficient N:M Sparsity"; the paper's Tables 1-2 "LBC").

An N:M block has :math:`C = \binom{M}{N}` possible masks ("combinations"). LBC gives every
block a learnable score per combination and gradually removes the low-score candidates until
one combination, hence an exact N:M mask, remains per block.

Pure functions of block tensors (:func:`combination_table`, :func:`combination_gradient`,
:func:`remaining_count`, :func:`remove_combinations`, :func:`union_mask`) and
:class:`LBCSGD`, which wires them to the dense-weight optimizer shape of
:class:`bame_optim.peers.ste.DenseSTESGD`.

Training-FLOPs profile: the forward density falls from 1 (every combination remaining) to N/M
(one combination per block, from ``t_f`` on) following the cubic schedule; the backward is
dense by design (straight-through gradient of every weight, and :math:`G \odot W` for the
scores). The BAME paper's Table 1 lists 0.72x of dense training for 2:4; this reading's own
accounting is (mean forward density + 2) / 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from bame_optim.core.evolution import score_dtype
from bame_optim.core.kept import combination_table
from bame_optim.core.nm import param_to_blocks, top_n_mask
from bame_optim.core.schedule import resolve_schedule
from bame_optim.core.validation import check_nonnegative
from bame_optim.peers.ste import DenseSTESGD

__all__ = [
    "LBCSGD",
    "combination_gradient",
    "combination_table",
    "remaining_count",
    "remove_combinations",
    "union_mask",
]


@lru_cache(maxsize=32)
def _table(n: int, m: int, device: torch.device) -> Tensor:
    return combination_table(n, m).to(device)  # cached: never modify it in place


def remaining_count(t: int, num_combinations: int, t_f: int) -> int:
    """Candidates left per block after the step with counter ``t`` (cubic, Zhu & Gupta 2017):

    .. math:: r(t) = 1 + \\lfloor (C - 1)(1 - t / t_f)^3 \\rfloor \\quad (t < t_f),
        \\qquad r(t) = 1 \\quad (t \\ge t_f).

    Integer arithmetic, so no rounding surprises.
    """
    if t >= t_f:
        return 1
    return 1 + (num_combinations - 1) * (t_f - t) ** 3 // t_f**3


def combination_gradient(weight: Tensor, grad: Tensor, table: Tensor) -> Tensor:
    """``[K, C]``: :math:`\\sum_{j \\in c} (G \\odot W)_{kj}` for every block ``k`` and
    combination ``c``, i.e. the gradient :math:`\\partial L / \\partial B = G \\odot W` summed
    over the combination's weights, in :func:`bame_optim.core.evolution.score_dtype`.

    Args:
        weight, grad: ``[K, M]`` block views of the dense ``W`` and ``G = dL/d(W ⊙ B)``.
        table: ``[C, M]`` bool from :func:`combination_table`.
    """
    dtype = score_dtype(weight.dtype)
    return (grad.to(dtype) * weight.to(dtype)) @ table.to(dtype).T


def remove_combinations(scores: Tensor, remaining: Tensor, count: int) -> Tensor:
    """Keep the ``count`` highest-score remaining combinations of every block ``[K, C]``.

    Ties: among equal scores the combination with the lower index (earlier in
    :func:`combination_table`) survives, so the higher index is removed first. Removed
    combinations never come back, even when ``count`` exceeds the number remaining.
    """
    masked = scores.masked_fill(~remaining, float("-inf"))
    return top_n_mask(masked, min(count, scores.shape[1]), prefer=remaining) & remaining


def union_mask(remaining: Tensor, table: Tensor) -> Tensor:
    """Forward mask ``[K, M]``: a weight is kept iff some remaining combination contains it."""
    counts = remaining.to(torch.float32) @ table.to(device=remaining.device, dtype=torch.float32)
    return counts > 0


class LBCSGD(DenseSTESGD):
    r"""SGD with LBC: dense weights, learnable combination scores, cubic candidate removal.

    State of a sparse parameter with ``K`` blocks: ``dense_weight`` (parameter layout),
    ``scores`` ``[K, C]`` (float32, or float64 for float64 parameters), ``remaining``
    ``[K, C]`` bool, ``mask`` ``[K, M]`` bool, the dense ``momentum_buffer``. The parameter
    holds :math:`W \odot B`. Each ``step()`` at counter :math:`t`, with :math:`G` = ``p.grad``:

    .. math::
        &\textbf{if } t \le t_f: \quad S_c \leftarrow S_c - \eta_S \textstyle\sum_{j \in c}
            (G \odot W)_j \quad \text{(all } c \text{, with } W \text{ before the update)}\\
        &W \leftarrow \text{SGD}(W, G) \quad \text{(straight-through, as torch.optim.SGD)}\\
        &\textbf{if } t \le t_f: \quad \text{keep the } r(t) \text{ highest-score remaining
            combinations}, \quad B = \bigcup_{c\ \text{remaining}} c\\
        &p \leftarrow W \odot B

    with :math:`r(t)` from :func:`remaining_count`, so after the step with counter :math:`t_f`
    exactly one combination, an exact N:M mask, remains per block, and the mask is fixed from
    then on (the scores are no longer updated).
    Dense parameters follow :class:`torch.optim.SGD` exactly.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, n, m,
            sparse, total_steps: as :class:`bame_optim.BAMESGD`.
        t_f: step by which one combination remains (default ``2 * total_steps // 3``, as
            BAME's ``t_f``; ``total_steps`` is needed when ``t_f`` is not given).
        score_lr: :math:`\eta_S`; ``None`` (default) uses the group's current ``lr``, so LR
            schedulers scale the score updates too.

    Removal starts at the first step; BAME's ``t_i``, ``delta_t``, ``alpha``, ``beta``,
    ``gamma``, ``seed`` are not taken. ``sparsity_report`` rows have
    ``phase`` ``"evolve"`` until the step with counter ``t_f`` and ``"frozen"`` after, and
    sparse rows add ``combinations`` (candidates left per block).

    .. note:: Our reading of LBC, where the optimizer shape leaves room for choices:
       the forward mask of a block is the *union* of its remaining combinations (dense at the
       start, N:M at the end); the mask's gradient is :math:`\partial L/\partial B = G \odot W`
       and a combination's score moves along the sum of it over its weights, so a combination
       whose weights lower the loss gains score; scores start at 0; removal follows the cubic
       schedule of :func:`remaining_count` at every step (``delta_t`` is not used), ties
       removing the higher combination index first; ``score_lr`` defaults to the weights' lr.
       Memory: ``C = binom(M, N)`` scores per block (6 for 2:4, 70 for 4:8, 12870 for 8:16).
    .. note:: The dense weights live in the optimizer: save its state dict with the model.
    """

    method_defaults: ClassVar[dict[str, Any]] = {"total_steps": None, "t_f": None, "score_lr": None}
    _exact_dtype_state = (*DenseSTESGD._exact_dtype_state, "scores", "remaining")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        total_steps: int | None = None,
        t_f: int | None = None,
        score_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, total_steps=total_steps,
            t_f=t_f, score_lr=score_lr, **kwargs,
        )

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("score_lr", group["score_lr"], optional=True)
        _, group["t_f"] = resolve_schedule(group["total_steps"], 0, group["t_f"])

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        k, c = state["mask"].shape[0], math.comb(group["m"], group["n"])
        state["scores"] = torch.zeros(k, c, dtype=score_dtype(p.dtype), device=p.device)
        state["remaining"] = torch.ones(k, c, dtype=torch.bool, device=p.device)

    def _observe(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group["step"] > group["t_f"]:
            return
        m = group["m"]
        lr = group["lr"] if group["score_lr"] is None else group["score_lr"]
        sign = -1.0 if group["maximize"] else 1.0
        table = _table(group["n"], m, p.device)
        weight = param_to_blocks(state["dense_weight"], m)
        grad = combination_gradient(weight, param_to_blocks(p.grad, m), table)
        state["scores"] = state["scores"].sub(grad, alpha=sign * lr)

    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        t, t_f = group["step"], group["t_f"]
        c = state["remaining"].shape[1]
        count = remaining_count(t, c, t_f)
        before = c if t == 0 else remaining_count(t - 1, c, t_f)
        if t > t_f or count >= before:
            return state["mask"]  # nothing to remove at this step
        remaining = remove_combinations(state["scores"], state["remaining"], count)
        state["remaining"] = remaining
        return union_mask(remaining, _table(group["n"], group["m"], p.device))

    def phase_name(self, group: dict[str, Any]) -> str:
        return "evolve" if group["step"] <= group["t_f"] else "frozen"

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        return t <= group["t_f"]

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        return group["t_f"]

    def sparsity_report(self) -> list[dict[str, Any]]:
        """As :meth:`BAMESGD.sparsity_report`, sparse rows with ``combinations``."""
        rows = super().sparsity_report()
        params = [p for group in self.param_groups for p in group["params"]]
        for row, p in zip(rows, params, strict=True):
            remaining = self.state.get(p, {}).get("remaining")
            if remaining is not None:
                row["combinations"] = int(remaining.sum(dim=1).max())
        return rows
