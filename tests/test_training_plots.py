"""bame_apps.integrations.training.plots: the loss/accuracy curves and the mask oscillation
figure are PNGs, with and without evaluations or mask changes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from bame_apps.integrations.training.plots import plot_curves, plot_mask_oscillation

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_pngs(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 2 / e,
            "train_accuracy": 0.2 * e,
            "eval_loss": 2.1 / e,
            "eval_accuracy": 0.19 * e,
        }
        for e in (1, 2, 3)
    ]
    history[1]["eval_accuracy"] = None  # an epoch without evaluation
    assert plot_curves(history, tmp_path / "c.png", "t").read_bytes()[:8] == PNG
    sad = {
        "a": torch.tensor([0, 0, 2, 6], dtype=torch.int32),
        "b": torch.zeros(5, dtype=torch.int32),
    }
    assert plot_mask_oscillation(sad, 3, tmp_path / "s.png").read_bytes()[:8] == PNG
    assert plot_mask_oscillation({}, 0, tmp_path / "e.png").read_bytes()[:8] == PNG
    many = {"big": torch.arange(5000, dtype=torch.int32) % 700}  # > 200 distinct values
    assert plot_mask_oscillation(many, 9, tmp_path / "m.png").read_bytes()[:8] == PNG
