"""The contract battery (test_contract.py), part 4: argument errors: ``ValueError`` naming the
argument and value, ``TypeError`` for keywords a factory does not take, ``ValueError`` from
``make_optimizer`` for settings it cannot honour."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from bame_optim import nm_param_groups
from bame_optim.methods import (
    CONTEXT_KEYWORDS,
    METHODS,
    accepted_keywords,
    make_optimizer,
)
from bame_optim.optim.sgd import BAMESGD

from .contract import (
    ADAMW_METHODS,
    ALL_METHODS,
    DENSE_FACTORIES,
    RUN,
    SGD_METHODS,
    SPARSE_METHODS,
    M,
    N,
    build_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


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
