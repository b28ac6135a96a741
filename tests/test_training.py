"""bame_apps.integrations.training's schedule and sampler: the per-step lr of torch's
schedulers against the closed-form warm-up and cosine, exact resume of the schedule from its
state, and the epoch-seeded data order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from bame_apps.integrations.training import EpochSampler, make_lr_scheduler


def closed_form_lr(step: int, total_steps: int, peak: float, warmup_steps: int = 0) -> float:
    """Optimizer step ``step`` (0-based): ``peak * (step + 1) / warmup_steps`` during the
    warm-up, then ``peak * (1 + cos(pi * s / S)) / 2`` over the remaining ``S`` steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def _lrs(total: int, peak: float, warmup: int = 0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = make_lr_scheduler(opt, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "total, warmup", [(50, 0), (20, 4), (10, 1), (5, 5), (1, 0), (30_000, 0), (30_000, 600)]
)
def test_lr_schedule_is_the_closed_form_warmup_and_cosine(total, warmup):
    """torch's CosineAnnealingLR and LinearLR compute the lr recursively from the previous
    one; in float64 that stays within ~1e-13 relative of the closed form even over 30,000
    steps (measured: < 3e-14), so the tolerance is rel 1e-12."""
    lrs = _lrs(total, 0.1, warmup)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(closed_form_lr(step, total, 0.1, warmup), rel=1e-12, abs=1e-16)
    assert lrs[0] == pytest.approx(0.1 / warmup if warmup else 0.1, rel=1e-15)


def test_lr_schedule_warmup_values_and_end():
    lrs = _lrs(20, 1.0, 4)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, (1 + math.cos(math.pi / 16)) / 2]
    assert lrs[:6] == pytest.approx(expected, rel=1e-15)
    assert lrs[12] == pytest.approx(0.5, rel=1e-15)  # half way through the cosine
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_lr_scheduler(opt, 10)
    for _ in range(10):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-17)


@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_resumes_exactly_from_its_state(warmup):
    def fresh():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, make_lr_scheduler(opt, 12, warmup)

    opt, scheduler = fresh()
    full = []
    for step in range(12):
        full.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        if step == 4:
            saved = (opt.state_dict(), scheduler.state_dict())
    opt2, scheduler2 = fresh()
    opt2.load_state_dict(saved[0])
    scheduler2.load_state_dict(saved[1])
    rest = []
    for _ in range(5, 12):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        scheduler2.step()
    assert rest == full[5:]  # bit for bit


@pytest.mark.parametrize("total, warmup", [(0, 0), (10, 11), (10, -1)])
def test_lr_schedule_rejects_bad_step_counts(total, warmup):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid (total_steps|warmup_steps) value"):
        make_lr_scheduler(opt, total, warmup)


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
