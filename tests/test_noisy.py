"""The unclear or noisy items of issue 16: each test fails on the code before its fix."""

from __future__ import annotations

import sys
import warnings

import pytest
from torch import nn

from bame_optim import nm_param_groups


def test_epochs_help_shows_the_default(load_example, capsys):
    with pytest.raises(SystemExit):
        load_example("train_cifar").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS default: 300" in out
    with pytest.raises(SystemExit):
        load_example("train_imagenet").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: resnet18 120, resnet50 120, deit_small 300, other models 120" in out


def test_console_command_usage_names_the_command(load_example, capsys, monkeypatch):
    from bame_optim import console

    monkeypatch.setattr(sys, "argv", ["/venv/bin/bame-train-cifar", "--bad-flag"])
    with pytest.raises(SystemExit):
        console.train_cifar()
    err = capsys.readouterr().err
    assert err.startswith("usage: bame-train-cifar ") and "train_cifar.py" not in err
    monkeypatch.setattr(sys, "argv", ["examples/train_cifar.py", "--bad-flag"])
    with pytest.raises(SystemExit):
        load_example("train_cifar").main()
    assert capsys.readouterr().err.startswith("usage: train_cifar.py ")


def test_a_refused_launch_prints_its_reason_without_the_usage(load_example, capsys, monkeypatch):
    from bame_optim.integrations.training import cli
    from bame_optim.integrations.training.launch import LaunchError

    def refuse(config, argv=None):
        raise LaunchError("2 processes were launched but each would train alone")

    monkeypatch.setattr(cli, "run", refuse)
    with pytest.raises(SystemExit) as info:
        load_example("train_cifar").main(["--data", "d"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "train_cifar.py: error: 2 processes were launched but each would train alone\n")


def test_make_optimizer_warnings_point_at_the_callers_line():
    from bame_optim.methods import make_optimizer

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_optimizer("bame", nm_param_groups(model, 1, 4, exclude=()), lr=0.1,
                       total_steps=30)  # delta_t 100: the evolve window holds no update
    assert record and all(w.filename == __file__ for w in record), [w.filename for w in record]
