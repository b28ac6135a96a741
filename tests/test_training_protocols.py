"""bame_apps.integrations.training.protocols: the Protocols the training loop asks instead of
``hasattr`` hold for exactly the optimizers that have the methods (every N:M method's, not
the dense ones), and for Accelerate's prepared loaders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from bame_apps.integrations.training.protocols import (
    EpochLoader,
    MaskedOptimizer,
    ScheduledOptimizer,
)
from bame_optim import nm_param_groups
from bame_optim.methods import METHODS, make_optimizer
from bame_optim.optim.base import NMOptimizer
from bame_optim.optim.masked import MaskedOptimizer as MaskedBase


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_protocols_hold_for_the_optimizers_with_masks(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    groups = nm_param_groups(model, 1, 4)
    optimizer = make_optimizer(method, groups, lr=0.1, total_steps=24, delta_t=2)
    assert isinstance(optimizer, MaskedOptimizer) == isinstance(optimizer, NMOptimizer)
    assert isinstance(optimizer, ScheduledOptimizer) == isinstance(optimizer, MaskedBase)
    assert isinstance(optimizer, MaskedOptimizer) == (not method.startswith("dense")), method


def test_a_plain_loader_is_no_epoch_loader_and_a_prepared_one_is():
    from accelerate import Accelerator

    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4)
    assert not isinstance(loader, EpochLoader)
    assert isinstance(Accelerator(cpu=True).prepare(loader), EpochLoader)
