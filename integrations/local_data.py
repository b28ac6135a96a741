"""Small image-classification datasets from local files, as in-memory tensors.

For benchmarks and the quick-start job: no downloads, clear errors naming the file.
``load_split(name, path)`` returns ``((x_train, y_train), (x_test, y_test))`` with images as
normalised float32 ``[N, C, H, W]`` and labels as int64.

* ``digits``: scikit-learn's bundled 8x8 digits (no path; a fixed stratified 80/20 split),
* ``fashion-mnist`` / ``mnist``: the four IDX files of a folder (:mod:`.idx`),
* ``cifar10``: the CIFAR-10 "python version" batches (``data_batch_1..5``, ``test_batch``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .idx import load_idx_dataset

__all__ = ["DATASETS", "load_split", "read_cifar10_batches"]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

Split = tuple[torch.Tensor, torch.Tensor]


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale by the training set's per-channel mean and std (inputs ``[N, C, H, W]``)."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return (
        torch.from_numpy(((train - mean) / std).astype(np.float32)),
        torch.from_numpy(((test - mean) / std).astype(np.float32)),
    )


def _digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 1, 8, 8) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    x_train, x_test = _normalise(x_train, x_test)
    return (x_train, torch.from_numpy(y_train)), (x_test, torch.from_numpy(y_test))


def read_cifar10_batches(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Read CIFAR-10 python batches: ``((train_images, train_labels), (test_images,
    test_labels))`` with images ``uint8 [N, 3, 32, 32]``.

    Raises ``FileNotFoundError`` naming a missing batch and ``ValueError`` naming a batch
    that is not a CIFAR-10 batch (wrong keys, sizes or label range).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {folder}")
    splits = []
    for names in (CIFAR10_TRAIN_BATCHES, ("test_batch",)):
        images, labels = [], []
        for name in names:
            file = folder / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"missing CIFAR-10 batch {file} (expected {', '.join(CIFAR10_TRAIN_BATCHES)}"
                    f" and test_batch, the 'python version' of the dataset)"
                )
            try:
                with open(file, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{file} is not a readable CIFAR-10 batch: {err!r}") from err
            rows = len(batch_labels)
            if data.ndim != 2 or data.shape != (rows, 3 * 32 * 32) or rows == 0:
                raise ValueError(
                    f"{file}: expected data of shape [N, 3072] (N images of 3x32x32) and N labels,"
                    f" got data {data.shape} and {rows} labels (truncated or corrupt?)"
                )
            bad = np.flatnonzero((batch_labels < 0) | (batch_labels > 9))
            if bad.size:
                raise ValueError(
                    f"{file}: label {int(batch_labels[bad[0]])} at index {int(bad[0])} is outside"
                    f" 0..9 (10 classes); {bad.size} label(s) out of range"
                )
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(batch_labels)
        splits.append((np.concatenate(images), np.concatenate(labels)))
    return tuple(splits)


def load_split(name: str, path: str | Path | None = None) -> tuple[Split, Split]:
    """``((x_train, y_train), (x_test, y_test))`` of dataset ``name`` (see module doc)."""
    if name not in DATASETS:
        raise ValueError(f"Invalid name value: {name!r} (one of {', '.join(DATASETS)})")
    if name == "digits":
        return _digits()
    if path is None:
        raise ValueError(f"Invalid path value: None (dataset {name!r} is read from a local folder)")
    if name == "cifar10":
        (xs, ys), (xt, yt) = read_cifar10_batches(path)
    else:
        (xs, ys), (xt, yt) = load_idx_dataset(path)
        xs, xt = xs[:, None], xt[:, None]
    x_train, x_test = _normalise(xs.astype(np.float32) / 255.0, xt.astype(np.float32) / 255.0)
    return (x_train, torch.from_numpy(ys.astype(np.int64))), (
        x_test,
        torch.from_numpy(yt.astype(np.int64)),
    )
