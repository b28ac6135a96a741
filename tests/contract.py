"""The run every test of the contract battery shares (see test_contract.py for the battery).

In the style of torch's optimizer test database (``torch/testing/_internal/common_optimizers.py``):
every test runs the same tiny conv + linear model through :func:`make_optimizer` with the same
keywords, on a 24-step schedule (``delta_t = 2``, so ``t_i = 8`` and ``t_f = 16``) that passes
through every phase: gradual (0-7), prune (8), evolve (9-15), frozen (16-23).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bame_optim import nm_param_groups
from bame_optim.methods import (
    METHODS,
    accepted_keywords,
    inert_keywords,
    make_optimizer,
)
from bame_optim.optim.base import NMOptimizer

# -- the run every test shares ---------------------------------------------------------------

N, M = 2, 4
TOTAL_STEPS, DELTA_T, T_I, T_F = 24, 2, 8, 16  # t_i, t_f: the defaults T // 3 and 2T // 3
INPUT_SHAPE = (4, 4, 4)
RUN = {"total_steps": TOTAL_STEPS, "delta_t": DELTA_T}
"""The same keywords for every method (``make_optimizer`` drops those a method does not take)."""
HYPER = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-3},
}
"""The same hyper-parameters for every method of one optimizer family (:attr:`Method.optimizer`)."""
DENSE_FACTORIES = (torch.optim.SGD, torch.optim.AdamW)

ALL_METHODS = list(METHODS)
SPARSE_METHODS = [name for name, record in METHODS.items() if record.factory not in DENSE_FACTORIES]
SGD_METHODS = [name for name, record in METHODS.items() if record.optimizer == "sgd"]
ADAMW_METHODS = [name for name, record in METHODS.items() if record.optimizer == "adamw"]
RESUME_POINTS = {3: "gradual", 8: "prune-next", 9: "evolve-first", 12: "evolve", 16: "frozen-first",
                 20: "frozen"}


def build_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    return model.to(dtype)


def build_optimizer(
    method: str, model: nn.Module, *, n: int = N, m: int = M, attach: bool = True, **hyper: Any
):
    """``method``'s optimizer over ``model`` (every Linear/Conv weight sparse), attached to the
    model where the method needs it."""
    groups = nm_param_groups(model, n, m, exclude=())
    family = HYPER[METHODS[method].optimizer]
    opt = make_optimizer(method, groups, n=n, m=m, **RUN, **(family | hyper))
    record = METHODS[method]
    if attach and record.attach is not None:
        record.attach(model, opt)
    return opt


def batch(t: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The fixed data of step ``t``."""
    generator = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(2, *INPUT_SHAPE, generator=generator).to(dtype)
    y = torch.randint(0, 4, (2,), generator=generator)
    return x, y


def train_step(model: nn.Module, opt, t: int) -> None:
    x, y = batch(t, next(model.parameters()).dtype)
    opt.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()


def train(model: nn.Module, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        train_step(model, opt, t)


def sparse_params(opt) -> list[tuple[Tensor, dict[str, Any]]]:
    return [
        (p, group)
        for group in opt.param_groups
        for p in group["params"]
        if isinstance(opt, NMOptimizer) and opt._is_sparse(p, group)
    ]


def momentum_of(opt, p: Tensor) -> Tensor | None:
    if hasattr(opt, "momentum_buffer"):
        return opt.momentum_buffer(p)
    return opt.state.get(p, {}).get("momentum_buffer")


def assert_same_state(opt_a, opt_b) -> None:
    """Every state entry (tensors: dtype and value) and every group setting are equal."""
    saved_a, saved_b = opt_a.state_dict(), opt_b.state_dict()
    for group_a, group_b in zip(saved_a["param_groups"], saved_b["param_groups"], strict=True):
        differ = {k: (group_a.get(k, "<missing>"), group_b.get(k, "<missing>"))
                  for k in group_a.keys() | group_b.keys() if group_a.get(k) != group_b.get(k)}
        assert group_a.keys() == group_b.keys() and not differ, differ
    assert saved_a["state"].keys() == saved_b["state"].keys()
    for i, entries in saved_a["state"].items():
        other = saved_b["state"][i]
        assert entries.keys() == other.keys(), i
        for key, value in entries.items():
            if isinstance(value, Tensor):
                assert value.dtype == other[key].dtype, (i, key)
                assert torch.equal(value, other[key]), (i, key)
            else:
                assert value == other[key], (i, key)


OTHER_VALUES = {
    "sgd": {"lr": 1.0, "momentum": 0.5, "weight_decay": 0.0},
    "adamw": {"lr": 1.0, "weight_decay": 0.5, "betas": (0.5, 0.5), "eps": 1e-3},
    "method": {"alpha": 0.25, "beta": 0.25, "gamma": 0.5, "seed": 7, "zeta": 0.5,
               "srste_decay": 0.5, "score_lr": 9.0, "revive_score": "sgd"},
}
"""Valid values unlike the run's of the hyper-parameters a resumed optimizer may be built with."""


def other_hyper(method: str) -> dict[str, Any]:
    """Other values of every hyper-parameter ``method`` takes that a checkpoint holds (not the
    schedule, which the given keywords set, nor settings it fixes or makes inert)."""
    record = METHODS[method]
    usable = accepted_keywords(method) - set(record.fixed) - inert_keywords(method)
    return OTHER_VALUES[record.optimizer] | {
        k: v for k, v in OTHER_VALUES["method"].items() if k in usable
    }
