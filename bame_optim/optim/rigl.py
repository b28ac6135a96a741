"""RigL restricted to N:M blocks (the "RigL" row of the paper's Table 4).

RigL (Evci et al., ICML 2020) drops the smallest-magnitude weights and regrows the pruned ones
with the largest gradient. Restricted to N:M blocks, as the paper's ablation does, every update
step swaps at most one weight per block, inside BAME's schedule (gradual pruning to ``t_i``,
updates every ΔT until ``t_f``) and without OBF.

Training-FLOPs profile: as BAME — sparse forward, input- and weight-gradient products at
density N/M, dense weight gradients only on update steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bame_optim.core.evolution import MaskEvolution, magnitude_mask, sad, update_oscillation
from bame_optim.core.nm import top_n_mask
from bame_optim.optim.bame_sgd import BAMESGD

__all__ = ["RigLSGD", "rigl_mask"]


def rigl_mask(weight: Tensor, grad: Tensor, kept: Tensor, n: int) -> Tensor:
    """Drop the kept weight with the smallest ``|W|`` and grow the pruned one with the largest
    ``|G|``, inside every block ``[K, M]`` holding ``n`` kept weights.

    .. note:: The dropped weight competes with the pruned ones for regrowth (as in RigL,
       where growth is chosen among all inactive connections after the drop), and wins ties,
       so a block changes only when some pruned weight has a strictly larger ``|G|``.
    """
    survivors = magnitude_mask(weight, kept, n - 1)
    grow_scores = grad.abs().to(torch.promote_types(grad.dtype, torch.float32))
    grow_scores = grow_scores.masked_fill(survivors, float("-inf"))
    grown = top_n_mask(grow_scores, 1, prefer=kept & ~survivors)
    return survivors | grown


class RigLSGD(BAMESGD):
    """:class:`BAMESGD` whose evolve-phase update is :func:`rigl_mask` instead of LMA + OBF.

    The oscillation EMA (Eq. 8) is still tracked, so oscillation can be compared across
    methods, but it freezes nothing.
    """

    def _evolve(
        self,
        weight: Tensor,
        grad: Tensor,
        kept: Tensor,
        oscillation: Tensor,
        group: dict[str, Any],
        freeze: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> MaskEvolution:
        new = rigl_mask(weight, grad, kept, group["n"])
        frozen = torch.zeros(kept.shape[0], dtype=torch.bool, device=kept.device)
        return MaskEvolution(
            new, update_oscillation(oscillation, sad(kept, new), group["gamma"]), new, frozen
        )
