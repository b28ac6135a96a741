"""BAMESGD under ``Accelerator.prepare`` with two real processes (torchrun, gloo on CPU).

One launch of :mod:`tests.accelerate_worker` checks both that the ranks keep identical masks
and weights through every mask update (and equal to a single-process run on the same global
batches), and that :func:`~bame_apps.integrations.accelerate.verify_masks` detects the swap of
one block's kept set ``{0, 3}`` / ``{1, 2}`` (2:4) on rank 1, says that the mask (and the
weights) of that parameter differ, and repairs it from rank 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from . import accelerate_worker as worker
from .torchrun import run_ranks

pytest.importorskip("accelerate")

CORRUPT_STEP = 9  # an evolve-phase update step (t_i = 6, delta_t = 3)


def _single_process_reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same training without accelerate: one process, global batches of 2 x 8 in the
    order the two ranks see them (batch k is ranks' batches 2k and 2k + 1), mean loss."""
    model, optimizer, data = worker.build()
    loader = torch.utils.data.DataLoader(
        data, batch_size=worker.WORLD * worker.PER_RANK_BATCH, shuffle=False
    )
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["step"] == worker.STEPS
    return worker.masks(optimizer), model.state_dict()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("accelerate_ranks")
    return run_ranks("accelerate_worker.py", out, "--corrupt-step", str(CORRUPT_STEP), timeout=120)


def test_step_counter_counts_every_update(ranks):
    assert [r["step"] for r in ranks] == [worker.STEPS, worker.STEPS]


def test_checks_run_on_every_update_step_and_catch_the_corruption(ranks):
    update_steps = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    frozen_checks = [30, 33, 36, 39]  # after t_f = 30, every delta_t
    for r in ranks:
        assert [t for t, _ in r["checks"]] == update_steps + frozen_checks
        assert [ok for t, ok in r["checks"] if t != CORRUPT_STEP] == [True] * 13
        assert dict(r["checks"])[CORRUPT_STEP] is False
        assert len(r["warnings"]) == 1
        assert r["warnings"][0].startswith(
            f"verify_masks (rank {r['rank']}): ranks [1] differ from rank 0 in '2.weight': "
            "the mask (ranks [1]), the weights (ranks [1]); repaired: "
        )


def test_rank_1_swapped_0_3_and_1_2_in_one_block(ranks):
    assert ranks[0]["swap"] is None
    block, kept = ranks[1]["swap"]
    assert kept in ([True, False, False, True], [False, True, True, False])
    assert ranks[0]["repaired"]["masks"]["2.weight"][block].tolist() != kept


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_repair_leaves_identical_masks_weights_and_state(ranks):
    first, second = (r["repaired"] for r in ranks)
    _assert_equal(first, second)
    _assert_equal(ranks[0]["optimizer"], ranks[1]["optimizer"])


def test_ranks_are_identical(ranks):
    first, second = ranks
    for name, mask in first["masks"].items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, second["masks"][name]), name
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name


def test_ranks_match_a_single_process_run_on_the_global_batches(ranks):
    masks, weights = _single_process_reference()
    assert masks.keys() == ranks[0]["masks"].keys()
    for name, mask in masks.items():
        assert torch.equal(mask, ranks[0]["masks"][name]), name
    for name, weight in weights.items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, atol=1e-5, rtol=1e-5)
