"""The fused evolve passes (bame_optim.kernels.evolve_cpu) against the eager core functions
they replace, bit for bit: evolve_blocks against lma_scores / top_n_mask_ / sad /
update_oscillation / block_norms / encode_kept (and NMEngine.zero_pruned_), obf_freeze and
top_fraction against core.evolution, apply_evolved_ against NMEngine.apply_mask's
decode / select / encode / masked_fill / remap_kept.

"Bit for bit" compares the bits (NaN payloads and the sign of zero included), float32 and
float64, over hypothesis-drawn shapes (Linear, Conv1d, Conv2d; contiguous, transposed
(nm_dim 0), channels_last), N:M patterns, tie-heavy values, NaN / inf / -0.0, frozen blocks
and every learning rate and gamma. The tests skip where the extension cannot be built here,
and fail instead with BAME_OPTIM_REQUIRE_NATIVE=1 (make test)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core.evolution import block_norms, obf_freeze, top_fraction
from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import param_to_blocks
from bame_optim.kernels import evolve_cpu, evolve_reference, native
from bame_optim.optim.engine import NMEngine

from .bitwise import assert_apply_equals_eager, assert_bits, bits
from .strategies import (
    FRACTIONS,
    GAMMAS,
    NM_PATTERNS,
    block_mask,
    exact_nm_mask,
    examples,
    fractions,
    lrs,
    param_shapes,
    seeded_tensor,
    seeds,
)

PATTERNS = (*NM_PATTERNS, (3, 4), (2, 16), (8, 16), (16, 32), (3, 64), (1, 2))
"""The paper's patterns, and ones whose codes are int16 ranks (8:16), stored positions
(16:32), the largest block (64) and the kernels' generic (not 4, 8, 16) block sizes."""
DTYPES = (torch.float32, torch.float64)
SPECIALS = (float("nan"), float("inf"), -float("inf"), -0.0, 0.0)


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if native.required():
        assert evolve_cpu.available(), f"unavailable: {evolve_cpu.error()}"
        return
    if evolve_cpu.disabled():
        pytest.skip(f"native kernels disabled by {native.DISABLE_ENV}")
    if not evolve_cpu.available():
        pytest.skip(f"fused evolve passes unavailable: {evolve_cpu.error()}")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (input dimension at 1) with the same values in another memory layout."""
    if layout == "transposed":  # nm_dim 0: the view w.t() of a contiguous [in, out]
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


@st.composite
def cases(draw, patterns=PATTERNS, kinds=("normal", "integers")):
    """One parameter: weight and gradient in a layout, its kept sets (possibly a count that is
    not n), an oscillation EMA (absent, tied or continuous) and hyper-parameters."""
    n, m = draw(st.sampled_from(patterns))
    layout = draw(st.sampled_from(("contiguous", "transposed", "channels_last")))
    kinds_of_shape = {"transposed": ("linear",), "channels_last": ("conv2d",)}
    shape = draw(param_shapes(m, kinds_of_shape.get(layout, ("linear", "conv1d", "conv2d")),
                              max_groups=3 if m > 16 else 4))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(kinds))
    seed = draw(seeds)
    k = torch.Size(shape).numel() // m
    count = draw(st.sampled_from((n, n, n, m, max(n - 1, 1), min(n + 1, m))))
    mask = exact_nm_mask(k, count, m, seed)
    weight = seeded_tensor(shape, seed + 1, kind, dtype)
    grad = seeded_tensor(shape, seed + 2, kind, dtype)
    if draw(st.booleans()):  # pruned weights 0, as the optimizer keeps them
        weight = weight * _as_param(mask, shape).to(dtype)
    for t in (weight, grad):  # NaN, inf, -0.0 at random entries
        for _ in range(draw(st.integers(0, 3))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    oscillation = draw(st.sampled_from(("none", "zeros", "tied", "random")))
    gen = torch.Generator().manual_seed(seed + 3)
    osc = {
        "none": None,
        "zeros": torch.zeros(k, dtype=dtype),
        "tied": (torch.randint(0, 4, (k,), generator=gen) / 4).to(dtype),
        "random": torch.rand(k, generator=gen, dtype=torch.float64).to(dtype),
    }[oscillation]
    grad_layout = draw(st.sampled_from((layout, "contiguous")))  # a gradient may differ
    return dict(
        weight=in_layout(weight, layout), grad=in_layout(grad, grad_layout), kept=mask,
        count=count,
        oscillation=osc, n=n, m=m, lr=draw(lrs), gamma=draw(st.sampled_from(GAMMAS)),
        revive=draw(st.sampled_from(("sgd", "adam"))), zero_pruned=draw(st.booleans()),
    )


def _as_param(mask: torch.Tensor, shape) -> torch.Tensor:
    from bame_optim.core.nm import blocks_to_param

    return blocks_to_param(mask, shape)


def _run(case, fn, weight):
    return fn(weight, case["grad"], encode_kept(case["kept"], case["count"]), case["count"],
              case["oscillation"], n=case["n"], m=case["m"], lr=case["lr"],
              gamma=case["gamma"], revive=case["revive"], zero_pruned=case["zero_pruned"])


@examples(50)
@given(case=cases())
def test_evolve_blocks_matches_the_core_functions_bit_for_bit(case):
    fused_weight, eager_weight = case["weight"].clone(), case["weight"].clone()
    fused_weight.as_strided_(case["weight"].shape, case["weight"].stride())
    eager_weight.as_strided_(case["weight"].shape, case["weight"].stride())
    n, m, count = case["n"], case["m"], case["count"]
    supported = evolve_cpu.supports(case["weight"], case["grad"],
                                    encode_kept(case["kept"], count), count, m,
                                    case["oscillation"], n=n)
    one_form = evolve_cpu.code_dtype(n, m) == evolve_cpu.code_dtype(count, m) and (
        evolve_cpu.code_shape(1, n, m) == (1,)) == (evolve_cpu.code_shape(1, count, m) == (1,))
    assert supported == one_form  # the passes take every case whose codes share one form
    if not supported:
        return
    fused = _run(case, evolve_cpu.evolve_blocks, fused_weight)
    eager = _run(case, evolve_reference.evolve_blocks_eager, eager_weight)
    for name, a, b in zip(("proposed", "oscillation", "norms"), fused, eager, strict=True):
        assert_bits(a, b, name)
    assert_bits(fused_weight, eager_weight, "weight")


@examples(50)
@given(case=cases(kinds=("integers",)))
def test_evolve_blocks_breaks_ties_as_top_n_mask(case):
    # Small integers: equal scores in most blocks (the kept weight, then the lower index win).
    test_evolve_blocks_matches_the_core_functions_bit_for_bit.hypothesis.inner_test(case)


def test_norms_equal_block_norms_on_every_block_size():
    # The probe's norm model (or ATen itself where it found none) on rows it did not see.
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for m in range(2, 65):
            weight = torch.randn(37, 2 * m, generator=gen, dtype=torch.float64).to(dtype) * 3
            grad = torch.randn_like(weight)
            kept = encode_kept(exact_nm_mask(weight.numel() // m, 1, m, 0), 1)
            _, _, norms = evolve_cpu.evolve_blocks(weight, grad, kept, 1, None, n=1, m=m, lr=0.1,
                                                   gamma=0.9)
            assert_bits(norms, block_norms(param_to_blocks(weight, m)), f"norms m={m} {dtype}")


@st.composite
def ranked_values(draw):
    """``[K]`` values with ties, NaN, inf and -0.0 (osc-like and norm-like)."""
    k = draw(st.integers(0, 300))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(("continuous", "tied", "constant")))
    if kind == "continuous":
        values = torch.rand(k, generator=gen, dtype=torch.float64) * 10
    elif kind == "tied":
        values = torch.randint(0, 5, (k,), generator=gen).double() / 4
    else:
        values = torch.full((k,), 0.5, dtype=torch.float64)
    values = values.to(dtype)
    for _ in range(draw(st.integers(0, 3)) if k else 0):
        values[draw(st.integers(0, k - 1))] = draw(st.sampled_from((*SPECIALS, -1.0)))
    return values


@examples(50)
@given(values=ranked_values(), fraction=fractions)
def test_top_fraction_matches_core(values, fraction):
    assert torch.equal(evolve_cpu.top_fraction(values, fraction), top_fraction(values, fraction))


@examples(50)
@given(osc=ranked_values(), seed=seeds, alpha=fractions, beta=fractions)
def test_obf_freeze_matches_core(osc, seed, alpha, beta):
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.randint(0, 3, osc.shape, generator=gen).double()
             + torch.rand(osc.shape, generator=gen, dtype=torch.float64) * (seed % 2)
             ).to(osc.dtype)
    assert torch.equal(evolve_cpu.obf_freeze(osc, norms, alpha, beta),
                       obf_freeze(osc, norms, alpha, beta))


def test_obf_freeze_of_many_blocks_with_a_mass_of_equal_values():
    # Large enough for the sampled bracket; most oscillations 0 (blocks that never flipped) and
    # norms with a mass at one value: the bracket collapses onto that value (every key in it is
    # the threshold, ties taken by index) and, for the oscillation, ties that O > 0 excludes.
    gen = torch.Generator().manual_seed(11)
    k = 200_000
    for dtype in DTYPES:
        for zero_share in (0.5, 0.9, 1.0):
            osc = torch.rand(k, generator=gen, dtype=torch.float64).to(dtype)
            osc[torch.rand(k, generator=gen) < zero_share] = 0
            norms = torch.rand(k, generator=gen, dtype=torch.float64).to(dtype)
            norms[torch.rand(k, generator=gen) < 0.7] = 0.5
            for alpha, beta in ((0.5, 0.5), (0.2, 0.95), (0.9, 0.05)):
                assert torch.equal(evolve_cpu.obf_freeze(osc, norms, alpha, beta),
                                   obf_freeze(osc, norms, alpha, beta)), (dtype, zero_share)
                assert torch.equal(evolve_cpu.top_fraction(norms, alpha),
                                   top_fraction(norms, alpha))


def test_obf_freeze_of_a_few_distinct_levels_at_every_fraction():
    # The oscillation EMA early in training: a handful of distinct values, each a class of
    # thousands of equal keys, so the sampled bracket's two ends are whole classes and the
    # threshold is either end or a level strictly between them, depending on the fraction.
    gen = torch.Generator().manual_seed(5)
    k = 150_000
    for dtype in DTYPES:
        for levels in (2, 3, 7, 40):
            osc = (torch.randint(0, levels, (k,), generator=gen).double() / levels).to(dtype)
            norms = (torch.randint(0, levels, (k,), generator=gen).double() + 1).to(dtype)
            for fraction in (0.01, 0.1, 0.25, 0.3, 0.5, 0.77, 0.97):
                assert torch.equal(evolve_cpu.top_fraction(osc, fraction),
                                   top_fraction(osc, fraction)), (dtype, levels, fraction)
                assert torch.equal(evolve_cpu.obf_freeze(osc, norms, fraction, 1 - fraction),
                                   obf_freeze(osc, norms, fraction, 1 - fraction))


def test_obf_freeze_many_equals_one_parameter_at_a_time():
    # Parameters of many sizes (small first, as in a ResNet) shared out among the threads.
    gen = torch.Generator().manual_seed(9)
    sizes = [7, 576, 0, 2304, 1, 9216, 150_000, 2304, 576, 9216]
    osc = [(torch.randint(0, 6, (k,), generator=gen).float() / 5) for k in sizes]
    norms = [torch.rand(k, generator=gen) for k in sizes]
    got = evolve_cpu.obf_freeze_many(osc, norms, 0.3, 0.6)
    assert len(got) == len(sizes)
    for o, n, frozen in zip(osc, norms, got, strict=True):
        assert torch.equal(frozen, obf_freeze(o, n, 0.3, 0.6))


@examples(50)
@given(case=cases(), signed_zeros=st.booleans())
def test_zero_pruned_matches_the_eager_engine_bit_for_bit(case, signed_zeros):
    weight, m, count = case["weight"], case["m"], case["count"]
    code = encode_kept(case["kept"], count)
    if not evolve_cpu.supports(weight, weight, code, count, m):
        return
    if signed_zeros:  # pruned entries -0.0 (not all bits 0: rewritten) or +0.0 (left alone)
        pruned = _as_param(~case["kept"], weight.shape)
        weight.masked_fill_(pruned & (weight > 0), -0.0).masked_fill_(pruned & (weight < 0), 0.0)
    native_weight, eager_weight = weight.clone(), weight.clone()
    native_weight.as_strided_(weight.shape, weight.stride())
    eager_weight.as_strided_(weight.shape, weight.stride())
    state = {"kept": code, "kept_count": count}
    pruned_bits = bits(weight)[_as_param(~case["kept"], weight.shape)]
    wrote = evolve_cpu.zero_pruned_(native_weight, code, count, m)
    NMEngine(()).zero_pruned_(eager_weight, state, m, fused=False)
    assert_bits(native_weight, eager_weight, "weight")
    assert wrote == bool((pruned_bits != 0).any())


def test_top_fraction_of_many_values_takes_the_lowest_indices_among_ties():
    # Large enough for the radix selection's buckets to matter; every value tied four ways.
    values = (torch.arange(100_000) % 25_000).float() / 7
    for fraction in (0.1, 0.5, 0.37, 0.99):
        assert torch.equal(evolve_cpu.top_fraction(values, fraction),
                           top_fraction(values, fraction))


@examples(50)
@given(case=cases(), frozen_share=st.sampled_from(FRACTIONS), buffers=st.integers(0, 3))
def test_apply_evolved_matches_apply_mask_bit_for_bit(case, frozen_share, buffers):
    m = case["m"]
    weight = case["weight"]
    k = weight.numel() // m
    seed = int(bits(weight).sum().item()) % 2**31
    old = encode_kept(case["kept"], case["count"])
    count = case["count"]
    proposal = encode_kept(block_mask(k, m, seed, count), count)
    frozen = torch.rand(k, generator=torch.Generator().manual_seed(seed)) < frozen_share
    gen = torch.Generator().manual_seed(seed + 1)
    values = [torch.randn(k, count, generator=gen, dtype=torch.float64).to(weight.dtype)
              for _ in range(buffers)]
    assert_apply_equals_eager(evolve_cpu.apply_evolved_, weight, values, old, count, proposal,
                              frozen, m)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
def test_apply_evolved_of_a_few_far_apart_changed_blocks(layout):
    # The usual update after the first: a handful of blocks change, hundreds of blocks apart,
    # in a layout where block k is not at k * M, so the pass must find each one's weights.
    shape = (48, 64, 3, 3) if layout == "channels_last" else (96, 256)
    m, count = 4, 2
    k = torch.Size(shape).numel() // m
    weight = in_layout(torch.randn(shape, generator=torch.Generator().manual_seed(3)), layout)
    old = encode_kept(exact_nm_mask(k, count, m, 0), count)
    proposal = old.clone()
    for block in (0, 1, 70, 71, 900, 2047, 2048, 2049, k - 1):  # runs, gaps, chunk edges
        proposal[block] = (int(old[block]) + 1) % 6  # another of the 6 kept sets of 2 of 4
    frozen = torch.zeros(k, dtype=torch.bool)
    frozen[71] = True  # a changed proposal that a frozen block ignores
    values = [torch.randn(k, count, dtype=weight.dtype, generator=torch.Generator().manual_seed(4))]
    assert_apply_equals_eager(evolve_cpu.apply_evolved_, weight, values, old, count, proposal,
                              frozen, m)


def test_apply_evolved_rejects_a_bad_code_before_writing():
    weight = torch.randn(4, 8)
    old = encode_kept(exact_nm_mask(8, 2, 4, 0), 2)
    proposal = old.clone()
    proposal[3] = 200  # beyond the 6 ranks of 2 of 4
    before = weight.clone()
    with pytest.raises(ValueError, match="outside"):
        evolve_cpu.apply_evolved_(weight, [], old, 2, proposal, torch.zeros(8, dtype=torch.bool), 4)
    assert torch.equal(weight, before)


@pytest.mark.parametrize(("n", "m", "bad"), [(2, 4, 200), (8, 16, -1), (8, 16, 20000),
                                           (16, 32, 40)])
def test_every_pass_rejects_a_bad_stored_code_before_writing(n, m, bad):
    # uint8 ranks beyond the table, int16 ranks below 0 or beyond it, positions >= m.
    weight, grad = torch.randn(2, 3 * m), torch.randn(2, 3 * m)
    good = encode_kept(exact_nm_mask(6, n, m, 0), n)
    corrupt = good.clone()
    corrupt[3] = bad
    before = weight.clone()
    passes = {
        "evolve_blocks": lambda: evolve_cpu.evolve_blocks(
            weight, grad, corrupt, n, None, n=n, m=m, lr=0.1, gamma=0.9, zero_pruned=True),
        "apply_evolved_": lambda: evolve_cpu.apply_evolved_(
            weight, [], good, n, corrupt, torch.zeros(6, dtype=torch.bool), m),
        "zero_pruned_": lambda: evolve_cpu.zero_pruned_(weight, corrupt, n, m),
    }
    for name, run in passes.items():
        with pytest.raises(ValueError, match="outside"):
            run()
        assert torch.equal(weight, before), name


def test_apply_and_zero_name_a_stored_form_they_do_not_take():
    weight = torch.randn(2, 12)
    good = encode_kept(exact_nm_mask(6, 2, 4, 0), 2)
    wide = good.long()  # int64 ranks: a form encode_kept never stores for 2 of 4
    with pytest.raises(ValueError, match=r"kept: ranks must be uint8 or int16, positions uint8"):
        evolve_cpu.zero_pruned_(weight, wide, 2, 4)
    with pytest.raises(ValueError, match=r"kept\[0\]: ranks must be uint8 or int16"):
        evolve_cpu.apply_evolved_(weight, [], wide, 2, wide, torch.zeros(6, dtype=torch.bool), 4)


def test_apply_and_zero_name_a_weight_whose_layout_does_not_fold():
    weight = torch.zeros(7, 5, 3, 4, 2).permute(4, 3, 2, 1, 0)  # [2, 4, 3, 5, 7], reversed
    code = encode_kept(exact_nm_mask(weight.numel() // 4, 2, 4, 0), 2)
    frozen = torch.zeros(weight.numel() // 4, dtype=torch.bool)
    assert not evolve_cpu.supports(weight, weight, code, 2, 4)
    with pytest.raises(ValueError, match=r"Invalid weight: shape \(2, 4, 3, 5, 7\) with strides"):
        evolve_cpu.zero_pruned_(weight, code, 2, 4)
    with pytest.raises(ValueError, match=r"Invalid weights\[0\]: shape \(2, 4, 3, 5, 7\)"):
        evolve_cpu.apply_evolved_(weight, [], code, 2, code, frozen, 4)


def test_supports_names_what_the_passes_take():
    w, g = torch.randn(4, 8), torch.randn(4, 8)
    kept = encode_kept(exact_nm_mask(8, 2, 4, 0), 2)
    assert evolve_cpu.supports(w, g, kept, 2, 4, n=2)
    assert not evolve_cpu.supports(w.half(), g.half(), kept, 2, 4)  # float16: eager
    assert not evolve_cpu.supports(w, g.double(), kept, 2, 4)
    assert not evolve_cpu.supports(w, None, kept, 2, 4)
    assert not evolve_cpu.supports(w, g, kept.long(), 2, 4)  # not the stored code dtype
    assert not evolve_cpu.supports(torch.randn(2, 128), torch.randn(2, 128),
                                   encode_kept(exact_nm_mask(2, 1, 128, 0), 1), 1, 128)  # M > 64
    assert not evolve_cpu.supports(w, g, kept, 2, 4, torch.zeros(8, dtype=torch.float64))
    strided = torch.zeros(2, 8).t()  # not contiguous
    assert not evolve_cpu.supports(w, g, kept, 2, 4, buffers=[strided])
