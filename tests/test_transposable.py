"""Transposable 2:4 masks: valid along rows and columns of every 4x4 tile, and the exact best
of the 90 tile patterns (checked against a brute-force float64 loop, ties included)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core import transposable
from bame_optim.core.transposable import (
    NUM_TRANSPOSABLE_PATTERNS,
    TRANSPOSABLE_PATTERNS,
    is_transposable_24,
    transposable_mask,
    transposable_patterns,
)
from tests.strategies import seeded_tensor, seeds, tensor_kinds

tile_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4)).map(lambda s: (4 * s[0], 4 * s[1]))


def brute_force_mask(weight: torch.Tensor) -> torch.Tensor:
    """Loop over tiles and the 90 patterns in float64; the first best pattern wins."""
    w = weight.detach().double().abs()
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for r0 in range(0, w.shape[0], 4):
        for c0 in range(0, w.shape[1], 4):
            tile = w[r0 : r0 + 4, c0 : c0 + 4].flatten().tolist()
            best, best_score = None, -1.0
            for pattern in TRANSPOSABLE_PATTERNS:
                score = sum(value for value, keep in zip(tile, pattern, strict=True) if keep)
                if score > best_score:
                    best, best_score = pattern, score
            mask[r0 : r0 + 4, c0 : c0 + 4] = torch.tensor(best, dtype=torch.bool).reshape(4, 4)
    return mask


def assert_tile_valid(mask: torch.Tensor) -> None:
    tiles = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4).permute(0, 2, 1, 3)
    assert (tiles.sum(dim=3) == 2).all(), "every tile row keeps 2 of 4"
    assert (tiles.sum(dim=2) == 2).all(), "every tile column keeps 2 of 4"


def test_the_90_patterns_are_all_and_only_the_transposable_tiles():
    assert len(TRANSPOSABLE_PATTERNS) == NUM_TRANSPOSABLE_PATTERNS == 90
    every = {
        bits
        for bits in itertools.product((0, 1), repeat=16)
        if all(sum(bits[4 * r : 4 * r + 4]) == 2 for r in range(4))
        and all(sum(bits[c::4]) == 2 for c in range(4))
    }
    assert set(TRANSPOSABLE_PATTERNS) == every
    patterns = transposable_patterns()
    assert patterns.shape == (90, 16) and patterns.dtype == torch.bool
    assert_tile_valid(patterns.reshape(90 * 4, 4))


@given(shape=tile_shapes, seed=seeds, kind=tensor_kinds)
def test_mask_is_valid_and_equals_brute_force(shape, seed, kind):
    weight = seeded_tensor(shape, seed, kind, low=-2, high=2)
    mask = transposable_mask(weight)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert_tile_valid(mask)
    torch.testing.assert_close(mask, brute_force_mask(weight), rtol=0, atol=0)
    assert is_transposable_24(weight * mask)
    assert is_transposable_24((weight * mask).T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights_give_the_float64_mask(dtype):
    weight = seeded_tensor((16, 32), 3).to(dtype)
    expected = transposable_mask(weight.double())
    torch.testing.assert_close(transposable_mask(weight), expected, rtol=0, atol=0)


def test_ties_go_to_the_first_pattern():
    assert torch.equal(
        transposable_mask(torch.zeros(4, 8)),
        transposable_patterns()[0].reshape(4, 4).repeat(1, 2),
    )
    ones = torch.ones(8, 4)
    torch.testing.assert_close(transposable_mask(ones), brute_force_mask(ones), rtol=0, atol=0)


def test_chunked_scoring_equals_one_chunk(monkeypatch):
    weight = seeded_tensor((32, 64), 7, "integers")
    expected = transposable_mask(weight)
    monkeypatch.setattr(transposable, "_CHUNK_TILES", 5)
    torch.testing.assert_close(transposable_mask(weight), expected, rtol=0, atol=0)


def test_is_transposable_24():
    row_24 = torch.tensor([[1.0, 1, 0, 0]] * 4)  # 2:4 along rows, 4 non-zeros in two columns
    assert not is_transposable_24(row_24)
    assert is_transposable_24(row_24.T * 0)
    assert is_transposable_24(torch.eye(4) + torch.eye(4).roll(1, dims=1))


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.ones(4, 6), "Invalid weight shape"),
        (torch.ones(6, 4), "Invalid weight shape"),
        (torch.ones(16), "Invalid weight shape"),
        (torch.ones(2, 4, 4), "Invalid weight shape"),
        (torch.ones(4, 4, dtype=torch.int64), "Invalid weight dtype"),
    ],
)
def test_bad_inputs_raise(weight, match):
    with pytest.raises(ValueError, match=match):
        transposable_mask(weight)
    with pytest.raises(ValueError, match=match):
        is_transposable_24(weight)
