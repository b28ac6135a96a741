"""The compact kept-set storage of bame_optim.core.kept against brute-force definitions, and the
size of BAMESGD's state that it buys."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import BAMESGD
from bame_optim.core import kept as kept_module
from bame_optim.core.kept import (
    MAX_RANKED,
    decode_kept,
    encode_kept,
    gather_kept,
    kept_indices,
    mask_from_indices,
    positions_by_rank,
    remap_kept,
    scatter_kept_,
)
from bame_optim.core.nm import blocks_to_param, param_to_blocks

from .strategies import examples, nm_patterns

PATTERNS = [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (1, 16), (8, 16), (16, 32), (3, 32)]


def _random_mask(k: int, count: int, m: int, seed: int) -> torch.Tensor:
    scores = torch.rand(k, m, generator=torch.Generator().manual_seed(seed))
    return mask_from_indices(scores.topk(count, dim=1).indices, m)


def _colex_rank(subset: tuple[int, ...]) -> int:
    """Rank of a sorted subset among all subsets of its size, ordered by their reversed tuples
    (colexicographic order), by brute-force enumeration."""
    m = max(subset) + 1
    ordered = sorted(combinations(range(m), len(subset)), key=lambda c: c[::-1])
    return ordered.index(subset)


@pytest.mark.parametrize(("count", "m"), [(1, 4), (2, 4), (3, 6), (2, 8), (1, 16)])
def test_rank_is_the_colexicographic_position(count, m):
    subsets = list(combinations(range(m), count))
    mask = mask_from_indices(torch.tensor(subsets), m)
    codes = encode_kept(mask, count)
    assert codes.ndim == 1
    assert codes.tolist() == [_colex_rank(s) for s in subsets]
    assert sorted(codes.tolist()) == list(range(math.comb(m, count)))


@pytest.mark.parametrize(("count", "m"), [(1, 4), (2, 4), (3, 6), (2, 8), (1, 16)])
def test_positions_by_rank_is_the_table_the_kernels_read(count, m):
    """Row r holds the sorted positions of the subset of colex rank r (the kernels' table)."""
    table = positions_by_rank(count, m, torch.device("cpu"))
    assert table.dtype == torch.int64 and table.shape == (math.comb(m, count), count)
    assert [_colex_rank(tuple(row)) for row in table.tolist()] == list(range(table.shape[0]))


@examples(60)
@given(st.sampled_from(PATTERNS), st.integers(0, 40), st.integers(0, 2**16))
def test_round_trip_gives_sorted_positions(pattern, k, seed):
    count, m = pattern
    mask = _random_mask(k, count, m, seed)
    stored = encode_kept(mask, count)
    indices = kept_indices(stored, count, m)
    assert indices.dtype == torch.int64 and indices.shape == (k, count)
    assert torch.equal(mask_from_indices(indices, m), mask)
    assert (indices.diff(dim=1) > 0).all()
    if math.comb(m, count) <= MAX_RANKED:
        assert stored.shape == (k,)
        assert stored.element_size() == (1 if math.comb(m, count) <= 256 else 2)
    else:
        assert stored.shape == (k, count) and stored.dtype == torch.uint8


@pytest.mark.parametrize("count", [0, 4])
def test_empty_and_full_blocks(count):
    mask = torch.full((3, 4), bool(count), dtype=torch.bool)
    indices = kept_indices(encode_kept(mask, count), count, 4)
    assert indices.shape == (3, count)
    assert torch.equal(mask_from_indices(indices, 4), mask)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="Invalid mask"):
        encode_kept(torch.ones(2, 4), 2)
    with pytest.raises(ValueError, match="Invalid count value: 5"):
        encode_kept(torch.ones(2, 4, dtype=torch.bool), 5)


@examples(40)
@given(
    nm_patterns,
    st.sampled_from([(), (1,), (3,), (2, 3)]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_gather_and_scatter_match_the_block_view(pattern, kernel, channels_last, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 2 * m, *kernel)
    tensor = torch.randn(shape, generator=gen, dtype=torch.float64)
    if channels_last and len(kernel) == 2:
        tensor = tensor.to(memory_format=torch.channels_last)
    k = tensor.numel() // m
    mask = _random_mask(k, n, m, seed)
    indices = kept_indices(encode_kept(mask, n), n, m)
    values = gather_kept(tensor, indices, m)
    assert values.is_contiguous() and values.shape == (k, n)
    assert torch.equal(values, param_to_blocks(tensor, m)[mask].view(k, n))
    target = torch.zeros_like(tensor)
    assert scatter_kept_(target, indices, values, m) is target
    assert torch.equal(target, torch.where(blocks_to_param(mask, shape), tensor, 0))


@pytest.mark.parametrize(("n", "m", "bound"), [(1, 16, 0.15), (2, 4, 0.60)])
def test_frozen_phase_state_is_a_fraction_of_sgd_momentum(n, m, bound):
    p = torch.randn(64, 256, requires_grad=True)
    opt = BAMESGD([p], lr=0.1, momentum=0.9, n=n, m=m, t_i=0, t_f=0)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    state_bytes = sum(
        v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor)
    )
    sgd_bytes = p.numel() * p.element_size()
    k = p.numel() // m
    assert state_bytes == k * n * 4 + k  # fp32 momentum of kept weights + one byte per block
    assert state_bytes < bound * sgd_bytes


@given(st.data())
def test_bit_table_encoding_equals_the_binomial_sum(data):
    """Blocks of M <= MAX_BIT_TABLE_M are encoded through a table of bit patterns: the same
    colex ranks as summing binomials per position."""
    m = data.draw(st.integers(1, kept_module.MAX_BIT_TABLE_M))
    count = data.draw(st.integers(0, m))
    k = data.draw(st.integers(0, 40))
    seed = data.draw(st.integers(0, 2**16))
    scores = torch.rand(k, m, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(k, m, dtype=torch.bool).scatter_(1, scores.argsort(1)[:, :count], True)
    expected = kept_module._encode_by_binomials(mask)
    assert torch.equal(encode_kept(mask, count).long(), expected)


@pytest.mark.parametrize("m", range(1, kept_module.MAX_BIT_TABLE_M + 1))
def test_bit_patterns_of_every_row(m):
    """Rows read as integers and folded (M of 2, 4, 8, 16) or weighted and summed: the bit
    pattern of every possible row, contiguous or not."""
    patterns = torch.arange(2**m)
    mask = ((patterns.unsqueeze(1) >> torch.arange(m)) & 1).bool()
    assert torch.equal(kept_module._bit_patterns(mask).long(), patterns)
    strided = torch.stack([mask, ~mask], dim=2)[:, :, 0]
    assert not strided.is_contiguous()
    assert torch.equal(kept_module._bit_patterns(strided).long(), patterns)


@examples(80)
@given(st.sampled_from([*PATTERNS, (0, 4), (4, 4), (3, 5)]), st.integers(0, 40),
       st.integers(0, 2**16))
def test_decode_equals_the_mask_of_the_positions(pattern, k, seed):
    count, m = pattern
    mask = _random_mask(k, count, m, seed)
    stored = encode_kept(mask, count)
    decoded = decode_kept(stored, count, m)
    assert decoded.dtype == torch.bool and decoded.is_contiguous()
    assert torch.equal(decoded, mask_from_indices(kept_indices(stored, count, m), m))
    assert torch.equal(decoded, mask)
    assert torch.equal(decode_kept(stored, count, m, pruned=True), ~mask)


def _dense_remap(values, old, old_count, new, new_count, m):
    """The remap of BAMESGD's buffers before remap_kept: each block's values scattered into a
    dense row, entries whose mask flipped zeroed, the new kept positions gathered."""
    old_positions = kept_indices(old, old_count, m)
    new_positions = kept_indices(new, new_count, m)
    changed = mask_from_indices(old_positions, m) != mask_from_indices(new_positions, m)
    dense = torch.zeros(old_positions.shape[0], m, dtype=values.dtype)
    dense.scatter_(1, old_positions, values).masked_fill_(changed, 0)
    return dense.gather(1, new_positions)


@examples(150)
@given(st.data())
def test_remap_equals_the_dense_row(data):
    """Same count (evolve phase) or a lower one (gradual budget, from dense too), ranked
    codes through the table of pairs or the dense row, and stored positions; values of
    every bit pattern come through unchanged."""
    m = data.draw(st.sampled_from([2, 3, 4, 5, 8, 16, 32]))
    old_count = data.draw(st.integers(0, m) if m < 32 else st.sampled_from([1, 3, 16]))
    new_count = data.draw(st.sampled_from([old_count, data.draw(st.integers(0, old_count))]))
    k, seed = data.draw(st.integers(0, 30)), data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    old = _random_mask(k, old_count, m, seed)
    if new_count == old_count:
        new = torch.where(torch.rand(k, 1, generator=gen) < 0.5, old,
                          _random_mask(k, new_count, m, seed + 1))
    else:
        scores = torch.rand(k, m, generator=gen).masked_fill(~old, -1)
        new = mask_from_indices(scores.topk(new_count, dim=1).indices, m)
    bits = torch.randint(-(2**31), 2**31 - 1, (k, old_count), generator=gen, dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    old_kept, new_kept = encode_kept(old, old_count), encode_kept(new, new_count)
    remapped = remap_kept(values, old_kept, old_count, new_kept, new_count, m)
    expected = _dense_remap(values, old_kept, old_count, new_kept, new_count, m)
    assert remapped.shape == (k, new_count) and remapped.dtype == torch.float32
    assert torch.equal(remapped.view(torch.int32), expected.view(torch.int32))


def test_remap_through_the_dense_row_where_the_table_would_be_large(monkeypatch):
    old = _random_mask(20, 2, 4, 0)
    new = _random_mask(20, 2, 4, 1)
    values = torch.randn(20, 2)
    args = (values, encode_kept(old, 2), 2, encode_kept(new, 2), 2, 4)
    by_table = remap_kept(*args)
    monkeypatch.setattr(kept_module, "MAX_PAIR_TABLE", 0)
    assert torch.equal(remap_kept(*args), by_table)
    assert torch.equal(by_table, _dense_remap(*args))
