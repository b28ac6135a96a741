"""The update-rule records (:mod:`bame_optim.optim.update_rule`) and the signatures that name
them: each optimizer's explicit signature agrees with its records, and what a class says it
takes (``accepted_keywords()``) is what its constructor takes."""

from __future__ import annotations

import inspect

import pytest
import torch

from bame_optim.methods import METHODS
from bame_optim.optim.adamw import ADAMW_RULE, BAMEAdamW
from bame_optim.optim.base import NM_KEYWORDS
from bame_optim.optim.masked import MaskedOptimizer
from bame_optim.optim.rules import RULE_KEYWORDS
from bame_optim.optim.sgd import ASPSGD, BAMESGD, SGD_RULE, RigLSGD
from bame_optim.peers.bidir import BidirBAMESGD

CLASSES = (BAMESGD, RigLSGD, ASPSGD, BAMEAdamW, BidirBAMESGD)


def _signature(cls: type) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "params")}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_signature_names_every_keyword_of_the_records_with_their_defaults(cls):
    signature = _signature(cls)
    rule = cls.update_rule
    assert set(rule.defaults) | NM_KEYWORDS <= set(signature)
    for name, default in rule.defaults.items():
        assert signature[name].default == default, name
    # the rest are rule keywords, None meaning "the rules' default"
    rest = set(signature) - set(rule.defaults) - NM_KEYWORDS
    assert rest <= set(RULE_KEYWORDS)
    assert all(signature[name].default is None for name in rest)
    assert set(cls.rules.keywords) <= rest


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_accepted_keywords_are_taken_and_the_others_of_the_signature_refused(cls):
    accepted = cls.accepted_keywords()
    assert accepted <= set(_signature(cls))
    p = torch.zeros(4, 8, requires_grad=True)
    schedule = {"total_steps": 30, "delta_t": 1} if "total_steps" in accepted else {}
    schedule["sparse"] = True
    cls([p], **schedule)  # builds
    refused = sorted(set(_signature(cls)) - accepted)  # rule keywords these rules lack
    assert refused or cls is BAMEAdamW
    for name in refused:
        with pytest.raises(TypeError, match=rf"does not use the keywords \['{name}'\]"):
            cls([p], **schedule, **{name: 1})


def test_engine_and_dense_class_follow_the_update_rule():
    assert BAMESGD.engine.buffers == SGD_RULE.buffers == ("momentum_buffer",)
    assert BAMEAdamW.engine.buffers == ADAMW_RULE.buffers
    assert BAMESGD.dense_class is torch.optim.SGD and BAMEAdamW.dense_class is torch.optim.AdamW
    assert RigLSGD.engine is BAMESGD.engine  # a class naming no record of its own inherits


def test_every_engine_method_of_the_registry_names_both_records():
    for method in METHODS.values():
        factory = method.factory
        if isinstance(factory, type) and issubclass(factory, MaskedOptimizer):
            assert factory.update_rule is not None and factory.rules is not None, method.name
