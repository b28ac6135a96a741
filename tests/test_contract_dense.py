"""The contract battery (test_contract.py), part 3: dense parameters (excluded layers, 1-D and
indivisible ones) follow :class:`torch.optim.SGD` or :class:`torch.optim.AdamW` bit for bit, with
no mask state (a table of configs)."""

from __future__ import annotations

import copy

import pytest
import torch

from bame_optim import nm_param_groups
from bame_optim.methods import (
    METHODS,
    make_optimizer,
)

from .contract import (
    ADAMW_METHODS,
    RUN,
    SGD_METHODS,
    M,
    N,
    build_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


# -- 3. dense parameters equal torch.optim.SGD ------------------------------------------------

SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1},
    "maximize": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    "lr0": {"lr": 0.0, "momentum": 0.9, "weight_decay": 0.1},
    "foreach": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "foreach": True},
}


ADAMW_CONFIGS = {
    "plain": {"lr": 1e-2},
    "decay": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    "amsgrad": {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True},
    "maximize": {"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
    "lr0": {"lr": 0.0, "weight_decay": 0.1},
    "foreach": {"lr": 1e-2, "weight_decay": 0.01, "foreach": True, "amsgrad": True},
    "tensor_lr": {"lr": torch.tensor(1e-2), "weight_decay": 0.01},
}
DENSE_CASES = [(name, config) for name in SGD_METHODS for config in SGD_CONFIGS] + [
    (name, config) for name in ADAMW_METHODS for config in ADAMW_CONFIGS
]
STATES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


@pytest.mark.parametrize(("method", "config"), DENSE_CASES)
def test_dense_params_equal_torch(method, config):
    """Dense parameters follow torch.optim.SGD (SGD methods) or torch.optim.AdamW (AdamW
    methods) bit for bit: parameters and every state tensor."""
    adamw = METHODS[method].optimizer == "adamw"
    config = (ADAMW_CONFIGS if adamw else SGD_CONFIGS)[config]
    model = build_model()
    reference = copy.deepcopy(model)
    # the default exclusion keeps the stem and the classifier in a sparse=False group; with
    # sparse=None a weight whose input dimension does not divide by m, and a 1-D parameter,
    # stay dense too
    generator = torch.Generator().manual_seed(99)
    extra = [("extra.weight", torch.randn(4, 6, generator=generator).requires_grad_()),
             ("extra.bias", torch.randn(4, generator=generator).requires_grad_())]
    extra_ref = [(name, p.detach().clone().requires_grad_()) for name, p in extra]
    groups = [*nm_param_groups(model, N, M), {"params": extra, "sparse": None}]
    assert [g["sparse"] for g in groups] == [True, False, False, None]
    opt = make_optimizer(method, groups, n=N, m=M, **RUN, **config)
    ref_groups = [
        {k: v for k, v in g.items() if k != "sparse"}
        for g in nm_param_groups(reference, N, M)
        if not g["sparse"]
    ] + [{"params": extra_ref}]
    dense_names = {name for g in ref_groups for name, _ in g["params"]}
    ref = (torch.optim.AdamW if adamw else torch.optim.SGD)(ref_groups, **config)
    assert dense_names == {"0.weight", "0.bias", "3.bias", "5.weight", "5.bias", "extra.weight",
                           "extra.bias"}
    pairs = list(zip([*model.named_parameters(), *extra],
                     [*reference.parameters(), *(p for _, p in extra_ref)], strict=True))
    for t in range(6):
        generator = torch.Generator().manual_seed(t)
        for (_, p), q in pairs:
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for (name, p), q in pairs:
            if name not in dense_names:
                continue
            assert torch.equal(p, q), (t, name)
            assert set(opt.state.get(p, {})) <= set(STATES), (t, name)  # no mask state
            for key in STATES:
                found, expected = opt.state.get(p, {}).get(key), ref.state[q].get(key)
                assert (found is None) == (expected is None), (t, name, key)
                if expected is not None:
                    assert torch.equal(found, expected), (t, name, key)
