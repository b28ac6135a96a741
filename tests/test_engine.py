"""The mask changes of ``bame_optim.optim.engine.NMEngine`` equal, bit for bit, the dense
formulation they replaced (a ``[K, M]`` mask decoded from the kept positions, a masked fill of
the weights, every buffer scattered into a dense ``[K, M]`` row and gathered back)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core.kept import encode_kept, kept_indices, mask_from_indices
from bame_optim.core.nm import blocks_to_param
from bame_optim.optim.engine import NMEngine

from .strategies import exact_nm_mask, examples, seeds

BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
PATTERNS = [(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (1, 16), (2, 16), (3, 5), (16, 32)]
"""(count, m): ranked codes (uint8 and int16), stored positions (16 of 32), odd m."""


# --------------------------------------------------------------------------- the old engine


def old_mask(state, m):
    return mask_from_indices(kept_indices(state["kept"], state["kept_count"], m), m)


def old_apply_mask(p, state, new, count, m, buffers):
    """``NMEngine.apply_mask`` before the rewrite."""
    old_positions = kept_indices(state["kept"], state["kept_count"], m)
    old = mask_from_indices(old_positions, m)
    changed = old != new
    p.masked_fill_(blocks_to_param(old & ~new, p.shape), 0)
    state["kept"] = encode_kept(new, count)
    state["kept_count"] = count
    new_positions = kept_indices(state["kept"], count, m)
    for name in buffers:
        buffer = state.get(name)
        if buffer is None:
            continue
        dense = torch.zeros(old.shape, dtype=buffer.dtype)
        dense.scatter_(1, old_positions, buffer).masked_fill_(changed, 0)
        state[name] = dense.gather(1, new_positions)
    return changed


def old_zero_pruned_(p, state, m):
    p.masked_fill_(blocks_to_param(~old_mask(state, m), p.shape), 0)


# --------------------------------------------------------------------------- cases


def random_bits(shape, dtype, gen):
    """Every bit pattern of ``dtype`` (NaN payloads, signed zeros, infinities, subnormals)."""
    info = torch.iinfo(BITS[dtype])
    bits = torch.randint(info.min, info.max, tuple(shape), generator=gen, dtype=torch.int64)
    return bits.to(BITS[dtype]).view(dtype)


def equal_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(BITS[a.dtype]) if a.dtype in BITS else a, b.view(BITS[b.dtype]) if b.dtype in BITS
        else b
    )


ALL_KINDS = ("same count", "gradual", "dense start")
# float16 / bfloat16 take the full path (see engine._rewrites_nans): drawn less often
ALL_DTYPES = (torch.float32, torch.float64) * 2 + (torch.float16, torch.bfloat16)
MOVED = (0.0, 0.05, 0.1, 0.3, 0.7, 1.0)


@st.composite
def mask_changes(draw, kinds=ALL_KINDS, dtypes=ALL_DTYPES, moved_fractions=MOVED):
    """A parameter with a state (kept set, buffers) and the new mask of one update."""
    count, m = draw(st.sampled_from(PATTERNS))
    layout = draw(st.sampled_from(["linear", "conv", "channels_last"]))
    out, groups = draw(st.integers(1, 8)), draw(st.integers(1, 4))
    shape = (out, m * groups) if layout == "linear" else (out, m * groups, 2, 3)
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    p = random_bits(shape, dtype, gen)
    if layout == "channels_last":
        p = p.contiguous(memory_format=torch.channels_last)
    k = p.numel() // m
    kind = draw(st.sampled_from(kinds))
    if kind == "dense start":
        old_count, old = m, torch.ones(k, m, dtype=torch.bool)
    else:
        old_count, old = count, exact_nm_mask(k, count, m, seed + 1)
    if kind == "gradual":
        new_count = draw(st.integers(0, old_count))
        new = old & mask_from_indices(
            torch.rand(k, m, generator=gen).masked_fill(~old, -1).topk(new_count, 1).indices, m
        )
    else:
        new_count = draw(st.integers(0, m)) if kind == "dense start" else old_count
        moved = draw(st.sampled_from(moved_fractions))
        fresh = exact_nm_mask(k, new_count, m, seed + 3)
        rows = torch.rand(k, generator=gen) < moved
        new = torch.where(rows.unsqueeze(1), fresh, old) if new_count == old_count else fresh
    if draw(st.booleans()):  # a model may hold values at pruned entries (load_state_dict)
        p.masked_fill_(blocks_to_param(~old, shape), 0)
    state = {"kept": encode_kept(old, old_count), "kept_count": old_count}
    names = ("momentum_buffer", "exp_avg")
    for name in names:
        if draw(st.booleans()):
            state[name] = random_bits((k, old_count), dtype, gen)
    return p, state, new, new_count, m, names


def clone_state(state):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------- tests


def check_apply_mask(case):
    p, state, new, count, m, names = case
    expected_p, expected_state = p.clone(), clone_state(state)
    expected_changed = old_apply_mask(expected_p, expected_state, new, count, m, names)
    changed = NMEngine(names).apply_mask(p, state, new, count, m)
    assert torch.equal(changed, expected_changed) and changed.dtype == torch.bool
    assert equal_bits(p, expected_p)
    assert set(state) == set(expected_state)
    assert state["kept_count"] == expected_state["kept_count"]
    assert torch.equal(state["kept"], expected_state["kept"])
    assert state["kept"].dtype == expected_state["kept"].dtype
    for name in names:
        if name in state:
            assert equal_bits(state[name], expected_state[name]), name


@examples(250)
@given(case=mask_changes())
def test_apply_mask_equals_the_dense_formulation(case):
    check_apply_mask(case)


@examples(150)
@given(
    case=mask_changes(
        kinds=("same count",), dtypes=(torch.float32, torch.float64),
        moved_fractions=(0.02, 0.1, 0.25, 0.4),
    )
)
def test_apply_mask_of_a_few_moved_blocks(case):
    """The evolve phase's usual update: the moved blocks' rows only (in place)."""
    check_apply_mask(case)


@examples(150)
@given(case=mask_changes(), signed_zeros=st.booleans(), fused=st.sampled_from((None, False)))
def test_zero_pruned_equals_the_masked_fill(case, signed_zeros, fused):
    """The native pass (``fused`` None, float32/float64 on the CPU) and the eager one."""
    p, state, _, _, m, _ = case
    mask = old_mask(state, m)
    if signed_zeros:  # pruned entries at +0.0 but some at -0.0: those must be rewritten
        pruned = blocks_to_param(~mask, p.shape)
        p.masked_fill_(pruned, 0.0)
        some = torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) < 0.1
        p.masked_fill_(pruned & some, -0.0)
    expected = p.clone()
    old_zero_pruned_(expected, state, m)
    NMEngine(()).zero_pruned_(p, state, m, fused=fused)
    assert equal_bits(p, expected)


@pytest.mark.parametrize("fused", [None, False])
def test_zero_pruned_leaves_clean_weights_alone(fused):
    m, count = 16, 1
    p = torch.randn(8, 32)
    mask = exact_nm_mask(p.numel() // m, count, m, 0)
    p.masked_fill_(blocks_to_param(~mask, p.shape), 0)
    state = {"kept": encode_kept(mask, count), "kept_count": count}
    version = p._version
    NMEngine(()).zero_pruned_(p, state, m, fused=fused)
    assert p._version == version  # nothing was written


def test_apply_mask_that_changes_nothing():
    m, count = 4, 2
    p = torch.randn(6, 8)
    mask = exact_nm_mask(p.numel() // m, count, m, 1)
    buffer = torch.randn(p.numel() // m, count)
    state = {"kept": encode_kept(mask, count), "kept_count": count, "momentum_buffer": buffer}
    before = p.clone(), buffer.clone()
    changed = NMEngine(("momentum_buffer",)).apply_mask(p, state, mask.clone(), count, m)
    assert not changed.any() and changed.shape == mask.shape
    assert torch.equal(p, before[0]) and torch.equal(state["momentum_buffer"], before[1])


def test_gradual_budget_drops_at_1_of_16():
    """Budget drops of the gradual phase at M = 16: through the table of pairs of kept sets
    (3 -> 2, 2 -> 1) and through the dense row (8 -> 7: too many pairs)."""
    m = 16
    for old_count, new_count in [(2, 1), (3, 2), (8, 7)]:
        k = 50
        gen = torch.Generator().manual_seed(old_count)
        old = exact_nm_mask(k, old_count, m, 3)
        pick = torch.rand(k, m, generator=gen).masked_fill(~old, -1).topk(new_count, 1).indices
        new = mask_from_indices(pick, m)
        state = {"kept": encode_kept(old, old_count), "kept_count": old_count,
                 "momentum_buffer": torch.randn(k, old_count, generator=gen)}
        p = torch.randn(5, 160, generator=gen)
        expected_p, expected_state = p.clone(), clone_state(state)
        old_apply_mask(expected_p, expected_state, new, new_count, m, ("momentum_buffer",))
        NMEngine(("momentum_buffer",)).apply_mask(p, state, new, new_count, m)
        assert torch.equal(state["momentum_buffer"], expected_state["momentum_buffer"])
        assert torch.equal(p, expected_p)
