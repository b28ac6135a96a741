"""SR-STE against the float64 reference step by step, its invariants, schedulers and errors
(resume, dtypes and dense parameters: the contract battery, test_contract.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import nm_param_groups
from bame_optim.core.nm import is_nm_sparse
from bame_optim.peers.srste import DEFAULT_SRSTE_DECAY, SRSTESGD, srste_mask
from bame_optim.reference import ReferenceSRSTE
from bame_optim.reference.evolution import to_blocks, to_param
from bame_optim.reference.peers import srste_mask as srste_mask_reference

from .peer_setups import (
    assert_follows_reference,
    dense_setups,
    make_params,
    seeded_grads,
    sgd_kwargs,
)
from .strategies import examples, nm_patterns

DECAYS = [0.0, DEFAULT_SRSTE_DECAY, 0.5]


@examples(40)
@given(dense_setups(), st.sampled_from(DECAYS))
def test_matches_float64_reference_step_by_step(setup, decay):
    params = make_params(setup)
    opt = SRSTESGD(
        params,
        lr=0.05,
        n=setup["n"],
        m=setup["m"],
        srste_decay=decay,
        maximize=setup["maximize"],
        **sgd_kwargs(setup),
    )
    ref = ReferenceSRSTE(params, n=setup["n"], m=setup["m"], decay=decay,
                         maximize=setup["maximize"], **sgd_kwargs(setup))
    assert_follows_reference(opt, ref, params, setup)


@examples(30)
@given(dense_setups(), st.sampled_from(DECAYS), st.data())
def test_parameter_is_dense_weight_times_mask_and_nm(setup, decay, data):
    params = make_params(setup, dtype=torch.float32)
    opt = SRSTESGD(params, lr=0.1, n=setup["n"], m=setup["m"], srste_decay=decay)
    for step in range(setup["steps"]):
        # Some parameters get no gradient: they are still masked.
        has_grad = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
        for p, g, keep in zip(
            params, seeded_grads(setup["shapes"], step, 3), has_grad, strict=True
        ):
            p.grad = g.float() if keep else None
        if not any(has_grad):
            continue
        before = {id(p): opt.state[p]["mask"].clone() for p in params if p in opt.state}
        opt.step()
        for p in params:
            state = opt.state[p]
            mask = state["mask"]
            assert mask.dtype == torch.bool and (mask.sum(dim=1) == setup["n"]).all()
            assert torch.equal(p.detach(), state["dense_weight"] * to_param(mask, p.shape))
            assert is_nm_sparse(p.detach(), setup["n"], setup["m"])
            flips = int((before[id(p)] != mask).sum()) if id(p) in before else state["last_flips"]
            assert state["last_flips"] == flips


@given(nm_patterns, st.integers(1, 10), st.integers(0, 2**16))
def test_srste_mask_ties_keep_current_then_lower_index(pattern, k, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-2, 3, (k, m), generator=gen).double()  # ties everywhere
    old = torch.rand(k, m, generator=gen).argsort(dim=1).argsort(dim=1) < n
    new = srste_mask(weight, old, n)
    assert torch.equal(new, srste_mask_reference(weight, old, n))


def test_first_step_copies_the_parameter_and_state_init_call_changes_nothing():
    p = torch.randn(4, 8, requires_grad=True)
    before = p.detach().clone()
    opt = SRSTESGD([p], lr=0.0, momentum=0.9, n=1, m=4)
    p.grad = torch.zeros_like(p)  # torch.distributed.checkpoint's state-initialising call
    opt.step()
    assert opt.param_groups[0]["step"] == 0 and torch.equal(p, before)
    assert torch.equal(opt.state[p]["dense_weight"], before) and opt.state[p]["mask"].all()
    p.grad = torch.randn_like(p)  # an ordinary lr-0 step: the mask is drawn, W is unchanged
    opt.step()
    assert opt.param_groups[0]["step"] == 1
    assert torch.equal(opt.state[p]["dense_weight"], before)
    kept = to_param(opt.state[p]["mask"], p.shape)
    assert torch.equal(p.detach(), torch.where(kept, before, 0.0))
    expected = srste_mask_reference(to_blocks(before, 4), torch.ones(8, 4, dtype=torch.bool), 1)
    assert torch.equal(opt.state[p]["mask"], expected)


def test_decay_pulls_pruned_weights_to_zero_and_lets_them_return():
    p = torch.tensor([[4.0, 3.0, 2.0, 1.0]], requires_grad=True)
    opt = SRSTESGD([p], lr=1.0, n=2, m=4, srste_decay=0.25)
    p.grad = torch.zeros_like(p)
    p.grad[0, 0] = 1.0  # nudge so that the step advances
    opt.step()
    assert torch.equal(opt.state[p]["dense_weight"], torch.tensor([[3.0, 3.0, 2.0, 1.0]]))
    p.grad = torch.zeros_like(p)
    p.grad[0, 3] = -3.0  # pruned: 1.0 + 3.0 - 0.25 * 1.0; the other pruned 2.0 decays
    opt.step()
    assert torch.equal(opt.state[p]["dense_weight"], torch.tensor([[3.0, 3.0, 1.5, 3.75]]))
    assert torch.equal(p.detach(), torch.tensor([[3.0, 0.0, 0.0, 3.75]]))


def test_trains_with_nm_param_groups_closure_and_lr_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nm_param_groups may warn about excluded layers
        groups = nm_param_groups(model, n=2, m=4)
    opt = SRSTESGD(groups, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(40):
        losses.append(opt.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    report = {row["name"]: row for row in opt.sparsity_report()}
    middle = report["2.weight"]
    assert middle["sparse"] and middle["nm_valid"] and middle["density"] == 0.5
    assert middle["phase"] == "evolve" and middle["step"] == 40
    assert report["0.weight"]["sparse"] is False  # the stem stays dense
    assert is_nm_sparse(model[2].weight.detach(), 2, 4)


BAD_ARGUMENTS = [
    ({"srste_decay": -1.0}, "srste_decay", "-1.0"),
    ({"srste_decay": float("nan")}, "srste_decay", "nan"),
    ({"srste_decay": "big"}, "srste_decay", "'big'"),
    ({"n": 4, "m": 4}, "n", "4"),
    ({"lr": -0.1}, "lr", "-0.1"),
    ({"nesterov": True}, "nesterov", "True"),
]


@pytest.mark.parametrize("name", ["total_steps", "t_i", "t_f", "delta_t", "alpha", "seed"])
def test_schedule_keywords_are_not_taken(name):
    """SR-STE has no schedule: BAME's keywords are refused, not accepted and ignored."""
    with pytest.raises(TypeError, match=rf"unexpected keyword arguments: \['{name}'\]"):
        SRSTESGD([torch.randn(4, 8, requires_grad=True)], lr=0.1, **{name: 5})


@pytest.mark.parametrize(("kwargs", "name", "value"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, value):
    with pytest.raises(ValueError, match=rf"Invalid {name} value: {value}"):
        SRSTESGD([torch.randn(4, 8, requires_grad=True)], **{"lr": 0.1, **kwargs})
    if name == "srste_decay":  # a group override is validated too
        group = {"params": [torch.randn(4, 8, requires_grad=True)], **kwargs}
        with pytest.raises(ValueError, match=rf"Invalid {name} value"):
            SRSTESGD([group], lr=0.1)
