"""The unclear or noisy items of issue 16: each test fails on the code before its fix."""

from __future__ import annotations

import socket
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
    from bame_apps import console

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
    from bame_apps.integrations.training import cli
    from bame_apps.integrations.training.launch import LaunchError

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


def test_a_hub_name_fails_fast_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from bame_apps.integrations.datasets import load as image_datasets

    def no_download(*args, **kwargs):
        pytest.fail("load_dataset ran although the Hub could not be reached")

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused
    monkeypatch.setattr(image_datasets, "getproxies", dict)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    probes = []
    connect = socket.create_connection

    def recorded(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recorded)
    with pytest.raises(image_datasets.DatasetUnavailableError,
                       match=r"cannot load dataset 'fashion_mnist' .*set HF_HUB_OFFLINE=1 to "
                             r"use a cached copy.*no connection to 127\.0\.0\.1:9 within 3 s"):
        image_datasets.load_image_dataset("fashion_mnist", cache_dir=str(tmp_path))
    # Fast by construction: one bounded probe, and the Hub client (its retries) never runs.
    assert probes == [(("127.0.0.1", 9), image_datasets.HUB_PROBE_TIMEOUT)]
