"""``bame_optim.flops``: per-layer FLOPs written out by hand, profiles in exact arithmetic, the
closed-form schedule sums against step-by-step loops and against BAMESGD's own masks."""

from __future__ import annotations

import contextlib
import doctest
import io
import itertools
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bame_apps.integrations.models import resnet32
from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.schedule import Phase, gradual_budget, is_update_step, phase
from bame_optim.flops import breakdown as flops_breakdown_module
from bame_optim.flops import (
    flops_breakdown,
    layer_flops,
    lbc_union_bounds,
    step_density_sums,
    training_flops_ratio,
)
from bame_optim.flops import layers as flops_layers
from bame_optim.flops import profiles as flops_profiles
from bame_optim.methods import METHODS as REGISTRY
from bame_optim.peers.lbc import LBCSGD, remaining_count

from .strategies import examples

PATTERNS = [(2, 4), (1, 4), (1, 16)]
METHODS = [*REGISTRY, "bimask"]  # every method of the registry, and Bi-Mask's profile
SPARSE_METHODS = [method for method in METHODS if method not in ("dense", "dense_adamw", "asp")]


def only(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, int, int, bool]]:
    return {
        layer.name: (layer.forward, layer.input_grad, layer.weight_grad, layer.sparse)
        for layer in layer_flops(model, shape)
    }


def all_sparse_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def ratio(model: nn.Module, shape, method: str, n: int, m: int, **kwargs) -> Fraction:
    layers = layer_flops(model, shape, n=n, m=m, exclude=kwargs.pop("exclude", None))
    return flops_breakdown(layers, method, n=n, m=m, **kwargs)["ratio_exact"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Everything here is tiny: intra-op threads only cost time on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return resnet32()


@pytest.fixture(scope="module")
def resnet_layers(resnet) -> dict[tuple[int, int], list]:
    """ResNet-32's layers for every pattern, computed once (one forward each)."""
    return {(n, m): layer_flops(resnet, (3, 32, 32), n=n, m=m) for n, m in [*PATTERNS, (1, 8)]}


# ------------------------------------------------------------------- per-layer FLOPs by hand


def test_linear_flops_by_hand():
    # forward 2 * in * out = 2 * 5 * 7 = 70 per sample, the same for dX and dW
    assert only(nn.Linear(5, 7), (5,)) == {"": (70, 70, 70, False)}
    # 3 tokens per sample: 2 * 3 * 5 * 7 = 210
    assert only(nn.Linear(5, 7), (3, 5)) == {"": (210, 210, 210, False)}


def test_conv2d_flops_by_hand():
    # 3x10x10 -> 8x5x5 (stride 2, padding 1): 2 * (8 * 5 * 5) * (3 * 3 * 3) = 2 * 200 * 27
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert only(conv, (3, 10, 10)) == {"": (10800, 10800, 10800, False)}


def test_grouped_and_depthwise_conv_flops_by_hand():
    # 8x6x6 -> 12x4x4, 4 groups: each output sees 8 / 4 = 2 input channels of 3x3:
    # 2 * (12 * 16) * (2 * 9) = 6912
    assert only(nn.Conv2d(8, 12, 3, groups=4), (8, 6, 6))[""][0] == 6912
    # depthwise 4x5x5 -> 4x5x5: 2 * (4 * 25) * (1 * 9) = 1800
    assert only(nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 5, 5))[""][0] == 1800


def test_conv1d_and_conv_transpose_flops_by_hand():
    # 4x10 -> 6x8: 2 * (6 * 8) * (4 * 3) = 1152
    assert only(nn.Conv1d(4, 6, 3), (4, 10))[""][0] == 1152
    # transposed 4x3x3 -> 2x6x6, kernel 2 stride 2: each input pixel of each input channel
    # meets 2 output channels x 4 kernel taps: 2 * (4 * 9) * (2 * 4) = 576
    assert only(nn.ConvTranspose2d(4, 2, 2, stride=2), (4, 3, 3))[""][0] == 576


def test_model_sums_layers_and_counts_reused_layers_twice():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Flatten(0, -1), nn.Unflatten(0, (1, 4)))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model, shared

        def forward(self, x):
            return self.head(self.head(self.body(x)))

    # conv 2x1 -> 4x1: 2 * 4 * 2 = 16; Linear(4, 4) called twice: 2 * (2 * 16) = 64
    layers = only(Twice(), (2, 1))
    assert layers == {"body.0": (16, 16, 16, False), "head": (64, 64, 64, False)}


def test_layer_flops_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_flops(model, (4,), n=1, m=4, exclude=())
    assert [mod.training for mod in model.modules()] == [True, True, False, True, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(mod._forward_hooks for mod in model.modules())


def test_layer_flops_runs_on_a_meta_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 4))
    layers = layer_flops(model, (3, 4, 4))
    assert [layer.forward for layer in layers] == [2 * 8 * 16 * 27, 2 * 128 * 4]


def test_sparse_flags_follow_nm_param_groups(resnet, resnet_layers):
    for n, m in PATTERNS:
        layers = resnet_layers[n, m]
        (group,) = [g for g in nm_param_groups(resnet, n, m) if g["sparse"]]
        sparse_names = {name.removesuffix(".weight") for name, _ in group["params"]}
        assert {layer.name for layer in layers if layer.sparse} == sparse_names
        assert {layer.name for layer in layers if not layer.sparse} == {"conv1", "fc"}
        assert all(layer.pattern == (n, m) for layer in layers if layer.sparse)
    assert len(layers) == 32  # 31 convs + fc
    # ResNet-32 has about 69 M multiply-adds (He et al. 2016)
    assert sum(layer.forward for layer in layers) == 2 * 68_862_592
    with pytest.warns(UserWarning, match="conv1"):
        layers = layer_flops(resnet, (3, 32, 32), n=2, m=4, exclude=())
    assert {layer.name for layer in layers if not layer.sparse} == {"conv1"}


def test_backward_mask_flag_needs_the_output_dimension_divisible_by_m():
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8))
    with pytest.warns(UserWarning, match="stays dense"):
        layers = layer_flops(model, (16,), n=1, m=8, exclude=())
    assert [(x.sparse, x.backward_mask) for x in layers] == [(True, False), (False, False)]
    layers = layer_flops(model, (16,), n=1, m=4, exclude=())
    assert [(x.sparse, x.backward_mask) for x in layers] == [(True, True), (True, True)]


# --------------------------------------------------------------------- multi-head attention


class SelfAttention(nn.Module):
    """One ``nn.MultiheadAttention`` on inputs ``[tokens, E]``; with ``batch_first=False``
    the batch-1 input is moved to ``[tokens, 1, E]`` unless ``transpose`` is off."""

    def __init__(self, embed: int, heads: int, batch_first: bool, transpose: bool = True):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
        self.transpose = transpose and not batch_first

    def forward(self, x):
        x = x.transpose(0, 1) if self.transpose else x
        if self.attn.batch_first:
            return self.attn(x, x, x, need_weights=False)[0]
        return self.attn(query=x, key=x, value=x)[0]  # keywords: the hook sees them too


def attention_flops(tokens: int, embed: int, batch: int = 1, keys: int | None = None):
    """Forward FLOPs (2 x MACs) of one self-attention call: in_proj, out_proj, QKᵀ + AV."""
    keys = tokens if keys is None else keys
    return (
        2 * batch * tokens * embed * 3 * embed,
        2 * batch * tokens * embed * embed,
        2 * batch * 2 * tokens * keys * embed,
    )


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_flops_by_hand(batch_first):
    # E = 8, 5 tokens: in_proj 2 * 5 * 8 * 24 = 1920, out_proj 2 * 5 * 8 * 8 = 640,
    # QKᵀ and AV 2 * (2 * 5 * 5 * 8) = 800 (the heads split E, so their count is E's)
    model = SelfAttention(8, 2, batch_first)
    assert attention_flops(5, 8) == (1920, 640, 800)
    layers = layer_flops(model, (5, 8), n=2, m=4, exclude=())
    assert [(x.name, x.forward, x.input_grad, x.weight_grad, x.sparse) for x in layers] == [
        ("attn.in_proj", 1920, 1920, 1920, True),
        ("attn.out_proj", 640, 640, 640, True),
        ("attn.attention", 800, 800, 800, False),
    ]
    assert [x.backward_mask for x in layers] == [True, True, False]
    assert not any(mod._forward_hooks for mod in model.modules())
    # dense without a pattern, and the same on a meta model
    assert [x.sparse for x in layer_flops(model, (5, 8))] == [False] * 3
    with torch.device("meta"):
        meta = SelfAttention(8, 2, batch_first)
    assert [x.forward for x in layer_flops(meta, (5, 8))] == [1920, 640, 800]


def test_multihead_attention_reads_batch_and_tokens_from_batch_first():
    # batch_first=False on a [1, 5, 8] input: 1 token, a batch of 5
    model = SelfAttention(8, 2, batch_first=False, transpose=False)
    assert [x.forward for x in layer_flops(model, (5, 8))] == list(attention_flops(1, 8, 5))
    assert attention_flops(1, 8, 5) == (1920, 640, 160)


def linear_rules(method: str, total_steps: int) -> tuple[Fraction, Fraction]:
    """``method``'s ratio at 2:4 for an all-sparse and for an all-dense Linear model (ASP's
    dense layers cost 2: pre-training plus fine-tuning)."""
    mlp = all_sparse_mlp()
    sparse = ratio(mlp, (16,), method, 2, 4, exclude=(), total_steps=total_steps)
    return sparse, ratio(mlp, (16,), method, 2, 4, exclude=("0", "2"), total_steps=total_steps)


def test_multihead_attention_sparse_ratio_follows_the_linear_rule():
    """The projections cost what an all-sparse Linear model costs, relative to dense; the
    attention products what an all-dense one costs (1, 2 for ASP)."""
    model = SelfAttention(8, 2, batch_first=True)
    sparse, dense = 1920 + 640, 800
    for method in METHODS:
        linear_rule, dense_rule = linear_rules(method, total_steps=600)
        got = ratio(model, (5, 8), method, 2, 4, exclude=(), total_steps=600)
        assert got == (sparse * linear_rule + dense * dense_rule) / (sparse + dense), method
    assert ratio(model, (5, 8), "static", 2, 4, exclude=(), total_steps=9) == Fraction(
        1280 + 800, 3360
    )
    # excluding the module keeps in_proj dense; out_proj is a module of its own
    assert ratio(model, (5, 8), "static", 2, 4, exclude=("attn",), total_steps=9) == Fraction(
        1920 + 320 + 800, 3360
    )
    assert ratio(model, (5, 8), "static", 2, 4, exclude=("attn*",), total_steps=9) == 1


def test_transformer_encoder_layer_is_counted_despite_its_fast_path():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    got = {x.name: x.forward for x in layer_flops(layer, (5, 8))}
    assert got == {
        "self_attn.in_proj": 1920,
        "self_attn.out_proj": 640,
        "self_attn.attention": 800,
        "linear1": 2 * 5 * 8 * 16,
        "linear2": 2 * 5 * 16 * 8,
    }
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=64, mlp_dim=128,
        num_classes=10,
    )  # fmt: skip


def test_tiny_vision_transformer_flops_by_hand():
    model = tiny_vit()
    # 32 / 16 = 2 x 2 patches + the class token: 5 tokens of width 64
    tokens, width, mlp = 5, 64, 128
    patchify = 2 * (width * 2 * 2) * (3 * 16 * 16)  # conv_proj, 16x16 stride 16
    in_proj, out_proj, products = attention_flops(tokens, width)
    mlp_flops = 2 * tokens * width * mlp
    head = 2 * width * 10  # the class token only
    prefix = "encoder.layers.encoder_layer_0."
    expected = {
        "conv_proj": (patchify, False),
        prefix + "self_attention.in_proj": (in_proj, True),
        prefix + "self_attention.out_proj": (out_proj, True),
        prefix + "self_attention.attention": (products, False),
        prefix + "mlp.0": (mlp_flops, True),
        prefix + "mlp.3": (mlp_flops, True),
        "heads.head": (head, False),
    }
    layers = layer_flops(model, (3, 32, 32), n=2, m=4)
    assert {x.name: (x.forward, x.sparse) for x in layers} == expected
    assert sum(x.forward for x in layers) == (
        393_216 + 122_880 + 40_960 + 6_400 + 2 * 81_920 + 1_280
    )
    # the sparse layers are those of nm_param_groups, in_proj_weight included
    (group,) = [g for g in nm_param_groups(model, 2, 4) if g["sparse"]]
    assert {x.name for x in layers if x.sparse} == {
        name.removesuffix(".weight").removesuffix("_weight") for name, _ in group["params"]
    }
    # 2:4: the sparse layers follow the Linear rule, the stem, head and QKᵀ / AV stay dense
    sparse = in_proj + out_proj + 2 * mlp_flops
    total = sum(x.forward for x in layers)
    for method in METHODS:
        linear_rule, dense_rule = linear_rules(method, total_steps=600)
        got = ratio(model, (3, 32, 32), method, 2, 4, total_steps=600)
        assert got == (sparse * linear_rule + (total - sparse) * dense_rule) / total, method
    static = training_flops_ratio(model, (3, 32, 32), "static", n=2, m=4, total_steps=10)
    assert static == pytest.approx(1 - sparse / total / 2, rel=1e-12)


# ------------------------------------------------------------------------- profiles, exactly


@pytest.mark.parametrize("n, m", PATTERNS)
def test_dense_ratio_is_one_exactly(resnet_layers, n, m):
    got = flops_breakdown(resnet_layers[n, m], "dense", n=n, m=m, total_steps=58800)
    assert got["ratio_exact"] == 1
    assert got["ratio"] == 1.0


def test_dense_ratio_from_the_model_is_one_exactly():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 8), nn.Linear(8, 4))
    assert training_flops_ratio(model, (3, 4, 4), "dense", n=1, m=4, total_steps=7) == 1.0


@pytest.mark.parametrize("n, m", [*PATTERNS, (3, 8)])
def test_fixed_profiles_on_an_all_sparse_model(n, m):
    model, d = all_sparse_mlp(), Fraction(n, m)
    kwargs = {"exclude": (), "total_steps": 1234}
    assert ratio(model, (16,), "srste", n, m, **kwargs) == (d + 2) / 3
    assert ratio(model, (16,), "static", n, m, **kwargs) == d
    assert ratio(model, (16,), "bimask", n, m, **kwargs) == (2 * d + 1) / 3
    # floats: the same correctly rounded numbers
    as_float = training_flops_ratio(model, (16,), "srste", n=n, m=m, total_steps=9, exclude=())
    assert as_float == (n / m + 2) / 3
    assert training_flops_ratio(model, (16,), "static", n=n, m=m, total_steps=9, exclude=()) == (
        n / m
    )


def test_asp_is_dense_pretraining_plus_sparse_finetuning():
    model, d = all_sparse_mlp(), Fraction(1, 4)
    assert ratio(model, (16,), "asp", 1, 4, exclude=(), total_steps=100) == 1 + d
    got = ratio(
        model, (16,), "asp", 1, 4, exclude=(), total_steps=100, pretrain_steps=30, finetune_steps=50
    )
    assert got == Fraction(30, 100) + Fraction(50, 100) * d
    breakdown = flops_breakdown(
        layer_flops(model, (16,), n=1, m=4, exclude=()), "asp", n=1, m=4, total_steps=10
    )
    assert breakdown["steps"] == 20


def test_dense_layers_count_dense(resnet_layers):
    layers = resnet_layers[1, 16]
    dense = sum(3 * x.forward for x in layers if not x.sparse)
    sparse = sum(3 * x.forward for x in layers if x.sparse)
    got = flops_breakdown(layers, "static", n=1, m=16, total_steps=10)
    assert got["ratio_exact"] == Fraction(dense + sparse * Fraction(1, 16), dense + sparse)
    assert got["sparse_share"] == pytest.approx(sparse / (dense + sparse))
    assert got["forward_ratio"] + got["input_grad_ratio"] + got["weight_grad_ratio"] == (
        pytest.approx(got["ratio"])
    )


@pytest.mark.parametrize("n, m", PATTERNS)
def test_bame_with_no_schedule_approaches_static(n, m):
    model, d = all_sparse_mlp(), Fraction(n, m)
    for steps in (10, 1000, 100_000):
        got = ratio(model, (16,), "bame", n, m, exclude=(), total_steps=steps, t_i=0, t_f=0,
                    delta_t=10**9)  # fmt: skip
        # BAMESGD draws the static mask in the first step(): only step 0 runs dense
        assert got == d + (1 - d) / steps
    assert float(got) == pytest.approx(float(d), abs=1e-5)


# ----------------------------------------------------------- closed form vs step-by-step loops


def loop_sums(method: str, n: int, m: int, steps: int, t_i: int, t_f: int, delta_t: int):
    """Step by step, as BAMESGD runs: the forward of step t uses the mask the previous
    step() left; step t's update (if any) reads the dense gradient only in the evolve phase.
    Sums are kept in units of 1/m (integers)."""
    forward = input_grad = weight_grad = 0
    kept = m  # the mask starts all ones
    backward_kept = m  # BidirBAMESGD's backward mask exists from the first step() on
    for t in range(steps):
        update = is_update_step(t, delta_t, t_i, t_f)
        forward += kept
        input_grad += backward_kept if method == "bame_bidir" else kept
        weight_grad += m if update and phase(t, t_i, t_f) is Phase.EVOLVE else kept
        if update:
            kept = gradual_budget(t, n, m, t_i)
        backward_kept = n
    return Fraction(forward, m), Fraction(input_grad, m), Fraction(weight_grad, m)


def check_against_loop(
    n, m, steps, t_i, t_f, delta_t, methods=("bame", "lma", "rigl", "bame_bidir")
):
    for method in methods:
        got = step_density_sums(
            method, n=n, m=m, total_steps=steps, t_i=t_i, t_f=t_f, delta_t=delta_t
        )
        assert got == loop_sums(method, n, m, steps, t_i, t_f, delta_t), (method, got)
    for method in ("lbc", "lbc_lower"):
        got = step_density_sums(method, n=n, m=m, total_steps=steps, t_i=t_i, t_f=t_f)
        assert got == lbc_loop_sums(method, n, m, steps, t_f), (method, got)


def lbc_loop_sums(method: str, n: int, m: int, steps: int, t_f: int):
    """Step by step, as LBCSGD runs: the forward of step t uses the union of the combinations
    the previous step() left, r(t - 1) of them (all C at t = 0), at its largest (``lbc``) or
    smallest (``lbc_lower``) size; the backward is dense."""
    c = math.comb(m, n)
    forward = 0
    for t in range(steps):
        r = c if t == 0 else remaining_count(t - 1, c, t_f)
        least, most = lbc_union_bounds(r, n, m)
        forward += most if method == "lbc" else least
    return Fraction(forward, m), steps, steps


@pytest.mark.parametrize("n, m", [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (2, 5), (3, 5)])
def test_lbc_union_bounds_are_the_extremes_over_all_sets_of_combinations(n, m):
    combos = [frozenset(c) for c in itertools.combinations(range(m), n)]
    for r in range(1, len(combos) + 1):
        sizes = {len(frozenset().union(*chosen)) for chosen in itertools.combinations(combos, r)}
        assert lbc_union_bounds(r, n, m) == (min(sizes), max(sizes)), r
    for r in (0, len(combos) + 1):
        with pytest.raises(ValueError, match="r value"):
            lbc_union_bounds(r, n, m)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_lbc_bounds_hold_the_masks_of_lbcsgd(n, m):
    """The density of the mask LBCSGD holds before each step (the one the forward uses) lies
    between the two profiles at every step, and equals both when N = 1."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8, bias=False)
    steps, t_f = 30, 21
    opt = LBCSGD(nm_param_groups(model, n, m, exclude=()), lr=0.1, momentum=0.9, n=n, m=m,
                 total_steps=steps, t_f=t_f)  # fmt: skip
    x = torch.randn(32, 16)
    c = math.comb(m, n)
    forward = Fraction(0)
    for t in range(steps):
        mask = opt.state[model.weight]["mask"] if t else torch.ones(1, m, dtype=torch.bool)
        kept = Fraction(int(mask.sum()), mask.numel())
        least, most = lbc_union_bounds(c if t == 0 else remaining_count(t - 1, c, t_f), n, m)
        assert Fraction(least, m) <= kept <= Fraction(most, m), t
        forward += kept
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    lower = step_density_sums("lbc_lower", n=n, m=m, total_steps=steps, t_f=t_f)[0]
    upper = step_density_sums("lbc", n=n, m=m, total_steps=steps, t_f=t_f)[0]
    assert lower <= forward <= upper
    assert (lower == forward == upper) == (n == 1)


def test_bame_closed_form_equals_the_step_loop_on_a_grid():
    for (n, m), steps, delta_t in itertools.product([(2, 4), (1, 4), (1, 16), (3, 8)],
                                                    (1, 2, 7, 60), (1, 3, 10, 100)):  # fmt: skip
        for t_i, t_f in itertools.combinations_with_replacement(
            sorted({0, 1, steps // 3, steps // 2, steps - 1, steps}), 2
        ):
            check_against_loop(n, m, steps, t_i, t_f, delta_t)


@examples(60)
@given(
    pattern=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (1, 16), (5, 32)]),
    steps=st.integers(1, 400),
    cuts=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    delta_t=st.integers(1, 120),
)
def test_bame_closed_form_equals_the_step_loop(pattern, steps, cuts, delta_t):
    t_i, t_f = sorted(int(c * steps) for c in cuts)
    check_against_loop(*pattern, steps, t_i, t_f, delta_t)


def test_paper_schedule_matches_the_step_loop():
    steps = 300 * 196
    check_against_loop(1, 16, steps, steps // 3, 2 * steps // 3, 100, methods=("bame",))


@pytest.mark.parametrize("n, m, delta_t", [(2, 4, 5), (1, 4, 3), (1, 8, 4)])
def test_bame_densities_match_the_masks_of_bamesgd(n, m, delta_t):
    """Sum the density of the mask BAMESGD actually holds before each step (the one the
    forward uses) and the steps where its update read the gradient."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8, bias=False)
    steps, t_i, t_f = 40, 13, 29
    opt = BAMESGD(nm_param_groups(model, n, m, exclude=()), lr=0.1, momentum=0.9, n=n, m=m,
                  total_steps=steps, t_i=t_i, t_f=t_f, delta_t=delta_t)  # fmt: skip
    x = torch.randn(32, 16)
    forward = Fraction(0)
    for _ in range(steps):
        (row,) = opt.sparsity_report()
        forward += Fraction(row["density"]).limit_denominator(1000)
        assert (model.weight != 0).float().mean() <= row["density"]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    got = step_density_sums("bame", n=n, m=m, total_steps=steps, t_i=t_i, t_f=t_f, delta_t=delta_t)
    assert got[0] == forward


def lines_run(function) -> int:
    """Python lines executed by ``function()`` (a measure of work that no load can change)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "line"
        return tracer

    sys.settrace(tracer)
    try:
        function()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("delta_t", [1, 100])
@pytest.mark.parametrize("method", METHODS)
def test_closed_form_work_does_not_grow_with_the_schedule(method, delta_t):
    """O(M - N) work (O((M - N) log t_f) for LBC), not O(T): a million times more steps
    take at most a few times as many lines (an O(T) loop would take a million times)."""
    def work(steps):
        return lines_run(lambda: step_density_sums(method, n=1, m=16, total_steps=steps,
                                                   delta_t=delta_t))

    work(1_000)  # first calls run one-off lines (caches, lookups)
    short, long = work(1_000), work(1_000_000_000)
    assert 0 < long <= 4 * short


# ------------------------------------------------------------------------------- ordering facts


def test_orderings_on_resnet32(resnet_layers):
    steps = 300 * 196
    ratios = {}
    for (n, m), layers in resnet_layers.items():
        for method in METHODS:
            ratios[method, n, m] = flops_breakdown(layers, method, n=n, m=m, total_steps=steps)[
                "ratio"
            ]
    for n, m in PATTERNS:
        r = {method: ratios[method, n, m] for method in METHODS}
        assert r["static"] < r["bame_bidir"] < r["bame"] < r["srste"] < r["lbc"] < r["dense"]
        assert r["bimask"] < r["srste"] and r["bame"] < r["bimask"]
        assert r["lma"] == r["rigl"] == r["bame"]
        assert r["dense"] < r["asp"]
        # the AdamW variants count as their SGD methods: the update rule adds no products
        assert (r["dense_adamw"], r["static_adamw"], r["bame_adamw"]) == (
            r["dense"], r["static"], r["bame"])
    for method in [*SPARSE_METHODS, "asp"]:
        assert ratios[method, 1, 16] < ratios[method, 1, 8] < ratios[method, 1, 4]
        assert ratios[method, 1, 4] < ratios[method, 2, 4]
    # the paper's 2:4 numbers (Table 1: BAME 0.63, SR-STE 0.83, ASP 1.5; Table 2: BAME† 0.59)
    assert round(ratios["bame", 2, 4], 2) == 0.63
    assert round(ratios["bame_bidir", 2, 4], 2) == 0.59
    assert round(ratios["srste", 2, 4], 2) == 0.83
    assert round(ratios["asp", 2, 4], 1) == 1.5


def test_longer_gradual_phase_and_more_updates_cost_more():
    model = all_sparse_mlp()

    def r(**kw):
        return ratio(model, (16,), "bame", 1, 4, exclude=(), total_steps=3000, **kw)

    assert r(t_i=0, t_f=0) < r(t_i=1000, t_f=2000) < r(t_i=2000, t_f=2000)
    # more evolve-phase updates, more dense weight gradients
    no_gradual = {"t_i": 0, "t_f": 2000}
    assert r(delta_t=1000, **no_gradual) < r(delta_t=100, **no_gradual) < r(delta_t=1, **no_gradual)
    # in the gradual phase a larger ΔT holds each budget longer: with t_i = ΔT the only
    # gradual update is at t = 0 (budget M), so steps 0..t_i all run dense (1 more than static)
    dense_gradual = r(t_i=1000, t_f=1000, delta_t=1000)
    assert dense_gradual == r(t_i=0, t_f=0) + Fraction(1000, 3000) * Fraction(3, 4)


# ----------------------------------------------------------------------------------------- errors


def names(message: str, argument: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){argument}(?![A-Za-z0-9_])", message) is not None


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"method": "sparse"}, "method"),
        ({"n": 4}, "n"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"m": 1, "n": 1}, "m"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10.0}, "total_steps"),
        ({"delta_t": 0}, "delta_t"),
        ({"t_i": 8, "t_f": 5}, "t_i"),
        ({"t_f": 11}, "t_f"),
        ({"t_i": -1}, "t_i"),
        ({"pretrain_steps": 5}, "pretrain_steps"),
        ({"method": "asp", "pretrain_steps": -1}, "pretrain_steps"),
        ({"method": "asp", "finetune_steps": 0}, "finetune_steps"),
        ({"exclude": "nope"}, "exclude"),
    ],
)
def test_errors_name_the_argument(kwargs, argument):
    args = {"method": "bame", "n": 2, "m": 4, "total_steps": 10, "exclude": ()} | kwargs
    method = args.pop("method")
    with pytest.raises(ValueError, match="Invalid") as info:
        training_flops_ratio(all_sparse_mlp(), (16,), method, **args)
    assert names(str(info.value), argument), str(info.value)
    assert "sparse" in str(info.value) or method != "sparse"


def test_layer_errors():
    with pytest.raises(ValueError, match="input_shape"):
        layer_flops(all_sparse_mlp(), (0, 16))
    with pytest.raises(ValueError, match="input_shape"):
        layer_flops(all_sparse_mlp(), "16")
    with pytest.raises(ValueError, match="Invalid n value"):
        layer_flops(all_sparse_mlp(), (16,), n=2)
    layers = layer_flops(all_sparse_mlp(), (16,), n=2, m=4, exclude=())
    with pytest.raises(ValueError, match="layers"):
        flops_breakdown(layers, "bame", n=1, m=4, total_steps=10)
    with pytest.raises(ValueError, match="layers"):
        flops_breakdown([], "bame", n=1, m=4, total_steps=10)


# ------------------------------------------------------------------------------ docs and doctest


@pytest.mark.parametrize("module", [flops_layers, flops_profiles, flops_breakdown_module])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_docs_table_is_the_script_output():
    from benchmarks import flops_table

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        flops_table.main()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "flops.md").read_text()
    assert out.getvalue().strip() in docs
