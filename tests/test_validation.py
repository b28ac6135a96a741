"""``bame_optim.core.validation``: every check accepts what it promises and names the argument,
the value and the reason of anything else, through the error factory it is given."""

from __future__ import annotations

import math
import re

import pytest
import torch

from bame_optim.core.validation import (
    check_adamw_hyper,
    check_fraction,
    check_int,
    check_nonnegative,
    check_one_of,
    check_real_in,
    check_sgd_hyper,
    invalid,
    is_int,
    is_real,
)


class Custom(ValueError):
    def __init__(self, name, value, reason):
        super().__init__(name, value, reason)
        self.parts = (name, value, reason)


def message(name, value, reason):
    return re.escape(f"Invalid {name} value: {value!r} ({reason})")


def test_predicates_exclude_bools():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_real(3) and is_real(2.5) and is_real(math.nan) and not is_real(False)
    assert not is_real("1") and not is_real(torch.tensor(1.0))


def test_invalid_formats_the_one_message():
    error = invalid("lr", -1.0, "why")
    assert type(error) is ValueError and str(error) == "Invalid lr value: -1.0 (why)"


@pytest.mark.parametrize("value", [0, 1, 7])
def test_check_int_accepts_and_returns(value):
    assert check_int("steps", value, 0) == value
    assert check_int("steps", None, 5, optional=True) is None


@pytest.mark.parametrize("value", [-1, 2.0, True, None, "3"])
def test_check_int_rejects(value):
    with pytest.raises(ValueError, match=message("steps", value, "an integer >= 0 is required")):
        check_int("steps", value, 0)


@pytest.mark.parametrize(("value", "one", "ok"), [
    (0, True, True), (1, True, True), (0.5, False, True), (1, False, False), (1.5, True, False),
    (-0.1, True, False), (math.nan, True, False), (True, True, False), ("0.5", True, False),
])  # fmt: skip
def test_check_fraction(value, one, ok):
    if ok:
        check_fraction("alpha", value, one=one)
        return
    reason = "must be in [0, 1]" if one else "must be in [0, 1)"
    with pytest.raises(ValueError, match=message("alpha", value, reason)):
        check_fraction("alpha", value, one=one)


@pytest.mark.parametrize(("value", "finite", "tensor", "ok"), [
    (0.0, True, False, True), (3, True, False, True), (math.inf, True, False, False),
    (math.inf, False, False, True), (math.nan, False, False, False), (-1e-9, False, False, False),
    (torch.tensor(0.1), False, True, True), (torch.tensor(0.1), False, False, False),
    (torch.tensor(-0.1), False, True, False), (False, True, False, False),
])  # fmt: skip
def test_check_nonnegative(value, finite, tensor, ok):
    if ok:
        check_nonnegative("decay", value, finite=finite, tensor=tensor)
        return
    with pytest.raises(ValueError, match=r"Invalid decay value: .* \(a float >= 0 is required\)"):
        check_nonnegative("decay", value, finite=finite, tensor=tensor)


def test_check_real_in_and_one_of_and_custom_errors():
    check_real_in("p", 0.0, 0.0, 1.0)
    check_real_in("p", 1.0, 0.0, 1.0, high_open=False)
    with pytest.raises(Custom) as info:
        check_real_in("p", 1.0, 0.0, 1.0, error=Custom)
    assert info.value.parts == ("p", 1.0, "a finite number 0.0 <= value < 1.0 is required")
    with pytest.raises(ValueError, match=message("p", math.inf, "a finite number 0.0 <= value "
                                                 "<= inf is required")):
        check_real_in("p", math.inf, 0.0, math.inf, high_open=False)
    check_one_of("kind", "b", ("a", "b"))
    check_one_of("kind", None, ("a",), optional=True)
    with pytest.raises(Custom) as info:
        check_one_of("kind", "c", ("a", "b"), error=Custom)
    assert info.value.parts == ("kind", "c", "one of a, b is required")
    with pytest.raises(Custom):
        check_int("n", 0, 1, error=Custom)
    with pytest.raises(Custom):
        check_fraction("n", 2, error=Custom)


SGD = {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "foreach": None}


@pytest.mark.parametrize(("change", "match"), [
    ({"lr": -0.1}, "Invalid lr value: -0.1 (a float >= 0 is required)"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Invalid lr value: a Tensor lr must be one floating"),
    ({"momentum": math.nan}, "Invalid momentum value: nan"),
    ({"dampening": "x"}, "Invalid dampening value: 'x'"),
    ({"nesterov": True}, "Invalid nesterov value: True (Nesterov momentum requires a momentum"),
])  # fmt: skip
def test_check_sgd_hyper(change, match):
    check_sgd_hyper(dict(SGD, lr=torch.tensor(0.1), weight_decay=math.inf))  # as torch.optim.SGD
    with pytest.raises(ValueError, match=re.escape(match)):
        check_sgd_hyper(SGD | change)


@pytest.mark.parametrize(("change", "match"), [
    ({"lr": torch.tensor(1e-3), "foreach": True}, "Invalid foreach value: True"),
    ({"eps": -1.0}, "Invalid eps value: -1.0"),
    ({"betas": (0.9,)}, "Invalid betas value: (0.9,)"),
    ({"betas": (0.9, 1.0)}, "Invalid betas value: (0.9, 1.0)"),
    ({"betas": (torch.tensor([0.9, 0.9]), 0.9)}, "Invalid betas value"),
])  # fmt: skip
def test_check_adamw_hyper(change, match):
    group = dict(ADAMW, betas=[0, torch.tensor(0.5)])
    check_adamw_hyper(group)
    assert group["betas"][0] == 0.0 and type(group["betas"][0]) is float
    assert isinstance(group["betas"], tuple) and torch.is_tensor(group["betas"][1])
    with pytest.raises(ValueError, match=re.escape(match)):
        check_adamw_hyper(ADAMW | change)
