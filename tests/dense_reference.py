"""Pieces shared by the SR-STE and LBC tests: seeded gradients, the hypothesis setups of both,
state comparison (their float64 references are :mod:`bame_optim.reference`)."""

from __future__ import annotations

import io
import math

import torch
from hypothesis import strategies as st

from .strategies import nm_patterns


def seeded_grads(shapes, step: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def cosine_lr(step: int, total: int, base: float = 0.05) -> float:
    return base * (1 + math.cos(math.pi * step / max(total, 1))) / 2


@st.composite
def dense_setups(draw, max_steps: int = 12):
    """Shapes (Linear, Conv1d, Conv2d), an N:M pattern and SGD hyper-parameters."""
    n, m = draw(nm_patterns)
    layouts = [(4, 2 * m), (3, m, 3), (2, m, 2, 2)]
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "n": n,
        "m": m,
        "shapes": draw(st.lists(st.sampled_from(layouts), min_size=1, max_size=3)),
        "steps": draw(st.integers(1, max_steps)),
        "seed": draw(st.integers(0, 2**16)),
        "momentum": momentum,
        "nesterov": nesterov,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.25])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "maximize": draw(st.booleans()),
    }


def make_params(setup, dtype=torch.float64):
    gen = torch.Generator().manual_seed(setup["seed"])
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        for s in setup["shapes"]
    ]


def sgd_kwargs(setup) -> dict:
    return {k: setup[k] for k in ("momentum", "dampening", "weight_decay", "nesterov")}


def save_and_load(state_dict):
    """``torch.save`` / ``torch.load(weights_only=True)`` through memory (as accelerate does)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Two optimizers' per-parameter states are bit-identical, dtypes included."""
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def dense_matches_torch_sgd(make_optimizer, steps: int = 6) -> None:
    """Dense parameters (1-D, indivisible, ``sparse=False`` group) follow ``torch.optim.SGD``
    bit for bit; ``make_optimizer(groups, **hyper)`` builds the optimizer under test."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8,), (4, 6), (3, 8)]
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    hyper = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-2}
    for nesterov, maximize in ((False, False), (True, True)):
        opt = make_optimizer(
            [{"params": ours[:2]}, {"params": ours[2:], "sparse": False}],
            nesterov=nesterov,
            maximize=maximize,
            foreach=False,
            **hyper,
        )
        ref = torch.optim.SGD(theirs, nesterov=nesterov, maximize=maximize, foreach=False, **hyper)
        for step in range(steps):
            for p, q, g in zip(ours, theirs, seeded_grads(shapes, step, 1), strict=True):
                p.grad, q.grad = g.float(), g.float()
            opt.step()
            ref.step()
            for p, q in zip(ours, theirs, strict=True):
                assert torch.equal(p, q)
        assert all("mask" not in opt.state[p] for p in ours)
