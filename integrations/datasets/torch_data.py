"""Torch adapters of a loaded ``datasets`` split: :class:`TorchImageDataset` (decode,
transform, return ``(image_tensor, label)``) and :func:`make_loaders` (the training and test
``DataLoader`` s)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

__all__ = ["TorchImageDataset", "make_loaders"]


class TorchImageDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over one split: ``(transform(image), label)`` per item.

    Images are decoded here (not by ``datasets``) so that a file that fails to decode raises
    ``ValueError`` naming it and its index. Batched fetching (``__getitems__``) reads a whole
    batch from Arrow at once.
    """

    def __init__(self, split: datasets.Dataset, transform: Callable[[Any], Any] | None = None):
        feature = split.features.get("image")
        if not isinstance(feature, datasets.Image) or "label" not in split.column_names:
            raise ValueError(
                f"expected columns 'image' (Image) and 'label', got {dict(split.features)}"
            )
        self.name = str(split.split or "split")
        self.feature = feature
        self.data = split.select_columns(["image", "label"]).cast_column(
            "image", datasets.Image(decode=False)
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def _item(self, index: int, value: dict, label: int) -> tuple[Any, int]:
        path = value.get("path")
        try:
            if value.get("bytes") is None and path and Path(path).is_file():
                # read it here: datasets' decoder leaves the file open when decoding fails
                value = {"bytes": Path(path).read_bytes(), "path": path}
            image = self.feature.decode_example(value)
        except Exception as err:
            where = path or "in-memory bytes"
            raise ValueError(
                f"{where}: cannot decode image {self.name}[{index}] ({type(err).__name__}: {err})"
            ) from err
        return (self.transform(image) if self.transform else image), int(label)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.data[int(index)]
        return self._item(int(index), row["image"], row["label"])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
        rows = self.data[list(indices)]
        return [
            self._item(int(i), v, y)
            for i, v, y in zip(indices, rows["image"], rows["label"], strict=True)
        ]


def make_loaders(
    dataset_dict: datasets.DatasetDict,
    *,
    batch_size: int,
    train_transform: Callable[[Any], Any],
    test_transform: Callable[[Any], Any],
    num_workers: int = 0,
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
    test_batch_size: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` yielding ``(float images [B, C, H, W], int64 labels [B])``.

    The training loader shuffles with a ``torch.Generator`` seeded by ``seed`` (the same order
    for the same seed) and drops the last incomplete batch if ``drop_last``; the test loader
    keeps the split's order.
    """
    for split in (train_split, test_split):
        if split not in dataset_dict:
            raise KeyError(f"no split {split!r} in the dataset (splits: {list(dataset_dict)})")
    common = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        common["persistent_workers"] = True
    train = DataLoader(
        TorchImageDataset(dataset_dict[train_split], train_transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    test = DataLoader(
        TorchImageDataset(dataset_dict[test_split], test_transform),
        batch_size=test_batch_size or batch_size,
        shuffle=False,
        **common,
    )
    return train, test
