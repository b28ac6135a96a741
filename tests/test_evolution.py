"""``bame_optim.core.evolution`` against the float64 reference written straight from the
paper's equations (Eq. 4-10) with Python loops over blocks (:mod:`bame_optim.reference.evolution`),
and the invariants of docs/design.md sections 3 and 5."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core import evolution as evolution_module
from bame_optim.core.evolution import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    REVIVE_SCORES,
    block_norms,
    evolve_mask,
    lma_scores,
    magnitude_mask,
    obf_freeze,
    sad,
    score_dtype,
    top_fraction,
    update_oscillation,
)
from bame_optim.core.nm import top_n_mask
from bame_optim.reference import evolution as ref

from .strategies import (
    GAMMAS,
    NM_PATTERNS,
    block_mask,
    exact_nm_mask,
    examples,
    fractions,
    gammas,
    lrs,
    seeded_tensor,
    seeds,
    tensor_kinds,
)

# --------------------------------------------------------------------------- inputs


@st.composite
def evolution_cases(draw, kinds=tensor_kinds, gamma=gammas):
    """Blocks with an exact N:M mask, weights (pruned entries 0 or not), gradients, an
    oscillation EMA (zeros or multiples of 1/4, so ties between blocks happen), lr, alpha,
    beta and gamma."""
    n, m = draw(st.sampled_from(NM_PATTERNS))
    k = draw(st.integers(1, 40))
    kind = draw(kinds)
    seed = draw(seeds)
    kept = exact_nm_mask(k, n, m, seed)
    weight = seeded_tensor((k, m), seed + 1, kind)
    if draw(st.booleans()):
        weight = weight * kept  # realistic: pruned weights are exactly 0
    grad = seeded_tensor((k, m), seed + 2, kind)
    if draw(st.booleans()):
        oscillation = torch.zeros(k, dtype=torch.float64)
    else:
        top = 8 * min(n, m - n)
        gen = torch.Generator().manual_seed(seed + 3)
        oscillation = torch.randint(0, top + 1, (k,), generator=gen).double() / 4
    return {
        "weight": weight,
        "grad": grad,
        "kept": kept,
        "oscillation": oscillation,
        "n": n,
        "lr": draw(lrs),
        "alpha": draw(fractions),
        "beta": draw(fractions),
        "gamma": draw(gamma),
    }


def _evolve(case, **overrides):
    args = {**case, **overrides}
    return evolve_mask(
        args["weight"],
        args["grad"],
        args["kept"],
        args["oscillation"],
        n=args["n"],
        lr=args["lr"],
        alpha=args["alpha"],
        beta=args["beta"],
        gamma=args["gamma"],
    )


def _reference(case, **overrides):
    args = {**case, **overrides}
    return ref.evolve_blocks(
        args["weight"],
        args["grad"],
        args["kept"],
        args["oscillation"],
        n=args["n"],
        lr=args["lr"],
        alpha=args["alpha"],
        beta=args["beta"],
        gamma=args["gamma"],
    )


def _assert_matches(result, expected):
    assert result.proposed.tolist() == expected["proposed"]
    assert result.frozen.tolist() == expected["frozen"]
    assert result.kept.tolist() == expected["kept"]
    torch.testing.assert_close(
        result.oscillation, torch.tensor(expected["oscillation"], dtype=torch.float64)
    )


# --------------------------------------------------------------------------- evolve_mask


@given(case=evolution_cases())
def test_evolve_mask_matches_reference(case):
    result = _evolve(case)
    assert result.kept.dtype == torch.bool
    assert result.proposed.dtype == torch.bool
    assert result.frozen.dtype == torch.bool
    assert result.oscillation.dtype == torch.float64
    _assert_matches(result, _reference(case))


@given(case=evolution_cases(kinds=st.just("integers")))
def test_evolve_mask_matches_reference_on_tie_heavy_inputs(case):
    _assert_matches(_evolve(case), _reference(case))


@given(
    case=evolution_cases(),
    alpha=st.sampled_from([DEFAULT_ALPHA, 0.0, 1.0]),
    beta=st.sampled_from([DEFAULT_BETA, 0.0, 1.0]),
)
def test_evolve_mask_matches_reference_at_edge_fractions(case, alpha, beta):
    _assert_matches(_evolve(case, alpha=alpha, beta=beta), _reference(case, alpha=alpha, beta=beta))


@given(case=evolution_cases(), cycles=st.integers(2, 5), seed=seeds)
def test_evolve_mask_over_several_cycles(case, cycles, seed):
    """Carry B and O from one LMA cycle to the next, as the optimizer does."""
    kept, oscillation = case["kept"], case["oscillation"]
    kind = "integers" if seed % 2 else "normal"
    for c in range(cycles):
        weight = seeded_tensor(kept.shape, seed + 2 * c, kind) * kept
        grad = seeded_tensor(kept.shape, seed + 2 * c + 1, kind)
        step = {"weight": weight, "grad": grad, "kept": kept, "oscillation": oscillation}
        result = _evolve(case, **step)
        expected = _reference(case, **step)
        _assert_matches(result, expected)
        kept = torch.tensor(expected["kept"])
        oscillation = torch.tensor(expected["oscillation"], dtype=torch.float64)


@given(
    case=evolution_cases(kinds=st.just("integers"), gamma=st.sampled_from([0.0, 0.5, 0.75, 1.0])),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    lr=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
)
def test_evolve_mask_low_precision_integer_inputs(case, dtype, lr):
    """Small integers, dyadic lr and gamma: every score, norm order and EMA value is exact in
    the score dtype, so low-precision inputs must give the float64 reference's masks."""
    expected = _reference(case, lr=lr)
    sdtype = score_dtype(dtype)
    assert sdtype == torch.float32
    result = _evolve(
        case,
        lr=lr,
        weight=case["weight"].to(dtype),
        grad=case["grad"].to(dtype),
        oscillation=case["oscillation"].to(sdtype),
    )
    assert result.oscillation.dtype == sdtype
    assert result.proposed.tolist() == expected["proposed"]
    assert result.frozen.tolist() == expected["frozen"]
    assert result.kept.tolist() == expected["kept"]
    assert result.oscillation.tolist() == expected["oscillation"]


@given(case=evolution_cases())
def test_evolve_mask_invariants(case):
    k, m = case["kept"].shape
    n = case["n"]
    result = _evolve(case)
    # exactly n per block, before and after freezing
    assert result.proposed.sum(dim=1).tolist() == [n] * k
    assert result.kept.sum(dim=1).tolist() == [n] * k
    # OBF never freezes more than floor(beta K) blocks
    assert int(result.frozen.sum()) <= math.floor(case["beta"] * k)
    assert int(result.frozen.sum()) <= math.floor(case["alpha"] * k)
    # frozen blocks keep the old mask, the others take the proposal
    frozen = result.frozen.unsqueeze(1).expand(k, m)
    assert torch.equal(result.kept[frozen], case["kept"][frozen])
    assert torch.equal(result.kept[~frozen], result.proposed[~frozen])
    # SAD of a swap inside a block of exactly n: even, at most 2 min(n, M - n)
    divergence = sad(case["kept"], result.proposed)
    assert (divergence % 2 == 0).all()
    assert ((divergence >= 0) & (divergence <= 2 * min(n, m - n))).all()
    # Eq. 8 keeps O within [0, 2 min(n, M - n)] when it starts there
    assert (result.oscillation >= 0).all()
    assert (result.oscillation <= 2 * min(n, m - n)).all()


@given(case=evolution_cases(), zero=st.sampled_from(["alpha", "beta"]))
def test_zero_fraction_freezes_nothing(case, zero):
    result = _evolve(case, **{zero: 0.0})
    assert not result.frozen.any()
    assert torch.equal(result.kept, result.proposed)


@given(case=evolution_cases())
def test_zero_lr_changes_nothing(case):
    """With eta = 0 every pruned weight scores 0 <= every kept score, and ties keep the kept
    weight: the proposal is the current mask, SAD is 0 and O only decays."""
    result = _evolve(case, lr=0.0)
    assert torch.equal(result.proposed, case["kept"])
    assert torch.equal(result.kept, case["kept"])
    torch.testing.assert_close(result.oscillation, case["oscillation"] * case["gamma"])
    _assert_matches(result, _reference(case, lr=0.0))


@given(case=evolution_cases())
def test_evolve_mask_does_not_touch_its_inputs(case):
    before = {name: case[name].clone() for name in ("weight", "grad", "kept", "oscillation")}
    _evolve(case)
    for name, tensor in before.items():
        assert torch.equal(case[name], tensor), name


def test_evolve_mask_hand_written():
    # 1:4, three blocks, lr = 1, gamma = 0.5, alpha = beta = 2/3 -> floor(2) = 2 blocks.
    weight = torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 5.0, 0]], dtype=torch.float64)
    grad = torch.tensor([[1.0, 2, 0, 0], [0, 0.5, 3, 0], [0, 0, 1, 0]], dtype=torch.float64)
    kept = weight != 0
    oscillation = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    # scores: block 0: kept 3 vs revive 4 -> swap to index 1 (SAD 2)
    #         block 1: kept 0.5 vs revive 9 -> swap to index 2 (SAD 2)
    #         block 2: kept 5 vs 0 -> stay (SAD 0)
    # O = 0.5 O + 0.5 SAD = [1, 1, 1]; top-2 O (ties -> lower index) = blocks 0, 1;
    # norms [3, 1, 5]: top-2 = blocks 2, 0 -> block 0 frozen.
    result = evolve_mask(
        weight, grad, kept, oscillation, n=1, lr=1.0, alpha=2 / 3, beta=2 / 3, gamma=0.5
    )
    assert result.proposed.tolist() == [
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, False],
    ]
    assert result.oscillation.tolist() == [1.0, 1.0, 1.0]
    assert result.frozen.tolist() == [True, False, False]
    assert result.kept.tolist() == [
        [True, False, False, False],
        [False, False, True, False],
        [False, False, True, False],
    ]


def test_default_hyper_parameters():
    assert (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA) == (0.5, 0.5, 0.9)
    assert DEFAULT_GAMMA in GAMMAS


# --------------------------------------------------------------------------- the pieces


@given(
    case=evolution_cases(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    revive=st.sampled_from(REVIVE_SCORES),
)
def test_lma_scores(case, dtype, revive):
    weight, grad, kept = case["weight"].to(dtype), case["grad"].to(dtype), case["kept"]
    scores = lma_scores(weight, grad, kept, case["lr"], revive=revive)
    assert scores.dtype == dtype
    assert scores.shape == kept.shape
    expected = [
        ref.lma_scores(w, g, b, case["lr"], revive)
        for w, g, b in zip(
            weight.double().tolist(), grad.double().tolist(), kept.tolist(), strict=True
        )
    ]
    if dtype == torch.float64:
        assert scores.tolist() == expected
    else:
        torch.testing.assert_close(scores, torch.tensor(expected, dtype=dtype))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_score_dtype(dtype, expected):
    assert score_dtype(dtype) == expected
    ones = torch.ones(2, 4, dtype=dtype)
    assert lma_scores(ones, ones, ones > 0, 0.1).dtype == expected
    assert block_norms(ones).dtype == expected


@given(case=evolution_cases())
def test_sad_and_oscillation(case):
    k, m = case["kept"].shape
    other = exact_nm_mask(k, case["n"], m, 7)
    divergence = sad(case["kept"], other)
    assert divergence.dtype == torch.int64
    expected = [ref.sad(a, b) for a, b in zip(case["kept"].tolist(), other.tolist(), strict=True)]
    assert divergence.tolist() == expected
    gamma = case["gamma"]
    new = update_oscillation(case["oscillation"], divergence, gamma)
    assert new is not case["oscillation"]
    reference = [
        gamma * o + (1 - gamma) * s
        for o, s in zip(case["oscillation"].tolist(), expected, strict=True)
    ]
    torch.testing.assert_close(new, torch.tensor(reference, dtype=torch.float64))


@given(case=evolution_cases())
def test_block_norms(case):
    norms = block_norms(case["weight"])
    expected = [ref.block_norm(row) for row in case["weight"].tolist()]
    torch.testing.assert_close(norms, torch.tensor(expected, dtype=torch.float64))


@given(
    values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 10), max_size=40),
    fraction=fractions,
)
def test_top_fraction(values, fraction):
    chosen = top_fraction(torch.tensor(values, dtype=torch.float64), fraction)
    assert chosen.dtype == torch.bool
    assert chosen.tolist() == ref.top_members(values, fraction)
    assert int(chosen.sum()) == math.floor(fraction * len(values))


@given(
    k=st.integers(1, 40),
    seed=seeds,
    alpha=fractions,
    beta=fractions,
    zeros=st.booleans(),
)
def test_obf_freeze(k, seed, alpha, beta, zeros):
    gen = torch.Generator().manual_seed(seed)
    oscillation = torch.randint(0, 5, (k,), generator=gen).double() / 2
    if zeros:
        oscillation[torch.rand(k, generator=gen) < 0.5] = 0.0
    norms = torch.randint(0, 4, (k,), generator=gen).double()
    frozen = obf_freeze(oscillation, norms, alpha, beta)
    expected = ref.obf_frozen(oscillation.tolist(), norms.tolist(), alpha, beta)
    assert frozen.tolist() == expected
    assert int(frozen.sum()) <= math.floor(beta * k)
    assert not frozen[oscillation == 0].any()
    assert not obf_freeze(oscillation, norms, 0.0, beta).any()
    assert not obf_freeze(oscillation, norms, alpha, 0.0).any()


# --------------------------------------------------------------------------- magnitude_mask


@given(
    pattern=st.sampled_from(NM_PATTERNS),
    k=st.integers(1, 40),
    seed=seeds,
    kind=tensor_kinds,
    zero_pruned=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_magnitude_mask(pattern, k, seed, kind, zero_pruned, dtype, data):
    n, m = pattern
    budget = data.draw(st.integers(n, m))
    # every block keeps between `budget` and M entries (the budget never grows)
    kept = block_mask(k, m, seed, budget, m)
    weight = seeded_tensor((k, m), seed + 1, kind).to(dtype)
    if zero_pruned:
        weight = weight * kept
    new = magnitude_mask(weight, kept, budget)
    assert new.dtype == torch.bool
    assert new.sum(dim=1).tolist() == [budget] * k
    assert not (new & ~kept).any(), "a pruned weight was revived"
    assert new.tolist() == ref.keep_largest(weight.double(), kept, budget).tolist()
    # the survivors are at least as large as every weight dropped in the same block
    magnitude = weight.double().abs()
    for row in range(k):
        dropped = kept[row] & ~new[row]
        if dropped.any():
            assert magnitude[row][new[row]].min() >= magnitude[row][dropped].max()


@pytest.mark.parametrize(("n", "m"), NM_PATTERNS)
def test_magnitude_mask_from_dense_to_n(n, m):
    """The prune step at t_i from a dense mask: the n largest |W| of each block."""
    weight = torch.tensor(
        [[(-1) ** j * (j % 3) for j in range(m)] for _ in range(3)], dtype=torch.float32
    )
    new = magnitude_mask(weight, torch.ones(3, m, dtype=torch.bool), n)
    assert new.tolist() == ref.keep_largest(
        weight.double(), torch.ones(3, m, dtype=torch.bool), n
    ).tolist()


@given(
    values=st.lists(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 2.5]),
        max_size=40,
    ),
    fraction=fractions,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_top_fraction_equals_the_stable_descending_sort(values, fraction, dtype):
    """The selection path (kthvalue and tied entries in index order) keeps what a stable
    descending sort keeps, NaN, infinities and signed zeros included."""
    tensor = torch.tensor(values, dtype=dtype)
    count = math.floor(fraction * len(values))
    order = tensor.sort(descending=True, stable=True).indices[:count]
    expected = torch.zeros(len(values), dtype=torch.bool).scatter_(0, order, True)
    assert torch.equal(top_fraction(tensor, fraction), expected)


# --------------------------------------------------------------------------- faster forms
# Each function against the formulation it replaced, bit for bit.

FLOAT_BITS = {torch.float64: torch.int64, torch.float32: torch.int32}


def _bits_tensor(shape, dtype, gen):
    """Every bit pattern of ``dtype``: NaN payloads, infinities, signed zeros, subnormals."""
    raw = torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64)
    return raw.to(FLOAT_BITS[dtype]).view(dtype)


@given(
    pattern=st.sampled_from(NM_PATTERNS),
    k=st.integers(0, 40),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    lr=lrs,
    revive=st.sampled_from(["sgd", "adam"]),
    special=st.booleans(),
)
def test_lma_scores_equal_the_where_formula(pattern, k, seed, dtype, lr, revive, special):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    if special:  # any bits (float32 / float64 only: the 16-bit ones go through float32)
        wide = dtype if dtype in FLOAT_BITS else torch.float32
        weight, grad = _bits_tensor((k, m), wide, gen), _bits_tensor((k, m), wide, gen)
    else:
        weight = torch.randn(k, m, generator=gen).to(dtype)
        grad = torch.randn(k, m, generator=gen).to(dtype)
    kept = exact_nm_mask(k, n, m, seed)
    scores = lma_scores(weight, grad, kept, lr, revive=revive)
    w, g = weight.to(score_dtype(weight.dtype)), grad.to(score_dtype(grad.dtype))
    revived = g.square().mul_(lr) if revive == "sgd" else g.abs().mul_(lr)
    expected = torch.where(kept, (g * w).abs(), revived)
    view = FLOAT_BITS[expected.dtype]
    assert scores.dtype == expected.dtype
    assert torch.equal(scores.view(view), expected.view(view))


@given(
    pattern=st.sampled_from(NM_PATTERNS),
    k=st.integers(0, 40),
    seed=seeds,
    exact=st.booleans(),
    special=st.booleans(),
)
def test_magnitude_mask_equals_top_n_of_the_masked_magnitudes(pattern, k, seed, exact, special):
    """Blocks that keep exactly the budget (the gradual phase between budget drops) and blocks
    that keep more; NaN and infinite weights included."""
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    budget = n
    kept = exact_nm_mask(k, n, m, seed) if exact else block_mask(k, m, seed, n, m)
    weight = _bits_tensor((k, m), torch.float32, gen) if special else torch.randn(
        k, m, generator=gen
    )
    scores = weight.abs().masked_fill(~kept, float("-inf"))
    expected = top_n_mask(scores, budget, prefer=kept)
    new = magnitude_mask(weight, kept, budget)
    assert new.dtype == torch.bool and new.is_contiguous()
    assert torch.equal(new, expected)


@given(case=evolution_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sad_and_oscillation_equal_the_old_formulas(case, dtype):
    k, m = case["kept"].shape
    other = exact_nm_mask(k, case["n"], m, 11)
    divergence = sad(case["kept"], other)
    assert divergence.dtype == torch.int64
    assert torch.equal(divergence, (case["kept"] != other).sum(dim=1))
    oscillation = case["oscillation"].to(dtype)
    before = oscillation.clone(), divergence.clone()
    gamma = case["gamma"]
    new = update_oscillation(oscillation, divergence, gamma)
    expected = oscillation * gamma + divergence.to(dtype) * (1.0 - gamma)
    assert torch.equal(new.view(FLOAT_BITS[dtype]), expected.view(FLOAT_BITS[dtype]))
    assert torch.equal(oscillation, before[0]) and torch.equal(divergence, before[1])
    float_divergence = divergence.to(dtype)
    update_oscillation(oscillation, float_divergence, gamma)
    assert torch.equal(float_divergence, divergence.to(dtype))  # not scaled in place


LARGE_POOLS = [
    [0.0, 0.1, 0.2, 0.5, 1.0],  # the oscillation EMA early on: a few values, heavy ties
    [0.0, -0.0, 1.0, float("inf"), -float("inf")],
    [0.0, 0.5, float("nan")],
]


@examples(40)
@given(
    k=st.integers(1, 20000),
    seed=seeds,
    fraction=fractions,
    kind=st.sampled_from(["continuous", "pool 0", "pool 1", "pool 2", "mixed", "adversarial"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_top_fraction_of_many_blocks_equals_the_stable_descending_sort(
    k, seed, fraction, kind, dtype
):
    """Large K: the sampled bracket, its one-value form, its misses, and the chunked tie cut."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        values = torch.rand(k, generator=gen, dtype=torch.float64)
    elif kind.startswith("pool"):
        pool = torch.tensor(LARGE_POOLS[int(kind[-1])], dtype=torch.float64)
        values = pool[torch.randint(0, len(pool), (k,), generator=gen)]
    elif kind == "mixed":
        values = torch.rand(k, generator=gen, dtype=torch.float64).mul_(4).floor_()
        values[torch.rand(k, generator=gen) < 0.5] = 0.25
    else:  # the sampled entries (every SAMPLE_STRIDE-th) far from all the others
        values = torch.rand(k, generator=gen, dtype=torch.float64)
        values[:: evolution_module.SAMPLE_STRIDE] += 10
    values = values.to(dtype)
    count = math.floor(fraction * k)
    order = values.sort(descending=True, stable=True).indices[:count]
    expected = torch.zeros(k, dtype=torch.bool).scatter_(0, order, True)
    assert torch.equal(top_fraction(values, fraction), expected)


@examples(60)
@given(k=st.integers(1, 20000), seed=seeds, fraction=st.floats(0.0, 1.0), ties=st.booleans())
def test_kth_largest_is_kthvalue(k, seed, fraction, ties):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(k, generator=gen)
    if ties:
        values = values.mul_(7).floor_()
    count = max(1, math.floor(fraction * k))
    expected = values.kthvalue(k - count + 1).values
    assert float(evolution_module._kth_largest(values, count)) == float(expected)


@examples(60)
@given(size=st.integers(0, 20000), density=st.floats(0.0, 1.0), seed=seeds, data=st.data())
def test_keep_first_is_the_cumulative_sum_cut(size, density, seed, data):
    mask = torch.rand(size, generator=torch.Generator().manual_seed(seed)) < density
    count = data.draw(st.integers(0, int(mask.sum())))
    expected = mask & (mask.cumsum(0) <= count)
    assert torch.equal(evolution_module._keep_first(mask.clone(), count), expected)
