"""kept_sgd: SGD on the kept weights only, against a float64 loop, on every path."""

from __future__ import annotations

import itertools

import pytest
import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import blocks_to_param, random_nm_mask
from bame_optim.kernels import kept_sgd_cpu
from bame_optim.optim.functional import kept_sgd

from .strategies import SGD_CONFIGS

SHAPES = [(8, 16), (4, 8, 3), (6, 8, 2, 2)]  # Linear, Conv1d, Conv2d: blocks along dim 1
PATTERNS = [(2, 4), (1, 8)]
PATHS = [
    dict(foreach=False, fused=False),
    dict(foreach=True, fused=False),
    pytest.param(
        dict(fused=True),
        marks=pytest.mark.skipif(not kept_sgd_cpu.available(), reason="no native kernel here"),
    ),
]


def _full(config: dict) -> dict:
    return {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
            "maximize": False} | config


def _problem(n: int, m: int, dtype: torch.dtype, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    masks = [random_nm_mask(torch.Size(s).numel() // m, n, m, gen) for s in SHAPES]
    kept = [blocks_to_param(mask, s) for mask, s in zip(masks, SHAPES, strict=True)]
    params = [torch.randn(s, generator=gen, dtype=dtype) * k for s, k in zip(SHAPES, kept,
                                                                           strict=True)]
    codes = [encode_kept(mask, n) for mask in masks]
    return params, kept, codes


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _reference(param, grad, buffer, kept, *, lr, momentum, dampening, weight_decay, nesterov,
               maximize):
    """One element-wise float64 step written out in full, in the parameter's layout."""
    g = (-grad if maximize else grad) * kept + weight_decay * param
    if momentum:
        buffer = g.clone() if buffer is None else momentum * buffer + (1 - dampening) * g
        g = g + momentum * buffer if nesterov else buffer
    return param - lr * g, buffer


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_kept_sgd_matches_float64_reference(config, path, pattern):
    n, m = pattern
    config = _full(config)
    params, kept, codes = _problem(n, m, torch.float64)
    ref_params = [p.clone() for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    ref_buffers: list[torch.Tensor | None] = [None] * len(params)
    for step in range(5):
        grads = _grads(params, step)
        kept_sgd(params, grads, buffers, codes, [n] * len(params), m=m, **path, **config)
        for i in range(len(params)):
            ref_params[i], ref_buffers[i] = _reference(
                ref_params[i], grads[i], ref_buffers[i], kept[i], **config
            )
        for p, r, k in zip(params, ref_params, kept, strict=True):
            torch.testing.assert_close(p, r)
            assert (p[~k] == 0).all(), "a pruned entry moved"
    if config["momentum"]:
        for b, r, k in zip(buffers, ref_buffers, kept, strict=True):
            # the compact buffer holds the kept entries, in block order
            expected = r.movedim(1, -1)[k.movedim(1, -1)]
            torch.testing.assert_close(b.flatten(), expected)


@pytest.mark.parametrize(("config", "dtype"),
                         list(itertools.product(SGD_CONFIGS, [torch.float32, torch.float64])))
def test_every_path_is_bit_identical(config, dtype):
    """The per-tensor loop, foreach and (where it compiles) the fused kernel agree bit for bit,
    on parameters and momentum."""
    config = _full(config)
    runs = []
    paths = [dict(foreach=False, fused=False), dict(foreach=True, fused=False)]
    if kept_sgd_cpu.available():
        paths.append(dict(fused=True))
    for path in paths:
        params, _, codes = _problem(2, 4, dtype, seed=5)
        buffers: list[torch.Tensor | None] = [None] * len(params)
        for step in range(4):
            kept_sgd(params, _grads(params, step), buffers, codes, [2] * len(params), m=4,
                     **path, **config)
        runs.append(params + [b for b in buffers if b is not None])
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_nan_gradient_at_pruned_entry_never_reaches_the_weight(path):
    mask = torch.tensor([[True, False, True, False]])
    param = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    grad = torch.tensor([[0.5, float("nan"), 0.5, float("inf")]])
    kept_sgd([param], [grad], [None], [encode_kept(mask, 2)], [2], m=4, lr=0.1, momentum=0.9,
             dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False, **path)
    assert param[0, 1] == 0 and param[0, 3] == 0
    assert torch.isfinite(param).all()


def test_fused_true_names_a_gradient_laid_out_unlike_its_weight():
    """A channels_last weight takes the kernel; given a contiguous gradient (assigned by hand:
    autograd gives the weight's layout) fused=True says both strides."""
    param = torch.zeros(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    mask = torch.ones(36, 4, dtype=torch.bool)
    hyper = dict(m=4, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, fused=True)
    kept_sgd([param], [torch.ones_like(param)], [None], [encode_kept(mask, 4)], [4], **hyper)
    assert (param == -0.1).all()
    with pytest.raises(ValueError, match=r"strides \(72, 1, 24, 8\), grad cpu torch.float32, "
                                         r"strides \(72, 9, 3, 1\);.*channels-last"):
        kept_sgd([param], [torch.ones(2, 8, 3, 3)], [None], [encode_kept(mask, 4)], [4],
                 **hyper)


def test_fused_true_without_support_is_a_clear_error():
    param = torch.zeros(4, 16, dtype=torch.float64)[:, ::2]  # strided: not supported
    mask = torch.ones(8, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"Invalid fused value: True .*dtype torch.float64"):
        kept_sgd([param], [torch.zeros_like(param)], [None], [encode_kept(mask, 4)], [4], m=4,
                 lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, fused=True)
