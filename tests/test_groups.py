"""nm_param_groups: which parameters are sparse, decayed, or left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.groups import default_exclude


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.odd = nn.Conv2d(32, 6, 1)
        self.mix = nn.Conv2d(6, 6, 1)  # 6 input channels: not divisible by 4
        self.up = nn.ConvTranspose2d(6, 8, 2)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.mix(self.odd(self.conv(torch.relu(self.bn(self.stem(x))))))
        x = self.up(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.proj(x)))


def _names(groups):
    return [[name for name, _ in g["params"]] for g in groups]


def test_default_keeps_stem_and_classifier_dense():
    model = SmallCNN()
    assert default_exclude(model) == ["stem", "head"]
    with pytest.warns(UserWarning, match=r"mix.weight of shape \(6, 6, 1, 1\) stays dense"):
        groups = nm_param_groups(model, 2, 4)
    sparse, dense, no_decay = groups
    assert sparse["sparse"] and sparse["n"] == 2 and sparse["m"] == 4
    assert [n for n, _ in sparse["params"]] == ["conv.weight", "odd.weight", "proj.weight"]
    assert [n for n, _ in dense["params"]] == [
        "stem.weight",
        "mix.weight",
        "up.weight",
        "head.weight",
    ]
    assert dense["sparse"] is False and "weight_decay" not in dense
    assert no_decay["weight_decay"] == 0.0
    assert {n for n, _ in no_decay["params"]} == {
        "stem.bias",
        "bn.weight",
        "bn.bias",
        "odd.bias",
        "mix.bias",
        "up.bias",
        "proj.bias",
        "head.bias",
    }
    # every parameter exactly once
    all_names = [n for g in _names(groups) for n in g]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())


def test_exclude_patterns_and_empty_exclude():
    model = SmallCNN()
    with pytest.warns(UserWarning):
        groups = nm_param_groups(model, 1, 4, exclude=())
    # stem (3 input channels) and mix (6) are not divisible by 4: dense, with warnings
    expected = ["conv.weight", "odd.weight", "proj.weight", "head.weight"]
    assert [n for n, _ in groups[0]["params"]] == expected
    with pytest.warns(UserWarning):
        groups = nm_param_groups(model, 1, 4, exclude="pro*")
    assert "proj.weight" not in [n for n, _ in groups[0]["params"]]


def test_no_decay_1d_false_puts_biases_with_decay():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    groups = nm_param_groups(model, 2, 4, no_decay_1d=False)
    assert len(groups) == 2
    assert "1.bias" in [n for n, _ in groups[1]["params"]]


def test_errors_name_the_argument():
    model = SmallCNN()
    with pytest.raises(ValueError, match=r"Invalid exclude value: 'nope'"):
        nm_param_groups(model, 2, 4, exclude=["nope"])
    with pytest.raises(ValueError, match=r"Invalid n value: 4"):
        nm_param_groups(model, 4, 4)


def test_groups_drive_bamesgd_and_weight_decay_skips_1d():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 4))
    opt = BAMESGD(nm_param_groups(model, 1, 4), lr=0.1, weight_decay=0.5, t_i=0, t_f=0)
    norm_before = model[1].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[0].weight.grad = None
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert torch.equal(model[1].weight, norm_before), "norm weights get no decay"
    assert (model[2].weight != 0).sum() == 16 * 16 // 4
    assert opt.param_groups[0]["param_names"] == ["2.weight"]
