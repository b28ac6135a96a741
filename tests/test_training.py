"""bame_optim.integrations.training's schedule and sampler: the per-step cosine learning rate
and the epoch-seeded data order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from bame_optim.integrations.training import EpochSampler, cosine_lr


def test_cosine_lr_is_torch_cosine_annealing_per_step():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for step in range(50):
        assert cosine_lr(step, 50, 0.1) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        scheduler.step()
    assert [cosine_lr(s, 20, 1.0, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(4, 20, 1.0, warmup_steps=4) == 1.0
    assert cosine_lr(12, 20, 1.0, warmup_steps=4) == pytest.approx(0.5)


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    b.set_epoch(2)
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))
