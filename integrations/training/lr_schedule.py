"""The learning-rate schedule of a training run, from :mod:`torch.optim.lr_scheduler`:
:func:`make_lr_scheduler` (an optional linear warm-up, then cosine annealing to 0), stepped once
per optimizer step."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

__all__ = ["make_lr_scheduler"]


def make_lr_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    """The schedule of every parameter group's lr over ``total_steps`` optimizer steps.

    Call ``scheduler.step()`` after every optimizer step that ran. Optimizer step ``t``
    (0-based) then runs with ``lr * (t + 1) / warmup_steps`` during the warm-up
    (:class:`~torch.optim.lr_scheduler.LinearLR`), then with ``lr * (1 + cos(pi * s / S)) / 2``,
    ``s = t - warmup_steps``, ``S = max(1, total_steps - warmup_steps)``
    (:class:`~torch.optim.lr_scheduler.CosineAnnealingLR` with ``T_max = S``; both compute this
    recursively from the previous lr, equal to the closed form within float64 rounding), where
    ``lr`` is each group's initial lr. The scheduler's ``state_dict`` (with the optimizer's)
    resumes the schedule exactly.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"Invalid total_steps value: {total_steps!r} (an integer >= 1 is required)"
        )
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"Invalid warmup_steps value: {warmup_steps!r} (an integer 0 <= warmup_steps <= "
            f"total_steps = {total_steps} is required)"
        )
    span = max(1, total_steps - warmup_steps)
    if warmup_steps == 0:
        return CosineAnnealingLR(optimizer, T_max=span)
    warmup = LinearLR(
        optimizer,
        start_factor=1.0 / warmup_steps,
        end_factor=1.0,
        total_iters=warmup_steps - 1,
    )
    cosine = CosineAnnealingLR(optimizer, T_max=span)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
