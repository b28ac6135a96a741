"""``bame_optim.reference``: the oracles share no code with the package, so the conventions they
restate (block layout, seeds, the gradual budget, the static start) are checked against the
package's here; their agreement with the optimizers is test_sgd, test_adamw, test_srste,
test_lbc and test_evolution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim.core.nm import blocks_to_param, param_to_blocks, random_nm_mask
from bame_optim.core.schedule import gradual_budget
from bame_optim.optim.rules import SEED_STRIDE
from bame_optim.reference import SEED_STRIDE as REFERENCE_SEED_STRIDE
from bame_optim.reference import evolution as ref

from .strategies import nm_patterns


def test_seed_stride_is_the_rules():
    assert REFERENCE_SEED_STRIDE == SEED_STRIDE


@pytest.mark.parametrize("shape", [(4, 8), (3, 8, 3), (2, 8, 2, 2)])
def test_block_layout_is_the_packages(shape):
    tensor = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    assert torch.equal(ref.to_blocks(tensor, 4), param_to_blocks(tensor, 4))
    assert torch.equal(ref.to_param(ref.to_blocks(tensor, 4), shape), tensor)
    assert torch.equal(ref.to_param(param_to_blocks(tensor, 4), shape),
                       blocks_to_param(param_to_blocks(tensor, 4), shape))


@given(nm_patterns, st.integers(1, 30), st.integers(0, 2**16))
def test_static_start_is_random_nm_mask(pattern, k, seed):
    n, m = pattern
    expected = random_nm_mask(k, n, m, torch.Generator().manual_seed(seed))
    assert torch.equal(ref.random_start(k, n, m, torch.Generator().manual_seed(seed)), expected)


@given(nm_patterns, st.integers(0, 200), st.integers(0, 200))
def test_gradual_budget_is_the_schedules(pattern, t, t_i):
    n, m = pattern
    assert ref.gradual_budget(t, n, m, t_i) == gradual_budget(t, n, m, t_i)
