"""MaxQ against a float64 reference (the soft mask on both axes under every ramp, and the
optimizer step by step), its schedule and FLOPs, N:M at the end, resume, export and errors."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from bame_optim import nm_param_groups
from bame_optim.core.nm import is_nm_sparse
from bame_optim.flops import step_density_sums, training_flops_ratio
from bame_optim.methods import make_optimizer
from bame_optim.peers.maxq import (
    DEFAULT_TAU,
    SCHEDULES,
    MaxQSGD,
    dense_block_count,
    dense_block_schedule,
    dense_block_sum,
    filter_query,
    incremental_mask,
    kernel_query,
    maxq_weight,
    soft_scale,
)
from bame_optim.peers.srste import DEFAULT_SRSTE_DECAY
from bame_optim.reference.evolution import to_blocks, to_param
from bame_optim.reference.peers import sgd_step

from .peer_setups import (
    assert_follows_reference,
    assert_same_entries,
    dense_setups,
    make_params,
    save_and_load,
    seeded_grads,
    sgd_kwargs,
)
from .strategies import nm_patterns

TAUS = [DEFAULT_TAU, 0.5, 2.0]
DECAYS = [0.0, DEFAULT_SRSTE_DECAY, 0.5]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only spin (and compete with other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the float64 reference, written out ---------------------------------------------------------


def reference_share(schedule: str, t: int, t_i: int) -> float:
    """p(t): the share of blocks kept whole at the forward of step t."""
    if t >= t_i:
        return 0.0
    u = t / t_i
    return {
        "linear": 1 - u,
        "cosine": math.cos(math.pi / 2 * u),
        "exponential": 1 - (1 - math.exp(-1.5 * u)) / (1 - math.exp(-1.5)),
        "cubic": (1 - u) ** 3,
    }[schedule]


def reference_whole_blocks(schedule: str, t: int, t_i: int, k: int) -> int:
    """floor(p(t) K), exactly for the polynomial ramps."""
    if t >= t_i:
        return 0
    if schedule == "linear":
        return (t_i - t) * k // t_i
    if schedule == "cubic":
        return (t_i - t) ** 3 * k // t_i**3
    return math.floor(reference_share(schedule, t, t_i) * k)


def reference_block_mask(weight, old, n: int, m: int, whole: int):
    """Top-n |w| per block (ties: the kept weight, then the lower index), and the `whole`
    blocks of smallest L1 norm (ties: the lower block) kept whole."""
    blocks = to_blocks(weight, m)
    new = torch.zeros_like(old)
    for k in range(blocks.shape[0]):
        order = sorted(range(m), key=lambda j: (-abs(float(blocks[k, j])), not bool(old[k, j]), j))
        new[k, order[:n]] = True
    norms = [sum(abs(float(x)) for x in blocks[k]) for k in range(blocks.shape[0])]
    for k in sorted(range(len(norms)), key=lambda k: (norms[k], k))[:whole]:
        new[k] = True
    return new


def reference_row(row: list[float], n: int, m: int, tau: float) -> list[float]:
    """One axis row: the top L - floor((M - N) L / M) magnitudes (ties: lower index) get
    sigmoid((|w| - theta) / tau), theta halfway between the last kept and the first dropped."""
    length = len(row)
    keep = length - (m - n) * length // m
    ranking = sorted(range(length), key=lambda j: (-row[j], j))
    theta = (row[ranking[keep - 1]] + row[ranking[keep]]) / 2
    top = set(ranking[:keep])
    return [1 / (1 + math.exp(-(row[j] - theta) / tau)) if j in top else 0.0
            for j in range(length)]


def reference_scale(weight, n: int, m: int, tau: float):
    """1 + S_filter + S_kernel, one row at a time."""
    out, cin = weight.shape[:2]
    positions = math.prod(weight.shape[2:])
    magnitude = weight.abs().reshape(out, cin, positions)
    filters = torch.zeros(out, cin, positions, dtype=torch.float64)
    for o in range(out):
        row = reference_row(magnitude[o].reshape(-1).tolist(), n, m, tau)
        filters[o] = torch.tensor(row, dtype=torch.float64).reshape(cin, positions)
    scale = 1 + filters
    if weight.ndim > 2 and positions > 1:
        kernel = torch.zeros_like(filters)
        for pos in range(positions):
            row = reference_row(magnitude[:, :, pos].reshape(-1).tolist(), n, m, tau)
            kernel[:, :, pos] = torch.tensor(row, dtype=torch.float64).reshape(out, cin)
        scale = scale + kernel
    return scale.reshape(weight.shape)


def reference_forward(weight, mask, n: int, m: int, tau: float):
    return weight * to_param(mask, weight.shape).double() * reference_scale(weight, n, m, tau)


class ReferenceMaxQ:
    """MaxQ on float64 dense weights, written out per step."""

    def __init__(self, params, *, n, m, t_i, schedule, tau, decay, setup):
        self.n, self.m, self.t_i, self.schedule = n, m, t_i, schedule
        self.tau, self.decay = tau, decay
        self.hyper = sgd_kwargs(setup)
        self.maximize = setup["maximize"]
        self.weights = [p.detach().clone() for p in params]
        self.masks = [torch.ones(p.numel() // m, m, dtype=torch.bool) for p in params]
        self.buffers = [None] * len(params)
        self.t = 0

    def step(self, grads, lr):
        for i, (w, g) in enumerate(zip(self.weights, grads, strict=True)):
            pruned = ~to_param(self.masks[i], w.shape)
            direction = (-g if self.maximize else g) + self.decay * pruned.double() * w
            self.weights[i], self.buffers[i] = sgd_step(
                w, direction, self.buffers[i], lr=lr, **self.hyper
            )
            whole = reference_whole_blocks(self.schedule, self.t + 1, self.t_i,
                                           self.masks[i].shape[0])
            self.masks[i] = reference_block_mask(self.weights[i], self.masks[i], self.n, self.m,
                                                 whole)
        self.t += 1

    def param(self, i):
        return reference_forward(self.weights[i], self.masks[i], self.n, self.m, self.tau)


# -- the soft mask against the reference --------------------------------------------------------

LAYOUTS = {  # (out, in multiple of m, *kernel): Linear, Conv1d, Conv2d 3x3, 1x1, a wider 3x3
    "linear": (4, 2), "conv1d": (3, 1, 3), "conv3x3": (2, 1, 3, 3), "conv1x1": (3, 1, 1, 1),
    "wide3x3": (3, 2, 3, 3),
}


@settings(max_examples=60, deadline=None)
@given(nm_patterns, st.sampled_from(list(LAYOUTS)), st.sampled_from(SCHEDULES),
       st.integers(0, 9), st.integers(0, 12), st.sampled_from(TAUS), st.booleans(),
       st.integers(0, 2**16))
def test_soft_mask_matches_float64_reference(pattern, layout, schedule, t_i, t, tau, ties, seed):
    n, m = pattern
    out, multiple, *kernel = LAYOUTS[layout]
    shape = (out, multiple * m, *kernel)
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes: every ranking meets ties
        weight = torch.randint(-3, 4, shape, generator=gen).double()
    else:
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    k = weight.numel() // m
    old = torch.rand(k, m, generator=gen).argsort(dim=1) < n
    whole = dense_block_count(t, t_i, k, schedule)
    assert whole == reference_whole_blocks(schedule, t, t_i, k)
    mask = incremental_mask(to_blocks(weight, m), old, n, whole)
    assert torch.equal(mask, reference_block_mask(weight, old, n, m, whole))
    assert (mask.sum(dim=1) == m).sum() >= whole and (mask.sum(dim=1) >= n).all()
    torch.testing.assert_close(soft_scale(weight, n, m, tau), reference_scale(weight, n, m, tau))
    got = maxq_weight(weight, mask, n, m, tau)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_forward(weight, mask, n, m, tau))
    # the kernel axis exists for a kernel of more than one position only
    has_kernel = math.prod(kernel) > 1
    scale = soft_scale(weight, n, m, tau)
    assert scale.max() <= (3 if has_kernel else 2) and scale.min() >= 1


def test_each_axis_queries_the_share_n_over_m_of_its_rows():
    weight = torch.randn(8, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    filters, kernel = filter_query(weight, 1, 4, 0.1), kernel_query(weight, 1, 4, 0.1)
    # a quarter of each filter (144 weights) and of each kernel position (128 weights)
    assert ((filters > 0).reshape(8, -1).sum(dim=1) == 36).all()
    assert ((kernel > 0).reshape(8 * 16, 9).sum(dim=0) == 32).all()
    assert filters.min() == kernel.min() == 0 and filters[filters > 0].min() >= 0.5
    assert kernel_query(weight.reshape(8, 144), 1, 4, 0.1) is None  # a Linear: filters only
    assert kernel_query(weight[:, :, :1, :1], 1, 4, 0.1) is None  # one kernel position


# -- the ramp ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("t_i", [0, 1, 7, 120])
def test_ramp_runs_from_all_blocks_whole_to_none(schedule, t_i):
    p = dense_block_schedule(schedule, t_i)
    values = [p(t) for t in range(t_i + 3)]
    for t, value in enumerate(values):
        assert value == pytest.approx(reference_share(schedule, t, t_i), rel=1e-15, abs=1e-15)
    if t_i:
        assert values[0] == 1
    assert all(v == 0 for v in values[t_i:])
    assert all(a >= b for a, b in itertools.pairwise(values))
    if schedule in ("linear", "cubic"):
        assert all(isinstance(v, Fraction) for v in values)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("total", "t_i"), [(1, 0), (10, 0), (10, 1), (10, 4), (10, 10),
                                            (7, 7), (300, 75), (301, 120)])
def test_ramp_sum_is_the_step_sum(schedule, total, t_i):
    expected = [reference_share(schedule, t, t_i) for t in range(1, total)]
    got = dense_block_sum(total, t_i, schedule)
    if schedule in ("linear", "cubic"):
        p = dense_block_schedule(schedule, t_i)
        assert got == sum((p(t) for t in range(1, total)), Fraction(0))
    assert float(got) == pytest.approx(math.fsum(expected), rel=1e-12, abs=1e-12)


# -- the optimizer against the reference ------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(dense_setups(), st.sampled_from(SCHEDULES), st.sampled_from(DECAYS),
       st.sampled_from(TAUS), st.data())
def test_matches_float64_reference_step_by_step(setup, schedule, decay, tau, data):
    params = make_params(setup)
    total = setup["steps"] + 2
    t_i = data.draw(st.integers(0, total))
    opt = MaxQSGD(params, lr=0.05, n=setup["n"], m=setup["m"], total_steps=total, t_i=t_i,
                  sparsity_schedule=schedule, tau=tau, srste_decay=decay,
                  maximize=setup["maximize"], **sgd_kwargs(setup))
    ref = ReferenceMaxQ(params, n=setup["n"], m=setup["m"], t_i=t_i, schedule=schedule, tau=tau,
                        decay=decay, setup=setup)
    assert_follows_reference(opt, ref, params, setup)


# -- a model: the ramp, N:M at the end, finalize, FLOPs -----------------------------------------


def conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4),
    )


def train(model, opt, start, stop):
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(4, 4, 4, 4, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def build(model, n=2, m=4, **kwargs):
    return make_optimizer("maxq", nm_param_groups(model, n, m, exclude=()), lr=0.1,
                          momentum=0.9, n=n, m=m, **kwargs)


def sparse_params(opt):
    return [p for g in opt.param_groups for p in g["params"] if opt._is_sparse(p, g)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ramp_reaches_n_m_at_t_i_and_the_parameter_is_the_folded_weight(schedule):
    model = conv_model()
    opt = build(model, total_steps=24, sparsity_schedule=schedule)
    t_i = opt.param_groups[0]["t_i"]
    assert t_i == 6  # total_steps // 4
    train(model, opt, 0, 1)
    with pytest.raises(RuntimeError, match="not N:M"):
        opt.check_nm()
    train(model, opt, 1, t_i)  # the mask written by step t_i - 1 is the forward of step t_i
    assert opt.check_nm() == ["0.weight", "3.weight", "7.weight", "9.weight"]
    for step in range(t_i, 30):  # past total_steps: still N:M
        train(model, opt, step, step + 1)
        assert opt.phase_name(opt.param_groups[0]) == "evolve"
        for p in sparse_params(opt):
            state = opt.state[p]
            assert (state["mask"].sum(dim=1) == 2).all() and is_nm_sparse(p.detach(), 2, 4)
            assert torch.equal(p.detach(), maxq_weight(state["dense_weight"], state["mask"], 2, 4,
                                                       DEFAULT_TAU))
    assert opt.check_finished()
    assert all(row["nm_valid"] and row["density"] == 0.5
               for row in opt.sparsity_report() if row["sparse"])


def test_finalize_masks_prunes_a_run_that_stopped_early():
    model = conv_model()
    opt = build(model, total_steps=100)
    train(model, opt, 0, 5)
    assert opt.phase_name(opt.param_groups[0]) == "gradual"
    with pytest.warns(UserWarning, match="before t_i=25 .*finalize_masks"):
        assert opt.check_finished() is False
    opt.finalize_masks()
    assert opt.param_groups[0]["t_i"] == 5 and opt.check_finished()
    opt.check_nm()
    train(model, opt, 5, 8)
    opt.check_nm()


def test_a_new_optimizer_over_exported_weights_scales_them_again():
    """The documented hazard: the exported weight has its scales folded in, and a new MaxQ run
    takes it as the dense weight (resume from the optimizer's state dict instead)."""
    model = conv_model()
    opt = build(model, total_steps=12)
    train(model, opt, 0, 12)
    exported = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = build(model, total_steps=12, t_i=0)
    fresh.param_groups[0]["lr"] = 0.0  # W stays the exported weight
    train(model, fresh, 12, 13)
    weight = model[0].weight.detach()
    assert torch.equal(fresh.state[model[0].weight]["dense_weight"], exported["0.weight"])
    assert torch.equal(weight != 0, exported["0.weight"] != 0)  # the same N:M mask
    assert not torch.equal(weight, exported["0.weight"])  # but scaled once more
    assert (weight.abs() >= exported["0.weight"].abs()).all()


def test_forward_flops_count_the_blocks_kept_whole():
    """The profile's forward density is the mask's, up to the whole blocks floor() drops
    (less than one block per layer and step); without a ramp it is SR-STE's."""
    model = conv_model()
    opt = build(model, total_steps=40, t_i=16)
    probe = model[3].weight  # 1x1 conv: 16 blocks
    blocks = probe.numel() // 4
    measured = 0.0
    for t in range(40):
        mask = opt.kept_mask(probe)
        measured += 1.0 if mask is None else mask.double().mean().item()
        train(model, opt, t, t + 1)
    forward, input_grad, weight_grad = step_density_sums("maxq", n=2, m=4, total_steps=40,
                                                         t_i=16)
    assert input_grad == weight_grad == 40
    assert 0 <= float(forward) - measured < (1 - 0.5) * 15 / blocks
    ramp = dense_block_sum(40, 16, "linear")
    assert forward == 1 + Fraction(1, 2) * 39 + Fraction(1, 2) * ramp
    # no ramp: SR-STE's count, except the first forward, which runs the parameter as given
    no_ramp = step_density_sums("maxq", n=2, m=4, total_steps=40, t_i=0)
    srste = step_density_sums("srste", n=2, m=4, total_steps=40)
    assert no_ramp == (srste[0] + Fraction(1, 2), *srste[1:])
    flat = training_flops_ratio(model, (4, 4, 4), "maxq", n=2, m=4, total_steps=40, t_i=0,
                                exclude=())
    ratios = [training_flops_ratio(model, (4, 4, 4), "maxq", n=2, m=4, total_steps=40, t_i=16,
                                   exclude=(), sparsity_schedule=s) for s in SCHEDULES]
    cubic, linear, exponential, cosine = (ratios[SCHEDULES.index(s)] for s in
                                          ("cubic", "linear", "exponential", "cosine"))
    assert flat < cubic < exponential < linear < cosine < 1
    with pytest.raises(ValueError, match="Invalid sparsity_schedule value: 'linear'"):
        step_density_sums("srste", n=2, m=4, total_steps=40, sparsity_schedule="linear")


# -- resume ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(dense_setups(), st.sampled_from(SCHEDULES), st.data())
def test_resume_from_state_dict_is_bit_identical(setup, schedule, data):
    total = setup["steps"] + 2
    split = data.draw(st.integers(0, total + 2))
    kwargs = dict(lr=0.05, n=setup["n"], m=setup["m"], total_steps=total, t_i=total // 2,
                  sparsity_schedule=schedule, **sgd_kwargs(setup))
    whole = make_params(setup, dtype=torch.float32)
    resumed = [p.detach().clone().requires_grad_() for p in whole]

    def run(params, opt, start, stop):
        for step in range(start, stop):
            for p, g in zip(params, seeded_grads(setup["shapes"], step, 5), strict=True):
                p.grad = g.float()
            opt.step()

    opt = MaxQSGD(whole, **kwargs)
    run(whole, opt, 0, total + 2)  # past total_steps too
    first = MaxQSGD(resumed, **kwargs)
    run(resumed, first, 0, split)
    # A fresh optimizer with other settings: everything comes from the state dict.
    second = MaxQSGD(resumed, lr=1.0, n=setup["n"], m=setup["m"], total_steps=99,
                     sparsity_schedule="cubic", tau=0.5)
    second.load_state_dict(save_and_load(first.state_dict()))
    run(resumed, second, split, total + 2)
    group = second.param_groups[0]
    assert (group["t_i"], group["sparsity_schedule"], group["tau"]) == (
        total // 2, schedule, DEFAULT_TAU)
    for p, q in zip(whole, resumed, strict=True):
        assert torch.equal(p, q)
        assert_same_entries(opt.state[p], second.state[q])


# -- errors ------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ({"sparsity_schedule": "sigmoid"}, "sparsity_schedule", "'sigmoid'"),
    ({"sparsity_schedule": "cos"}, "sparsity_schedule", "'cos'"),
    ({"tau": 0.0}, "tau", "0.0"),
    ({"tau": -1.0}, "tau", "-1.0"),
    ({"tau": float("nan")}, "tau", "nan"),
    ({"tau": True}, "tau", "True"),
    ({"srste_decay": -1.0}, "srste_decay", "-1.0"),
    ({"srste_decay": "big"}, "srste_decay", "'big'"),
    ({"t_i": -1}, "t_i", "-1"),
    ({"t_i": 2.5}, "t_i", "2.5"),
    ({"t_i": 13}, "t_i", "13"),
    ({"total_steps": -4}, "total_steps", "-4"),
    ({"total_steps": None}, "total_steps", "None"),
    ({"n": 4, "m": 4}, "n", "4"),
    ({"lr": -0.1}, "lr", "-0.1"),
]


@pytest.mark.parametrize(("kwargs", "name", "value"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, value):
    base = {"lr": 0.1, "total_steps": 12}
    with pytest.raises(ValueError, match=rf"Invalid {name} value: {value}"):
        MaxQSGD([torch.randn(4, 8, requires_grad=True)], **(base | kwargs))
    if name in ("sparsity_schedule", "tau", "t_i"):  # a group override is validated too
        group = {"params": [torch.randn(4, 8, requires_grad=True)], **kwargs}
        with pytest.raises(ValueError, match=rf"Invalid {name} value"):
            MaxQSGD([group], **base)


def test_ramp_functions_name_bad_arguments():
    with pytest.raises(ValueError, match="Invalid sparsity_schedule value: 'step'"):
        dense_block_schedule("step", 10)
    with pytest.raises(ValueError, match="Invalid t_i value: -2"):
        dense_block_schedule("linear", -2)
    with pytest.raises(ValueError, match="Invalid sparsity_schedule value: None"):
        dense_block_sum(8, 2, None)
    with pytest.raises(ValueError, match="Invalid sparsity_schedule value: 'cos'"):
        training_flops_ratio(conv_model(), (4, 4, 4), "maxq", n=2, m=4, total_steps=8,
                             sparsity_schedule="cos")
    with pytest.raises(ValueError, match="Invalid t_i value: 9"):
        training_flops_ratio(conv_model(), (4, 4, 4), "maxq", n=2, m=4, total_steps=8, t_i=9)


@pytest.mark.parametrize("name", ["t_f", "delta_t", "alpha", "beta", "gamma", "seed", "score_lr"])
def test_bame_keywords_are_not_taken(name):
    with pytest.raises(TypeError, match=rf"unexpected keyword arguments: \['{name}'\]"):
        MaxQSGD([torch.randn(4, 8, requires_grad=True)], lr=0.1, total_steps=12, **{name: 5})


def test_trains_with_a_closure_and_an_lr_scheduler():
    model = conv_model()
    x, y = torch.randn(32, 4, 4, 4), torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build(model, total_steps=40)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(40):
        losses.append(opt.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.check_finished()
