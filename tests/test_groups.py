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
    from bame_apps.integrations.models import build_model

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


# --- weight decay split for ViT / DeiT training (weight_decay=, no_weight_decay=) ---


class TokenNet(nn.Module):
    """A ViT-shaped toy with timm's ``no_weight_decay()`` convention; ``declare`` is what that
    method returns."""

    def __init__(self, declare: object = ("pos_embed", "cls_token")) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.reg_token = None  # an optional token switched off
        self.register_buffer("rel_index", torch.zeros(4, dtype=torch.long))
        self.stem = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.declare = declare

    def no_weight_decay(self) -> object:
        return self.declare


def _group_of(groups, name):
    """The flags (everything but ``params``) of the group holding parameter ``name``."""
    (found,) = [g for g in groups if name in [n for n, _ in g["params"]]]
    return {k: v for k, v in found.items() if k != "params"}


def _no_decay_names(groups):
    return {n for g in groups if g.get("weight_decay") == 0.0 for n, _ in g["params"]}


def test_weight_decay_none_keeps_the_old_groups_and_ignores_model_declarations():
    model = TokenNet()
    groups = nm_param_groups(model, 2, 4)
    assert [sorted(g) for g in groups] == [
        ["m", "n", "params", "sparse"],
        ["params", "sparse"],
        ["params", "sparse", "weight_decay"],
    ]
    # pos_embed and cls_token are 3-D: decayed by the optimizer's default, as before
    assert {"cls_token", "pos_embed"} <= {n for n, _ in groups[1]["params"]}
    assert _no_decay_names(groups) == {"stem.bias", "norm.weight", "norm.bias", "fc.bias",
                                       "head.bias"}


def test_weight_decay_splits_by_model_declaration_and_sets_every_group():
    model = TokenNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reg_token (None) and buffers are not typos
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    assert _group_of(groups, "fc.weight") == {"sparse": True, "n": 2, "m": 4,
                                              "weight_decay": 0.05}
    assert _group_of(groups, "head.weight") == {"sparse": False, "weight_decay": 0.05}
    assert _group_of(groups, "pos_embed") == {"sparse": False, "weight_decay": 0.0}
    assert _no_decay_names(groups) == {"cls_token", "pos_embed", "stem.bias", "norm.weight",
                                       "norm.bias", "fc.bias", "head.bias"}
    all_names = sorted(n for g in groups for n, _ in g["params"])
    assert all_names == sorted(n for n, _ in model.named_parameters())
    # weight_decay=0.0 is a request too: the split happens, every group says 0
    groups = nm_param_groups(model, 2, 4, weight_decay=0.0)
    assert all(g["weight_decay"] == 0.0 for g in groups)
    # no_decay_1d=False: only the declared names skip decay
    groups = nm_param_groups(model, 2, 4, weight_decay=0.1, no_decay_1d=False)
    assert _no_decay_names(groups) == {"cls_token", "pos_embed"}


def test_no_weight_decay_argument_patterns_and_sparse_weights_without_decay():
    model = TokenNet(declare=set())
    groups = nm_param_groups(model, 2, 4, no_weight_decay=["pos_*", "fc.weight"])
    # the argument applies even without weight_decay; sparsity is unchanged
    assert _group_of(groups, "fc.weight") == {"sparse": True, "n": 2, "m": 4,
                                              "weight_decay": 0.0}
    assert _group_of(groups, "pos_embed") == {"sparse": False, "weight_decay": 0.0}
    assert _group_of(groups, "cls_token") == {"sparse": False}
    with pytest.raises(ValueError, match=r"Invalid no_weight_decay value: 'pos_embedding'"):
        nm_param_groups(model, 2, 4, weight_decay=0.05, no_weight_decay="pos_embedding")


def test_declared_name_matching_no_parameter_warns_naming_it():
    model = TokenNet(declare={"pos_embed", "cls_tokn", "reg_token", "rel_index"})
    with pytest.warns(UserWarning, match=r"1 no_weight_decay name\(s\).*'cls_tokn' "
                                         r"\(no_weight_decay\(\) of TokenNet\)") as caught:
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    assert len(caught) == 1
    assert "cls_token" not in _no_decay_names(groups)  # the typo left it decayed
    assert "pos_embed" in _no_decay_names(groups)


def test_submodule_declarations_are_prefixed_and_bad_returns_raise():
    model = nn.Sequential(TokenNet(declare=["*_embed"]), nn.Linear(2, 2))
    groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    assert "0.pos_embed" in _no_decay_names(groups)
    assert "0.cls_token" not in _no_decay_names(groups)
    with pytest.raises(TypeError, match=r"no_weight_decay\(\) of TokenNet returned 3"):
        nm_param_groups(TokenNet(declare=3), 2, 4, weight_decay=0.05)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.05"])
def test_invalid_weight_decay_raises_naming_it(bad):
    with pytest.raises(ValueError, match=r"Invalid weight_decay value"):
        nm_param_groups(TokenNet(), 2, 4, weight_decay=bad)


def test_negative_weight_decay_message_names_the_value():
    with pytest.raises(ValueError, match=r"Invalid weight_decay value: -0\.1 "):
        nm_param_groups(TokenNet(), 2, 4, weight_decay=-0.1)


def _train_and_check_nm(model, groups, x, y, steps: int = 6):
    """BAMESGD over ``groups`` for ``steps`` steps (past ``t_i``); every sparse weight is N:M."""
    with warnings.catch_warnings():
        # 10 steps leave only 2 mask updates in the evolve window; fine for this check
        warnings.filterwarnings("ignore", message=r"BAMESGD: the evolve window")
        opt = BAMESGD(groups, lr=0.1, momentum=0.9, n=2, m=4, total_steps=10, delta_t=1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.param_groups[0]["step"] > opt.param_groups[0]["t_i"]
    rows = [row for row in opt.sparsity_report() if row["sparse"]]
    assert rows and all(row["nm_valid"] and row["density"] == 0.5 for row in rows)
    return opt


def test_timm_vit_groups_and_bamesgd_keep_nm():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install .[timm])")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        num_classes=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm lists reg_token / dist_token it may not have
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    sparse, dense, no_decay = groups
    assert sparse["sparse"] and sparse["weight_decay"] == 0.05
    assert [n for n, _ in sparse["params"]] == [
        f"blocks.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert [n for n, _ in dense["params"]] == ["patch_embed.proj.weight", "head.weight"]
    assert dense == dense | {"sparse": False, "weight_decay": 0.05}
    assert no_decay["weight_decay"] == 0.0
    names = {n for n, _ in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.weight"} <= names
    assert all(n.endswith(("bias", "weight")) or n in {"pos_embed", "cls_token"} for n in names)
    assert {n for n, p in model.named_parameters() if p.ndim <= 1} <= names
    # the groups suit torch's AdamW too (DeiT's optimizer); extra keys are kept
    adamw = torch.optim.AdamW(nm_param_groups(model, 2, 4, weight_decay=0.05), lr=1e-3)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.05, 0.0]
    opt = _train_and_check_nm(model, groups, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert opt.param_groups[0]["param_names"][0] == "blocks.0.attn.qkv.weight"


def test_timm_distilled_deit_dist_token_gets_no_decay():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install .[timm])")
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
        depth=1, num_classes=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    assert {"pos_embed", "cls_token", "dist_token"} <= _no_decay_names(groups)


def test_torchvision_vit_class_token_and_pos_embedding_get_no_decay():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = nm_param_groups(model, 2, 4, weight_decay=0.05)
    assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight"} <= _no_decay_names(
        groups
    )
    assert _group_of(groups, "encoder.layers.encoder_layer_0.self_attention.in_proj_weight") == {
        "sparse": True, "n": 2, "m": 4, "weight_decay": 0.05,
    }
    assert _group_of(groups, "conv_proj.weight") == {"sparse": False, "weight_decay": 0.05}
    # without weight_decay the old groups: the 3-D tokens are left to the optimizer's default
    assert "class_token" not in _no_decay_names(nm_param_groups(model, 2, 4))
    _train_and_check_nm(model, groups, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
