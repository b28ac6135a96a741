"""In-memory splits: digits, IDX folders and CIFAR-10 python batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from bame_apps.integrations.local_data import load_split, read_cifar10_batches


def test_digits_split_is_normalised_and_stratified():
    (x, _y), (xt, yt) = load_split("digits")
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert len(x) + len(xt) == 1797 and len(xt) == 360
    assert abs(float(x.mean())) < 1e-4
    assert set(yt.tolist()) == set(range(10))


def test_idx_split(tmp_path, write_idx_folder):
    write_idx_folder(tmp_path)
    (x, y), (xt, _yt) = load_split("fashion-mnist", tmp_path)
    assert x.shape == (12, 1, 28, 28) and xt.shape == (5, 1, 28, 28)
    assert y.dtype == torch.int64


def test_cifar_batches(tmp_path, write_cifar_folder):
    write_cifar_folder(tmp_path)
    (xs, _ys), (xt, _yt) = read_cifar10_batches(tmp_path)
    assert xs.shape == (20, 3, 32, 32) and xt.shape == (4, 3, 32, 32)
    with open(tmp_path / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    np.testing.assert_array_equal(xs[4:8].reshape(4, -1), raw[b"data"])
    (x, _), _ = load_split("cifar10", tmp_path)
    assert x.shape == (20, 3, 32, 32)


def test_cifar_errors_name_the_file(tmp_path, write_cifar_folder):
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").write_bytes((tmp_path / "data_batch_3").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"data_batch_3 is not a readable CIFAR-10 batch"):
        read_cifar10_batches(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"data_batch_3: expected data of shape \[N, 3072\]"):
        read_cifar10_batches(tmp_path)
    (tmp_path / "test_batch").unlink()
    write_cifar_folder(tmp_path / "other")
    (tmp_path / "other" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing CIFAR-10 batch .*test_batch"):
        read_cifar10_batches(tmp_path / "other")


def test_bad_names():
    with pytest.raises(ValueError, match=r"Invalid name value: 'imagenet'"):
        load_split("imagenet")
    with pytest.raises(ValueError, match=r"Invalid path value: None"):
        load_split("cifar10")


@pytest.mark.parametrize("bad", [10, -1])
def test_cifar_label_out_of_range_names_the_batch_and_value(tmp_path, write_cifar_folder, bad):
    write_cifar_folder(tmp_path)
    with open(tmp_path / "test_batch", "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"][2] = bad
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    pattern = rf"test_batch: label {bad} at index 2 is outside 0\.\.9 \(10 classes\)"
    with pytest.raises(ValueError, match=pattern):
        read_cifar10_batches(tmp_path)
