"""BAME's mask updates written straight from the paper, block by block, in Python floats
(float64): the oracle of :func:`bame_optim.core.evolution.evolve_mask` and of the gradual and
prune steps, written without any of the package's code.

Blocks are the rows of ``[K, M]`` (:func:`to_blocks`: the input dimension, dimension 1, cut
into runs of ``M``; docs/design.md section 1). Every function takes and returns plain lists or
CPU tensors; nothing here is fast.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TypedDict

import torch
from torch import Tensor

__all__ = [
    "Evolution",
    "block_norm",
    "evolve_blocks",
    "gradual_budget",
    "keep_largest",
    "lma_scores",
    "obf_frozen",
    "propose",
    "random_start",
    "sad",
    "to_blocks",
    "to_param",
    "top_members",
]


def to_blocks(tensor: Tensor, m: int) -> Tensor:
    """``[K, M]`` blocks of a parameter-shaped tensor: for every output row and kernel position
    (row-major), the input dimension cut into runs of ``m``."""
    return tensor.movedim(1, -1).reshape(-1, m)


def to_param(blocks: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The inverse of :func:`to_blocks` for a parameter of ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return blocks.reshape(moved).movedim(-1, 1)


def gradual_budget(t: int, n: int, m: int, t_i: int) -> int:
    """Weights kept per block after an update at step ``t`` of the gradual phase:
    ``N + ceil((M - N)(1 - t / t_i))``, and ``N`` from ``t_i`` on (exact arithmetic)."""
    if t >= t_i:
        return n
    return n + math.ceil((m - n) * (1 - Fraction(t, t_i)))


def keep_largest(weight: Tensor, kept: Tensor, count: int) -> Tensor:
    """Per block, the ``count`` largest ``|w|`` among the kept entries; ties keep the lower
    index (gradual pruning and the prune at ``t_i``: pruned weights never come back)."""
    new = torch.zeros_like(kept)
    for k in range(weight.shape[0]):
        candidates = [j for j in range(weight.shape[1]) if kept[k, j]]
        candidates.sort(key=lambda j: (-abs(float(weight[k, j])), j))
        for j in candidates[:count]:
            new[k, j] = True
    return new


def random_start(k: int, n: int, m: int, generator: torch.Generator) -> Tensor:
    """The static start: per block the ``n`` largest of ``torch.rand(k, m, generator)`` (drawn
    on the CPU in one call), ties to the lower index."""
    scores = torch.rand(k, m, generator=generator).tolist()
    mask = torch.zeros(k, m, dtype=torch.bool)
    for row, values in enumerate(scores):
        for j in sorted(range(m), key=lambda j: (-values[j], j))[:n]:
            mask[row, j] = True
    return mask


def lma_scores(
    w_row: list[float], g_row: list[float], b_row: list[bool], lr: float, revive: str = "sgd"
) -> list[float]:
    """Eq. 4 for a kept weight (``|G W|``) and Eq. 5 for a pruned one (``η G²``; with
    ``revive="adam"`` the loss drop of Adam's first step, ``η |G|``)."""
    return [
        abs(g * w) if b else (lr * (g * g) if revive == "sgd" else lr * abs(g))
        for w, g, b in zip(w_row, g_row, b_row, strict=True)
    ]


def propose(scores: list[float], n: int, kept: list[bool]) -> list[bool]:
    """Eq. 6: the ``n`` largest scores of a block; ties keep the kept weight, then the lower
    index."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], not kept[j], j))
    chosen = set(order[:n])
    return [j in chosen for j in range(len(scores))]


def sad(old: list[bool], new: list[bool]) -> int:
    """Eq. 7: the entries where the two masks of a block differ."""
    return sum(abs(int(a) - int(b)) for a, b in zip(old, new, strict=True))


def top_members(values: list[float], fraction: float) -> list[bool]:
    """Membership in ``Top(x, floor(fraction K))`` (Eq. 9, 10); ties go to the lower index."""
    count = math.floor(fraction * len(values))
    order = sorted(range(len(values)), key=lambda k: (-values[k], k))
    chosen = set(order[:count])
    return [k in chosen for k in range(len(values))]


def block_norm(row: list[float]) -> float:
    """``||W_k||_2`` of one block, correctly rounded (:func:`math.fsum`)."""
    return math.sqrt(math.fsum(w * w for w in row))


def obf_frozen(
    oscillation: list[float], norms: list[float], alpha: float, beta: float
) -> list[bool]:
    """Eq. 10: a block is frozen when its ``O_k`` is among the ``floor(β K)`` largest and its
    norm among the ``floor(α K)`` largest, and ``O_k > 0`` (a block whose proposal equals its
    mask is not counted as frozen: docs/design.md section 3, step 5)."""
    top_o = top_members(oscillation, beta)
    top_w = top_members(norms, alpha)
    return [a and b and o > 0 for a, b, o in zip(top_o, top_w, oscillation, strict=True)]


class Evolution(TypedDict):
    """One update of one parameter's blocks, as lists."""

    kept: list[list[bool]]
    oscillation: list[float]
    proposed: list[list[bool]]
    frozen: list[bool]


def evolve_blocks(
    weight: Tensor,
    grad: Tensor,
    kept: Tensor,
    oscillation: Tensor,
    *,
    n: int,
    lr: float,
    alpha: float,
    beta: float,
    gamma: float,
    revive: str = "sgd",
) -> Evolution:
    """One BAME mask update of ``[K, M]`` blocks (docs/design.md section 3): LMA scores
    (Eq. 4, 5), the proposal (Eq. 6), SAD (Eq. 7), the oscillation EMA
    ``O_k ← γ O_k + (1 − γ) SAD_k`` (Eq. 8) and OBF (Eq. 10): a frozen block keeps its mask,
    every other takes the proposal."""
    w_rows, g_rows, b_rows = weight.tolist(), grad.tolist(), kept.tolist()
    proposed, new_oscillation, norms = [], [], []
    for w_row, g_row, b_row, o in zip(w_rows, g_rows, b_rows, oscillation.tolist(),
                                      strict=True):
        row = propose(lma_scores(w_row, g_row, b_row, lr, revive), n, b_row)
        proposed.append(row)
        new_oscillation.append(gamma * o + (1 - gamma) * sad(b_row, row))
        norms.append(block_norm(w_row))
    frozen = obf_frozen(new_oscillation, norms, alpha, beta)
    new_kept = [b if f else p for b, p, f in zip(b_rows, proposed, frozen, strict=True)]
    return Evolution(kept=new_kept, oscillation=new_oscillation, proposed=proposed,
                     frozen=frozen)
