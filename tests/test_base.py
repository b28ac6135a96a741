"""What every N:M optimizer shares (optim/base.py): it never trains dense without saying so,
and ``check_nm()`` cannot pass over nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, BAMEAdamW, nm_param_groups
from bame_optim.methods import make_optimizer


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _train(model: nn.Module, opt, steps: int) -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_model_whose_layers_are_all_excluded_warns_twice_naming_why():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # a stem and a head
    with pytest.warns(UserWarning, match="nm_param_groups: no weight is N:M sparse.*every "
                      r"eligible layer is excluded \(0, 2"):
        groups = nm_param_groups(model, 2, 4)
    with pytest.warns(UserWarning, match=r"BAMESGD: no parameter is N:M sparse \(every param "
                      r"group has sparse=False\), so it trains dense"):
        BAMESGD(groups, lr=0.1, total_steps=30)


@pytest.mark.parametrize("model, why", [
    (nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Conv2d(6, 6, 3)),
     "have an input dimension that m=4 does not divide"),
    (nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)), "no Linear, Conv1d/2d/3d"),
])
def test_nm_param_groups_says_why_nothing_is_sparse(model, why):
    with pytest.warns(UserWarning, match=f"no weight is N:M sparse.*{why}"):
        nm_param_groups(model, 2, 4)


def test_sparse_none_that_finds_nothing_warns():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.warns(UserWarning, match="sparse=None found no floating parameter.*m=4"):
        BAMEAdamW(model.parameters(), total_steps=30)


def test_sparse_none_says_it_chose_2d_axes_by_shape_alone():
    model = _mlp()
    with pytest.warns(UserWarning, match=r"sparse=None made 3 2-D parameter\(s\) N:M along "
                      r"dimension 1 by shape alone \(e.g. shape \(16, 8\)\).*Conv1D"):
        BAMEAdamW(model.parameters(), total_steps=30)
    with warnings.catch_warnings():  # convolutions are [out, in, *k] in torch: no guess
        warnings.simplefilter("error")
        conv = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
        BAMESGD(conv.parameters(), lr=0.1, total_steps=300, delta_t=10)
        BAMESGD(model.parameters(), lr=0.1, sparse=False)  # asked for dense: nothing to say


def test_check_nm_raises_on_nothing_sparse_and_on_the_gradual_phase():
    model = _mlp()
    opt = BAMESGD(model.parameters(), lr=0.1, sparse=False)
    with pytest.raises(RuntimeError, match="no parameter is N:M sparse, so there is nothing"):
        opt.check_nm()
    model = _mlp()
    opt = BAMESGD(nm_param_groups(model, 2, 4, exclude=()), lr=0.1, momentum=0.9,
                  total_steps=30, delta_t=2)
    _train(model, opt, 6)  # gradual phase: 3 of 4 kept
    with pytest.raises(RuntimeError, match=r"3 of 3 sparse parameter\(s\) are not N:M: 0.weight "
                       r"\(16, 8\) \(phase 'gradual' at step 6\).*finalize_masks\(\)"):
        opt.check_nm()
    opt.finalize_masks()
    assert opt.check_nm() == ["0.weight", "2.weight", "4.weight"]


def test_check_nm_catches_a_weight_written_behind_the_optimizer():
    model = _mlp()
    opt = make_optimizer("bame", nm_param_groups(model, 2, 4, exclude=()), lr=0.1,
                         total_steps=12, delta_t=1)
    _train(model, opt, 12)
    opt.check_nm()
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    with pytest.raises(RuntimeError, match=r"1 of 3 .*2.weight"):
        opt.check_nm()


def test_check_nm_is_on_the_peers_too():
    model = _mlp()
    opt = make_optimizer("srste", nm_param_groups(model, 2, 4, exclude=()), lr=0.1,
                         total_steps=12)
    _train(model, opt, 3)
    assert len(opt.check_nm()) == 3
