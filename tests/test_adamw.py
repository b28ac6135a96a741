"""BAMEAdamW against a float64 reference loop, its compact moments, checkpoints of
torch.optim.AdamW, and its argument errors. The registry-wide contract (resume in every phase,
dtypes, dense parameters equal torch.optim.AdamW) is in test_contract.py."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import BAMESGD, BAMEAdamW
from bame_optim.core.evolution import lma_scores
from bame_optim.core.nm import is_nm_sparse, param_to_blocks
from bame_optim.kernels import kept_adamw_cpu
from bame_optim.reference import ReferenceBAMEAdamW

from .strategies import examples, nm_patterns


@st.composite
def adamw_setups(draw):
    """Shapes, an N:M pattern, a schedule, AdamW's settings and the revive score."""
    n, m = draw(nm_patterns)
    layouts = [(4, 2 * m), (3, m, 3), (2, m, 2, 2)]
    total = draw(st.integers(8, 30))
    t_i = draw(st.integers(0, total))
    return {
        "n": n,
        "m": m,
        "shapes": draw(st.lists(st.sampled_from(layouts), min_size=1, max_size=3)),
        "total": total,
        "t_i": t_i,
        "t_f": draw(st.integers(t_i, total)),
        "delta_t": draw(st.integers(1, 6)),
        "alpha": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "beta": draw(st.sampled_from([0.0, 0.5])),
        "seed": draw(st.integers(0, 2**16)),
        "weight_decay": draw(st.sampled_from([0.0, 0.05])),
        "betas": draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9)])),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "revive_score": draw(st.sampled_from(["adam", "sgd"])),
    }


def _lr(step: int, total: int) -> float:
    return 1e-2 * (1 + math.cos(math.pi * step / total)) / 2


SCHEDULE = ("n", "m", "t_i", "t_f", "delta_t", "alpha", "beta", "seed")
ADAMW = ("weight_decay", "betas", "amsgrad", "maximize")


@examples(30)
@given(adamw_setups())
def test_matches_reference_loop_in_float64(setup):
    gen = torch.Generator().manual_seed(setup["seed"])
    ours = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
            for s in setup["shapes"]]
    theirs = [p.detach().clone() for p in ours]
    opt = BAMEAdamW(
        ours, lr=1e-2, sparse=True, total_steps=setup["total"],
        revive_score=setup["revive_score"], **{k: setup[k] for k in SCHEDULE + ADAMW},
    )
    ref = ReferenceBAMEAdamW(
        theirs, revive=setup["revive_score"], **{k: setup[k] for k in SCHEDULE + ADAMW}
    )
    for step in range(setup["total"] + 2):
        lr = _lr(step, setup["total"])
        opt.param_groups[0]["lr"] = lr
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ours]
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, lr)
        for i, p in enumerate(ours):
            state = opt.state[p]
            assert torch.equal(opt.kept_mask(p), ref.masks[i]), f"mask {i} differs at {step}"
            torch.testing.assert_close(p.detach(), theirs[i])
            torch.testing.assert_close(opt.exp_avg(p), ref.exp_avg[i])
            torch.testing.assert_close(opt.exp_avg_sq(p), ref.exp_avg_sq[i])
            compact = (ref.masks[i].shape[0], state["kept_count"])
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == compact
            assert ("max_exp_avg_sq" in state) == setup["amsgrad"]
            assert float(state["step"]) == step + 1
            if "oscillation" in state:
                torch.testing.assert_close(state["oscillation"], ref.oscillation[i])


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _train(model, opt, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        generator = torch.Generator().manual_seed(t)
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_pruned_weights_and_their_moments_stay_zero_and_the_model_ends_n_m():
    model = _model()
    opt = BAMEAdamW(model.parameters(), lr=1e-2, n=1, m=4, total_steps=30, delta_t=3)
    for t in range(30):
        _train(model, opt, 1, start=t)
        for p in (model[0].weight, model[2].weight):
            kept = opt.kept_mask(p)
            for dense in (p.detach(), opt.exp_avg(p), opt.exp_avg_sq(p)):
                pruned = param_to_blocks(dense, 4)[~kept]
                assert torch.equal(pruned, torch.zeros_like(pruned)), t
    assert all(is_nm_sparse(p.detach(), 1, 4) for p in (model[0].weight, model[2].weight))
    assert opt.exp_avg(model[0].bias).shape == model[0].bias.shape  # dense: torch's state


def test_revived_weights_start_with_zero_moments():
    """Right after an evolve-phase update that revives weights, their moments hold only the
    update step's own gradient: (1 - beta1) g and (1 - beta2) g^2."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16, dtype=torch.float64))
    opt = BAMEAdamW([p], lr=1.0, n=1, m=4, t_i=1, t_f=40, delta_t=2, alpha=0.0)
    revived_seen = 0
    for t in range(12):
        before = opt.kept_mask(p)
        p.grad = torch.randn_like(p)
        opt.step()
        if t >= 2 and before is not None:
            revived = opt.kept_mask(p) & ~before
            grads = param_to_blocks(p.grad, 4)[revived]
            torch.testing.assert_close(param_to_blocks(opt.exp_avg(p), 4)[revived], 0.1 * grads)
            torch.testing.assert_close(param_to_blocks(opt.exp_avg_sq(p), 4)[revived],
                                       1e-3 * grads.square())
            revived_seen += int(revived.sum())
    assert revived_seen > 0, "the test needs revivals (lr 1.0 makes lr * |G| win)"


def test_revive_score_of_adam_is_lr_times_abs_grad():
    weight = torch.tensor([[0.5, 0.0, -2.0, 0.0]])
    grad = torch.tensor([[0.1, -3.0, 0.2, 0.5]])
    kept = torch.tensor([[True, False, True, False]])
    adam = lma_scores(weight, grad, kept, 0.1, revive="adam")
    sgd = lma_scores(weight, grad, kept, 0.1, revive="sgd")
    torch.testing.assert_close(adam, torch.tensor([[0.05, 0.3, 0.4, 0.05]]))
    torch.testing.assert_close(sgd, torch.tensor([[0.05, 0.9, 0.4, 0.025]]))
    with pytest.raises(ValueError, match=re.escape("Invalid revive value: 'l1'")):
        lma_scores(weight, grad, kept, 0.1, revive="l1")


def test_loads_a_torch_adamw_checkpoint_and_compacts_its_moments():
    model = _model()
    dense = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, dense, 3)
    opt = BAMEAdamW(model.parameters(), lr=1e-2, n=2, m=4, total_steps=30)
    opt.load_state_dict(dense.state_dict())
    assert opt.param_groups[0]["step"] == 0  # a dense optimizer's state: the schedule starts
    for p in model.parameters():
        assert torch.equal(opt.exp_avg(p), dense.state[p]["exp_avg"])
        assert torch.equal(opt.exp_avg_sq(p), dense.state[p]["exp_avg_sq"])
        assert float(opt.state[p]["step"]) == 3
    weight = model[2].weight
    assert opt.state[weight]["exp_avg"].shape == (weight.numel() // 4, 4)  # compact, all kept
    _train(model, opt, 30, start=3)
    assert is_nm_sparse(model[2].weight.detach(), 2, 4)


def test_sgd_and_adamw_take_their_own_keywords():
    params = [torch.nn.Parameter(torch.zeros(4, 8))]
    with pytest.raises(TypeError, match="zeta"):
        BAMEAdamW(params, total_steps=10, zeta=0.3)
    with pytest.raises(TypeError, match="momentum"):
        BAMEAdamW(params, total_steps=10, momentum=0.9)
    with pytest.raises(TypeError, match="revive_score"):
        BAMESGD(params, total_steps=10, revive_score="adam")
    with pytest.raises(ValueError, match=re.escape("Invalid revive_score value: 'l2'")):
        BAMEAdamW(params, total_steps=10, revive_score="l2")
    with pytest.raises(ValueError, match=re.escape("Invalid foreach value: True")):
        BAMEAdamW(params, lr=torch.tensor(1e-3), foreach=True, total_steps=10)
    with pytest.raises(ValueError, match=re.escape("Invalid betas value: (0.9,)")):
        BAMEAdamW(params, betas=(0.9,), total_steps=10)


def test_tensor_lr_steps_like_a_float_lr():
    a, b = _model(), _model()
    opt_a = BAMEAdamW(a.parameters(), lr=1e-2, total_steps=12, delta_t=2)
    opt_b = BAMEAdamW(b.parameters(), lr=torch.tensor(1e-2), total_steps=12, delta_t=2)
    _train(a, opt_a, 12)
    _train(b, opt_b, 12)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_schedule_warnings_point_at_the_callers_line():
    params = [torch.nn.Parameter(torch.zeros(4, 8))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BAMEAdamW(params, total_steps=30, delta_t=10)
    assert caught and all(w.filename == __file__ for w in caught), [w.filename for w in caught]


def test_every_keyword_of_torch_adamw_is_taken():
    import inspect

    torch_keywords = set(inspect.signature(torch.optim.AdamW).parameters) - {"params"}
    assert torch_keywords <= set(inspect.signature(BAMEAdamW).parameters)
    torch_keywords = set(inspect.signature(torch.optim.SGD).parameters) - {"params"}
    assert torch_keywords <= set(inspect.signature(BAMESGD).parameters)


def test_a_literal_swap_of_fused_adamw_with_tensor_betas_steps_dense_params_like_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(6, 5), torch.randn(5)]
    params_a = [torch.nn.Parameter(w.clone()) for w in weights]
    params_b = [torch.nn.Parameter(w.clone()) for w in weights]
    keywords = dict(lr=1e-2, betas=(torch.tensor(0.8), torch.tensor(0.95)), weight_decay=0.1,
                    fused=True, capturable=False, differentiable=False)
    ours = BAMEAdamW(params_a, sparse=False, **keywords)
    theirs = torch.optim.AdamW(params_b, **keywords)
    for step in range(4):
        for a, b in zip(params_a, params_b, strict=True):
            a.grad = b.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
        ours.step()
        theirs.step()
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("keywords, match", [
    (dict(capturable=True), r"Invalid capturable value: True \(BAMEAdamW supports only "
                            "capturable=False: a mask update reads"),
    (dict(differentiable=True), "Invalid differentiable value: True .*not differentiable"),
    (dict(fused=True, foreach=True), "Invalid fused value: True with foreach=True"),
    (dict(fused="yes"), "Invalid fused value: 'yes'"),
    (dict(betas=(torch.tensor([0.9, 0.8]), 0.99)), "Invalid betas value"),
    (dict(betas=(torch.tensor(1.0), 0.99)), "Invalid betas value"),
])
def test_torch_keywords_we_cannot_honour_are_value_errors(keywords, match):
    with pytest.raises(ValueError, match=match):
        BAMEAdamW([torch.nn.Parameter(torch.randn(4, 8))], total_steps=30, **keywords)


def test_fused_names_the_device_and_dtype_it_cannot_run_on():
    meta = torch.nn.Parameter(torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match=r"Invalid fused value: True for a parameter of shape "
                       r"\(4, 8\) on meta with dtype torch.float32"):
        BAMEAdamW([meta], fused=True, total_steps=30)
    with pytest.raises(ValueError, match=r"Invalid differentiable value: True \(BAMESGD"):
        BAMESGD([torch.nn.Parameter(torch.randn(4, 8))], lr=0.1, differentiable=True,
                total_steps=30)


@pytest.mark.skipif(not kept_adamw_cpu.available(), reason="no native kernel here")
def test_fused_true_steps_sparse_weights_on_the_native_kernel_like_the_eager_path():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    runs = {}
    for fused in (True, False):
        p = torch.nn.Parameter(weight.clone())
        opt = BAMEAdamW([{"params": [p], "sparse": True}], lr=1e-2, fused=fused, t_i=0, t_f=0,
                        betas=(torch.tensor(0.9), torch.tensor(0.99)))
        for step in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        runs[fused] = (p.detach(), opt.exp_avg_sq(p))
    # the moments agree bit for bit; the weights within torch's fused-vs-for-loop tolerance
    # (the eager path's MKL sqrt is not always correctly rounded: kernels/kept_adamw_cpu.py)
    assert torch.equal(runs[True][1], runs[False][1])
    torch.testing.assert_close(runs[True][0], runs[False][0])
    assert (runs[True][0] == 0).sum() == 8 * 16 // 2
