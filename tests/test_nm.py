"""``bame_optim.core.nm`` against explicit loops over the block layout of docs/design.md
section 1 and a slow pure-Python top-n with the tie rule of section 3, step 2."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core import nm as nm_module
from bame_optim.core.nm import (
    blocks_to_param,
    check_nm,
    is_nm_sparse,
    num_blocks,
    param_to_blocks,
    random_nm_mask,
    select,
    top_n_mask,
    top_n_mask_,
)

from .strategies import NM_PATTERNS, block_mask, examples, nm_shapes, seeded_tensor, seeds

INF = float("inf")


# --------------------------------------------------------------------------- references


def reference_blocks(weight: torch.Tensor, m: int) -> torch.Tensor:
    """docs/design.md section 1 spelled out: for every (out, *kernel position) in row-major order,
    the input channels are cut into consecutive groups of ``m``; block after block."""
    out, in_, *kernel = weight.shape
    blocks = []
    for o, *pos in itertools.product(range(out), *(range(size) for size in kernel)):
        for c in range(in_ // m):
            blocks.append(weight[(o, slice(c * m, (c + 1) * m), *pos)])
    return torch.stack(blocks)


def reference_top_n(scores: list[list[float]], n: int, prefer: list[list[bool]] | None):
    """Per block: sort by (score descending, preferred first, lower index), keep the first n."""
    mask = []
    for k, row in enumerate(scores):
        pref = prefer[k] if prefer is not None else [False] * len(row)
        order = sorted(range(len(row)), key=lambda j: (-row[j], not pref[j], j))
        chosen = set(order[:n])
        mask.append([j in chosen for j in range(len(row))])
    return mask


# --------------------------------------------------------------------------- block layout


@given(case=nm_shapes())
def test_block_layout_matches_explicit_loop(case):
    _n, m, shape = case
    weight = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    blocks = param_to_blocks(weight, m)
    expected = reference_blocks(weight, m)
    assert blocks.shape == (math.prod(shape) // m, m)
    assert torch.equal(blocks, expected)
    assert torch.equal(blocks_to_param(expected, shape), weight)


def test_block_layout_hand_written_conv2d():
    # Conv2d weight [out=2, in=4, kh=1, kw=2], m=2, entry value 1000*o + 10*c + kw.
    weight = torch.tensor(
        [[[[1000 * o + 10 * c + x for x in range(2)]] for c in range(4)] for o in range(2)],
        dtype=torch.float32,
    )
    assert weight.shape == (2, 4, 1, 2)
    expected = torch.tensor(
        [
            [0, 10],  # o=0, kh=0, kw=0, channels 0-1
            [20, 30],  # o=0, kh=0, kw=0, channels 2-3
            [1, 11],  # o=0, kh=0, kw=1, channels 0-1
            [21, 31],  # o=0, kh=0, kw=1, channels 2-3
            [1000, 1010],
            [1020, 1030],
            [1001, 1011],
            [1021, 1031],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(param_to_blocks(weight, 2), expected)
    assert torch.equal(blocks_to_param(expected, weight.shape), weight)


def test_block_layout_hand_written_linear():
    weight = torch.arange(16.0).reshape(2, 8)
    expected = torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    assert torch.equal(param_to_blocks(weight, 4), expected)


@given(case=nm_shapes(), seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_round_trip_both_ways(case, seed, dtype):
    n, m, shape = case
    weight = seeded_tensor(shape, seed, dtype=dtype)
    blocks = param_to_blocks(weight, m)
    back = blocks_to_param(blocks, shape)
    assert back.shape == weight.shape
    assert back.dtype == dtype
    assert torch.equal(back, weight)

    other = seeded_tensor((num_blocks(shape, m), m), seed + 1, dtype=dtype)
    assert torch.equal(param_to_blocks(blocks_to_param(other, shape), m), other)
    # bool masks (the block view of docs/design.md section 1) survive the round trip too
    mask = block_mask(num_blocks(shape, m), m, seed, n)
    assert torch.equal(param_to_blocks(blocks_to_param(mask, shape), m), mask)


@given(case=nm_shapes(), seed=seeds)
def test_linear_block_view_shares_storage(case, seed):
    _n, m, shape = case
    weight = seeded_tensor(shape[:2], seed)
    blocks = param_to_blocks(weight, m)
    blocks[0, 0] = 1234.5
    assert weight[0, 0] == 1234.5


@given(case=nm_shapes(), seed=seeds)
def test_blocks_to_param_is_a_view_of_the_blocks(case, seed):
    _n, m, shape = case
    blocks = seeded_tensor((num_blocks(shape, m), m), seed)
    param = blocks_to_param(blocks, shape)
    param.zero_()
    assert not blocks.any()


@given(case=nm_shapes())
def test_num_blocks(case):
    _n, m, shape = case
    assert num_blocks(shape, m) == math.prod(shape) // m
    assert num_blocks(torch.Size(shape), m) == math.prod(shape) // m


@pytest.mark.parametrize(
    ("shape", "m"), [((4, 6), 4), ((3, 10, 3, 3), 4), ((2, 4, 5), 8), ((16, 2), 4)]
)
def test_indivisible_grouped_dimension_raises(shape, m):
    for func in (lambda: num_blocks(shape, m), lambda: param_to_blocks(torch.zeros(shape), m)):
        with pytest.raises(ValueError, match="Invalid shape") as info:
            func()
        assert str(shape) in str(info.value)


@pytest.mark.parametrize("shape", [(8,), ()])
def test_tensors_below_two_dims_raise(shape):
    with pytest.raises(ValueError, match="Invalid shape") as info:
        num_blocks(shape, 4)
    assert str(shape) in str(info.value)
    with pytest.raises(ValueError, match="Invalid shape"):
        param_to_blocks(torch.zeros(shape), 4)


@pytest.mark.parametrize("m", [0, -4])
def test_num_blocks_rejects_non_positive_m(m):
    with pytest.raises(ValueError) as info:
        num_blocks((4, 8), m)
    assert repr(m) in str(info.value)


# --------------------------------------------------------------------------- top_n_mask

TIE_VALUES = st.sampled_from([0.0, 1.0, 2.0, -INF])
ANY_VALUES = st.one_of(TIE_VALUES, st.floats(allow_nan=False, width=32))


@st.composite
def top_n_cases(draw, values=ANY_VALUES):
    m = draw(st.sampled_from(sorted({m for _, m in NM_PATTERNS} | {2, 3, 5})))
    k = draw(st.integers(1, 12))
    n = draw(st.integers(0, m))
    scores = draw(st.lists(st.lists(values, min_size=m, max_size=m), min_size=k, max_size=k))
    prefer = draw(
        st.none()
        | st.lists(st.lists(st.booleans(), min_size=m, max_size=m), min_size=k, max_size=k)
    )
    return scores, n, prefer


def _run_top_n(scores, n, prefer, dtype):
    scores_t = torch.tensor(scores, dtype=dtype)
    prefer_t = None if prefer is None else torch.tensor(prefer, dtype=torch.bool)
    return top_n_mask(scores_t, n, prefer=prefer_t)


@given(case=top_n_cases(TIE_VALUES), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_top_n_mask_forced_ties_match_reference(case, dtype):
    scores, n, prefer = case
    mask = _run_top_n(scores, n, prefer, dtype)
    assert mask.dtype == torch.bool
    assert mask.tolist() == reference_top_n(scores, n, prefer)


@given(case=top_n_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_top_n_mask_matches_reference(case, dtype):
    scores, n, prefer = case
    mask = _run_top_n(scores, n, prefer, dtype)
    assert mask.tolist() == reference_top_n(scores, n, prefer)


@given(case=top_n_cases(TIE_VALUES))
def test_top_n_mask_exactly_n_and_minus_inf_last(case):
    scores, n, prefer = case
    mask = _run_top_n(scores, n, prefer, torch.float64)
    assert mask.shape == (len(scores), len(scores[0]))
    assert mask.sum(dim=1).tolist() == [n] * len(scores)
    for row, kept in zip(scores, mask.tolist(), strict=True):
        finite = sum(s != -INF for s in row)
        kept_inf = sum(s == -INF and keep for s, keep in zip(row, kept, strict=True))
        assert kept_inf == max(0, n - finite)


def _reference_top_n_mask(scores, n, prefer=None):
    """``top_n_mask`` as it was before the sort-free rewrite: two stable sorts."""
    if prefer is None:
        order = scores.sort(dim=1, descending=True, stable=True).indices
    else:
        # Two stable sorts give the lexicographic order (score desc, preferred first, index).
        first = (~prefer).to(torch.uint8).sort(dim=1, stable=True).indices
        by_score = scores.gather(1, first).sort(dim=1, descending=True, stable=True).indices
        order = first.gather(1, by_score)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order[:, :n], True)


NAN = float("nan")
# Few distinct values, so most blocks hold ties; signed zeros, both infinities, NaNs of both signs.
SPECIAL_VALUES = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, INF, -INF, NAN, -NAN])
BIT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@st.composite
def special_cases(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 17, 32, 33]))  # 32+: 16-bit tie codes
    k = draw(st.integers(0, 6))
    n = draw(st.integers(0, m))
    pool = st.sampled_from(draw(st.lists(SPECIAL_VALUES, min_size=1, max_size=3)))
    values = draw(st.sampled_from([pool, SPECIAL_VALUES, st.one_of(pool, st.floats(width=32))]))
    flat = draw(st.lists(values, min_size=k * m, max_size=k * m))
    with_prefer = draw(st.booleans())
    prefer = draw(st.lists(st.booleans(), min_size=k * m, max_size=k * m)) if with_prefer else None
    return k, m, n, flat, prefer, draw(st.booleans())


@examples(300)
@given(case=special_cases(), dtype=st.sampled_from(list(BIT_VIEW)))
def test_top_n_mask_equals_two_sort_reference(case, dtype):
    """The sort-free ``top_n_mask`` is bit-for-bit the two-sort one, NaN, infinities and signed
    zeros included, for every n in [0, M], with and without ``prefer``, on strided input too."""
    k, m, n, flat, prefer, transposed = case
    base = torch.tensor(flat, dtype=torch.float64).to(dtype)
    scores = base.reshape(m, k).t() if transposed else base.reshape(k, m)
    prefer_t = None if prefer is None else torch.tensor(prefer, dtype=torch.bool).reshape(k, m)
    bits = scores.view(BIT_VIEW[dtype]).clone()
    mask = top_n_mask(scores, n, prefer=prefer_t)
    assert mask.dtype == torch.bool and mask.shape == (k, m)
    assert torch.equal(mask, _reference_top_n_mask(scores, n, prefer_t))
    assert torch.equal(scores.view(BIT_VIEW[dtype]), bits)  # the input is left alone


@examples(150)
@given(case=special_cases(), dtype=st.sampled_from(list(BIT_VIEW)))
def test_top_n_mask_on_scratch_scores_is_top_n_mask(case, dtype):
    """top_n_mask_ (scores as scratch space) gives top_n_mask's mask."""
    k, m, n, flat, prefer, transposed = case
    base = torch.tensor(flat, dtype=torch.float64).to(dtype)
    scores = base.reshape(m, k).t() if transposed else base.reshape(k, m)
    prefer_t = None if prefer is None else torch.tensor(prefer, dtype=torch.bool).reshape(k, m)
    expected = top_n_mask(scores, n, prefer=prefer_t)
    assert torch.equal(top_n_mask_(scores.clone(), n, prefer=prefer_t), expected)


def test_top_n_mask_hand_written_ties():
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-INF, 3.0, -INF, -INF]])
    prefer = torch.tensor([[False, False, True, True], [False, True, False, True], [True] * 4])
    # row 0: 2.0 at 1 and 2, index 2 preferred -> 2 then 1
    # row 1: all tied -> preferred 1, 3 first
    # row 2: 3.0, then -inf tie among preferred -> lower index 0
    assert top_n_mask(scores, 2, prefer=prefer).tolist() == [
        [False, True, True, False],
        [False, True, False, True],
        [True, True, False, False],
    ]
    assert top_n_mask(scores, 1).tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [False, True, False, False],
    ]


def test_top_n_mask_errors():
    with pytest.raises(ValueError, match="shape"):
        top_n_mask(torch.zeros(8), 1)
    with pytest.raises(ValueError, match="shape"):
        top_n_mask(torch.zeros(2, 2, 4), 1)
    for n in (-1, 5):
        with pytest.raises(ValueError) as info:
            top_n_mask(torch.zeros(3, 4), n)
        assert str(n) in str(info.value)


# --------------------------------------------------------------------------- random_nm_mask


@given(pattern=st.sampled_from(NM_PATTERNS), k=st.integers(0, 64), seed=seeds)
def test_random_nm_mask_is_exact_nm_and_seeded(pattern, k, seed):
    n, m = pattern
    mask = random_nm_mask(k, n, m, torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool
    assert mask.shape == (k, m)
    assert mask.device.type == "cpu"
    assert mask.sum(dim=1).tolist() == [n] * k
    assert torch.equal(mask, random_nm_mask(k, n, m, torch.Generator().manual_seed(seed)))


@given(pattern=st.sampled_from(NM_PATTERNS), seed=seeds, a=seeds, b=seeds)
def test_random_nm_mask_ignores_and_keeps_global_rng(pattern, seed, a, b):
    n, m = pattern
    torch.manual_seed(a)
    state = torch.random.get_rng_state()
    first = random_nm_mask(32, n, m, torch.Generator().manual_seed(seed))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(b)
    second = random_nm_mask(32, n, m, torch.Generator().manual_seed(seed))
    assert torch.equal(first, second)


def test_random_nm_mask_depends_on_seed():
    masks = [random_nm_mask(64, 2, 4, torch.Generator().manual_seed(s)) for s in range(3)]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[1], masks[2])


def test_random_nm_mask_is_uniform_over_patterns():
    # 2:4 has C(4, 2) = 6 patterns; 6000 blocks -> 1000 each, sd ~ 29. A fixed seed makes
    # this deterministic; the 5-sigma band only fails for a biased sampler.
    mask = random_nm_mask(6000, 2, 4, torch.Generator().manual_seed(0))
    counts: dict[tuple[bool, ...], int] = {}
    for row in mask.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 6
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts
    # every position of 1:16 is kept about 1/16 of the time
    per_position = random_nm_mask(16000, 1, 16, torch.Generator().manual_seed(1)).sum(dim=0)
    assert ((per_position - 1000).abs() < 150).all(), per_position


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4), (1, 1)])
def test_random_nm_mask_invalid_pattern(n, m):
    with pytest.raises(ValueError):
        random_nm_mask(4, n, m, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- is_nm_sparse


def reference_is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    return all(sum(x != 0 for x in block) <= n for block in reference_blocks(weight, m).tolist())


@given(
    case=nm_shapes(),
    seed=seeds,
    extra=st.integers(0, 3),
    signed_zero=st.booleans(),
)
def test_is_nm_sparse_matches_reference(case, seed, extra, signed_zero):
    n, m, shape = case
    k = num_blocks(shape, m)
    # blocks with 0..n nonzeros, then `extra` random entries made nonzero
    kept = block_mask(k, m, seed, 0, n)
    values = seeded_tensor((k, m), seed + 1)
    zero = -0.0 if signed_zero else 0.0
    blocks = torch.where(kept, values, torch.full_like(values, zero))
    gen = torch.Generator().manual_seed(seed + 2)
    flat = blocks.view(-1)
    flat[torch.randint(0, flat.numel(), (extra,), generator=gen)] = 1.0
    weight = blocks_to_param(blocks, shape).contiguous()
    result = is_nm_sparse(weight, n, m)
    assert isinstance(result, bool)
    assert result == reference_is_nm_sparse(weight, n, m)
    if extra == 0:
        assert result


@given(case=nm_shapes(), seed=seeds)
def test_is_nm_sparse_exact_masks(case, seed):
    n, m, shape = case
    k = num_blocks(shape, m)
    kept = block_mask(k, m, seed, n)
    weight = blocks_to_param(seeded_tensor((k, m), seed) * kept, shape)
    assert is_nm_sparse(weight, n, m)
    # one more nonzero in one block breaks it
    blocks = param_to_blocks(weight, m).clone()
    block = seed % k
    blocks[block, (~kept[block]).nonzero()[0, 0]] = 0.5
    assert not is_nm_sparse(blocks_to_param(blocks, shape), n, m)
    assert is_nm_sparse(blocks_to_param(blocks, shape), n + 1, m)


# --------------------------------------------------------------------------- check_nm


def test_check_nm_accepts_every_valid_pair():
    for m in range(2, 33):
        for n in range(1, m):
            check_nm(n, m)


@pytest.mark.parametrize(
    ("n", "m"), [(0, 4), (-1, 4), (4, 4), (5, 4), (17, 16), (2.0, 4), (True, 4)]
)
def test_check_nm_rejects_n(n, m):
    with pytest.raises(ValueError, match=r"\bn\b") as info:
        check_nm(n, m)
    assert repr(n) in str(info.value)


@pytest.mark.parametrize("m", [1, 0, -4, 4.0, True, None, "4"])
def test_check_nm_rejects_m(m):
    with pytest.raises(ValueError, match=r"\bm\b") as info:
        check_nm(1, m)
    assert repr(m) in str(info.value)


# --------------------------------------------------------------------------- select and rows

SELECT_DTYPES = [*BIT_VIEW, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@given(
    dtype=st.sampled_from(SELECT_DTYPES),
    shape=st.sampled_from([(0, 4), (3, 4), (5, 16), (7, 3), (9, 8), (4, 1), (2, 3, 5)]),
    layout=st.sampled_from(["contiguous", "transposed", "broadcast", "rows"]),
    seed=seeds,
)
def test_select_is_torch_where_bit_for_bit(dtype, shape, layout, seed):
    """Every bit pattern (NaN payloads, signed zeros) comes through as torch.where's does."""
    gen = torch.Generator().manual_seed(seed)

    def bits(size):
        raw = torch.randint(-(2**62), 2**62, size, generator=gen, dtype=torch.int64)
        if dtype == torch.bool:
            return raw > 0
        view = BIT_VIEW.get(dtype, dtype)
        return raw.to(view).view(dtype)

    a, b = bits(shape), bits(shape)
    condition = torch.rand(shape, generator=gen) < 0.5
    if layout == "transposed":
        a, b, condition = a.mT, b.mT, condition.mT
    elif layout == "broadcast":
        condition = condition[..., :1, :]
    elif layout == "rows":  # one flag per row
        condition = condition[..., :1]
    got, expected = select(condition, a, b), torch.where(condition, a, b)
    view = BIT_VIEW.get(dtype, dtype)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.view(view), expected.view(view))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16, 17])
def test_repeat_rows_and_add_row_are_broadcasts(m):
    gen = torch.Generator().manual_seed(m)
    k = 37
    values = torch.randint(0, 128, (k,), generator=gen, dtype=torch.int8)
    repeated = nm_module._repeat_rows(values, m)
    assert repeated.is_contiguous()
    assert torch.equal(repeated, values.unsqueeze(1).expand(k, m))
    flags = values > 60
    assert torch.equal(nm_module._repeat_rows(flags, m), flags.unsqueeze(1).expand(k, m))
    tensor = torch.randint(0, 64, (k, m), generator=gen, dtype=torch.int8)
    row = torch.randint(0, 64, (m,), generator=gen, dtype=torch.int8)
    expected = tensor + row
    assert nm_module._add_row_(tensor, row) is tensor
    assert torch.equal(tensor, expected)
