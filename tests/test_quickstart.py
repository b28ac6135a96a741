"""The main job (examples/quickstart.py) runs end to end on digits and on an IDX folder, leaves
N:M weights, and rejects bad flags and damaged data with errors that name them."""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bame_apps.integrations.idx import IMAGES_MAGIC
from bame_optim.core.nm import is_nm_sparse

TINY = ["--epochs", "2", "--hidden", "64", "--delta-t", "2"]
SPARSE_LAYERS = (3, 5)
"""Indices in the ``nn.Sequential`` MLP of the two hidden-to-hidden Linear layers."""
DENSE_LAYERS = (1, 7)
"""The first layer and the classifier, which ``nm_param_groups`` keeps dense."""


@pytest.fixture(scope="module")
def quickstart(load_example) -> ModuleType:
    return load_example("quickstart")


def _zero_pattern(model: torch.nn.Module, layer: int) -> torch.Tensor:
    return model[layer].weight.detach() == 0


def test_digits_three_methods(quickstart, capsys):
    results = quickstart.main([*TINY, "--seeds", "2"])
    assert list(results) == list(quickstart.METHODS)
    for runs in results.values():
        assert len(runs) == 2
        for run in runs:
            assert 0.0 <= run["accuracy"] <= 1.0 and math.isfinite(run["accuracy"])
            assert math.isfinite(run["seconds"]) and run["seconds"] > 0
            assert run["steps"] == 2 * math.ceil(1437 / 64)
    for method in ("static N:M", "BAME"):
        for run in results[method]:
            assert run["nm_valid"] is True
            for layer in SPARSE_LAYERS:
                weight = run["model"][layer].weight.detach()
                assert is_nm_sparse(weight, 1, 16)
                assert int((weight != 0).sum()) == weight.numel() // 16
            for layer in DENSE_LAYERS:
                assert not bool(_zero_pattern(run["model"], layer).any())
            rows = [row for row in run["report"] if row["sparse"]]
            assert [row["name"] for row in rows] == ["3.weight", "5.weight"]
            assert all(row["nm_valid"] and row["density"] == 1 / 16 for row in rows)
    for run in results["dense SGD"]:
        assert run["nm_valid"] is None and run["report"] == []
        assert not is_nm_sparse(run["model"][3].weight.detach(), 1, 16)
    # The static mask is drawn from the run's seed: two seeds, two different masks.
    first, second = (_zero_pattern(run["model"], 3) for run in results["static N:M"])
    assert not torch.equal(first, second)
    out = capsys.readouterr().out
    assert "1437 train / 360 test images" in out
    for method in quickstart.METHODS:
        assert f"\n{method} " in out
    assert "1:16 valid in all 2 seeds: True" in out


def test_same_seed_same_run(quickstart):
    """Same initial weights and batches for a given seed: a run repeats bit for bit."""
    args = quickstart.parse_args([*TINY, "--n", "2", "--m", "8"])
    data = quickstart.load_data(args, quickstart.build_parser())
    first, second = (quickstart.train("BAME", data, args, seed=3) for _ in range(2))
    for a, b in zip(first["model"].parameters(), second["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert first["accuracy"] == second["accuracy"]
    assert all(is_nm_sparse(first["model"][i].weight, 2, 8) for i in SPARSE_LAYERS)


def test_limit_train(quickstart, capsys):
    results = quickstart.main(["--limit-train", "100", "--epochs", "1", "--seeds", "1"])
    assert results["BAME"][0]["steps"] == 2
    assert "100 train / 360 test images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--limit-train", "5000"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --limit-train: invalid value 5000 (the training set has 1437 images)" in err


def test_idx_folder(quickstart, tmp_path, capsys, write_idx_folder):
    write_idx_folder(tmp_path)
    argv = ["--data", str(tmp_path), "--epochs", "2", "--seeds", "2", "--hidden", "32"]
    results = quickstart.main([*argv, "--n", "2", "--m", "8", "--batch-size", "5"])
    assert all(len(runs) == 2 for runs in results.values())
    assert all(run["nm_valid"] for run in results["BAME"] + results["static N:M"])
    assert results["BAME"][0]["model"][1].in_features == 28 * 28
    assert "12 train / 5 test images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "4", "--m", "4"], "--n: invalid value 4 (1 <= n < m = 4"),
        (["--n", "0"], "--n: invalid value 0"),
        (["--m", "1", "--n", "1"], "--m: invalid value 1"),
        (["--hidden", "100"], "--hidden: invalid value 100 (must be divisible by m = 16)"),
        (["--epochs", "0"], "--epochs: invalid value 0"),
        (["--batch-size", "-3"], "--batch-size: invalid value -3"),
        (["--seeds", "0"], "--seeds: invalid value 0"),
        (["--delta-t", "0"], "--delta-t: invalid value 0"),
        (["--limit-train", "0"], "--limit-train: invalid value 0"),
        (["--lr", "-1"], "--lr: invalid value -1.0"),
        (["--lr", "nan"], "--lr: invalid value nan"),
        (["--weight-decay", "-0.1"], "--weight-decay: invalid value -0.1"),
        (["--seed", "-1"], "--seed: invalid value -1"),
        (["--data", "/nonexistent/fashion"], "--data: invalid value '/nonexistent/fashion'"),
        (["--epochs", "two"], "--epochs: invalid int value: 'two'"),
    ],
)
def test_bad_flags(quickstart, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {message}" in capsys.readouterr().err


def _rewrite(path: Path, change) -> None:
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])


def _wrong_magic(raw: bytes) -> bytes:
    return IMAGES_MAGIC.to_bytes(4, "big") + raw[4:]


@pytest.mark.parametrize(
    ("name", "damage", "checksums", "message"),
    [
        ("t10k-labels-idx1-ubyte.gz", _flip_last_byte, True, "MD5"),
        ("train-images-idx3-ubyte.gz", lambda raw: raw[:-28], True, "MD5"),
        ("train-images-idx3-ubyte.gz", lambda raw: raw[:-28], False, "truncated or corrupt"),
        ("train-labels-idx1-ubyte.gz", _wrong_magic, False, "IDX magic 2051, expected 2049"),
        ("t10k-images-idx3-ubyte.gz", None, True, "missing IDX file"),
    ],
)
def test_damaged_idx_folder_is_named(
    quickstart, tmp_path, capsys, name, damage, checksums, message, write_idx_folder
):
    """Each damaged or missing file stops the job before training, naming the file."""
    write_idx_folder(tmp_path, checksums=checksums)
    if damage is None:
        (tmp_path / name).unlink()
    else:
        _rewrite(tmp_path / name, damage)
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--data", str(tmp_path), "--epochs", "1", "--seeds", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --data:" in err and message in err
    assert str(tmp_path / name.removesuffix(".gz")) in err


def test_corrupt_gzip_stream_exits_cleanly(quickstart, tmp_path, capsys, write_idx_folder):
    """A damaged deflate stream raises ``zlib.error`` in the loader, not a named error."""
    write_idx_folder(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[12:24] = bytes(b ^ 0xFF for b in data[12:24])  # inside the deflate stream
    target.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--data", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # zlib names no file, so the job names the folder
    assert "argument --data:" in err and str(tmp_path) in err and "corrupt" in err


def test_default_schedule_gives_bame_at_least_ten_evolve_updates(quickstart):
    """The main job must run BAME, not gradual pruning with a mask that never evolves."""
    from bame_optim.core.schedule import evolve_updates

    args = quickstart.parse_args([])
    steps = args.epochs * math.ceil(1437 / args.batch_size)  # digits: 1797 - 360 test images
    assert evolve_updates(steps // 3, 2 * steps // 3, args.delta_t) >= 10

