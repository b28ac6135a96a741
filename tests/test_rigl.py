"""RigL (Evci et al. 2020) inside N:M blocks: a cosine-annealed share of the layer's smallest
|W| dropped, each block regrowing as many as it lost by largest |G|."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import BAMESGD
from bame_optim.core.nm import param_to_blocks
from bame_optim.core.rigl import rigl_drop_fraction
from bame_optim.methods import METHODS, accepted_keywords, make_optimizer
from bame_optim.optim import sgd as sgd_module
from bame_optim.optim.rules import RIGL_RULES, MaskContext, rigl, rigl_t_end
from bame_optim.optim.sgd import RigLSGD

from .strategies import exact_nm_mask, nm_shapes, seeded_tensor, seeds, tensor_kinds


def reference_fraction(t, zeta, t_end):
    """ζ_t of RigL's Eq. 1, 0 from T_end on."""
    if t >= t_end:
        return 0.0
    return zeta / 2 * (1 + math.cos(math.pi * t / t_end))


def reference_rigl(weight, grad, kept, n, fraction):
    """The layer ``[K, M]`` in plain Python float64: sort the kept |w| ascending (lower flat
    index k * M + j first on ties), drop the floor(fraction * count) smallest; in each block
    that lost some, regrow as many of the largest |g| among its pruned and dropped weights
    (a dropped weight first on ties, then the lower index). Returns (mask, dropped count)."""
    big_k, m = kept.shape
    kept_at = [(k, j) for k in range(big_k) for j in range(m) if kept[k, j]]
    drop = int(fraction * len(kept_at))
    kept_at.sort(key=lambda kj: (abs(float(weight[kj])), kj[0] * m + kj[1]))
    dropped = set(kept_at[:drop])
    new = kept.clone()
    for k in range(big_k):
        lost = sum((k, j) in dropped for j in range(m))
        if not lost:
            continue
        survivors = [j for j in range(m) if kept[k, j] and (k, j) not in dropped]
        candidates = [j for j in range(m) if j not in survivors]
        candidates.sort(key=lambda j: (-abs(float(grad[k, j])), not kept[k, j], j))
        chosen = set(survivors) | set(candidates[:lost])
        for j in range(m):
            new[k, j] = j in chosen
    return new, drop


def context(blocks: int, t: int, **extra) -> MaskContext:
    return MaskContext(step=t, index=0, total_blocks=blocks, first_block=0, **extra)


def group_of(n, m, zeta, t_end):
    return {"n": n, "m": m, "zeta": zeta, "t_end": t_end}


# -- the rule against the reference -------------------------------------------------------------


@given(
    case=nm_shapes(),
    seed=seeds,
    kind=tensor_kinds,
    dtype=st.sampled_from((torch.float64, torch.float32)),
    zeta=st.one_of(st.sampled_from((0.3, 0.5, 1.0)), st.floats(0.0, 1.0)),
    t_end=st.integers(0, 40),
    progress=st.one_of(st.floats(0.0, 0.5), st.floats(0.0, 1.25)),
)
def test_rigl_rule_matches_reference(case, seed, kind, dtype, zeta, t_end, progress):
    n, m, shape = case
    t = int(progress * t_end)  # mostly t < t_end, where something is dropped
    kept_param = exact_nm_mask(math.prod(shape) // m, n, m, seed)
    weight = param_to_blocks(seeded_tensor(shape, seed, kind, dtype), m) * kept_param
    grad = param_to_blocks(seeded_tensor(shape, seed + 1, kind, dtype), m)
    kept = kept_param.clone()
    result = rigl(weight, grad, kept, None, group_of(n, m, zeta, t_end), context(len(kept), t))
    expected, drop = reference_rigl(
        weight.double(), grad.double(), kept, n, reference_fraction(t, zeta, t_end)
    )
    assert torch.equal(kept, kept_param), "the rule does not write its input"
    assert torch.equal(result.kept, expected)
    assert result.count == n and result.oscillation is None and result.frozen is None
    assert (result.kept.sum(dim=1) == n).all(), "exactly N per block"
    assert int((kept & ~result.kept).sum()) <= drop, "at most the dropped weights leave"


def test_drop_fraction_schedule_values():
    assert rigl_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert rigl_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert rigl_drop_fraction(99, 0.3, 100) == pytest.approx(0.15 * (1 - math.cos(math.pi / 100)))
    for t in (100, 101, 10_000):
        assert rigl_drop_fraction(t, 0.3, 100) == 0.0, "0 from T_end on"
    assert rigl_drop_fraction(0, 0.3, 0) == 0.0, "t_end = 0: nothing is ever dropped"
    values = [rigl_drop_fraction(t, 0.5, 40) for t in range(45)]
    assert all(a >= b for a, b in itertools.pairwise(values)), "annealed"


def test_no_drop_when_fraction_times_count_below_one():
    # 1:16, one block: count 1, zeta_t <= 0.3, so floor(zeta_t * 1) = 0: nothing moves even
    # though a pruned weight has by far the largest |G| and the kept one the smallest |W|.
    kept = torch.zeros(1, 16, dtype=torch.bool)
    kept[0, 3] = True
    weight = torch.zeros(1, 16).index_fill_(1, torch.tensor([3]), 1e-6)
    grad = torch.zeros(1, 16).index_fill_(1, torch.tensor([7]), 1e6)
    result = rigl(weight, grad, kept, None, group_of(1, 16, 0.3, 100), context(1, 0))
    assert torch.equal(result.kept, kept)
    # three 1:16 blocks at zeta_t = 0.3: floor(0.9) = 0; four blocks: floor(1.2) = 1
    for blocks, drops in ((3, 0), (4, 1)):
        kept, weight, grad = kept[:1].repeat(blocks, 1), weight[:1].repeat(blocks, 1), grad[:1]
        weight = weight * torch.arange(1, blocks + 1).unsqueeze(1)
        result = rigl(weight, grad.repeat(blocks, 1), kept, None, group_of(1, 16, 0.3, 100),
                      context(blocks, 0))
        assert int((result.kept != kept).any(dim=1).sum()) == drops
        if drops:  # the smallest |W| is in block 0, which swaps to the large |G|
            assert result.kept[0, 7] and not result.kept[0, 3]
    # zeta = 1 but t >= t_end: nothing
    result = rigl(weight, grad.repeat(4, 1), kept, None, group_of(1, 16, 1.0, 10),
                  context(4, 10))
    assert torch.equal(result.kept, kept)


def test_ties_drop_lower_flat_index_and_blocks_may_lose_several():
    # 2:4, three blocks, every kept |W| equal: zeta_t = 0.5 of 6 drops the 3 kept weights of
    # lowest flat index k * 4 + j: both of block 0 and the first of block 1.
    kept = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    weight = kept.double() * -2.0
    grad = torch.tensor([[0.0, 5.0, 4.0, 5.0], [9.0, 0.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    result = rigl(weight, grad, kept, None, group_of(2, 4, 1.0, 2), context(3, 1))
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    # block 0 lost two, regrows 2: |G| 5 (j=1, dropped, wins the tie with j=3) and 5 (j=3);
    # block 1 lost j=1 and regrows j=0 (|G| 9); block 2 lost nothing.
    assert torch.equal(result.kept, expected)
    again = rigl(weight, grad, kept, None, group_of(2, 4, 1.0, 2), context(3, 1))
    assert torch.equal(again.kept, result.kept), "deterministic"


def test_sharded_parameters_raise():
    kept = exact_nm_mask(4, 2, 4, 0)
    weight, grad = torch.randn(4, 4) * kept, torch.randn(4, 4)
    with pytest.raises(ValueError, match="RigL does not support sharded"):
        rigl(weight, grad, kept, None, group_of(2, 4, 0.3, 10),
             context(4, 1, freeze=lambda oscillation, norms: oscillation > 0))
    with pytest.raises(ValueError, match="RigL does not support sharded"):  # a shard's rows
        rigl(weight, grad, kept, None, group_of(2, 4, 0.3, 10),
             MaskContext(step=1, index=0, total_blocks=8, first_block=4))


def test_rigl_optimizer_rejects_sharded_parameters_at_construction(monkeypatch):
    monkeypatch.setattr(sgd_module, "is_sharded", lambda p: True)
    with pytest.raises(ValueError, match="RigLSGD does not support sharded"):
        RigLSGD([torch.zeros(4, 8, requires_grad=True)], lr=0.1, total_steps=30, delta_t=1)


# -- keywords ---------------------------------------------------------------------------------


def test_keywords_defaults_and_registry():
    assert RIGL_RULES.keywords["zeta"] == 0.3 and RIGL_RULES.keywords["t_end"] is None
    assert METHODS["rigl"].factory.rules is RIGL_RULES
    assert {"zeta", "t_end"} <= accepted_keywords("rigl")
    assert not {"alpha", "beta", "gamma"} & accepted_keywords("rigl")
    for name in ("bame", "static", "lma", "asp"):
        assert not {"zeta", "t_end"} & accepted_keywords(name)
    p = torch.zeros(4, 8, requires_grad=True)
    group = make_optimizer("rigl", [p], lr=0.1, total_steps=41, delta_t=1).param_groups[0]
    assert (group["zeta"], group["t_end"]) == (0.3, 30)  # 3 * 41 // 4
    group = RigLSGD([p], lr=0.1, total_steps=41, delta_t=1, zeta=0.5, t_end=7).param_groups[0]
    assert (group["zeta"], group["t_end"]) == (0.5, 7)
    opt = RigLSGD([{"params": [p], "zeta": 0.1}], lr=0.1, t_i=2, t_f=9, t_end=9, delta_t=1)
    assert (opt.param_groups[0]["zeta"], opt.param_groups[0]["t_end"]) == (0.1, 9)
    assert rigl_t_end({"total_steps": 100}) == 75, "a group saved without t_end"
    # a group without sparse parameters needs no schedule
    RigLSGD([torch.zeros(8, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zeta": 1.5}, "Invalid zeta value: 1.5"),
        ({"zeta": -0.1}, "Invalid zeta value: -0.1"),
        ({"zeta": True}, "Invalid zeta value: True"),
        ({"t_end": -1}, "Invalid t_end value: -1"),
        ({"t_end": 2.5}, "Invalid t_end value: 2.5"),
        ({"total_steps": None, "t_i": 2, "t_f": 6}, "Invalid t_end value: None"),
    ],
)
def test_bad_keywords_raise_naming_them(kwargs, message):
    p = torch.zeros(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        RigLSGD([p], lr=0.1, **({"total_steps": 20} | kwargs))
    with pytest.raises(ValueError, match=re.escape(message)):  # per group too
        RigLSGD([{"params": [p], **kwargs}], lr=0.1, total_steps=20)


def test_other_methods_do_not_take_rigl_keywords():
    p = torch.zeros(4, 8, requires_grad=True)
    for keyword in ("zeta", "t_end"):
        with pytest.raises(TypeError, match=keyword):
            BAMESGD([p], lr=0.1, total_steps=20, **{keyword: 1})
        with pytest.raises(ValueError, match=keyword):
            make_optimizer("bame", [p], lr=0.1, total_steps=20, **{keyword: 1})


# -- the optimizer ------------------------------------------------------------------------------


def test_rigl_optimizer_follows_bame_schedule_and_the_rule():
    gen = torch.Generator().manual_seed(0)
    n, m, lr, t_i, t_f, delta_t, zeta = 2, 8, 0.1, 4, 20, 2, 0.5
    p = torch.randn(8, 16, generator=gen).requires_grad_()
    q = p.detach().clone().requires_grad_()
    rigl_opt = RigLSGD([p], lr=lr, n=n, m=m, total_steps=24, t_i=t_i, t_f=t_f,
                       delta_t=delta_t, zeta=zeta)
    bame = BAMESGD([q], lr=lr, n=n, m=m, total_steps=24, t_i=t_i, t_f=t_f, delta_t=delta_t)
    t_end = rigl_opt.param_groups[0]["t_end"]
    assert t_end == 18
    flips = 0
    for t in range(24):
        grad = torch.randn(8, 16, generator=gen)
        p.grad, q.grad = grad.clone(), grad.clone()
        before_w, before_kept = p.detach().clone(), rigl_opt.kept_mask(p)
        rigl_opt.step()
        bame.step()
        kept = rigl_opt.kept_mask(p)
        if t <= t_i:  # gradual and prune phases are BAME's
            assert torch.equal(kept, bame.kept_mask(q))
        else:
            update = t < t_f and t % delta_t == 0
            expected = before_kept
            if update:
                expected, _ = reference_rigl(
                    param_to_blocks(before_w, m).double(), param_to_blocks(grad, m).double(),
                    before_kept, n, reference_fraction(t, zeta, t_end),
                )
            assert torch.equal(kept, expected), t
            grown = kept & ~before_kept
            # new weights start at 0: one plain SGD step from 0
            assert torch.equal(param_to_blocks(p.detach(), m)[grown],
                               -lr * param_to_blocks(grad, m)[grown])
            flips += int(grown.sum())
            if t >= t_end:
                assert torch.equal(kept, before_kept), "zeta_t = 0 from t_end on"
        state = rigl_opt.state[p]
        assert state["last_frozen"] == 0 and "oscillation" not in state  # no OBF
        if t >= t_i:
            assert (kept.sum(dim=1) == n).all()
        assert (p.detach()[~kept.reshape(8, 16)] == 0).all()
    assert flips > 0, "RigL moved some weights"


def test_rigl_group_saved_without_rigl_keywords_resumes():
    """A checkpoint of the earlier RigLSGD (no zeta / t_end in its groups) loads and runs: the
    missing keys take this optimizer's defaults and t_end resolves from total_steps."""
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4, 8, generator=gen).requires_grad_()
    opt = RigLSGD([p], lr=0.1, n=1, m=4, total_steps=12, delta_t=1)
    for _ in range(5):
        p.grad = torch.randn(4, 8, generator=gen)
        opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["zeta"], group["t_end"]
    resumed = RigLSGD([p], lr=0.1, n=1, m=4, total_steps=12, delta_t=1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["zeta"] == 0.3
    for _ in range(5):
        p.grad = torch.randn(4, 8, generator=gen)
        resumed.step()
    assert (resumed.kept_mask(p).sum(dim=1) == 1).all()
