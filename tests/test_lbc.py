"""LBC: the combination table, the cubic count, scores and removal against float64 / Python
references, the optimizer step by step against the reference loop, and errors (resume,
dtypes and dense parameters: the contract battery, test_contract.py)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core.nm import is_nm_sparse
from bame_optim.peers.lbc import (
    LBCSGD,
    combination_gradient,
    combination_table,
    remaining_count,
    remove_combinations,
    union_mask,
)
from bame_optim.reference import ReferenceLBC
from bame_optim.reference.evolution import to_param
from bame_optim.reference.peers import (
    lbc_combinations,
    lbc_keep_best,
    lbc_remaining,
    lbc_union,
)

from .peer_setups import (
    cosine_lr,
    dense_setups,
    make_params,
    seeded_grads,
    sgd_kwargs,
)
from .strategies import NM_PATTERNS, examples, nm_patterns


@pytest.mark.parametrize(("n", "m"), [*NM_PATTERNS, (1, 2), (3, 5), (8, 16)])
def test_combination_table(n, m):
    table = combination_table(n, m)
    assert table.dtype == torch.bool and table.shape == (math.comb(m, n), m)
    assert (table.sum(dim=1) == n).all()
    assert len({tuple(row.tolist()) for row in table}) == table.shape[0], "rows are distinct"
    assert [row.nonzero().flatten().tolist() for row in table] == lbc_combinations(n, m)


@given(st.integers(2, 200), st.integers(0, 50), st.data())
def test_remaining_count_is_the_cubic_schedule(c, t_f, data):
    t = data.draw(st.integers(0, t_f + 5))
    assert remaining_count(t, c, t_f) == lbc_remaining(t, c, t_f)
    if t_f:
        assert remaining_count(0, c, t_f) == c
    counts = [remaining_count(s, c, t_f) for s in range(t_f + 3)]
    assert all(a >= b for a, b in pairwise(counts)), "non-increasing"
    assert counts[t_f:] == [1] * 3


@given(nm_patterns, st.integers(1, 12), st.integers(0, 2**16))
def test_combination_gradient_matches_float64_sums(pattern, k, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, m, generator=gen, dtype=torch.float64)
    grad = torch.randn(k, m, generator=gen, dtype=torch.float64)
    ours = combination_gradient(weight, grad, combination_table(n, m))
    expected = torch.tensor(
        [
            [sum(float(grad[b, j]) * float(weight[b, j]) for j in combo)
             for combo in lbc_combinations(n, m)]
            for b in range(k)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours, expected)
    half = combination_gradient(weight.bfloat16(), grad.bfloat16(), combination_table(n, m))
    assert half.dtype == torch.float32, "scores are at least float32"


@given(nm_patterns, st.integers(1, 10), st.integers(0, 2**16), st.data())
def test_remove_combinations_and_union_match_python(pattern, k, seed, data):
    n, m = pattern
    c = math.comb(m, n)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, (k, c), generator=gen).float()  # ties everywhere
    remaining = torch.rand(k, c, generator=gen) < 0.7
    remaining[:, 0] = True
    count = data.draw(st.integers(1, c + 1))
    new = remove_combinations(scores, remaining, count)
    assert torch.equal(new, lbc_keep_best(scores, remaining, count))
    assert not (new & ~remaining).any(), "removed combinations never come back"
    expected = lbc_union(new, lbc_combinations(n, m), m)
    assert torch.equal(union_mask(new, combination_table(n, m)), expected)


@examples(40)
@given(dense_setups(max_steps=14), st.data())
def test_matches_float64_reference_step_by_step(setup, data):
    n, m, steps = setup["n"], setup["m"], setup["steps"]
    t_f = data.draw(st.integers(0, steps))
    score_lr = data.draw(st.sampled_from([None, 0.3]))
    params = make_params(setup)
    opt = LBCSGD(
        params, lr=0.05, n=n, m=m, t_f=t_f, score_lr=score_lr, maximize=setup["maximize"],
        **sgd_kwargs(setup),
    )  # fmt: skip
    ref = ReferenceLBC(params, n=n, m=m, t_f=t_f, score_lr=score_lr, maximize=setup["maximize"],
                       **sgd_kwargs(setup))
    c = math.comb(m, n)
    for step in range(steps + 2):
        lr = cosine_lr(step, steps)
        opt.param_groups[0]["lr"] = lr  # what an LR scheduler does: score_lr=None follows it
        grads = seeded_grads(setup["shapes"], step, setup["seed"])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, lr)
        for i, p in enumerate(params):
            state = opt.state[p]
            remaining, mask = state["remaining"], state["mask"]
            assert (remaining.sum(dim=1) == lbc_remaining(step, c, t_f)).all(), f"count at {step}"
            assert torch.equal(remaining, ref.remaining[i]), f"combinations differ at {step}"
            assert torch.equal(mask, ref.masks[i])
            assert torch.equal(mask, union_mask(remaining, combination_table(n, m)))
            torch.testing.assert_close(state["scores"], ref.scores[i])
            torch.testing.assert_close(state["dense_weight"], ref.weights[i])
            assert torch.equal(p.detach(), state["dense_weight"] * to_param(mask, p.shape))
            torch.testing.assert_close(p.detach(), ref.param(i))
            if setup["momentum"]:
                torch.testing.assert_close(state["momentum_buffer"], ref.buffers[i])
            if step >= t_f:
                assert (mask.sum(dim=1) == n).all() and is_nm_sparse(p.detach(), n, m)


def test_masks_are_fixed_after_t_f_and_params_without_grad_follow_the_schedule():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 16, generator=gen).requires_grad_()
    q = torch.randn(2, 8, generator=gen).requires_grad_()  # never gets a gradient
    opt = LBCSGD([p, q], lr=0.1, momentum=0.9, n=2, m=8, total_steps=12)
    assert opt.param_groups[0]["t_f"] == 8
    masks = []
    for step in range(12):
        p.grad = torch.randn(4, 16, generator=gen)
        opt.step()
        assert (opt.state[q]["remaining"].sum(dim=1) == remaining_count(step, 28, 8)).all()
        masks.append(opt.state[p]["mask"].clone())
        report = {row["name"]: row for row in opt.sparsity_report()}
        assert report["group0.param0"]["combinations"] == remaining_count(step, 28, 8)
        assert report["group0.param0"]["phase"] == ("evolve" if step + 1 <= 8 else "frozen")
    assert all(torch.equal(masks[8], later) for later in masks[9:])
    assert (masks[0].all()) and not masks[-1].all()
    assert torch.equal(q.detach(), opt.state[q]["dense_weight"] * to_param(
        opt.state[q]["mask"], q.shape))  # fmt: skip
    assert report["group0.param0"]["nm_valid"] and report["group0.param0"]["density"] == 0.25


def test_state_initialising_call_changes_nothing():
    p = torch.randn(4, 8, requires_grad=True)
    before = p.detach().clone()
    opt = LBCSGD([p], lr=0.0, momentum=0.9, n=1, m=4, t_f=0)
    p.grad = torch.zeros_like(p)
    opt.step()
    state = opt.state[p]
    assert opt.param_groups[0]["step"] == 0 and torch.equal(p, before)
    assert state["remaining"].all() and state["mask"].all() and not state["scores"].any()
    p.grad = torch.randn_like(p)  # an ordinary lr-0 step advances: t_f = 0 gives 1:4 at once
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and (state["mask"].sum(dim=1) == 1).all()


def test_trains_with_lr_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    opt = LBCSGD(model.parameters(), lr=0.1, momentum=0.9, n=2, m=4, total_steps=40)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
    assert losses[-1] < losses[0]
    assert all(is_nm_sparse(mod.weight.detach(), 2, 4) for mod in (model[0], model[2]))


BAD_ARGUMENTS = [
    ({"score_lr": -1.0}, "score_lr", "-1.0"),
    ({"score_lr": float("inf")}, "score_lr", "inf"),
    ({"score_lr": "fast"}, "score_lr", "'fast'"),
    ({"total_steps": None}, "total_steps", "None"),
    ({"t_f": 200}, "t_f", "200"),
    ({"t_f": -1}, "t_f", "-1"),
    ({"n": 0, "m": 4}, "n", "0"),
    ({"momentum": -0.5}, "momentum", "-0.5"),
]


@pytest.mark.parametrize("name", ["t_i", "delta_t", "alpha", "beta", "gamma", "seed"])
def test_bame_keywords_are_not_taken(name):
    """LBC removes combinations from step 0: BAME's keywords are refused, not ignored."""
    with pytest.raises(TypeError, match=rf"unexpected keyword arguments: \['{name}'\]"):
        LBCSGD([torch.randn(4, 8, requires_grad=True)], lr=0.1, total_steps=10, **{name: 1})


@pytest.mark.parametrize(("kwargs", "name", "value"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, value):
    kwargs = {"lr": 0.1, "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=rf"Invalid {name} value: {value}"):
        LBCSGD([torch.randn(4, 8, requires_grad=True)], **kwargs)
