"""BAMESGD on parameters sharded by FSDP2 (``fully_shard``), two real processes (torchrun,
gloo on CPU): each rank computes the N:M masks of its own rows, OBF ranks the blocks of all
shards, and the run equals a single-process run on the same global batches; a
``torch.distributed.checkpoint`` save and load in the evolve phase continues bit-identically.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bame_optim.optim.sharded import is_sharded, local_state, local_tensor

from . import fsdp_worker as worker
from .torchrun import run_ranks

if not torch.distributed.is_available():  # pragma: no cover - every supported build has it
    pytest.skip("torch.distributed is not available", allow_module_level=True)

@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks("fsdp_worker.py", tmp_path_factory.mktemp("fsdp_ranks"))


def _whole_masks(ranks: list[dict], run: str) -> dict[str, torch.Tensor]:
    """Each layer's mask from the ranks' shards, checking that they tile the blocks."""
    masks = {}
    for layer in ranks[0][run]["masks"]:
        parts = [r[run]["masks"][layer] for r in ranks]
        first = 0
        for mask, (start, count) in parts:
            assert start == first and mask.shape[0] == count
            first += count
        masks[layer] = torch.cat([mask for mask, _ in parts])
    return masks


def _single_process() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    model = worker.build(seed=0)
    opt = worker.optimizer(model)
    worker.train(model, opt, range(worker.STEPS), rank=0, world=1)
    masks = {str(i): opt.kept_mask(model[i].weight) for i in (0, 2)}
    return model, masks


def test_uneven_shards_hold_whole_rows(ranks):
    # 21 rows of the second layer split 11 / 10: blocks 11 * 9 and 10 * 9.
    starts = [r["whole"]["masks"]["2"][1] for r in ranks]
    assert starts == [(0, 99), (99, 90)]


def test_sharded_run_equals_one_process(ranks):
    model, masks = _single_process()
    for r in ranks:
        assert r["whole"]["steps"] == [worker.STEPS, worker.STEPS]
        for name, value in model.state_dict().items():
            torch.testing.assert_close(r["whole"]["weights"][name], value, rtol=1e-5, atol=1e-6)
    for layer, mask in _whole_masks(ranks, "whole").items():
        assert torch.equal(mask, masks[layer]), f"layer {layer}"
        assert (mask.sum(dim=1) == worker.SCHEDULE["n"]).all()
    for name in ("0.weight", "2.weight"):
        blocks = ranks[0]["whole"]["weights"][name].reshape(-1, 4)
        assert ((blocks != 0).sum(dim=1) <= 2).all()


def test_distributed_checkpoint_resume_is_bit_identical(ranks):
    for r in ranks:
        assert r["resumed_at"] == [worker.SAVE_AT, worker.SAVE_AT]
        assert r["resumed"]["steps"] == r["whole"]["steps"]
        for name, value in r["whole"]["weights"].items():
            assert torch.equal(r["resumed"]["weights"][name], value), name
    whole, resumed = _whole_masks(ranks, "whole"), _whole_masks(ranks, "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_helpers_are_identity_on_ordinary_tensors():
    t = torch.randn(4, 8)
    assert not is_sharded(t)
    assert local_tensor(t) is t and local_state(t) is t
