"""BAMESGD against the float64 reference (:class:`bame_optim.reference.ReferenceBAME`), the
invariants of docs/design.md section 5, resume, edge steps and errors."""

from __future__ import annotations

import copy
import io
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import BAMESGD
from bame_optim.core.nm import blocks_to_param, param_to_blocks
from bame_optim.reference import ReferenceBAME
from bame_optim.reference.evolution import gradual_budget as budget

from .strategies import SGD_CONFIGS, examples, nm_patterns


@st.composite
def sparse_setups(draw):
    """Shapes (Linear, Conv1d, Conv2d), an N:M pattern, a schedule and a seed."""
    n, m = draw(nm_patterns)
    layouts = [(4, 2 * m), (3, m, 3), (2, m, 2, 2)]
    shapes = draw(st.lists(st.sampled_from(layouts), min_size=1, max_size=3))
    total = draw(st.integers(8, 30))
    t_i = draw(st.integers(0, total))
    t_f = draw(st.integers(t_i, total))
    delta_t = draw(st.integers(1, 6))
    return {
        "n": n,
        "m": m,
        "shapes": shapes,
        "total": total,
        "t_i": t_i,
        "t_f": t_f,
        "delta_t": delta_t,
        "alpha": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        "beta": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
        "momentum": draw(st.sampled_from([0.0, 0.9])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
    }


def _make(setup, dtype=torch.float64):
    gen = torch.Generator().manual_seed(setup["seed"])
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in setup["shapes"]]


def _grads(params, step, seed):
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _lr(step: int, total: int) -> float:
    return 0.05 * (1 + math.cos(math.pi * step / total)) / 2  # a cosine schedule


def _optimizer(params, setup, **overrides):
    kwargs = {
        "lr": 0.05,
        "momentum": setup["momentum"],
        "weight_decay": setup["weight_decay"],
        "n": setup["n"],
        "m": setup["m"],
        "t_i": setup["t_i"],
        "t_f": setup["t_f"],
        "delta_t": setup["delta_t"],
        "alpha": setup["alpha"],
        "beta": setup["beta"],
        "seed": setup["seed"],
        "sparse": True,
        "total_steps": setup["total"],
        **overrides,
    }
    return BAMESGD(params, **kwargs)


@examples(40)
@given(sparse_setups())
def test_matches_reference_loop_in_float64(setup):
    ours = _make(setup)
    theirs = [p.detach().clone() for p in ours]
    opt = _optimizer(ours, setup)
    ref = ReferenceBAME(
        theirs,
        n=setup["n"],
        m=setup["m"],
        t_i=setup["t_i"],
        t_f=setup["t_f"],
        delta_t=setup["delta_t"],
        alpha=setup["alpha"],
        beta=setup["beta"],
        momentum=setup["momentum"],
        weight_decay=setup["weight_decay"],
        seed=setup["seed"],
    )
    for step in range(setup["total"] + 3):
        lr = _lr(step, setup["total"])
        opt.param_groups[0]["lr"] = lr  # what an LR scheduler does: Eq. 5 must see it
        grads = _grads(ours, step, setup["seed"])
        for p, g in zip(ours, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, lr)
        # The EMA lives from the first evolve-phase update until the mask is fixed.
        t_i, t_f, delta_t = setup["t_i"], setup["t_f"], setup["delta_t"]
        evolved = any(t_i < s <= step and s % delta_t == 0 for s in range(t_f))
        for i, p in enumerate(ours):
            state = opt.state[p]
            assert torch.equal(opt.kept_mask(p), ref.masks[i]), f"mask {i} differs at {step}"
            torch.testing.assert_close(p.detach(), theirs[i])
            assert ("oscillation" in state) == (evolved and step < t_f), step
            if "oscillation" in state:
                torch.testing.assert_close(state["oscillation"], ref.oscillation[i])
            if setup["momentum"]:
                torch.testing.assert_close(opt.momentum_buffer(p), ref.buffers[i])
                compact = (ref.masks[i].shape[0], state["kept_count"])
                assert state["momentum_buffer"].shape == compact, "momentum of kept weights only"
    assert opt.param_groups[0]["step"] == setup["total"] + 3


@examples(40)
@given(sparse_setups())
def test_invariants_after_every_step(setup):
    params = _make(setup, dtype=torch.float32)
    opt = _optimizer(params, setup)
    n, m, t_i, t_f, delta_t = (setup[k] for k in ("n", "m", "t_i", "t_f", "delta_t"))
    last_budget = m
    previous = None
    for step in range(setup["total"] + 3):
        for p, g in zip(params, _grads(params, step, setup["seed"]), strict=True):
            p.grad = g
        opt.step()
        update = step == t_i or (step < t_f and step % delta_t == 0)
        if update:
            last_budget = budget(step, n, m, t_i)
        masks = [opt.kept_mask(p) for p in params]
        for p, mask in zip(params, masks, strict=True):
            assert mask.dtype == torch.bool
            assert (p.detach()[~blocks_to_param(mask, p.shape)] == 0).all(), "pruned weight != 0"
            kept_per_block = mask.sum(dim=1)
            assert (kept_per_block == last_budget).all()
            if step >= t_i:
                assert last_budget == n
            assert opt.state[p]["last_frozen"] <= math.floor(setup["beta"] * mask.shape[0])
        if previous is not None and not update:
            for old, new in zip(previous, masks, strict=True):
                assert torch.equal(old, new), f"mask changed at non-update step {step}"
        if previous is not None and step >= t_f and step != t_i:
            assert all(torch.equal(a, b) for a, b in zip(previous, masks, strict=True))
        previous = masks


def _train(params, opt, steps, seed, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(params, step, seed), strict=True):
            p.grad = g.to(p.dtype)
        opt.step()


@examples(25)
@given(sparse_setups(), st.data())
def test_resume_from_state_dict_is_bit_identical(setup, data):
    split = data.draw(st.integers(0, setup["total"]))
    whole = _make(setup, dtype=torch.float32)
    resumed = [p.detach().clone().requires_grad_() for p in whole]
    opt = _optimizer(whole, setup)
    _train(whole, opt, setup["total"] + 2, setup["seed"])

    first = _optimizer(resumed, setup)
    _train(resumed, first, split, setup["seed"])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what accelerate.utils.load does
    # A fresh optimizer with other hyper-parameters: everything but the schedule keywords it
    # is given (those win, tests/test_safety.py) must come from the state dict.
    second = BAMESGD(resumed, lr=1.0, n=setup["n"], m=setup["m"], t_i=setup["t_i"],
                     t_f=setup["t_f"])
    second.load_state_dict(saved)
    _train(resumed, second, setup["total"] + 2 - split, setup["seed"], start=split)

    assert second.param_groups[0]["step"] == opt.param_groups[0]["step"]
    for p, q in zip(whole, resumed, strict=True):
        assert torch.equal(p, q)
        a, b = opt.state[p], second.state[q]
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype, key
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def test_load_state_dict_keeps_dtypes_for_half_precision_params():
    p = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    opt = BAMESGD([p], lr=0.1, momentum=0.9, n=1, m=4, t_i=1, t_f=10, delta_t=1)
    _train([p], opt, 4, seed=0)
    oscillation = opt.state[p]["oscillation"].clone()
    assert oscillation.dtype == torch.float32 and oscillation.any()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # Accelerator.prepare's round trip
    assert opt.state[p]["kept"].dtype == torch.uint8
    assert opt.state[p]["oscillation"].dtype == torch.float32
    assert torch.equal(opt.state[p]["oscillation"], oscillation)
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


def test_static_start_is_seeded_and_independent_of_global_rng():
    def mask_after_first_step(seed, global_seed):
        torch.manual_seed(global_seed)
        p = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        opt = BAMESGD([p], lr=0.1, n=2, m=4, t_i=0, t_f=0, seed=seed)
        p.grad = torch.ones_like(p)
        opt.step()
        return opt.kept_mask(p)

    a = mask_after_first_step(seed=1, global_seed=0)
    assert torch.equal(a, mask_after_first_step(seed=1, global_seed=123))
    assert not torch.equal(a, mask_after_first_step(seed=2, global_seed=0))
    assert (a.sum(dim=1) == 2).all()


def test_static_mask_never_changes():
    p = torch.randn(8, 16, requires_grad=True)
    opt = BAMESGD([p], lr=0.1, momentum=0.9, n=1, m=8, t_i=0, t_f=0, delta_t=1)
    _train([p], opt, 1, seed=0)
    first = opt.kept_mask(p)
    _train([p], opt, 20, seed=0, start=1)
    assert torch.equal(opt.kept_mask(p), first)


def test_nan_gradient_skips_mask_evolution_with_a_warning_but_updates_like_sgd():
    p = torch.randn(4, 8, requires_grad=True)
    q = torch.randn(4, 8, requires_grad=True)
    opt = BAMESGD([p, q], lr=0.1, n=1, m=4, t_i=0, t_f=10, delta_t=1, alpha=0.0)
    _train([p, q], opt, 2, seed=0)
    before = opt.kept_mask(p)
    other = opt.kept_mask(q)
    grad = torch.randn(4, 8)
    grad[0, 0] = float("nan")
    grad[1, 1] = float("inf")
    p.grad, q.grad = grad, torch.randn(4, 8) * 100
    expected = p.detach() - 0.1 * torch.where(blocks_to_param(before, p.shape), grad, 0.0)
    with pytest.warns(RuntimeWarning, match=r"parameter 0 \(shape \(4, 8\)\).*NaN or Inf"):
        opt.step()
    assert torch.equal(opt.kept_mask(p), before)
    torch.testing.assert_close(p.detach(), expected, equal_nan=True)
    assert not torch.equal(opt.kept_mask(q), other), "the healthy parameter still evolves"


def test_step_with_no_gradients_does_nothing():
    p = torch.randn(4, 8, requires_grad=True)
    opt = BAMESGD([p], lr=0.1, n=1, m=4, t_i=0, t_f=0)
    before = p.detach().clone()
    assert opt.step() is None
    assert opt.param_groups[0]["step"] == 0
    assert torch.equal(p, before)
    assert len(opt.state) == 0


def test_state_initialising_call_of_distributed_checkpoint_leaves_schedule_and_masks():
    p = torch.randn(4, 8, requires_grad=True)
    opt = BAMESGD([p], lr=0.0, momentum=0.9, n=1, m=4, t_i=0, t_f=0)
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.param_groups[0]["step"] == 0
    assert torch.equal(p, before)
    assert opt.kept_mask(p).all(), "no mask was drawn"
    assert "momentum_buffer" in opt.state[p]


def test_ordinary_lr_zero_step_advances_schedule():
    p = torch.randn(4, 8, requires_grad=True)
    opt = BAMESGD([p], lr=0.0, n=1, m=4, t_i=0, t_f=0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.param_groups[0]["step"] == 1
    assert (opt.kept_mask(p).sum(dim=1) == 1).all()


def test_closure_and_lr_scheduler_and_zero_grad():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, n=2, m=4, total_steps=30, delta_t=5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            losses.append(opt.step(closure).item())
            sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["step"] == 30
    sparse = [p for p in model.parameters() if p.ndim == 2]
    for p in sparse:
        assert (param_to_blocks(p.detach(), 4) != 0).sum(dim=1).le(2).all()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_group_overrides_and_dense_group():
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 16, requires_grad=True)
    c = torch.randn(4, 8, requires_grad=True)
    opt = BAMESGD(
        [
            {"params": [a]},
            {"params": [b], "n": 1, "m": 16, "t_i": 0},
            {"params": [c], "sparse": False},
        ],
        lr=0.1,
        n=2,
        m=4,
        total_steps=30,
    )
    _train([a, b, c], opt, 11, seed=0)
    assert opt.param_groups[0]["t_i"] == 10 and opt.param_groups[0]["t_f"] == 20
    assert (opt.kept_mask(a).sum(dim=1) == 2).all()
    assert (opt.kept_mask(b).sum(dim=1) == 1).all()
    assert opt.kept_mask(c) is None and "kept" not in opt.state[c]
    assert (c != 0).all()


def test_sparsity_report():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    from bame_optim import nm_param_groups

    opt = BAMESGD(nm_param_groups(model, 1, 4, exclude=()), lr=0.1, t_i=0, t_f=10, delta_t=2)
    params = list(model.parameters())
    _train(params, opt, 3, seed=0)
    report = {row["name"]: row for row in opt.sparsity_report()}
    assert set(report) == {"0.weight", "1.weight", "0.bias", "1.bias"}
    row = report["0.weight"]
    assert row["sparse"] and row["nm_valid"] and row["density"] == 0.25
    assert row["blocks"] == 32 and row["phase"] == "evolve" and row["step"] == 3
    assert 0 <= row["flips"] <= 2 * 32 and 0 <= row["frozen_blocks"] <= 16
    assert report["0.bias"]["sparse"] is False and report["0.bias"]["nm_valid"] is None
    flips = sum(r["flips"] for r in report.values())
    assert flips > 0, "LMA on random gradients moves some weights"


BAD_ARGUMENTS = [
    ({"n": 4, "m": 4}, "n", "4"),
    ({"n": 0, "m": 4}, "n", "0"),
    ({"n": 1, "m": 1}, "m", "1"),
    ({"lr": -0.1}, "lr", "-0.1"),
    ({"momentum": -0.5}, "momentum", "-0.5"),
    ({"weight_decay": -1.0}, "weight_decay", "-1.0"),
    ({"t_i": 20, "t_f": 10}, "t_i", "20"),
    ({"t_f": 200}, "t_f", "200"),
    ({"alpha": 1.5}, "alpha", "1.5"),
    ({"beta": -0.1}, "beta", "-0.1"),
    ({"gamma": 1.0}, "gamma", "1.0"),
    ({"delta_t": 0}, "delta_t", "0"),
    ({"total_steps": None}, "total_steps", "None"),
    ({"nesterov": True}, "nesterov", "True"),
    ({"sparse": "yes"}, "sparse", "yes"),
]


@pytest.mark.parametrize(("kwargs", "name", "value"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, value):
    kwargs = {"lr": 0.1, "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=rf"Invalid {name} value: '?{value}"):
        BAMESGD([torch.randn(4, 8, requires_grad=True)], **kwargs)


def test_explicit_sparse_group_rejects_indivisible_and_integer_params():
    with pytest.raises(ValueError, match=r"shape \(4, 6\)"):
        BAMESGD([torch.randn(4, 6, requires_grad=True)], sparse=True, total_steps=10)
    with pytest.raises(ValueError, match=r"ndim >= 2"):
        BAMESGD([torch.randn(8, requires_grad=True)], sparse=True, total_steps=10)
    with pytest.raises(ValueError, match=r"dense floating-point"):
        BAMESGD([torch.zeros(4, 8, dtype=torch.int64)], sparse=True, total_steps=10)
    with pytest.raises(ValueError, match=r"Invalid m value"):
        BAMESGD([{"params": [torch.randn(4, 8, requires_grad=True)], "m": 1}], total_steps=10)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'srste_decay'"):
        BAMESGD([torch.randn(4, 8, requires_grad=True)], total_steps=10, srste_decay=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("foreach", [False, True])
def test_ordinary_cuda_steps_read_nothing_back_and_match_the_cpu(foreach):
    def run(device: str, sync_check: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.randn(32, 64, generator=gen).to(device).requires_grad_(),
            torch.randn(16, 32, 3, 3, generator=gen).to(device).requires_grad_(),
            torch.randn(32, generator=gen).to(device).requires_grad_(),
        ]
        opt = BAMESGD(
            [{"params": params[:2]}, {"params": params[2:], "sparse": False}],
            lr=0.1, momentum=0.9, weight_decay=5e-4, n=1, m=16, t_i=0, t_f=0, foreach=foreach,
        )  # fmt: skip
        grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params] for _ in range(6)]
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g
            if sync_check and step >= 1:  # step 0 draws the mask; the rest are ordinary steps
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [p.detach().cpu() for p in params]

    on_cuda = run("cuda", sync_check=True)
    for a, b in zip(on_cuda, run("cpu", sync_check=False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


SHAPES = [(8, 16), (16,), (4, 8, 3), (6, 4, 2, 2)]


def _sgd_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _sgd_grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


@pytest.mark.parametrize(
    ("config", "foreach", "dtype"),
    list(itertools.product(SGD_CONFIGS, [False, True], [torch.float32, torch.float64])),
)
def test_dense_groups_equal_torch_sgd(config, foreach, dtype):
    ours = _sgd_params(dtype)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = BAMESGD(ours, sparse=False, foreach=foreach, total_steps=10, **config)
    ref = torch.optim.SGD(theirs, foreach=foreach, **config)
    for step in range(6):
        for p, q, g in zip(ours, theirs, _sgd_grads(ours, step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            mine, expected = (
                opt.state[p].get("momentum_buffer"),
                ref.state[q].get("momentum_buffer"),
            )
            if expected is None:
                assert mine is None
            else:
                torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_auto_sparse_leaves_1d_and_indivisible_params_as_torch_sgd():
    weight = torch.randn(4, 6, requires_grad=True)  # 6 % 4 != 0: dense under sparse=None
    bias = torch.randn(4, requires_grad=True)
    ref = [weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    opt = BAMESGD([weight, bias], lr=0.1, momentum=0.9, n=2, m=4, total_steps=10)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for step in range(4):
        for p, q, g in zip([weight, bias], ref, _sgd_grads([weight, bias], step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(weight, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(bias, ref[1], rtol=0, atol=0)
    assert "kept" not in opt.state[weight]
