"""Shared hypothesis strategies and seeded tensor builders for the bame_optim tests.

Strategies draw small things (patterns, shapes, seeds, hyper-parameters); tensors are built
from a drawn seed with a private ``torch.Generator`` (never the global RNG), which keeps
hypothesis fast on tensors of a few thousand elements. Nothing here imports ``bame_optim``:
masks are built independently of the code under test.

Typical use (the example count comes from the hypothesis profile, ``conftest.py``)::

    @given(case=nm_shapes(), seed=seeds)
    def test_something(case, seed):
        n, m, shape = case
        weight = seeded_tensor(shape, seed)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import settings
from hypothesis import strategies as st

__all__ = [
    "CI_EXAMPLES",
    "FRACTIONS",
    "GAMMAS",
    "LAYOUTS",
    "LRS",
    "NM_PATTERNS",
    "Schedule",
    "block_mask",
    "exact_nm_mask",
    "examples",
    "fractions",
    "gammas",
    "layouts",
    "lrs",
    "nm_patterns",
    "nm_shapes",
    "param_shapes",
    "schedules",
    "seeded_tensor",
    "seeds",
    "tensor_kinds",
]

CI_EXAMPLES = 50
"""``max_examples`` of the ``ci`` profile (``conftest.py``): enough examples to find ties, fast
on 2 CPU cores. A property test without its own settings runs this many under ``ci``."""


def examples(ci: int) -> settings:
    """Settings of a property test that runs ``ci`` examples under the ``ci`` profile (fewer
    for a heavy test, more for a cheap one), scaled with the active profile's
    ``max_examples`` (``HYPOTHESIS_PROFILE=dev`` runs ten times as many)."""
    return settings(max_examples=max(1, round(ci * settings.default.max_examples / CI_EXAMPLES)))

NM_PATTERNS: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (1, 8), (1, 16), (2, 8), (4, 8))
"""The N:M patterns of the paper's tables plus the 2:8 / 4:8 middle ground."""

LAYOUTS = ("linear", "conv1d", "conv2d")

nm_patterns = st.sampled_from(NM_PATTERNS)
"""``(n, m)`` pairs."""

layouts = st.sampled_from(LAYOUTS)

seeds = st.integers(min_value=0, max_value=2**32 - 1)
"""Seeds for :func:`seeded_tensor`, :func:`block_mask` and ``torch.Generator``."""

tensor_kinds = st.sampled_from(("normal", "integers"))
"""``"normal"``: continuous values (ties practically impossible); ``"integers"``: small
integer-valued floats (ties everywhere, and exact arithmetic in every float dtype)."""

LRS = (0.0, 1e-3, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0)
lrs = st.one_of(st.sampled_from(LRS), st.floats(min_value=0.0, max_value=10.0))
"""Learning rates, 0 included (a warm-up that starts at 0)."""

FRACTIONS = (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0)
fractions = st.one_of(st.sampled_from(FRACTIONS), st.floats(min_value=0.0, max_value=1.0))
"""OBF fractions ``alpha`` and ``beta`` in ``[0, 1]``."""

GAMMAS = (0.0, 0.5, 0.75, 0.9, 1.0)
gammas = st.sampled_from(GAMMAS)
"""Oscillation EMA momenta; 0.9 is the default, the others are exact in binary."""


@st.composite
def param_shapes(
    draw,
    m: int,
    layouts: tuple[str, ...] = LAYOUTS,
    max_out: int = 6,
    max_groups: int = 4,
    max_kernel: int = 3,
) -> tuple[int, ...]:
    """A parameter shape whose grouped dimension (``in``, dim 1) divides by ``m``.

    Linear ``[out, in]``, Conv1d ``[out, in, k]``, Conv2d ``[out, in, kh, kw]`` with
    ``in = m * groups``. With the defaults and ``m <= 16`` a shape has at most 3456 elements.
    """
    layout = draw(st.sampled_from(layouts))
    out = draw(st.integers(1, max_out))
    in_ = m * draw(st.integers(1, max_groups))
    kernel = st.integers(1, max_kernel)
    if layout == "linear":
        return (out, in_)
    if layout == "conv1d":
        return (out, in_, draw(kernel))
    if layout == "conv2d":
        return (out, in_, draw(kernel), draw(kernel))
    raise ValueError(f"Invalid layout: {layout!r}")


@st.composite
def nm_shapes(
    draw,
    patterns: tuple[tuple[int, int], ...] = NM_PATTERNS,
    layouts: tuple[str, ...] = LAYOUTS,
) -> tuple[int, int, tuple[int, ...]]:
    """``(n, m, shape)``: an N:M pattern and a parameter shape that it divides."""
    n, m = draw(st.sampled_from(patterns))
    return n, m, draw(param_shapes(m, layouts))


class Schedule(NamedTuple):
    total_steps: int
    t_i: int
    t_f: int
    delta_t: int


@st.composite
def schedules(draw, max_total: int = 60, max_delta_t: int = 10) -> Schedule:
    """A valid schedule ``0 <= t_i <= t_f <= total_steps``, ``delta_t >= 1``; the edge cases
    (``t_i = 0``: static start, ``t_i = t_f``: no evolve phase) come up often."""
    total = draw(st.integers(0, max_total))
    t_i = draw(st.one_of(st.just(0), st.just(total // 3), st.integers(0, total)))
    t_f = draw(st.one_of(st.just(t_i), st.integers(t_i, total)))
    return Schedule(total, t_i, t_f, draw(st.integers(1, max_delta_t)))


def seeded_tensor(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    kind: str = "normal",
    dtype: torch.dtype = torch.float64,
    low: int = -3,
    high: int = 3,
) -> torch.Tensor:
    """A tensor drawn from ``torch.Generator().manual_seed(seed)``.

    ``kind="normal"``: standard normal; ``kind="integers"``: integers in ``[low, high]``
    stored as ``dtype`` (exact in every float dtype for small ranges).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)
    if kind == "integers":
        return torch.randint(low, high + 1, tuple(shape), generator=gen).to(dtype)
    raise ValueError(f"Invalid kind: {kind!r}")


def block_mask(k: int, m: int, seed: int, min_kept: int, max_kept: int | None = None):
    """Bool ``[k, m]``: each block keeps a uniformly random set of ``c`` entries, ``c`` drawn
    uniformly from ``[min_kept, max_kept]`` per block (``max_kept`` defaults to ``min_kept``)."""
    max_kept = min_kept if max_kept is None else max_kept
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(min_kept, max_kept + 1, (k, 1), generator=gen)
    ranks = torch.rand(k, m, generator=gen).argsort(dim=1).argsort(dim=1)
    return ranks < counts


def exact_nm_mask(k: int, n: int, m: int, seed: int) -> torch.Tensor:
    """Bool ``[k, m]`` with exactly ``n`` entries per block, at random positions."""
    return block_mask(k, m, seed, n)


# One table of SGD configurations, as torch's optimizer tests do.
SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True, maximize=True),
    dict(lr=0.0, momentum=0.5, weight_decay=1e-3),
]
