"""``bame_optim.core.schedule`` against docs/design.md section 2, written out with exact
arithmetic."""

from __future__ import annotations

import itertools
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core.schedule import (
    DEFAULT_DELTA_T,
    Phase,
    describe_schedule,
    evolve_updates,
    gradual_budget,
    gradual_updates,
    is_update_step,
    last_update_step,
    phase,
    resolve_schedule,
)

from .strategies import NM_PATTERNS, examples, schedules

steps = st.integers(0, 10**6)


def reference_budget(t: int, n: int, m: int, t_i: int) -> int:
    """n(t) = N + ceil((M - N)(1 - t / t_i)) for t < t_i, N from t_i on (docs/design.md
    section 2)."""
    if t >= t_i:
        return n
    return n + math.ceil((m - n) * (1 - Fraction(t, t_i)))


def names(message: str, argument: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){argument}(?![A-Za-z0-9_])", message) is not None


# --------------------------------------------------------------------------- resolve_schedule


def test_default_delta_t_is_the_papers():
    assert DEFAULT_DELTA_T == 100


@given(total=steps)
def test_resolve_schedule_defaults(total):
    assert resolve_schedule(total, None, None) == (total // 3, 2 * total // 3)


@given(total=steps, data=st.data())
def test_resolve_schedule_fills_only_the_missing_one(total, data):
    t_i = data.draw(st.integers(0, 2 * total // 3))
    assert resolve_schedule(total, t_i, None) == (t_i, 2 * total // 3)
    t_f = data.draw(st.integers(total // 3, total))
    assert resolve_schedule(total, None, t_f) == (total // 3, t_f)


@given(total=st.none() | steps, data=st.data())
def test_resolve_schedule_passes_valid_values_through(total, data):
    upper = 10**6 if total is None else total
    t_i = data.draw(st.integers(0, upper))
    t_f = data.draw(st.integers(t_i, upper))
    assert resolve_schedule(total, t_i, t_f) == (t_i, t_f)


@pytest.mark.parametrize("argument", ["total_steps", "t_i", "t_f"])
@pytest.mark.parametrize("value", [-1, -100, 10.0, 1.5, True, False, "10"])
def test_resolve_schedule_rejects_bad_values(argument, value):
    kwargs = {"total_steps": 300, "t_i": 100, "t_f": 200}
    kwargs[argument] = value
    with pytest.raises(ValueError) as info:
        resolve_schedule(**kwargs)
    message = str(info.value)
    assert names(message, argument), message
    assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize(("t_i", "t_f"), [(None, None), (None, 10), (10, None)])
def test_resolve_schedule_needs_total_steps_for_defaults(t_i, t_f):
    with pytest.raises(ValueError) as info:
        resolve_schedule(None, t_i, t_f)
    assert names(str(info.value), "total_steps"), str(info.value)


@pytest.mark.parametrize(
    ("total", "t_i", "t_f"),
    [(300, 201, 200), (None, 5, 4), (300, 250, None), (3, 3, 2), (0, 1, 0)],
)
def test_resolve_schedule_rejects_t_i_after_t_f(total, t_i, t_f):
    with pytest.raises(ValueError) as info:
        resolve_schedule(total, t_i, t_f)
    assert names(str(info.value), "t_i"), str(info.value)
    assert str(t_i) in str(info.value)


@pytest.mark.parametrize(
    ("total", "t_i", "t_f"), [(300, 100, 301), (0, 0, 1), (10, None, 11), (10, 11, 11)]
)
def test_resolve_schedule_rejects_t_f_after_total(total, t_i, t_f):
    with pytest.raises(ValueError) as info:
        resolve_schedule(total, t_i, t_f)
    assert names(str(info.value), "t_f"), str(info.value)
    assert str(t_f) in str(info.value)


# --------------------------------------------------------------------------- phase


def expected_phase(t: int, t_i: int, t_f: int) -> Phase:
    if t < t_i:
        return Phase.GRADUAL
    if t == t_i:  # end of gradual: the mask always reaches N:M here, even if t_i == t_f
        return Phase.PRUNE
    if t < t_f:
        return Phase.EVOLVE
    return Phase.FROZEN


@given(schedule=schedules(max_total=200))
def test_phase_partitions_the_steps(schedule):
    _, t_i, t_f, _ = schedule
    seen = []
    for t in range(t_f + 5):
        p = phase(t, t_i, t_f)
        assert p is expected_phase(t, t_i, t_f), (t, p)
        seen.append(p)
    # contiguous runs in order gradual, prune, evolve, frozen: [0, t_i), {t_i}, (t_i, t_f), ...
    assert seen.count(Phase.GRADUAL) == t_i
    assert seen.count(Phase.PRUNE) == 1
    assert seen.count(Phase.EVOLVE) == max(0, t_f - t_i - 1)
    order = [Phase.GRADUAL, Phase.PRUNE, Phase.EVOLVE, Phase.FROZEN]
    assert [order.index(p) for p in seen] == sorted(order.index(p) for p in seen)


@given(t=steps, t_i=steps, data=st.data())
def test_phase_of_large_steps(t, t_i, data):
    t_f = data.draw(st.integers(t_i, 2 * 10**6))
    assert phase(t, t_i, t_f) is expected_phase(t, t_i, t_f)


def test_phase_values_are_strings():
    assert [p.value for p in Phase] == ["gradual", "prune", "evolve", "frozen"]
    assert phase(5, 5, 5) == "prune"
    assert phase(6, 5, 5) == "frozen"
    assert phase(0, 0, 0) == "prune"


# --------------------------------------------------------------------------- is_update_step


@given(schedule=schedules(max_total=300, max_delta_t=40))
def test_is_update_step_rule(schedule):
    _, t_i, t_f, delta_t = schedule
    for t in range(t_f + 2 * delta_t + 2):
        expected = t == t_i or (t % delta_t == 0 and t < t_f)
        assert is_update_step(t, delta_t, t_i, t_f) is expected, t
        if t >= t_f and t != t_i:
            assert not is_update_step(t, delta_t, t_i, t_f)
    assert is_update_step(t_i, delta_t, t_i, t_f)


@given(t=steps, delta_t=st.integers(1, 1000), t_i=steps, data=st.data())
def test_is_update_step_large_steps(t, delta_t, t_i, data):
    t_f = data.draw(st.integers(t_i, 2 * 10**6))
    expected = t == t_i or (t % delta_t == 0 and t < t_f)
    assert is_update_step(t, delta_t, t_i, t_f) is expected


def test_is_update_step_examples():
    # T = 3000 with the defaults: t_i = 1000, t_f = 2000, delta_t = 100
    updates = [t for t in range(3000) if is_update_step(t, 100, 1000, 2000)]
    assert updates == list(range(0, 2000, 100))
    # t_i off the grid is still an update step
    updates = [t for t in range(40) if is_update_step(t, 10, 15, 25)]
    assert updates == [0, 10, 15, 20]
    # static sparse training: one update at t = 0, then never
    assert [t for t in range(50) if is_update_step(t, 7, 0, 0)] == [0]


# --------------------------------------------------------------------------- gradual_budget


@given(pattern=st.sampled_from(NM_PATTERNS), t_i=st.integers(1, 500), data=st.data())
def test_gradual_budget_over_a_whole_schedule(pattern, t_i, data):
    n, m = pattern
    budgets = [gradual_budget(t, n, m, t_i) for t in range(t_i + 10)]
    assert budgets == [reference_budget(t, n, m, t_i) for t in range(t_i + 10)]
    assert budgets[0] == m
    assert all(a >= b for a, b in itertools.pairwise(budgets))
    assert all(n <= b <= m for b in budgets)
    assert budgets[t_i:] == [n] * 10
    assert all(b > n for b in budgets[:t_i])  # strictly above N until t_i


@given(m=st.integers(2, 64), data=st.data(), t_i=st.integers(0, 10**6), t=steps)
def test_gradual_budget_any_pattern(m, data, t_i, t):
    n = data.draw(st.integers(1, m - 1))
    assert gradual_budget(t, n, m, t_i) == reference_budget(t, n, m, t_i)


@pytest.mark.parametrize(("n", "m"), NM_PATTERNS)
def test_gradual_budget_with_t_i_zero_is_n(n, m):
    assert [gradual_budget(t, n, m, 0) for t in range(5)] == [n] * 5


def test_gradual_budget_hand_written():
    # 1:4 over t_i = 4: N + ceil(3 * (1 - t/4)) = 1 + ceil(3, 2.25, 1.5, 0.75) = 4, 4, 3, 2
    assert [gradual_budget(t, 1, 4, 4) for t in range(6)] == [4, 4, 3, 2, 1, 1]
    # 2:4 over t_i = 3: 2 + ceil(2, 4/3, 2/3) = 4, 4, 3
    assert [gradual_budget(t, 2, 4, 3) for t in range(4)] == [4, 4, 3, 2]


def test_last_update_step():
    assert last_update_step(5, 5, 3) == 5
    assert last_update_step(4, 20, 7) == 14
    assert last_update_step(4, 6, 100) == 4
    assert last_update_step(0, 0, 100) == 0


@examples(100)
@given(schedules())
def test_last_update_step_is_the_last_update_step(schedule):
    """Against the definition: the largest t that is an update step."""
    t_i, t_f, delta_t = schedule.t_i, schedule.t_f, schedule.delta_t
    horizon = max(t_f, t_i) + 2 * delta_t
    updates = [t for t in range(horizon) if is_update_step(t, delta_t, t_i, t_f)]
    assert last_update_step(t_i, t_f, delta_t) == max(updates)


@examples(100)
@given(schedules())
def test_update_counts_are_the_update_steps_of_each_phase(schedule):
    """gradual_updates / evolve_updates against the definition of an update step."""
    t_i, t_f, delta_t = schedule.t_i, schedule.t_f, schedule.delta_t
    updates = [t for t in range(max(t_f, t_i) + 1) if is_update_step(t, delta_t, t_i, t_f)]
    assert gradual_updates(t_i, delta_t) == sum(t < t_i for t in updates)
    assert evolve_updates(t_i, t_f, delta_t) == sum(t_i < t < t_f for t in updates)
    line = describe_schedule(2, 4, t_i, t_f, delta_t)
    assert f"({gradual_updates(t_i, delta_t)} mask updates)" in line and "\n" not in line

