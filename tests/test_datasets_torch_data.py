"""A loaded split as a torch dataset, and the training / test loaders
(``integrations/datasets/torch_data.py``)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from bame_apps.integrations.datasets import (
    TorchImageDataset,
    image_transforms,
    load_image_dataset,
    make_loaders,
)


def labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(list(ds["label"]))


@pytest.fixture
def cifar(tmp_path, write_cifar_folder) -> datasets.DatasetDict:
    write_cifar_folder(tmp_path / "cifar")
    return load_image_dataset(tmp_path / "cifar")


def test_make_loaders(cifar):
    dd = cifar
    kwargs = {
        "batch_size": 8,
        "train_transform": image_transforms("cifar10", train=True),
        "test_transform": image_transforms("cifar10", train=False),
        "seed": 3,
    }
    train, test = make_loaders(dd, **kwargs)
    batches = list(train)
    assert [len(y) for _, y in batches] == [8, 8, 4]
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = [y for _, y in make_loaders(dd, **kwargs)[0]]
    assert all(torch.equal(a, b) for (_, a), b in zip(batches, again, strict=True))
    assert sorted(torch.cat(again).tolist()) == sorted(labels(dd["train"]).tolist())
    (xt, yt), *_ = list(test)
    assert xt.shape == (4, 3, 32, 32)
    assert yt.tolist() == labels(dd["test"]).tolist()
    with pytest.raises(KeyError, match=r"no split 'validation'.*\['train', 'test'\]"):
        make_loaders(dd, test_split="validation", **kwargs)


def test_torch_dataset_fetches_single_items_and_batches_alike(cifar):
    view = TorchImageDataset(cifar["test"])  # no transform: the decoded PIL images
    single = [view[i] for i in range(len(view))]
    batch = view.__getitems__(list(range(len(view))))
    assert [y for _, y in single] == [y for _, y in batch] == labels(cifar["test"]).tolist()
    for (a, _), (b, _) in zip(single, batch, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"expected columns 'image' \(Image\) and 'label'"):
        TorchImageDataset(cifar["test"].remove_columns("label"))
