"""Pieces shared by the SR-STE, MaxQ and LBC tests: seeded gradients, a cosine learning rate and the
hypothesis setups of both (their float64 references are :mod:`bame_optim.reference.peers`;
resume, dtypes and dense parameters are the contract battery's, test_contract.py)."""

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


def assert_same_entries(a: dict, b: dict) -> None:
    """Two per-parameter states are bit-identical, dtypes included."""
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_follows_reference(opt, ref, params, setup) -> None:
    """Steps ``opt`` (a dense-weight STE optimizer over ``params``) and its float64 reference
    ``ref`` through ``setup``'s seeded gradients under a cosine learning rate (set in the group,
    as an LR scheduler does), comparing the mask, the dense weight, the parameter and the
    momentum of every parameter after every step."""
    for step in range(setup["steps"]):
        lr = cosine_lr(step, setup["steps"])
        opt.param_groups[0]["lr"] = lr
        grads = seeded_grads(setup["shapes"], step, setup["seed"])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(grads, lr)
        for i, p in enumerate(params):
            state = opt.state[p]
            assert torch.equal(state["mask"], ref.masks[i]), f"mask {i} differs at step {step}"
            torch.testing.assert_close(state["dense_weight"], ref.weights[i])
            torch.testing.assert_close(p.detach(), ref.param(i))
            if setup["momentum"]:
                torch.testing.assert_close(state["momentum_buffer"], ref.buffers[i])
    assert opt.param_groups[0]["step"] == setup["steps"]
