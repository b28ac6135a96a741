"""Mask rules: what a method does to a parameter's mask on an update step.

A rule is a function ``(weight, grad, kept, oscillation, group, context) -> MaskUpdate`` of
block tensors (``weight``, ``grad``, ``kept``: ``[K, M]``; ``oscillation``: ``[K]`` or
``None``; ``group``: the param group's hyper-parameters; ``context``: the step and the
parameter's place, :class:`MaskContext`). A method is a :class:`MaskRules` record choosing one
rule per phase of the schedule (:mod:`bame_optim.core.schedule`):

* ``start``: at ``t == t_i == 0`` (no gradual phase): a seeded random N:M mask
  (:func:`random_start`, the "static" start) or one-shot magnitude pruning (:func:`one_shot`,
  ASP);
* ``gradual``: before and at ``t_i``: :func:`gradual_magnitude`;
* ``evolve``: between ``t_i`` and ``t_f``: :func:`lma_obf` (BAME) or :func:`rigl` (RigL in N:M
  blocks: a cosine-annealed share of the layer's smallest ``|W|`` dropped, regrown per block by
  ``|G|``); these need the gradient, and the optimizer skips a parameter without a finite one.

All the N:M math is in :mod:`bame_optim.core`; rules only choose and combine it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bame_optim.core.evolution import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    REVIVE_SCORES,
    evolve_mask,
    magnitude_mask,
)
from bame_optim.core.nm import random_nm_mask
from bame_optim.core.rigl import rigl_drop_fraction, rigl_mask
from bame_optim.core.schedule import (
    DEFAULT_DELTA_T,
    Phase,
    evolve_updates,
    gradual_budget,
    resolve_schedule,
)
from bame_optim.core.validation import check_fraction, check_int, invalid
from bame_optim.optim.stacklevel import user_stacklevel

__all__ = [
    "ASP_RULES",
    "BAME_RULES",
    "RIGL_RULES",
    "RULE_KEYWORDS",
    "MaskContext",
    "MaskRule",
    "MaskRules",
    "MaskUpdate",
    "gradual_magnitude",
    "lma_obf",
    "one_shot",
    "random_start",
    "rigl",
    "rigl_t_end",
]

SEED_STRIDE = 1_000_003
"""Separates the per-parameter generator seeds ``seed * stride + index`` (a prime, so seeds of
nearby (seed, index) pairs do not collide for models with fewer parameters than that)."""


class MaskContext(NamedTuple):
    """Where a rule runs: the step, and the parameter's place among the optimizer's."""

    step: int
    """The step counter ``t``."""
    index: int
    """The parameter's position over all param groups (seeds its random start mask)."""
    total_blocks: int
    """``K`` of the whole parameter (more than the rows given on one FSDP2 shard)."""
    first_block: int
    """Index of the first block given (0 unless the parameter is sharded)."""
    freeze: Callable[[Tensor, Tensor], Tensor] | None = None
    """OBF over all shards' blocks for a sharded parameter (Eq. 10 ranks all ``K`` blocks)."""


class MaskUpdate(NamedTuple):
    """A rule's result for one parameter."""

    kept: Tensor
    """New mask ``[K, M]`` bool."""
    count: int
    """Weights kept per block in ``kept``."""
    oscillation: Tensor | None = None
    """Updated oscillation EMA ``[K]`` (Eq. 8), for rules that track it."""
    frozen: Tensor | None = None
    """Blocks that kept their mask by OBF ``[K]`` bool, for rules that freeze."""


MaskRule = Callable[[Tensor, Tensor | None, Tensor, Tensor | None, dict[str, Any], MaskContext],
                    MaskUpdate]


def random_start(weight, grad, kept, oscillation, group, context) -> MaskUpdate:
    """A uniformly random N:M mask from a generator seeded with the group's ``seed`` and the
    parameter's index, the same on every rank (drawn for all blocks, sliced to this rank's)."""
    generator = torch.Generator().manual_seed(group["seed"] * SEED_STRIDE + context.index)
    whole = random_nm_mask(context.total_blocks, group["n"], group["m"], generator, kept.device)
    first = context.first_block
    return MaskUpdate(whole[first : first + kept.shape[0]], group["n"])


def one_shot(weight, grad, kept, oscillation, group, context) -> MaskUpdate:
    """The ``n`` largest ``|W|`` of every block (ASP's one-shot pruning of a trained model)."""
    return MaskUpdate(magnitude_mask(weight, kept, group["n"]), group["n"])


def gradual_magnitude(weight, grad, kept, oscillation, group, context) -> MaskUpdate:
    """The ``n(t)`` largest ``|W|`` among the kept weights of every block (the gradual budget
    of :func:`bame_optim.core.schedule.gradual_budget`; exactly ``n`` at ``t_i``), at most the
    count kept now: pruned weights do not come back in this phase, also when a resumed run's
    ``t_i`` lies later than the checkpoint's."""
    count = gradual_budget(context.step, group["n"], group["m"], group["t_i"])
    if kept.shape[0]:  # never above the current count (a resume that moved t_i later)
        count = min(count, int(kept[0].sum()))
    return MaskUpdate(magnitude_mask(weight, kept, count), count)


def lma_obf(weight, grad, kept, oscillation, group, context) -> MaskUpdate:
    """BAME's evolve step: LMA scores and proposal (Eq. 4-6), SAD and the oscillation EMA
    (Eq. 7-8), OBF freezing (Eq. 10); :func:`bame_optim.core.evolution.evolve_mask`. The
    revive score is the group's ``revive_score`` where the rules take it (BAMEAdamW), else
    Eq. 5's ``"sgd"``."""
    evolution = evolve_mask(
        weight, grad, kept, oscillation, n=group["n"], lr=group["lr"], alpha=group["alpha"],
        beta=group["beta"], gamma=group["gamma"], freeze=context.freeze,
        revive=group.get("revive_score", "sgd"),
    )
    return MaskUpdate(evolution.kept, group["n"], evolution.oscillation, evolution.frozen)


def rigl_t_end(group: dict[str, Any]) -> int:
    """``T_end`` of a group: its ``t_end``, or ``3 * total_steps // 4`` (RigL's default
    ``0.75 T``) when ``t_end`` is ``None``; ``ValueError`` naming both if neither is set."""
    t_end = group.get("t_end")
    if t_end is not None:
        return t_end
    total = group.get("total_steps")
    if total is None:
        raise ValueError(
            "Invalid t_end value: None (RigL needs t_end, or total_steps for the default "
            "t_end = 3 * total_steps // 4)"
        )
    return 3 * total // 4


def rigl(weight, grad, kept, oscillation, group, context) -> MaskUpdate:
    """RigL (Evci et al., ICML 2020) inside N:M blocks; no OBF.

    At an evolve-phase update with step counter ``t``, drop
    ``floor(ζ_t · count)`` of the layer's ``count`` kept weights (smallest ``|W|`` across the
    parameter) and regrow, per block, as many as it lost by largest ``|G|``
    (:func:`bame_optim.core.rigl.rigl_mask`, :func:`bame_optim.core.rigl.rigl_drop_fraction`);
    regrown weights start at 0 (pruned weights are 0), a dropped weight that wins regrowth
    keeps its value. Reads ``zeta`` (ζ, default 0.3) and ``t_end`` (:func:`rigl_t_end`).

    .. note:: Reading of RigL's schedule inside BAME's: ``t`` in the cosine is the
       optimizer's step counter (the ``t`` of ``t_i`` and ``t_f``, counted from the start of
       training, not from ``t_i``), and ``T_end`` defaults to ``3 * total_steps // 4``:
       RigL's ``0.75 T`` with ``T`` the planned training length ``total_steps``. Updates
       happen only where BAME's schedule has them (``t_i < t < t_f``, ``t % delta_t == 0``);
       updates at ``t >= t_end`` drop nothing. With BAME's default ``t_f = 2T/3 < 0.75 T``
       the cosine is cut at ``t_f`` (ζ_t ≈ 0.03 ζ at the last update); pass ``t_end=t_f`` to
       anneal to 0 exactly at the end of the evolve window.

    .. note:: Sharded (FSDP2) parameters are not supported yet: the layer-wide ranking needs
       every shard's ``|W|``; this raises ``ValueError`` (and :class:`RigLSGD
       <bame_optim.optim.sgd.RigLSGD>` at construction).
    """
    if context.freeze is not None or context.total_blocks != kept.shape[0]:
        raise ValueError(
            f"Invalid parameter {context.index}: RigL does not support sharded (FSDP2) "
            "parameters yet (its drop ranks |W| across the whole layer)"
        )
    fraction = rigl_drop_fraction(context.step, group["zeta"], rigl_t_end(group))
    drop = int(fraction * int(kept.sum()))
    return MaskUpdate(rigl_mask(weight, grad, kept, group["n"], drop), group["n"])


@dataclass(frozen=True)
class MaskRules:
    """The rules of one method, one per phase, and the group keywords they read.

    ``keywords`` maps each keyword a rule reads (beyond ``n``, ``m``, ``lr``) to its default;
    an optimizer accepts exactly these, so no keyword is accepted and then ignored.
    ``scheduled=False`` fixes ``t_i = t_f = 0`` (the mask is chosen at the first step, by
    ``start``, and never changes).
    """

    start: MaskRule
    gradual: MaskRule | None = gradual_magnitude
    evolve: MaskRule | None = None
    keywords: dict[str, Any] = field(default_factory=dict)
    scheduled: bool = True

    def tracks_oscillation(self) -> bool:
        """Whether the evolve rule reads and returns the oscillation EMA."""
        return self.evolve is lma_obf

    def rule_for(self, current: Phase, t_i: int, *, untouched: bool) -> MaskRule | None:
        """The rule of an update step in phase ``current`` (``untouched``: the mask still
        keeps every weight, so a ``t_i = 0`` start may replace it)."""
        if current is Phase.PRUNE and t_i == 0 and untouched:
            return self.start
        if current is Phase.EVOLVE:
            return self.evolve
        return self.gradual

    def prepare(self, group: dict[str, Any], owner: str, *, has_sparse: bool) -> None:
        """Validate the rule keywords of a param group (``ValueError`` naming a bad one, or a
        keyword these rules do not read) and resolve its schedule in place.

        A group without sparse parameters needs no schedule (``total_steps`` may be
        missing). A schedule whose evolve window holds fewer than
        :data:`MIN_EVOLVE_UPDATES` update steps warns, naming the numbers."""
        unused = sorted(k for k in RULE_KEYWORDS if k in group and k not in self.keywords)
        if unused:
            raise ValueError(f"Invalid param group keys {unused}: {owner} does not use them")
        for name in ("alpha", "beta"):
            if name in group:
                check_fraction(name, group[name])
        check_fraction("gamma", group.get("gamma", 0.0), one=False)
        for name, minimum in (("delta_t", 1), ("seed", 0)):
            if name in group:
                check_int(name, group[name], minimum)
        if "zeta" in group:
            check_fraction("zeta", group["zeta"])
        if "revive_score" in group and group["revive_score"] not in REVIVE_SCORES:
            raise invalid("revive_score", group["revive_score"], f"one of {REVIVE_SCORES}")
        check_int("t_end", group.get("t_end"), 0, optional=True)
        if not self.scheduled:
            group["t_i"], group["t_f"], group["delta_t"] = 0, 0, DEFAULT_DELTA_T
            return
        if not has_sparse and group["total_steps"] is None:
            group["t_i"] = 0 if group["t_i"] is None else group["t_i"]
            group["t_f"] = group["t_i"] if group["t_f"] is None else group["t_f"]
            return
        t_i, t_f = resolve_schedule(group["total_steps"], group["t_i"], group["t_f"])
        group["t_i"], group["t_f"] = t_i, t_f
        if has_sparse and "t_end" in self.keywords:
            group["t_end"] = rigl_t_end(group)
        updates = evolve_updates(t_i, t_f, group["delta_t"])
        if has_sparse and self.evolve is not None and t_f > t_i and updates < MIN_EVOLVE_UPDATES:
            fitting = (t_f - t_i) // (MIN_EVOLVE_UPDATES + 1)
            advice = (
                f"choose delta_t <= {fitting} for this run" if 1 <= fitting < group["delta_t"]
                else f"the window is too short for {MIN_EVOLVE_UPDATES} updates at any delta_t: "
                "train for more steps (total_steps) or move t_i and t_f apart"
            )
            warnings.warn(
                f"{owner}: the evolve window t_i={t_i} .. t_f={t_f} holds {updates} mask "
                f"update(s) at delta_t={group['delta_t']} (fewer than {MIN_EVOLVE_UPDATES}): "
                f"the masks barely evolve, which is gradual magnitude pruning, not BAME; {advice}",
                UserWarning,
                stacklevel=user_stacklevel(),
            )


MIN_EVOLVE_UPDATES = 3
"""Fewer evolve-phase mask updates than this is almost certainly a mistake (ΔT too large for a
short run): docs/design.md section 2."""

RULE_KEYWORDS = ("total_steps", "t_i", "t_f", "delta_t", "alpha", "beta", "gamma", "seed", "zeta",
                 "t_end", "revive_score")
"""Keywords that only some rules read (:attr:`MaskRules.keywords`)."""

_SCHEDULE = {"total_steps": None, "t_i": None, "t_f": None, "delta_t": DEFAULT_DELTA_T}

BAME_RULES = MaskRules(
    start=random_start,
    evolve=lma_obf,
    keywords=_SCHEDULE
    | {"alpha": DEFAULT_ALPHA, "beta": DEFAULT_BETA, "gamma": DEFAULT_GAMMA, "seed": 0},
)
"""BAME: gradual magnitude pruning, LMA + OBF, a seeded random start when ``t_i = 0``."""

DEFAULT_ZETA = 0.3
"""RigL's initial drop fraction ζ (Evci et al. 2020)."""

RIGL_RULES = MaskRules(
    start=random_start,
    evolve=rigl,
    keywords=_SCHEDULE | {"seed": 0, "zeta": DEFAULT_ZETA, "t_end": None},
)
"""RigL in N:M blocks inside BAME's schedule (the paper's Table 4 row): ``zeta`` 0.3,
``t_end`` ``None`` (``3 * total_steps // 4``, :func:`rigl_t_end`)."""

ASP_RULES = MaskRules(start=one_shot, gradual=None, evolve=None, scheduled=False)
"""ASP: one-shot magnitude pruning at the first step, fixed mask after."""

