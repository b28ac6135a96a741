"""bame_apps.integrations.training.checkpoints: finding complete checkpoints, atomic save."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("accelerate")
from accelerate import Accelerator

from bame_apps.integrations.training.checkpoints import (
    checkpoint_epoch,
    find_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def accelerator(fresh_accelerate_state):
    """A CPU ``Accelerator`` on a fresh process-wide Accelerate state (reset again after)."""
    return Accelerator(cpu=True)


def test_find_checkpoint_ignores_temporary_and_partial_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("epoch_0002", True), ("epoch_0010", True), ("epoch_0011", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    (root / ".tmp-epoch_0012").mkdir()
    (root / ".tmp-epoch_0012" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == root / "epoch_0010"
    assert find_checkpoint(root) == root / "epoch_0010"
    assert find_checkpoint(root / "epoch_0002") == root / "epoch_0002"
    assert find_checkpoint(tmp_path / "nothing") is None
    assert checkpoint_epoch(root / "epoch_0010") == 10
    with pytest.raises(ValueError, match="Invalid checkpoint value"):
        checkpoint_epoch(root / ".tmp-epoch_0012")


def test_save_checkpoint_is_atomic_and_keeps_the_latest(
    accelerator, tmp_path, monkeypatch, model_and_optimizer
):
    model, opt = model_and_optimizer()
    model, opt = accelerator.prepare(model, opt)
    root = tmp_path / "checkpoints"
    extra = {"trainer_state": {"epoch": 1}, "oscillation": {}}
    for epoch in (1, 2, 3):
        path = save_checkpoint(
            accelerator, root, epoch, extra | {"trainer_state": {"epoch": epoch}}, keep=2
        )
        assert path == root / f"epoch_{epoch:04d}"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002", "epoch_0003"]
    assert json.loads((root / "epoch_0003" / "trainer_state.json").read_text()) == {"epoch": 3}
    # saving the same epoch again replaces it whole
    save_checkpoint(accelerator, root, 3, extra | {"trainer_state": {"epoch": 33}}, keep=2)
    assert json.loads((root / "epoch_0003" / "trainer_state.json").read_text()) == {"epoch": 33}

    def broken_write(self, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(root), "write_text", broken_write)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(accelerator, root, 4, extra, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002", "epoch_0003"]
    assert find_checkpoint(root) == root / "epoch_0003"
