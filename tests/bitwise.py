"""Bit-for-bit comparisons shared by the fused-evolve tests (CPU passes, Triton kernels, the
optimizer-level runs): a float tensor's entries as integers, and an apply pass run beside its
eager reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bame_optim.kernels import evolve_reference


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s entries (detached, contiguous, on the CPU) as integers of their size."""
    t = t.detach().contiguous().cpu()
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``actual`` equals ``expected`` bit for bit, with the same dtype and shape."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    same = bits(actual) == bits(expected)
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} entries differ"


def assert_apply_equals_eager(
    apply: Callable, weight: torch.Tensor, values: list[torch.Tensor], kept: torch.Tensor,
    count: int, proposal: torch.Tensor, frozen: torch.Tensor, m: int,
) -> None:
    """``apply`` (an ``apply_evolved_`` pass) and :func:`evolve_reference.apply_evolved_eager`
    on copies of ``weight`` (same strides) and of the buffers ``values``: the same new kept
    sets, flips, weights and buffers, bit for bit."""
    runs = []
    for fn in (apply, evolve_reference.apply_evolved_eager):
        w = weight.clone()
        w.as_strided_(weight.shape, weight.stride())
        state = [v.clone() for v in values]
        new_kept, flips = fn(w, state, kept, count, proposal, frozen, m)
        runs.append((w, state, new_kept, int(flips)))
    (w1, s1, k1, f1), (w2, s2, k2, f2) = runs
    assert_bits(k1, k2, "kept")
    assert f1 == f2
    assert_bits(w1, w2, "weight")
    for a, b in zip(s1, s2, strict=True):
        assert_bits(a, b, "buffer")
