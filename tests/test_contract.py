"""One contract battery over every method of the registry (:data:`bame_optim.methods.METHODS`).

In the style of torch's optimizer test database (``torch/testing/_internal/common_optimizers.py``):
the methods and a few tables of configurations are the parameters; every test runs the same
tiny conv + linear model through :func:`make_optimizer` with the same keywords, on a 24-step
schedule (``delta_t = 2``, so ``t_i = 8`` and ``t_f = 16``) that passes through every phase:
gradual (0-7), prune (8), evolve (9-15), frozen (16-23).

1. bit-identical resume from a checkpoint taken in every phase (read back with
   ``torch.load(weights_only=True)`` into an optimizer built with other hyper-parameters), and
   under every SGD option;
2. ``load_state_dict`` keeps every state tensor's dtype (bfloat16 and float64 models);
3. dense parameters (excluded layers, 1-D and indivisible ones) follow :class:`torch.optim.SGD`
   or :class:`torch.optim.AdamW` bit for bit, with no mask state (a table of configs);
4. argument errors: ``ValueError`` naming the argument and value, ``TypeError`` for keywords a
   factory does not take, ``ValueError`` from ``make_optimizer`` for settings it cannot honour;
5. the N:M guarantee after every step and at the end of training;
6. registry consistency: FLOPs profiles, scheduled masks, attachments.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bame_optim import nm_param_groups
from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import is_nm_sparse, param_to_blocks
from bame_optim.flops import FlopsProfile, layer_flops, step_density_sums, training_flops_ratio
from bame_optim.methods import (
    ADAMW_KEYWORDS,
    CONTEXT_KEYWORDS,
    METHODS,
    SGD_KEYWORDS,
    accepted_keywords,
    inert_keywords,
    make_optimizer,
)
from bame_optim.optim.base import NMOptimizer
from bame_optim.optim.sgd import BAMESGD
from bame_optim.peers.bidir import BidirBAMESGD

from .peer_setups import save_and_load

# -- the run every test shares ---------------------------------------------------------------

N, M = 2, 4
TOTAL_STEPS, DELTA_T, T_I, T_F = 24, 2, 8, 16  # t_i, t_f: the defaults T // 3 and 2T // 3
INPUT_SHAPE = (4, 4, 4)
RUN = {"total_steps": TOTAL_STEPS, "delta_t": DELTA_T}
"""The same keywords for every method (``make_optimizer`` drops those a method does not take)."""
HYPER = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-3},
}
"""The same hyper-parameters for every method of one optimizer family (:attr:`Method.optimizer`)."""
DENSE_FACTORIES = (torch.optim.SGD, torch.optim.AdamW)

ALL_METHODS = list(METHODS)
SPARSE_METHODS = [name for name, record in METHODS.items() if record.factory not in DENSE_FACTORIES]
SGD_METHODS = [name for name, record in METHODS.items() if record.optimizer == "sgd"]
ADAMW_METHODS = [name for name, record in METHODS.items() if record.optimizer == "adamw"]
RESUME_POINTS = {3: "gradual", 8: "prune-next", 9: "evolve-first", 12: "evolve", 16: "frozen-first",
                 20: "frozen"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only spin (and compete with other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    return model.to(dtype)


def build_optimizer(
    method: str, model: nn.Module, *, n: int = N, m: int = M, attach: bool = True, **hyper: Any
):
    """``method``'s optimizer over ``model`` (every Linear/Conv weight sparse), attached to the
    model where the method needs it."""
    groups = nm_param_groups(model, n, m, exclude=())
    family = HYPER[METHODS[method].optimizer]
    opt = make_optimizer(method, groups, n=n, m=m, **RUN, **(family | hyper))
    record = METHODS[method]
    if attach and record.attach is not None:
        record.attach(model, opt)
    return opt


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The fixed data of step ``t``."""
    generator = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(2, *INPUT_SHAPE, generator=generator).to(dtype)
    y = torch.randint(0, 4, (2,), generator=generator)
    return x, y


def train_step(model: nn.Module, opt, t: int) -> None:
    x, y = batch(t, next(model.parameters()).dtype)
    opt.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()


def train(model: nn.Module, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        train_step(model, opt, t)


def sparse_params(opt) -> list[tuple[Tensor, dict[str, Any]]]:
    return [
        (p, group)
        for group in opt.param_groups
        for p in group["params"]
        if isinstance(opt, NMOptimizer) and opt._is_sparse(p, group)
    ]


def momentum_of(opt, p: Tensor) -> Tensor | None:
    if hasattr(opt, "momentum_buffer"):
        return opt.momentum_buffer(p)
    return opt.state.get(p, {}).get("momentum_buffer")


def assert_same_state(opt_a, opt_b) -> None:
    """Every state entry (tensors: dtype and value) and every group setting are equal."""
    saved_a, saved_b = opt_a.state_dict(), opt_b.state_dict()
    for group_a, group_b in zip(saved_a["param_groups"], saved_b["param_groups"], strict=True):
        differ = {k: (group_a.get(k, "<missing>"), group_b.get(k, "<missing>"))
                  for k in group_a.keys() | group_b.keys() if group_a.get(k) != group_b.get(k)}
        assert group_a.keys() == group_b.keys() and not differ, differ
    assert saved_a["state"].keys() == saved_b["state"].keys()
    for i, entries in saved_a["state"].items():
        other = saved_b["state"][i]
        assert entries.keys() == other.keys(), i
        for key, value in entries.items():
            if isinstance(value, Tensor):
                assert value.dtype == other[key].dtype, (i, key)
                assert torch.equal(value, other[key]), (i, key)
            else:
                assert value == other[key], (i, key)


OTHER_VALUES = {
    "sgd": {"lr": 1.0, "momentum": 0.5, "weight_decay": 0.0},
    "adamw": {"lr": 1.0, "weight_decay": 0.5, "betas": (0.5, 0.5), "eps": 1e-3},
    "method": {"alpha": 0.25, "beta": 0.25, "gamma": 0.5, "seed": 7, "zeta": 0.5,
               "srste_decay": 0.5, "score_lr": 9.0, "revive_score": "sgd"},
}
"""Valid values unlike the run's of the hyper-parameters a resumed optimizer may be built with."""


def other_hyper(method: str) -> dict[str, Any]:
    """Other values of every hyper-parameter ``method`` takes that a checkpoint holds (not the
    schedule, which the given keywords set, nor settings it fixes or makes inert)."""
    record = METHODS[method]
    usable = accepted_keywords(method) - set(record.fixed) - inert_keywords(method)
    return OTHER_VALUES[record.optimizer] | {
        k: v for k, v in OTHER_VALUES["method"].items() if k in usable
    }


# -- 1. bit-identical resume in every phase ----------------------------------------------------


@functools.cache
def uninterrupted_run(method: str) -> tuple[nn.Module, Any]:
    """The whole run of ``method``, once per module (read only)."""
    model = build_model()
    opt = build_optimizer(method, model)
    train(model, opt, 0, TOTAL_STEPS)
    return model, opt


@pytest.mark.parametrize("resume_at", RESUME_POINTS, ids=RESUME_POINTS.values())
@pytest.mark.parametrize("method", ALL_METHODS)
def test_resume_is_bit_identical(method, resume_at):
    model_a, opt_a = uninterrupted_run(method)

    model_b = build_model()
    opt_b = build_optimizer(method, model_b)
    train(model_b, opt_b, 0, resume_at)
    saved_model = copy.deepcopy(model_b.state_dict())
    saved_opt = copy.deepcopy(opt_b.state_dict())
    del model_b, opt_b

    model_c = build_model()
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(1.0)  # the model load, not the seed, must give the weights
    model_c.load_state_dict(saved_model)
    # A fresh optimizer with other hyper-parameters: everything but the schedule keywords it
    # is given (the same here; those win, test_safety.py) must come from the state dict, read
    # back as accelerate.utils.load does (torch.load with weights_only=True).
    opt_c = build_optimizer(method, model_c, attach=False, **other_hyper(method))
    opt_c.load_state_dict(save_and_load(saved_opt))
    if METHODS[method].attach is not None:
        METHODS[method].attach(model_c, opt_c)
    train(model_c, opt_c, resume_at, TOTAL_STEPS)

    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), name
        if hasattr(opt_a, "kept_mask"):
            mask_a, mask_c = opt_a.kept_mask(p), opt_c.kept_mask(q)
            assert (mask_a is None) == (mask_c is None), name
            if mask_a is not None:
                assert torch.equal(mask_a, mask_c), name
        buffer_a, buffer_c = momentum_of(opt_a, p), momentum_of(opt_c, q)
        assert (buffer_a is None) == (buffer_c is None), name
        if buffer_a is not None:
            assert torch.equal(buffer_a, buffer_c), name
    for group_a, group_c in zip(opt_a.param_groups, opt_c.param_groups, strict=True):
        assert group_a.get("step") == group_c.get("step")
    assert_same_state(opt_a, opt_c)


SGD_OPTIONS = {  # lr: maximize ascends the loss; the runs must stay finite to compare
    "nesterov_maximize": {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01,
                          "maximize": True},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1},
    "plain": {"lr": 0.1, "momentum": 0.0},
}


@pytest.mark.parametrize("options", SGD_OPTIONS.values(), ids=SGD_OPTIONS)
@pytest.mark.parametrize("method", SGD_METHODS)
def test_resume_is_bit_identical_under_every_sgd_option(method, options):
    """The resume of the battery with SGD's other options (Nesterov, maximize, dampening, no
    momentum), from a checkpoint in the evolve phase."""
    model_a = build_model()
    opt_a = build_optimizer(method, model_a, **options)
    train(model_a, opt_a, 0, TOTAL_STEPS)
    model_b = build_model()
    opt_b = build_optimizer(method, model_b, **options)
    train(model_b, opt_b, 0, 12)
    opt_c = build_optimizer(method, model_b, attach=False, **other_hyper(method))
    opt_c.load_state_dict(save_and_load(opt_b.state_dict()))
    if METHODS[method].attach is not None:
        METHODS[method].attach(model_b, opt_c)
    train(model_b, opt_c, 12, TOTAL_STEPS)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert p.isfinite().all()  # NaN would make the comparison vacuous
        assert torch.equal(p, q)
    assert_same_state(opt_a, opt_c)


def test_the_schedule_passes_through_every_phase():
    model = build_model()
    opt = build_optimizer("bame", model)
    group = opt.param_groups[0]
    assert (group["t_i"], group["t_f"], group["delta_t"]) == (T_I, T_F, DELTA_T)
    seen = []
    for t in range(TOTAL_STEPS):
        seen.append(opt.phase_name(group))
        train_step(model, opt, t)
    assert seen[2] == "gradual" and seen[T_I] == "prune"
    assert seen[10] == "evolve" and seen[T_F] == seen[-1] == "frozen"
    lbc = build_optimizer("lbc", build_model())
    assert lbc.param_groups[0]["t_f"] == T_F


# -- 2. load_state_dict keeps every state tensor's dtype ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_load_state_dict_keeps_dtypes(method, dtype):
    model = build_model(dtype)
    opt = build_optimizer(method, model)
    train(model, opt, 0, 12)  # evolve phase: every kind of state exists (oscillation, scores)
    before = opt.state_dict()["state"]
    dtypes = {(i, k): v.dtype for i, s in before.items() for k, v in s.items()
              if isinstance(v, Tensor)}
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    after = opt.state_dict()["state"]
    assert {(i, k): v.dtype for i, s in after.items() for k, v in s.items()
            if isinstance(v, Tensor)} == dtypes
    for i, entries in before.items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                assert torch.equal(value, after[i][key]), (i, key)

    params = [p for group in opt.param_groups for p in group["params"]]
    for (i, key), found in dtypes.items():
        expected = {
            "momentum_buffer": dtype,
            "exp_avg": dtype,
            "exp_avg_sq": dtype,
            "step": torch.float32,  # torch.optim.AdamW's counter
            "dense_weight": dtype,
            "oscillation": score_dtype(dtype),
            "scores": score_dtype(dtype),
            "mask": torch.bool,
            "remaining": torch.bool,
            "backward_mask": torch.bool,
        }.get(key)
        if key == "kept":
            assert not found.is_floating_point, (i, key, found)
        else:
            assert found == expected, (i, key, found)
        assert params[i].dtype == dtype
    if METHODS[method].factory not in DENSE_FACTORIES:
        kinds = {k for _, k in dtypes}
        buffers = {"momentum_buffer"} if METHODS[method].optimizer == "sgd" else {"exp_avg"}
        assert buffers < kinds
    for key in ("momentum_buffer", "exp_avg", "dense_weight", "scores"):  # not a trivial state
        assert all(after[i][key].any() for i in after if key in after[i]), key
    train(model, opt, 12, 14)  # and it still trains
    for p, group in sparse_params(opt):
        assert is_nm_sparse(p.detach(), group["n"], group["m"])


# -- 3. dense parameters equal torch.optim.SGD ------------------------------------------------

SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1},
    "maximize": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    "lr0": {"lr": 0.0, "momentum": 0.9, "weight_decay": 0.1},
    "foreach": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "foreach": True},
}


ADAMW_CONFIGS = {
    "plain": {"lr": 1e-2},
    "decay": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    "amsgrad": {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True},
    "maximize": {"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
    "lr0": {"lr": 0.0, "weight_decay": 0.1},
    "foreach": {"lr": 1e-2, "weight_decay": 0.01, "foreach": True, "amsgrad": True},
    "tensor_lr": {"lr": torch.tensor(1e-2), "weight_decay": 0.01},
}
DENSE_CASES = [(name, config) for name in SGD_METHODS for config in SGD_CONFIGS] + [
    (name, config) for name in ADAMW_METHODS for config in ADAMW_CONFIGS
]
STATES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


@pytest.mark.parametrize(("method", "config"), DENSE_CASES)
def test_dense_params_equal_torch(method, config):
    """Dense parameters follow torch.optim.SGD (SGD methods) or torch.optim.AdamW (AdamW
    methods) bit for bit: parameters and every state tensor."""
    adamw = METHODS[method].optimizer == "adamw"
    config = (ADAMW_CONFIGS if adamw else SGD_CONFIGS)[config]
    model = build_model()
    reference = copy.deepcopy(model)
    # the default exclusion keeps the stem and the classifier in a sparse=False group; with
    # sparse=None a weight whose input dimension does not divide by m, and a 1-D parameter,
    # stay dense too
    generator = torch.Generator().manual_seed(99)
    extra = [("extra.weight", torch.randn(4, 6, generator=generator).requires_grad_()),
             ("extra.bias", torch.randn(4, generator=generator).requires_grad_())]
    extra_ref = [(name, p.detach().clone().requires_grad_()) for name, p in extra]
    groups = [*nm_param_groups(model, N, M), {"params": extra, "sparse": None}]
    assert [g["sparse"] for g in groups] == [True, False, False, None]
    opt = make_optimizer(method, groups, n=N, m=M, **RUN, **config)
    ref_groups = [
        {k: v for k, v in g.items() if k != "sparse"}
        for g in nm_param_groups(reference, N, M)
        if not g["sparse"]
    ] + [{"params": extra_ref}]
    dense_names = {name for g in ref_groups for name, _ in g["params"]}
    ref = (torch.optim.AdamW if adamw else torch.optim.SGD)(ref_groups, **config)
    assert dense_names == {"0.weight", "0.bias", "3.bias", "5.weight", "5.bias", "extra.weight",
                           "extra.bias"}
    pairs = list(zip([*model.named_parameters(), *extra],
                     [*reference.parameters(), *(p for _, p in extra_ref)], strict=True))
    for t in range(6):
        generator = torch.Generator().manual_seed(t)
        for (_, p), q in pairs:
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for (name, p), q in pairs:
            if name not in dense_names:
                continue
            assert torch.equal(p, q), (t, name)
            assert set(opt.state.get(p, {})) <= set(STATES), (t, name)  # no mask state
            for key in STATES:
                found, expected = opt.state.get(p, {}).get(key), ref.state[q].get(key)
                assert (found is None) == (expected is None), (t, name, key)
                if expected is not None:
                    assert torch.equal(found, expected), (t, name, key)


# -- 4. argument errors -----------------------------------------------------------------------


def plain_groups(shape: tuple[int, ...] = (8, 8)) -> list[dict[str, Any]]:
    return [
        {"params": [torch.zeros(shape, requires_grad=True)], "sparse": True},
        {"params": [torch.zeros(8, requires_grad=True)], "sparse": False},
    ]


# (keywords, message of the N:M optimizers, message of torch.optim.SGD or None if unchecked)
BAD_SGD = {
    "lr": ({"lr": -0.1}, "Invalid lr value: -0.1", "Invalid learning rate: -0.1"),
    "momentum": ({"momentum": -0.5}, "Invalid momentum value: -0.5",
                 "Invalid momentum value: -0.5"),
    "weight_decay": ({"weight_decay": -0.01}, "Invalid weight_decay value: -0.01",
                     "Invalid weight_decay value: -0.01"),
    "dampening": ({"dampening": -0.1}, "Invalid dampening value: -0.1", None),
    "nesterov": ({"nesterov": True}, "Invalid nesterov value: True",
                 "Nesterov momentum requires a momentum"),
    "nesterov_dampening": ({"nesterov": True, "momentum": 0.9, "dampening": 0.1},
                           "Invalid nesterov value: True", "Nesterov momentum requires"),
}
BAD_NM = {
    "n_equals_m": ({"n": 4, "m": 4}, "Invalid n value: 4"),
    "n_above_m": ({"n": 5, "m": 4}, "Invalid n value: 5"),
    "n_zero": ({"n": 0}, "Invalid n value: 0"),
    "m_one": ({"n": 1, "m": 1}, "Invalid m value: 1"),
    "n_float": ({"n": 2.0}, "Invalid n value: 2.0"),
}
BAD_KEYWORD = {  # a keyword of some method and a bad value of it
    "alpha": 1.5, "beta": -0.1, "gamma": 1.0, "delta_t": 0, "seed": -1, "total_steps": -1,
    "t_i": -1, "t_f": -1, "srste_decay": -1.0, "score_lr": -1.0, "fused": "yes", "sparse": "yes",
    "zeta": 1.5, "t_end": -1, "revive_score": "sgd2", "sparsity_schedule": "sigmoid", "tau": 0.0,
}
ALL_KEYWORDS = frozenset().union(*(accepted_keywords(name) for name in METHODS))
SOME_VALUE = {  # a valid, non-default value of every keyword
    "n": 1, "m": 8, "sparse": True, "fused": False, "total_steps": 30, "t_i": 6, "t_f": 12,
    "delta_t": 3, "alpha": 0.25, "beta": 0.25, "gamma": 0.5, "seed": 3, "srste_decay": 1e-3,
    "score_lr": 0.05, "differentiable": True, "zeta": 0.5, "t_end": 10, "betas": (0.8, 0.99),
    "eps": 1e-6, "amsgrad": True, "capturable": True, "revive_score": "sgd", "momentum": 0.5,
    "dampening": 0.1, "nesterov": True, "sparsity_schedule": "cosine", "tau": 0.05,
}


BAD_ADAMW = {
    "lr": ({"lr": -0.1}, "Invalid lr value: -0.1", "Invalid learning rate: -0.1"),
    "eps": ({"eps": -1e-8}, "Invalid eps value: -1e-08", "Invalid epsilon value: -1e-08"),
    "weight_decay": ({"weight_decay": -0.01}, "Invalid weight_decay value: -0.01",
                     "Invalid weight_decay value: -0.01"),
    "beta1": ({"betas": (1.0, 0.999)}, "Invalid betas value: (1.0, 0.999)",
              "Invalid beta parameter at index 0: 1.0"),
    "beta2": ({"betas": (0.9, -0.1)}, "Invalid betas value: (0.9, -0.1)",
              "Invalid beta parameter at index 1: -0.1"),
}


@pytest.mark.parametrize("case", BAD_ADAMW.values(), ids=BAD_ADAMW)
@pytest.mark.parametrize("method", ADAMW_METHODS)
def test_bad_adamw_values_raise_naming_them(method, case):
    kwargs, message, torch_message = case
    if METHODS[method].factory is torch.optim.AdamW:
        message = torch_message
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(method, plain_groups(), **({"lr": 1e-3} | RUN | kwargs))
    if METHODS[method].factory is not torch.optim.AdamW:  # per-group values are checked too
        groups = plain_groups()
        groups[1].update(kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            make_optimizer(method, groups, lr=1e-3, **RUN)


@pytest.mark.parametrize("case", BAD_SGD.values(), ids=BAD_SGD)
@pytest.mark.parametrize("method", SGD_METHODS)
def test_bad_sgd_values_raise_naming_them(method, case):
    kwargs, message, torch_message = case
    if method == "dense":
        if torch_message is None:
            return  # torch.optim.SGD does not check it
        message = torch_message
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(method, plain_groups(), **({"lr": 0.1} | RUN | kwargs))
    if method != "dense":  # per-group values are checked too
        groups = plain_groups()
        groups[1].update(kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            make_optimizer(method, groups, lr=0.1, **RUN)


@pytest.mark.parametrize("case", BAD_NM.values(), ids=BAD_NM)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_bad_nm_pattern_raises_naming_it(method, case):
    kwargs, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(method, plain_groups(), lr=0.1, **(RUN | kwargs))


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_indivisible_sparse_group_raises_naming_the_shape(method):
    with pytest.raises(ValueError, match=re.escape("Invalid shape (4, 6) for m=4")):
        make_optimizer(method, plain_groups((4, 6)), lr=0.1, n=2, m=4, **RUN)
    # sparse=None leaves it dense instead
    groups = plain_groups((4, 6))
    groups[0]["sparse"] = None
    opt = make_optimizer(method, groups, lr=0.1, n=2, m=4, **RUN)
    assert not opt._is_sparse(groups[0]["params"][0], opt.param_groups[0])


@pytest.mark.parametrize(
    ("method", "keyword"),
    [(name, k) for name in ALL_METHODS for k in sorted(accepted_keywords(name))
     if k in BAD_KEYWORD and METHODS[name].factory not in DENSE_FACTORIES],  # torch: unchecked
)
def test_bad_method_keyword_raises_naming_it(method, keyword):
    value = BAD_KEYWORD[keyword]
    groups = [{"params": [torch.zeros(8, 8, requires_grad=True)]}]  # no group override
    with pytest.raises(ValueError, match=re.escape(f"Invalid {keyword} value: {value!r}")):
        make_optimizer(method, groups, lr=0.1, **(RUN | {keyword: value}))


@pytest.mark.parametrize(
    ("method", "keyword"),
    [(name, k) for name in ALL_METHODS for k in sorted(ALL_KEYWORDS - accepted_keywords(name))],
)
def test_factory_rejects_keywords_it_does_not_take(method, keyword):
    with pytest.raises(TypeError, match=re.escape(keyword)):
        METHODS[method].factory(plain_groups(), lr=0.1, **{keyword: SOME_VALUE[keyword]})


@pytest.mark.parametrize(
    ("method", "keyword"),
    [
        (name, k)
        for name in ALL_METHODS
        for k in sorted(ALL_KEYWORDS - accepted_keywords(name) - CONTEXT_KEYWORDS)
    ],
)
def test_make_optimizer_rejects_settings_a_method_cannot_honour(method, keyword):
    with pytest.raises(ValueError, match=re.escape(keyword)):
        make_optimizer(method, plain_groups(), lr=0.1, **{keyword: SOME_VALUE[keyword]})


@pytest.mark.parametrize("method", ALL_METHODS)
def test_make_optimizer_drops_context_and_default_keywords(method):
    """The same run keywords drive every method: context keywords and BAMESGD's default values
    of keywords a method does not take are dropped."""
    accepted = accepted_keywords(method)
    context = {"n": N, "m": M, "seed": 3, **RUN}
    defaults = {k: v for k, v in BAMESGD.rules.keywords.items()
                if k not in accepted and k not in CONTEXT_KEYWORDS}
    opt = make_optimizer(method, nm_param_groups(build_model(), N, M), lr=0.1, **context,
                         **defaults)
    assert type(opt) is METHODS[method].factory


def test_fixed_settings_cannot_be_contradicted_and_unknown_methods_raise():
    for name, record in METHODS.items():
        for key, value in record.fixed.items():
            assert key in accepted_keywords(name)
            other = 3 if isinstance(value, int) else 0.25
            with pytest.raises(ValueError, match=re.escape(f"Invalid {key} value: {other!r}")):
                make_optimizer(name, plain_groups(), lr=0.1, **(RUN | {key: other}))
    with pytest.raises(ValueError, match=re.escape("Invalid method value: 'nope'")):
        make_optimizer("nope", plain_groups(), lr=0.1)


# -- 5. the N:M guarantee ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)], ids=["2:4", "1:4"])
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_every_sparse_weight_ends_n_m(method, n, m):
    model = build_model()
    opt = build_optimizer(method, model, n=n, m=m)
    assert len(sparse_params(opt)) == 3
    for t in range(TOTAL_STEPS):
        train_step(model, opt, t)
        for p, group in sparse_params(opt):
            kept = opt.kept_mask(p)
            assert kept is not None and kept.dtype == torch.bool
            pruned = param_to_blocks(p.detach(), group["m"])[~kept]
            assert torch.equal(pruned, torch.zeros_like(pruned)), (t, tuple(p.shape))
    for p, group in sparse_params(opt):
        assert (group["n"], group["m"]) == (n, m)
        assert torch.isfinite(p).all()
        assert is_nm_sparse(p.detach(), n, m)
        assert (opt.kept_mask(p).sum(dim=1) == n).all()
    assert all(row["nm_valid"] for row in opt.sparsity_report() if row["sparse"])


# -- 6. registry consistency ------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_flops_profile_works_on_the_model(method):
    record = METHODS[method]
    assert record.name == method and isinstance(record.flops, FlopsProfile)
    family = SGD_KEYWORDS if record.optimizer == "sgd" else ADAMW_KEYWORDS
    assert accepted_keywords(method) >= family
    fixed = {k: v for k, v in record.fixed.items() if k in ("t_i", "t_f")}
    schedule = {"t_i": T_I, "t_f": T_F} | fixed
    ratio = training_flops_ratio(
        build_model(), INPUT_SHAPE, method, n=N, m=M, total_steps=TOTAL_STEPS, delta_t=DELTA_T,
        exclude=(), **schedule,
    )
    assert math.isfinite(ratio) and ratio > 0
    if record.flops is FlopsProfile.DENSE:
        assert ratio == 1.0
    elif record.flops is not FlopsProfile.PRETRAIN_FIXED:
        assert ratio < 1.0
    # a method whose masks may change at every step has a per-step profile, and back
    per_step = (FlopsProfile.STE, FlopsProfile.LBC, FlopsProfile.MAXQ)
    assert record.scheduled_masks == (record.flops not in per_step)


@pytest.mark.parametrize(
    "method",
    [name for name, r in METHODS.items()
     if r.flops in (FlopsProfile.SCHEDULED, FlopsProfile.SCHEDULED_BIDIR)],
)
def test_scheduled_flops_count_the_mask_in_force(method):
    """The forward density the FLOPs profile sums is the density of the mask in force."""
    model = build_model()
    opt = build_optimizer(method, model)
    p = sparse_params(opt)[0][0]
    measured = 0
    for t in range(TOTAL_STEPS):
        kept = opt.kept_mask(p)
        measured += 1 if kept is None else kept.float().mean().item()
        train_step(model, opt, t)
    forward, _, _ = step_density_sums(
        method, n=N, m=M, total_steps=TOTAL_STEPS, t_i=T_I, t_f=T_F, delta_t=DELTA_T
    )
    assert measured == pytest.approx(float(forward), abs=1e-9)
    layers = layer_flops(model, INPUT_SHAPE, n=N, m=M, exclude=())
    assert all(layer.sparse for layer in layers)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_masks_change_only_when_due(method):
    record = METHODS[method]
    model = build_model()
    opt = build_optimizer(method, model)
    changes, due = [], []
    for t in range(TOTAL_STEPS):
        before = []
        for p, group in sparse_params(opt):
            assert group["step"] == t
            kept = opt.kept_mask(p)
            before.append(torch.ones_like(param_to_blocks(p, group["m"]), dtype=torch.bool)
                          if kept is None else kept)
        train_step(model, opt, t)
        for (p, group), old in zip(sparse_params(opt), before, strict=True):
            due.append(opt.mask_update_due(group, t))
            if not torch.equal(opt.kept_mask(p), old):
                changes.append(t)
                assert opt.mask_update_due(group, t), (t, tuple(p.shape))
                last = opt.last_mask_update(group)
                assert last is None or t <= last
    assert changes
    if record.scheduled_masks:
        assert not all(due)
        assert all(opt.last_mask_update(g) is not None for _, g in sparse_params(opt))


def test_attach_is_given_exactly_to_the_bidirectional_method():
    for record in METHODS.values():
        factory = record.factory
        bidir = isinstance(factory, type) and issubclass(factory, BidirBAMESGD)
        assert (record.attach is not None) == bidir, record.name
    with pytest.raises(ValueError, match="Invalid optimizer value: BAMESGD"):
        METHODS["bame_bidir"].attach(build_model(), build_optimizer("bame", build_model()))


@pytest.mark.parametrize("method", [name for name, r in METHODS.items() if r.attach is not None])
def test_attach_is_used_and_its_absence_breaks_nothing(method):
    plain = build_model()
    opt = build_optimizer(method, plain, attach=False)
    train(plain, opt, 0, TOTAL_STEPS)
    for p, group in sparse_params(opt):
        assert torch.isfinite(p).all() and is_nm_sparse(p.detach(), group["n"], group["m"])
        assert "backward_mask" in opt.state[p]

    # with the same weights and masks, attaching changes the input gradient of the sparse layers
    attached = copy.deepcopy(plain)
    opt_attached = build_optimizer(method, attached, attach=False)
    opt_attached.load_state_dict(opt.state_dict())
    handles = METHODS[method].attach(attached, opt_attached)
    assert len(handles) == 3
    x, y = batch(TOTAL_STEPS)
    for net in (plain, attached):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
    assert torch.equal(plain[5].weight.grad, attached[5].weight.grad)  # dW is unchanged
    assert not torch.equal(plain[0].weight.grad, attached[0].weight.grad)  # dX upstream is not
