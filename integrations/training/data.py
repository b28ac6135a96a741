"""The data of a training run: :func:`load_training_data` loads the train and evaluation splits
``TrainingConfig.data`` names, with the transforms of its preset, into a :class:`TrainingData`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from ..datasets import (
    DatasetUnavailableError,
    TorchImageDataset,
    detect_kind,
    image_transforms,
    load_image_dataset,
)
from .config import ConfigError, TrainingConfig

__all__ = ["TrainingData", "load_training_data"]

_PRESET_OF_KIND = {"cifar10": "cifar10", "fashion-mnist": "fashion-mnist", "mnist": "mnist"}
_GRAYSCALE_PRESETS = frozenset({"fashion-mnist", "mnist"})


def _pick_eval_split(dataset_dict: Any, requested: str | None) -> str | None:
    if requested is not None:
        return requested if requested in dataset_dict else None
    for name in ("test", "validation", "val"):
        if name in dataset_dict:
            return name
    return None


def _subset(split: Any, count: int | None, seed: int) -> Any:
    if count is None or count >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(split), generator=generator)[:count].sort().values
    return split.select(indices.tolist(), keep_in_memory=True)


@dataclass
class TrainingData:
    """The datasets of a run and what the model needs to know of them (``info`` is recorded
    in ``metrics.json``; ``info["preset"]`` is the transform preset in use)."""

    train: TorchImageDataset
    eval: TorchImageDataset
    info: dict[str, Any]
    num_classes: int
    in_channels: int

    @property
    def preset(self) -> str:
        """The transform preset in use (``TrainingConfig.preset`` or the one of the data)."""
        return str(self.info["preset"])


def load_training_data(config: TrainingConfig, accelerator: Accelerator) -> TrainingData:
    """The train and evaluation datasets ``config`` names, with their transforms.

    The main process loads (and caches) first. A bad ``data`` (missing, corrupt, labels out of
    range), split or class count (an evaluation split with more classes than the train split)
    raises :class:`~.config.ConfigError` naming that field.
    """
    try:
        kind = config.inputs.data_kind or detect_kind(config.inputs.data)
        with accelerator.main_process_first():
            dataset_dict = load_image_dataset(
                config.inputs.data, kind=kind, cache_dir=config.inputs.cache_dir
            )
    except (FileNotFoundError, ValueError, DatasetUnavailableError) as err:
        raise ConfigError("data", config.inputs.data, str(err)) from err
    if config.inputs.train_split not in dataset_dict:
        raise ConfigError(
            "train_split", config.inputs.train_split, f"the data has splits {list(dataset_dict)}"
        )
    eval_split = _pick_eval_split(dataset_dict, config.inputs.eval_split)
    if eval_split is None:
        raise ConfigError(
            "eval_split", config.inputs.eval_split, f"the data has splits {list(dataset_dict)}"
        )
    preset = config.inputs.preset or _PRESET_OF_KIND.get(kind, config.inputs.default_preset)
    inputs, seed = config.inputs, config.optim.seed
    train_split = _subset(dataset_dict[inputs.train_split], inputs.max_train_samples, seed)
    eval_split_data = _subset(dataset_dict[eval_split], inputs.max_eval_samples, seed)
    size = config.inputs.image_size if preset in ("cifar10", "imagenet") else None
    train = TorchImageDataset(train_split, image_transforms(preset, train=True, size=size))
    test = TorchImageDataset(eval_split_data, image_transforms(preset, train=False, size=size))
    label = dataset_dict[config.inputs.train_split].features["label"]
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    if num_classes < 2:
        raise ConfigError("data", config.inputs.data, "fewer than 2 classes")
    eval_label = dataset_dict[eval_split].features["label"]
    eval_classes = int(getattr(eval_label, "num_classes", 0) or 0)
    if eval_classes > num_classes:  # its labels may exceed the model's outputs
        raise ConfigError(
            "eval_split",
            eval_split,
            f"its labels have {eval_classes} classes, the train split "
            f"{config.inputs.train_split!r} "
            f"{num_classes}",
        )
    info = {
        "source": str(config.inputs.data),
        "kind": kind,
        "preset": preset,
        "train_split": config.inputs.train_split,
        "eval_split": eval_split,
        "train_samples": len(train),
        "eval_samples": len(test),
        "num_classes": num_classes,
        "input_shape": list(test[0][0].shape),  # the deterministic transform
    }
    return TrainingData(train, test, info, num_classes, 1 if preset in _GRAYSCALE_PRESETS else 3)
