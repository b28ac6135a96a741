"""ASP: one-shot magnitude N:M pruning at the first step, fixed mask after."""

from __future__ import annotations

import pytest
import torch

from bame_optim.core.nm import param_to_blocks
from bame_optim.optim.sgd import ASPSGD


def test_prunes_by_magnitude_once_and_keeps_the_mask():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 16, generator=gen).requires_grad_()
    pretrained = p.detach().clone()
    opt = ASPSGD([p], lr=0.01, momentum=0.9, n=2, m=4)
    p.grad = torch.zeros_like(p) + 1e-3
    opt.step()
    mask = opt.kept_mask(p)
    blocks = param_to_blocks(pretrained, 4).abs()
    expected = blocks >= blocks.sort(dim=1, descending=True).values[:, 1:2]
    assert torch.equal(mask, expected)
    for _ in range(10):
        p.grad = torch.randn(6, 16, generator=gen)
        opt.step()
    assert torch.equal(opt.kept_mask(p), mask)
    assert (param_to_blocks(p.detach(), 4)[~mask] == 0).all()


@pytest.mark.parametrize("name", ["total_steps", "t_i", "t_f", "delta_t", "alpha", "seed"])
def test_schedule_arguments_are_refused(name):
    """ASP prunes once, at the first step: schedule and OBF keywords are not taken."""
    p = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(TypeError, match=rf"ASPSGD\(\) does not use the keywords \['{name}'\]"):
        ASPSGD([p], lr=0.1, **{name: 5})
    with pytest.raises(ValueError, match=rf"Invalid param group keys \['{name}'\]"):
        ASPSGD([{"params": [p], name: 5}], lr=0.1)
