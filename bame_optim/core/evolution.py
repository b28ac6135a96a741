"""Mask evolution inside N:M blocks: LMA scores, SAD, oscillation EMA and OBF freezing.

Pure functions of block tensors ``[K, M]`` (see :mod:`bame_optim.core.nm`). The optimizer and the
baselines call these; nothing here knows about modules or optimizers. ``G`` is the gradient with
respect to the masked weight, ``dL/d(W ⊙ B)``: dense on update steps because the forward used
zeros at pruned entries (section 3.2 of the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bame_optim.core.nm import select, top_n_mask_

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "REVIVE_SCORES",
    "MaskEvolution",
    "block_norms",
    "evolve_mask",
    "lma_scores",
    "magnitude_mask",
    "obf_freeze",
    "sad",
    "score_dtype",
    "top_fraction",
    "update_oscillation",
]

DEFAULT_ALPHA = 0.5
"""Fraction of blocks, by weight norm, that OBF may freeze (Eq. 10; the paper's setting)."""
DEFAULT_BETA = 0.5
"""Fraction of blocks, by oscillation, that OBF may freeze (Eq. 9, 10; the paper's setting)."""
DEFAULT_GAMMA = 0.9
"""Momentum of the oscillation EMA (Eq. 8); docs/design.md section 3, step 4."""


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the scores and the oscillation EMA are kept in: at least float32.

    .. note:: The paper does not say. Half-precision scores would turn many near-equal
       scores into ties and make masks depend on rounding, so they are computed in float32
       (float64 parameters keep float64).
    """
    return torch.promote_types(dtype, torch.float32)


REVIVE_SCORES = ("sgd", "adam")
"""The revive scores of :func:`lma_scores`: ``"sgd"`` is Eq. 5 (``η G²``), ``"adam"`` its
counterpart for Adam-type updates (``η |G|``)."""


def lma_scores(
    weight: Tensor, grad: Tensor, kept: Tensor, lr: float | Tensor, *, revive: str = "sgd"
) -> Tensor:
    """Expected loss change of flipping each weight (loss-aware mask adaption).

    Kept weights (Eq. 4) and pruned weights (Eq. 5, or its Adam counterpart)::

        ΔL(W_ki) = |G_ki · W_ki|    if B_ki = 1   (loss increase from pruning it)
        ΔL(W_kj) = η · G_kj²        if B_kj = 0   (revive="sgd": drop of one SGD step)
        ΔL(W_kj) = η · |G_kj|       if B_kj = 0   (revive="adam": drop of one Adam step)

    Args:
        weight, grad: ``[K, M]`` block views of ``W`` and ``G = dL/d(W ⊙ B)``.
        kept: ``[K, M]`` bool mask ``B``.
        lr: the current learning rate ``η``.
        revive: ``"sgd"`` or ``"adam"`` (:data:`REVIVE_SCORES`).

    .. note:: Eq. 5 is the first-order loss drop ``G · Δw`` of the first SGD step of a
       revived weight, ``Δw = -η G``. Adam's first step from zero moments is
       ``Δw = -η m̂ / (sqrt(v̂) + ε) = -η sign(G)`` (``m̂ = G``, ``v̂ = G²`` after bias
       correction, ``ε`` neglected), so the matching drop is ``η |G|``. It is linear in
       ``|G|`` like the prune score ``|G W|``, so the two stay comparable when the gradient
       scale changes, which ``η G²`` is not.
    """
    if revive not in REVIVE_SCORES:
        raise ValueError(f"Invalid revive value: {revive!r} (one of {REVIVE_SCORES})")
    dtype = score_dtype(weight.dtype)
    w, g = weight.to(dtype), grad.to(dtype)
    revived = g.square().mul_(lr) if revive == "sgd" else g.abs().mul_(lr)
    return select(kept, torch.mul(g, w).abs_(), revived, into_a=True)


def magnitude_mask(weight: Tensor, kept: Tensor, budget: int) -> Tensor:
    """Keep the ``budget`` largest ``|W|`` among the currently kept weights of each block.

    Gradual pruning (Zhu & Gupta 2017; paper section 3.3) and the prune step at ``t_i``:
    pruned weights never come back, ties keep the lower index.
    """
    if bool((_row_counts(kept) == budget).all()):
        # Each block keeps budget weights already: those are its budget largest (kept scores
        # are >= 0 or NaN, the others -inf), the mask stays; no scores needed.
        return kept.clone(memory_format=torch.contiguous_format)
    scores = weight.to(score_dtype(weight.dtype)).abs()
    scores.masked_fill_(~kept, float("-inf"))
    return top_n_mask_(scores, budget, prefer=kept)


def sad(kept: Tensor, proposed: Tensor) -> Tensor:
    """Sparse Architecture Divergence of each block (Eq. 7): ``Σ_m |B_km − B̄_km|``, as int64."""
    return _row_counts(kept != proposed).long()


def _row_counts(mask: Tensor) -> Tensor:
    """Set entries of each row of ``[K, M]`` bool: summed as bytes for ``M < 256`` (exact,
    and several times faster on the CPU than summing bools as int64)."""
    if mask.shape[1] < 256:
        return mask.view(torch.uint8).sum(dim=1, dtype=torch.uint8)
    return mask.sum(dim=1)


def update_oscillation(oscillation: Tensor, divergence: Tensor, gamma: float) -> Tensor:
    """Oscillation EMA (Eq. 8): ``O_k ← γ O_k + (1 − γ) SAD_k``. Returns a new tensor."""
    new = oscillation * gamma
    return new.add_(divergence.to(oscillation.dtype, copy=True).mul_(1.0 - gamma))


def block_norms(weight: Tensor) -> Tensor:
    """``||W_k||_2`` of each block ``[K]`` (the ``Ŵ`` of Eq. 10)."""
    return torch.linalg.vector_norm(weight.to(score_dtype(weight.dtype)), dim=1)


def top_fraction(values: Tensor, fraction: float) -> Tensor:
    """Bool ``[K]``: the ``floor(fraction · K)`` largest ``values``; ties keep the lower index.

    This is ``Top(x, floor(fraction · K))`` of Eq. 9 and 10 read as membership.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"Invalid fraction value: {fraction!r} (must be in [0, 1])")
    size = values.numel()
    count = int(fraction * size)
    if count == 0 or count == size:
        return torch.full_like(values, count == size, dtype=torch.bool)
    if values.is_floating_point() and _has_nan(values):
        # torch.sort ranks NaN above everything; keep its order exactly.
        order = values.sort(descending=True, stable=True).indices
        return torch.zeros_like(values, dtype=torch.bool).scatter_(0, order[:count], True)
    # The count-th largest value by selection (O(K), not a sort): everything above it, then
    # the tied entries in index order, which is what the stable descending sort keeps.
    threshold = _kth_largest(values.flatten(), count)
    at_least = values >= threshold
    if int(torch.count_nonzero(at_least)) == count:
        return at_least  # no tie at the threshold left out (the usual case for norms)
    above = values > threshold
    tied = _keep_first(values == threshold, count - int(torch.count_nonzero(above)))
    return above.logical_or_(tied)


def _has_nan(values: Tensor) -> bool:
    # A sum that is not NaN proves there is no NaN (one reduction, no [K] temporary); a NaN
    # sum may also come from inf - inf, so then look.
    return bool(values.sum().isnan()) and bool(values.isnan().any())


SAMPLE_STRIDE = 64
""":func:`_kth_largest` brackets its answer with a sorted sample of every this many values."""


def _kth_largest(values: Tensor, count: int) -> Tensor:
    """The ``count``-th largest of 1-D ``values`` without NaN, as a 0-dim tensor: the value of
    ``values.kthvalue(values.numel() - count + 1)``.

    .. note:: ``kthvalue`` (a copy and a scalar quickselect over all ``K``) is most of OBF's
       time. Here a sorted sample of every :data:`SAMPLE_STRIDE`-th value gives a bracket
       ``[lo, hi]``; the answer lies in it exactly when ``0 < need <= |inside|``, with
       ``need = count - #(values > hi)`` and ``inside`` the values in the bracket, and then it
       is the ``need``-th largest of ``inside``: one selection over a few percent of the
       values. A missed bracket falls back to the full selection.
    """
    size = values.numel()
    sample = values[::SAMPLE_STRIDE].sort().values
    samples = sample.numel()
    if samples < 64:
        return values.kthvalue(size - count + 1).values
    rank = (size - count) * samples // size  # the answer's place in the ascending sample
    slack = 4 * math.isqrt(samples) + 1  # a few standard deviations of that place
    lo, hi = sample[max(rank - slack, 0)], sample[min(rank + slack, samples - 1)]
    need = count - int(torch.count_nonzero(values > hi))
    if bool(lo == hi):  # one value fills the bracket (ties, e.g. of the oscillation EMA)
        if 0 < need <= int(torch.count_nonzero(values == hi)):
            return hi
        return values.kthvalue(size - count + 1).values
    inside = values[(values >= lo) & (values <= hi)]
    if not 0 < need <= inside.numel():
        return values.kthvalue(size - count + 1).values
    return inside.kthvalue(inside.numel() - need + 1).values


KEEP_FIRST_CHUNK = 4096
""":func:`_keep_first` counts set entries per chunk of this many first."""


def _keep_first(mask: Tensor, count: int) -> Tensor:
    """1-D bool ``mask`` with only its first ``count`` set entries left set (``mask`` holds at
    least ``count``); may be ``mask`` itself, written in place.

    This is ``mask & (mask.cumsum(0) <= count)`` without a cumulative sum over all of it:
    counts per chunk locate the chunk of the ``count``-th set entry, and only that chunk is
    summed entry by entry."""
    size = mask.numel()
    whole = size - size % KEEP_FIRST_CHUNK
    chunks = mask[:whole].view(-1, KEEP_FIRST_CHUNK).view(torch.uint8)
    before = chunks.sum(dim=1, dtype=torch.int64).cumsum(0)
    # chunk of the count-th set entry (the tail after the last whole chunk if beyond them)
    chunk = int(torch.searchsorted(before, count))
    start = chunk * KEEP_FIRST_CHUNK
    seen = int(before[chunk - 1]) if chunk else 0
    local = mask[start : start + KEEP_FIRST_CHUNK].cumsum(0)
    cut = start + int(torch.searchsorted(local, count - seen)) + 1 if count > seen else start
    mask[cut:] = False
    return mask


def obf_freeze(oscillation: Tensor, norms: Tensor, alpha: float, beta: float) -> Tensor:
    """Blocks that keep their old mask (oscillation-aware block freezing, Eq. 10)::

        frozen_k = O_k in Top(O, ⌊β K⌋)  and  ||W_k||_2 in Top(Ŵ, ⌊α K⌋)

    ``alpha == 0`` or ``beta == 0`` freezes nothing (LMA alone).

    .. note:: Eq. 10 leaves ties open. Membership is by a stable ranking (lower block index
       first), so at most ``⌊β K⌋`` blocks are frozen, and a block with ``O_k = 0`` is never
       counted as frozen: its proposal equals its mask (``O_k = 0`` implies ``SAD_k = 0``), so
       freezing it would change nothing and only inflate the reported count.
    """
    return top_fraction(oscillation, beta) & top_fraction(norms, alpha) & (oscillation > 0)


class MaskEvolution(NamedTuple):
    """Result of one LMA + OBF update of one parameter."""

    kept: Tensor
    """New mask ``B^c`` ``[K, M]`` bool."""
    oscillation: Tensor
    """Updated EMA ``O^c`` ``[K]``."""
    proposed: Tensor
    """LMA's proposal ``B̄^c`` before freezing ``[K, M]`` bool."""
    frozen: Tensor
    """Blocks that kept ``B^{c-1}`` ``[K]`` bool."""


def evolve_mask(
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
    freeze: Callable[[Tensor, Tensor], Tensor] | None = None,
    revive: str = "sgd",
) -> MaskEvolution:
    """One BAME mask update of one parameter (docs/design.md section 3, steps 1-5).

    1. LMA scores (Eq. 4, 5); 2. proposal ``B̄`` = top ``n`` per block, ties keep the kept
    weight (Eq. 6); 3. ``SAD(B, B̄)`` (Eq. 7); 4. oscillation EMA (Eq. 8); 5. OBF: frozen
    blocks keep ``B`` (Eq. 10).

    ``freeze(oscillation, norms)`` replaces :func:`obf_freeze` (with ``alpha``, ``beta``)
    where the blocks given are a shard of the parameter: Eq. 10 ranks all its blocks.
    ``revive`` chooses the revive score of :func:`lma_scores`.
    """
    proposed = top_n_mask_(lma_scores(weight, grad, kept, lr, revive=revive), n, prefer=kept)
    new_oscillation = update_oscillation(oscillation, sad(kept, proposed), gamma)
    norms = block_norms(weight)
    if freeze is None:
        frozen = obf_freeze(new_oscillation, norms, alpha, beta)
    else:
        frozen = freeze(new_oscillation, norms)
    new_kept = select(frozen.unsqueeze(1), kept, proposed)
    return MaskEvolution(new_kept, new_oscillation, proposed, frozen)
