"""nm_param_groups: which parameters are sparse, decayed, or left alone."""

from __future__ import annotations

import warnings

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


class TinyAttention(nn.Module):
    """A stem, one self-attention layer and a classifier (the shape of a ViT block)."""

    def __init__(self, embed: int = 16, same_dim: bool = True) -> None:
        super().__init__()
        self.stem = nn.Linear(3, embed)
        kdim = None if same_dim else 8
        self.attn = nn.MultiheadAttention(embed, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(embed, 8) if not same_dim else None
        self.head = nn.Linear(embed, 4)
        self.same_dim = same_dim

    def forward(self, x):
        h = self.stem(x)
        kv = h if self.same_dim else self.kv(h)
        out, _ = self.attn(h, kv, kv, need_weights=False)
        return self.head(out.mean(1))


def test_multihead_attention_in_proj_is_sparse_like_a_linear_weight():
    model = TinyAttention()
    groups = nm_param_groups(model, 2, 4)
    sparse = [name for name, _ in groups[0]["params"]]
    assert sparse == ["attn.in_proj_weight", "attn.out_proj.weight"]
    opt = BAMESGD(groups, lr=0.1, momentum=0.9, t_i=0, t_f=0)
    x, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    in_proj = model.attn.in_proj_weight.detach()
    assert in_proj.shape == (48, 16)
    # 2 of every 4 consecutive inputs kept in every row of the packed Q, K, V projection
    assert ((in_proj.reshape(48, 4, 4) != 0).sum(-1) == 2).all()
    assert opt.kept_mask(model.attn.in_proj_weight).shape == (48 * 4, 4)
    # excluding the attention module keeps its in_proj dense; its out_proj is a separate Linear
    groups = nm_param_groups(model, 2, 4, exclude=["stem", "head", "attn"])
    assert [name for name, _ in groups[0]["params"]] == ["attn.out_proj.weight"]


def test_multihead_attention_with_separate_projections():
    model = TinyAttention(same_dim=False)
    groups = nm_param_groups(model, 2, 4)
    sparse = {name for name, _ in groups[0]["params"]}
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"} <= sparse


def test_depthwise_convs_stay_dense_quietly_and_one_warning_summarises_the_rest():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),  # stem
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise: weight [8, 1, 3, 3]
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 6, 3, groups=2),  # grouped: weight [6, 4, 3, 3], 4 inputs per group
        nn.Conv2d(6, 6, 3, groups=6),  # depthwise
        nn.Conv2d(6, 12, 1),  # 6 inputs: not divisible by 4
        nn.Conv2d(12, 12, 1, groups=6),  # grouped: weight [12, 2, 1, 1]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = nm_param_groups(model, 2, 4, exclude=["0"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("nm_param_groups: 2 weight(s)")
    assert "5.weight of shape (12, 6, 1, 1) stays dense" in message
    assert "6.weight of shape (12, 2, 1, 1) stays dense" in message
    assert "1.weight" not in message and "4.weight" not in message
    sparse = [name for name, _ in groups[0]["params"]]
    assert sparse == ["2.weight", "3.weight"]


def test_mobilenet_v2_gives_at_most_one_warning():
    pytest.importorskip("torchvision")
    from bame_optim.integrations.models import build_model

    model = build_model("mobilenet_v2", 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = nm_param_groups(model, 2, 4)
    assert len(caught) == 0  # every non-depthwise MobileNet-V2 layer has 4 | inputs
    depthwise = [n for n, p in model.named_parameters() if p.ndim == 4 and p.shape[1] == 1]
    assert len(depthwise) == 17
    assert not set(depthwise) & {name for name, _ in groups[0]["params"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nm_param_groups(model, 1, 16)  # 24-channel inputs do not divide by 16
    assert len(caught) == 1 and "m=16" in str(caught[0].message)
