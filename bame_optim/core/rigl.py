"""RigL (Evci et al., ICML 2020) inside N:M blocks, as pure functions of block tensors
``[K, M]``: the cosine-annealed drop fraction and the drop-and-grow of one layer. The rule that
applies them on BAME's schedule is :func:`bame_optim.optim.rules.rigl`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import top_n_mask

__all__ = ["rigl_drop_fraction", "rigl_mask"]


def rigl_drop_fraction(t: int, zeta: float, t_end: int) -> float:
    """RigL's cosine-annealed drop fraction (Evci et al. 2020, Eq. 1)::

        ζ_t = ζ / 2 · (1 + cos(π t / T_end))  for t < T_end,   0 from T_end on.
    """
    if t >= t_end:
        return 0.0
    return zeta / 2 * (1 + math.cos(math.pi * t / t_end))


def rigl_mask(weight: Tensor, grad: Tensor, kept: Tensor, n: int, drop: int) -> Tensor:
    """RigL's drop and grow inside N:M blocks ``[K, M]`` holding ``n`` kept weights each.

    Drop: the ``drop`` kept weights with the smallest ``|W|`` across the whole layer (ties:
    the lower flat index ``k * M + j`` of the block view goes first). Grow: each block regrows
    as many weights as it lost, those with the largest ``|G|`` among its non-surviving
    weights (pruned and just dropped), so every block again holds exactly ``n``.

    .. note:: A dropped weight competes with the pruned ones for regrowth (as in RigL, where
       growth is chosen among all inactive connections after the drop) and wins ties, then
       the lower index within the block wins (:func:`~bame_optim.core.nm.top_n_mask` with
       ``prefer=kept``); a block may end unchanged. ``grad`` must be finite (survivors are
       ranked at ``+inf``).
    """
    dtype = score_dtype(weight.dtype)
    survivors = kept
    if drop > 0:
        candidates = kept.flatten().nonzero().squeeze(1)  # ascending flat index
        magnitude = weight.to(dtype).abs().flatten()[candidates]
        order = magnitude.sort(stable=True).indices[:drop]
        dropped = torch.zeros(kept.numel(), dtype=torch.bool, device=kept.device)
        dropped[candidates[order]] = True
        survivors = kept & ~dropped.view_as(kept)
    grow_scores = grad.abs().to(torch.promote_types(grad.dtype, dtype))
    grow_scores = grow_scores.masked_fill(survivors, float("inf"))
    return top_n_mask(grow_scores, n, prefer=kept)
