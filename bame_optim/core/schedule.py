"""BAME's three-phase schedule as pure functions of the step counter ``t``.

``t`` counts completed ``step()`` calls, starting at 0 (docs/design.md section 2). The paper
(section 3.3, following Jayakumar et al. 2020) splits training at ``t_i`` and ``t_f``:

============  =====================  =====================================================
phase         steps                  on an update step
============  =====================  =====================================================
``gradual``   ``0 <= t < t_i``       keep the ``n(t)`` largest ``|W|`` per block (Zhu & Gupta)
``prune``     ``t == t_i``           keep the ``N`` largest ``|W|`` (random N:M if ``t_i == 0``)
``evolve``    ``t_i < t < t_f``      LMA + OBF (Eq. 4-10)
``frozen``    ``t >= t_f``           nothing: the mask is fixed
============  =====================  =====================================================
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "DEFAULT_DELTA_T",
    "Phase",
    "describe_schedule",
    "evolve_updates",
    "gradual_budget",
    "gradual_updates",
    "is_update_step",
    "last_update_step",
    "phase",
    "resolve_schedule",
]

DEFAULT_DELTA_T = 100
"""Mask update interval ΔT: the paper's CIFAR-10 and ImageNet setting (section 4.1)."""


class Phase(str, Enum):
    GRADUAL = "gradual"
    PRUNE = "prune"
    EVOLVE = "evolve"
    FROZEN = "frozen"


def resolve_schedule(total_steps: int | None, t_i: int | None, t_f: int | None) -> tuple[int, int]:
    """``(t_i, t_f)`` with the paper's defaults ``T // 3`` and ``2 * T // 3`` ("t_i and t_f
    evenly divide the training schedule", section 3.3) filled in where ``None``.

    Raises ``ValueError`` naming the argument when a default is needed but ``total_steps`` is
    missing, or when ``0 <= t_i <= t_f <= total_steps`` does not hold.
    """
    for name, value in (("total_steps", total_steps), ("t_i", t_i), ("t_f", t_f)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"Invalid {name} value: {value!r} (an integer is required)")
        if value is not None and value < 0:
            raise ValueError(f"Invalid {name} value: {value} (must be >= 0)")
    if total_steps is None and (t_i is None or t_f is None):
        missing = "t_i" if t_i is None else "t_f"
        raise ValueError(
            f"Invalid total_steps value: None (total_steps is required when {missing} is not "
            f"given, since the default {missing} is a fraction of it)"
        )
    if t_i is None:
        t_i = total_steps // 3
    if t_f is None:
        t_f = 2 * total_steps // 3
    if t_i > t_f:
        raise ValueError(f"Invalid t_i value: {t_i} (t_i <= t_f={t_f} is required)")
    if total_steps is not None and t_f > total_steps:
        raise ValueError(f"Invalid t_f value: {t_f} (t_f <= total_steps={total_steps} is required)")
    return t_i, t_f


def phase(t: int, t_i: int, t_f: int) -> Phase:
    """The phase step ``t`` belongs to. ``t == t_i`` is :attr:`Phase.PRUNE` even if
    ``t_i == t_f``: the mask always reaches N:M at ``t_i``."""
    if t < t_i:
        return Phase.GRADUAL
    if t == t_i:
        return Phase.PRUNE
    if t < t_f:
        return Phase.EVOLVE
    return Phase.FROZEN


def is_update_step(t: int, delta_t: int, t_i: int, t_f: int) -> bool:
    """Whether the mask may change at step ``t`` (Algorithm 1 line 1: ``t % ΔT == 0``, plus
    ``t_i`` itself; never in the frozen phase)."""
    if t == t_i:
        return True
    return t < t_f and t % delta_t == 0


def gradual_budget(t: int, n: int, m: int, t_i: int) -> int:
    """Kept weights per block in the gradual phase, linear from ``M`` to ``N``
    (Zhu & Gupta 2017 as used in section 3.3):

    .. math:: n(t) = N + \\lceil (M - N)(1 - t / t_i) \\rceil, \\qquad 0 \\le t < t_i,

    and ``N`` from ``t_i`` on. Integer arithmetic, so no rounding surprises.
    """
    if t >= t_i:
        return n
    return n + -(-(m - n) * (t_i - t) // t_i)


def last_update_step(t_i: int, t_f: int, delta_t: int) -> int:
    """The last step at which the mask may change (the masks are final after the ``step()``
    that ran with this counter): ``t_i`` if ``t_f <= t_i``, else the last multiple of
    ``delta_t`` before ``t_f`` (but not before ``t_i``)."""
    if t_f <= t_i:
        return t_i
    return max(t_i, (t_f - 1) // delta_t * delta_t)


def gradual_updates(t_i: int, delta_t: int) -> int:
    """Mask updates of the gradual phase: the steps ``0 <= t < t_i`` with ``t % ΔT == 0``."""
    return -(-t_i // delta_t)


def evolve_updates(t_i: int, t_f: int, delta_t: int) -> int:
    """Mask updates of the evolve phase: the steps ``t_i < t < t_f`` with ``t % ΔT == 0``."""
    if t_f <= t_i + 1:
        return 0
    return (t_f - 1) // delta_t - t_i // delta_t


def describe_schedule(
    n: int, m: int, t_i: int, t_f: int, delta_t: int, total_steps: int | None = None
) -> str:
    """One line: the N:M pattern, the phases and their numbers of mask updates."""
    line = (
        f"{n}:{m}: gradual to t_i={t_i} ({gradual_updates(t_i, delta_t)} mask updates), "
        f"evolve to t_f={t_f} ({evolve_updates(t_i, t_f, delta_t)} updates, ΔT={delta_t}), "
        "then fixed"
    )
    return line if total_steps is None else f"{line} (total_steps={total_steps})"

