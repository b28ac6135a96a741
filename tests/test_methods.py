"""make_optimizer: every method trains the same groups and keeps its invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bame_optim import nm_param_groups
from bame_optim.core.nm import is_nm_sparse
from bame_optim.methods import METHODS, make_optimizer
from bame_optim.optim.base import NMOptimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_ends_n_m_sparse(method):
    model = _model()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    if METHODS[method].optimizer == "sgd":
        kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    else:
        kwargs = {"lr": 1e-2, "weight_decay": 1e-3}
    if METHODS[method].factory not in (torch.optim.SGD, torch.optim.AdamW):
        kwargs |= {"n": 1, "m": 4, "total_steps": 30, "delta_t": 3}
    opt = make_optimizer(method, nm_param_groups(model, 1, 4), **kwargs)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    middle = model[2].weight.detach()
    if METHODS[method].factory in (torch.optim.SGD, torch.optim.AdamW):
        assert type(opt) is METHODS[method].factory and (middle != 0).all()
    else:
        assert isinstance(opt, NMOptimizer)
        assert is_nm_sparse(middle, 1, 4)
        assert (model[0].weight != 0).all(), "the stem stays dense"


def test_dense_equals_torch_sgd_on_the_same_groups():
    a, b = _model(), _model()
    opt = make_optimizer(
        "dense",
        nm_param_groups(a, 2, 4),
        lr=0.1,
        momentum=0.9,
        weight_decay=0.1,
        n=2,
        m=4,
        total_steps=5,
    )
    ref = torch.optim.SGD(
        [
            {"params": [p for n, p in b.named_parameters() if p.ndim > 1]},
            {"params": [p for n, p in b.named_parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.1,
    )
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, o in ((a, opt), (b, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fixed_settings_and_unknown_method():
    params = [torch.randn(4, 8, requires_grad=True)]
    assert make_optimizer("static", params, total_steps=10).param_groups[0]["t_f"] == 0
    assert make_optimizer("lma", params, total_steps=10).param_groups[0]["alpha"] == 0.0
    with pytest.raises(ValueError, match=r"Invalid t_i value: 3 \(static fixes t_i=0\)"):
        make_optimizer("static", params, t_i=3, total_steps=10)
    with pytest.raises(ValueError, match=r"Invalid method value: 'adam'"):
        make_optimizer("adam", params)
