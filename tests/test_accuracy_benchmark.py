"""The accuracy benchmark runs every method on digits and writes its table, CSV and plot."""

from __future__ import annotations

import csv
import inspect

import pytest

from bame_optim.methods import METHODS
from benchmarks import accuracy


def test_methods_come_from_the_registry():
    """Every SGD method of the registry runs by default, in its order, and the benchmark names
    none itself (a newly registered method needs no edit here)."""
    sgd = [name for name, method in METHODS.items() if method.optimizer == "sgd"]
    assert list(accuracy.DEFAULT_METHODS) == sgd
    source = inspect.getsource(accuracy)
    assert [name for name in METHODS if f'"{name}"' in source or f"'{name}'" in source] == []


def test_small_run_on_digits(tmp_path, capsys):
    table = accuracy.main(
        [
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--patterns",
            "1:4",
            "--seeds",
            "0",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert [row["method"] for row in table] == list(accuracy.DEFAULT_METHODS)
    for row in table:
        assert 0 <= row["top1_mean"] <= 100 and row["seeds"] == "0 1"
        assert row["flops_ratio"] > 0
    by_method = {row["method"]: row for row in table}
    assert by_method["dense"]["flops_ratio"] == 1.0
    assert by_method["bame"]["flops_ratio"] < by_method["srste"]["flops_ratio"] < 1.0
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(table)
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "| bame | 1:4 |" in capsys.readouterr().out


def test_one_seed_shows_no_spread():
    assert accuracy.top1_std([81.5]) is None
    assert accuracy.top1_text({"top1_mean": 81.5, "top1_std": None}) == "81.50 (one seed)"
    assert accuracy.top1_std([81.0, 82.0]) == pytest.approx(0.5**0.5)
    assert accuracy.top1_text({"top1_mean": 81.5, "top1_std": 0.7071}) == "81.50 ± 0.71"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patterns", "4:4"], "invalid N:M pattern '4:4'"),
        (["--epochs", "0"], "--epochs: invalid value 0"),
        (["--dataset", "cifar10"], "--data: required"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        accuracy.main(argv)
    assert message in capsys.readouterr().err


def test_augment_is_a_random_crop_and_flip_of_each_image():
    import torch
    from torch.nn import functional as F

    x = torch.randn(16, 3, 8, 8)
    out = accuracy._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pad = accuracy.CROP_PADDING
    padded = F.pad(x, [pad] * 4)
    flipped = 0
    for i in range(len(x)):
        crops = [
            (padded[i, :, dy : dy + 8, dx : dx + 8], flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
        ]
        matches = [
            flip for crop, flip in crops if torch.equal(out[i], crop.flip(-1) if flip else crop)
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        flipped += matches[0]
    assert 0 < flipped < len(x)
