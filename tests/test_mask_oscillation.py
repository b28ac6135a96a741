"""bame_apps.integrations.training.mask_oscillation: the accumulated SAD per N:M block (the paper's
Figure 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from bame_apps.integrations.training.mask_oscillation import MaskOscillation
from bame_optim import BAMESGD


def _step(model, opt, generator):
    x = torch.randn(16, 8, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("method, every_step", [("bame", False), ("srste", True)])
def test_mask_oscillation_accumulates_sad_of_n_m_blocks(method, every_step, model_and_optimizer):
    """Against masks read after every step: SAD summed over consecutive masks, counting only
    blocks whose previous mask kept exactly N (so gradual pruning is not oscillation)."""
    model, opt = model_and_optimizer(method)
    weight = model[2].weight
    tracker = MaskOscillation(opt, every_step=every_step)
    generator = torch.Generator().manual_seed(1)
    expected = torch.zeros(16 * 16 // 4, dtype=torch.int32)
    previous = opt.kept_mask(weight)
    reads = 0
    for _ in range(24):
        _step(model, opt, generator)
        reads += tracker.after_step()
        current = opt.kept_mask(weight)
        if previous is not None:
            expected += (previous != current).sum(-1, dtype=torch.int32) * (previous.sum(-1) == 1)
        previous = current
    assert torch.equal(tracker.sad["2.weight"], expected)
    assert int(expected.sum()) > 0, "the masks moved in the N:M phase"
    if not every_step:
        group = opt.param_groups[0]
        updates = [t for t in range(24) if t % 2 == 0 or t == group["t_i"]]
        assert reads == len([t for t in updates if t < group["t_f"] or t == group["t_i"]])
    else:
        assert reads == 24
    # the state round-trips through a fresh tracker
    fresh = MaskOscillation(opt, every_step=every_step)
    fresh.load_state_dict(tracker.state_dict())
    assert fresh.cycles == tracker.cycles and fresh.total() == tracker.total()
    summary = tracker.summary()
    assert summary["overall"]["total"] == tracker.total()
    assert summary["layers"]["2.weight"]["blocks"] == 64


def test_mask_oscillation_needs_a_mask_optimizer():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="holds no N:M optimizer"):
        MaskOscillation(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = BAMESGD(model.parameters(), lr=0.1, n=1, m=4, t_i=0, t_f=0)
    assert MaskOscillation(opt).after_step() is False  # no step yet
