"""The density algebra of each training-FLOPs profile: exact sums over a schedule of a sparse
layer's forward, input-gradient and weight-gradient densities, in closed form (``O(M - N)``
work, ``O((M - N) log t_f)`` for LBC, not ``O(T)``) and exact rational arithmetic. The
profiles, and where they come from: docs/flops.md, "Method profiles"."""

from __future__ import annotations

import math
from fractions import Fraction

from bame_optim.core.nm import check_nm
from bame_optim.core.schedule import DEFAULT_DELTA_T, resolve_schedule
from bame_optim.core.validation import check_int
from bame_optim.methods import METHODS, FlopsProfile
from bame_optim.peers.maxq import DEFAULT_SCHEDULE, dense_block_sum, resolve_ramp

__all__ = ["lbc_union_bounds", "resolve_profile", "step_density_sums"]


def resolve_profile(method: str | FlopsProfile) -> FlopsProfile:
    """The profile of a method of :data:`bame_optim.methods.METHODS`, or ``method`` itself."""
    if isinstance(method, FlopsProfile):
        return method
    if method in METHODS:
        return METHODS[method].flops
    extra = (FlopsProfile.BIMASK, FlopsProfile.LBC_LOWER)  # profiles without an optimizer
    names = [*METHODS, *(profile.value for profile in extra)]
    for profile in extra:
        if method == profile.value:
            return profile
    raise ValueError(f"Invalid method value: {method!r} (one of {', '.join(names)})")


def step_density_sums(
    method: str,
    *,
    n: int,
    m: int,
    total_steps: int,
    t_i: int | None = None,
    t_f: int | None = None,
    delta_t: int = DEFAULT_DELTA_T,
    backward_mask: bool = True,
    sparsity_schedule: str | None = None,
) -> tuple[Fraction, Fraction, Fraction]:
    """Exact sums over the ``total_steps`` steps of a sparse layer's forward, input-grad and
    weight-grad densities under ``method`` (profiles: docs/flops.md; ``asp`` gives
    its fine-tuning phase of ``total_steps`` steps). ``backward_mask``: whether the layer gets
    a backward mask under ``bame_bidir``; ``sparsity_schedule``: MaxQ's ramp (``maxq``
    only). ``O(M - N)`` work (MaxQ's ``cosine`` and ``exponential`` ramps: ``O(t_i)``, as a
    float sum).
    """
    profile = resolve_profile(method)
    check_nm(n, m)
    steps = check_int("total_steps", total_steps, 1)
    delta_t = check_int("delta_t", delta_t, 1)
    if sparsity_schedule is not None and profile is not FlopsProfile.MAXQ:
        raise ValueError(f"Invalid sparsity_schedule value: {sparsity_schedule!r} (only method "
                         "'maxq' uses it)")
    if profile is FlopsProfile.MAXQ:  # its own t_i default; t_f is not used
        d = Fraction(n, m)
        ramp = dense_block_sum(steps, resolve_ramp(steps, t_i),
                               sparsity_schedule or DEFAULT_SCHEDULE)
        return 1 + d * (steps - 1) + (1 - d) * ramp, Fraction(steps), Fraction(steps)
    t_i, t_f = resolve_schedule(steps, t_i, t_f)
    d = Fraction(n, m)
    if profile is FlopsProfile.DENSE:
        return Fraction(steps), Fraction(steps), Fraction(steps)
    if profile in (FlopsProfile.FIXED, FlopsProfile.PRETRAIN_FIXED):
        return d * steps, d * steps, d * steps
    if profile is FlopsProfile.STE:
        return d * steps, Fraction(steps), Fraction(steps)
    if profile is FlopsProfile.BIMASK:
        return d * steps, d * steps, Fraction(steps)
    if profile in (FlopsProfile.LBC, FlopsProfile.LBC_LOWER):
        forward = _lbc_forward_entries(n, m, steps, t_f, upper=profile is FlopsProfile.LBC)
        return Fraction(forward, m), Fraction(steps), Fraction(steps)

    # BAME-like. Kept per block in the forward of step t: m at t = 0; for t >= 1 the budget
    # after step s = t - 1: gradual_budget(u) with u = delta_t * (s // delta_t) while s < t_i,
    # n from s = t_i on. Summed over s in [0, steps - 1): n per step, plus for j = 1..m-n one
    # extra per step s < S whose u satisfies ceil((m - n)(t_i - u) / t_i) >= j, i.e.
    # u < t_i (m - n - j + 1) / (m - n), i.e. s < delta_t * ceil(that / delta_t).
    span = min(t_i, steps - 1)
    kept = m + n * (steps - 1)
    for k in range(1, m - n + 1):
        reach = delta_t * -(-t_i * k // ((m - n) * delta_t))
        kept += min(span, reach)
    forward = Fraction(kept, m)
    # evolve-phase update steps t_i < t < t_f with t % delta_t == 0: dense weight gradient
    evolve_updates = max(0, (t_f - 1) // delta_t - t_i // delta_t) if t_f else 0
    weight_grad = forward + evolve_updates * (1 - d)
    input_grad = forward
    if profile is FlopsProfile.SCHEDULED_BIDIR and backward_mask:
        input_grad = 1 + d * (steps - 1)
    return forward, input_grad, weight_grad


def lbc_union_bounds(r: int, n: int, m: int) -> tuple[int, int]:
    """``(least, most)`` entries of a block of ``m`` that the union of ``r`` distinct
    ``n``-subsets can cover (``1 <= r <= binom(m, n)``): the smallest ``k`` with
    ``binom(k, n) >= r`` (all of them inside ``k`` entries) and ``min(m, r n)`` (as disjoint as
    they can be). The forward density of LBC with ``r`` combinations left lies in between.
    """
    check_nm(n, m)
    check_int("r", r, 1)
    if r > math.comb(m, n):
        raise ValueError(f"Invalid r value: {r!r} (at most binom({m}, {n}) = {math.comb(m, n)})")
    least = n
    while math.comb(least, n) < r:
        least += 1
    return least, min(m, r * n)


def _lbc_forward_entries(n: int, m: int, steps: int, t_f: int, upper: bool) -> int:
    """``sum over t < steps`` of the entries per block of LBC's forward (``m`` at ``t = 0``,
    then a bound of the union of ``r(t - 1)`` combinations; docs/flops.md), in closed form.

    The bound ``U(r)`` is non-decreasing in ``r``, so ``U(r) = U(1) + sum_j [r >= j] (U(j) -
    U(j - 1))`` over the ``j`` where it steps up. ``r(s) >= j >= 2`` holds iff ``s < t_f`` and
    ``(C - 1)(t_f - s)^3 >= (j - 1) t_f^3``, i.e. for ``s`` in ``[0, t_f - x_j]`` with ``x_j``
    the least positive integer meeting it: ``O((M - N) log t_f)`` work.
    """
    c = math.comb(m, n)
    if upper:  # min(m, j n) steps up at j = 2 .. ceil(m / n)
        steps_up = [(j, min(m, j * n) - (j - 1) * n) for j in range(2, min(c, -(-m // n)) + 1)]
    else:  # the least k with binom(k, n) >= j steps up by one at j = binom(k, n) + 1
        steps_up = [(math.comb(k, n) + 1, 1) for k in range(n, m)]
    later = steps - 1  # the steps t >= 1, whose forward follows step() s = t - 1
    entries = m + n * later
    for j, rise in steps_up:
        if not t_f:
            break
        low, high = 1, t_f  # x_j: (c - 1) x^3 >= (j - 1) t_f^3 holds at x = t_f since j <= c
        while low < high:
            mid = (low + high) // 2
            if (c - 1) * mid**3 >= (j - 1) * t_f**3:
                high = mid
            else:
                low = mid + 1
        entries += rise * min(later, t_f - low + 1)
    return entries
