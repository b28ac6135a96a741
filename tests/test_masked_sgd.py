"""The SGD arithmetic: dense parameters are exactly torch.optim.SGD, sparse ones move only
where kept, and the multi-tensor path equals the per-tensor loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from bame_optim import BAMESGD, masked_sgd

# One table of configurations, as torch's optimizer tests do.
CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True, maximize=True),
    dict(lr=0.0, momentum=0.5, weight_decay=1e-3),
]
SHAPES = [(8, 16), (16,), (4, 8, 3), (6, 4, 2, 2)]


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


@pytest.mark.parametrize(
    ("config", "foreach", "dtype"),
    list(itertools.product(CONFIGS, [False, True], [torch.float32, torch.float64])),
)
def test_dense_groups_equal_torch_sgd(config, foreach, dtype):
    ours = _params(dtype)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = BAMESGD(ours, sparse=False, foreach=foreach, total_steps=10, **config)
    ref = torch.optim.SGD(theirs, foreach=foreach, **config)
    for step in range(6):
        for p, q, g in zip(ours, theirs, _grads(ours, step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            mine, expected = (
                opt.state[p].get("momentum_buffer"),
                ref.state[q].get("momentum_buffer"),
            )
            if expected is None:
                assert mine is None
            else:
                torch.testing.assert_close(mine, expected, rtol=0, atol=0)


def test_auto_sparse_leaves_1d_and_indivisible_params_as_torch_sgd():
    weight = torch.randn(4, 6, requires_grad=True)  # 6 % 4 != 0: dense under sparse=None
    bias = torch.randn(4, requires_grad=True)
    ref = [weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    opt = BAMESGD([weight, bias], lr=0.1, momentum=0.9, n=2, m=4, total_steps=10)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for step in range(4):
        for p, q, g in zip([weight, bias], ref, _grads([weight, bias], step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(weight, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(bias, ref[1], rtol=0, atol=0)
    assert "mask" not in opt.state[weight]


def _reference_masked_sgd(
    param, grad, buffer, kept, *, lr, momentum, dampening, weight_decay, nesterov, maximize
):
    """One element-wise float64 step written out in full."""
    param, grad = param.double(), grad.double()
    g = (-grad if maximize else grad) * kept + weight_decay * param
    if momentum:
        buffer = g.clone() if buffer is None else momentum * buffer + (1 - dampening) * g
        g = g + momentum * buffer if nesterov else buffer
    return param - lr * g, buffer


@pytest.mark.parametrize(("config", "foreach"), list(itertools.product(CONFIGS, [False, True])))
def test_masked_update_matches_float64_reference(config, foreach):
    config = {
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
        **config,
    }
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 16), (4, 8, 3)]
    kept = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    params = [
        torch.randn(s, generator=gen, dtype=torch.float64) * k
        for s, k in zip(shapes, kept, strict=True)
    ]
    ref_params = [p.clone() for p in params]
    buffers: list[torch.Tensor | None] = [None, None]
    ref_buffers: list[torch.Tensor | None] = [None, None]
    for step in range(5):
        grads = _grads(params, step)
        masked_sgd(params, grads, buffers, list(kept), foreach=foreach, **config)
        for i in range(len(params)):
            ref_params[i], ref_buffers[i] = _reference_masked_sgd(
                ref_params[i], grads[i], ref_buffers[i], kept[i], **config
            )
        for p, r, k in zip(params, ref_params, kept, strict=True):
            torch.testing.assert_close(p, r)
            assert (p[~k] == 0).all(), "a pruned entry moved"
        if config["momentum"]:
            for b, r, k in zip(buffers, ref_buffers, kept, strict=True):
                torch.testing.assert_close(b, r)
                assert (b[~k] == 0).all()


@pytest.mark.parametrize("config", CONFIGS)
def test_foreach_equals_single_tensor_loop_on_masked_params(config):
    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 16), (4, 8, 3), (16,)]
    kept = [torch.rand(s, generator=gen) < 0.5 for s in shapes[:2]] + [None]
    base = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for foreach in (False, True):
        params = [p.clone() for p in base]
        buffers: list[torch.Tensor | None] = [None] * 3
        for step in range(4):
            masked_sgd(
                params,
                _grads(params, step),
                buffers,
                kept,
                foreach=foreach,
                **{
                    "momentum": 0.0,
                    "dampening": 0.0,
                    "weight_decay": 0.0,
                    "nesterov": False,
                    "maximize": False,
                    **config,
                },
            )
        runs[foreach] = (params, buffers)
    for a, b in zip(runs[False][0] + runs[False][1], runs[True][0] + runs[True][1], strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nan_gradient_at_pruned_entry_never_reaches_the_weight():
    kept = torch.tensor([[True, False, True, False]])
    param = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    grad = torch.tensor([[0.5, float("nan"), 0.5, float("inf")]])
    masked_sgd(
        [param],
        [grad],
        [None],
        [kept],
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=0.1,
        nesterov=False,
        maximize=False,
    )
    assert param[0, 1] == 0 and param[0, 3] == 0
    assert torch.isfinite(param).all()
