"""What a training run trains, built from its arguments: the train and evaluation data
(:func:`load_training_data`), the model (:func:`build_training_model`) and the N:M optimizer of
the chosen method (:func:`build_training_optimizer`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim import Optimizer

from bame_optim import nm_param_groups
from bame_optim.methods import fixed_settings, make_optimizer

from .datasets import (
    DatasetUnavailableError,
    TorchImageDataset,
    detect_kind,
    image_transforms,
    load_image_dataset,
)
from .models import DEIT_SMALL, build_model, deit_small
from .training_args import ScriptConfig

__all__ = [
    "TrainingData",
    "build_training_model",
    "build_training_optimizer",
    "load_training_data",
]

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
    """The datasets of a run and what the model needs to know of them."""

    train: TorchImageDataset
    eval: TorchImageDataset
    info: dict[str, Any]
    num_classes: int
    in_channels: int


def load_training_data(
    args: argparse.Namespace,
    config: ScriptConfig,
    parser: argparse.ArgumentParser,
    accelerator: Accelerator,
) -> TrainingData:
    """The train and evaluation datasets ``args`` name, with their transforms; a bad
    ``--data``, split or class count exits through ``parser.error``. Sets ``args.preset``."""
    try:
        kind = args.data_kind or detect_kind(args.data)
        with accelerator.main_process_first():
            dataset_dict = load_image_dataset(args.data, kind=kind, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError, DatasetUnavailableError) as err:
        parser.error(f"argument --data: invalid value {args.data!r} ({err})")
    if args.train_split not in dataset_dict:
        parser.error(
            f"argument --train-split: invalid value {args.train_split!r} (the data has splits "
            f"{list(dataset_dict)})"
        )
    eval_split = _pick_eval_split(dataset_dict, args.eval_split)
    if eval_split is None:
        parser.error(
            f"argument --eval-split: invalid value {args.eval_split!r} (the data has splits "
            f"{list(dataset_dict)})"
        )
    preset = args.preset or _PRESET_OF_KIND.get(kind, config.default_preset)
    args.preset = preset
    train_split = _subset(dataset_dict[args.train_split], args.max_train_samples, args.seed)
    eval_split_data = _subset(dataset_dict[eval_split], args.max_eval_samples, args.seed)
    size = args.image_size if preset in ("cifar10", "imagenet") else None
    train = TorchImageDataset(train_split, image_transforms(preset, train=True, size=size))
    test = TorchImageDataset(eval_split_data, image_transforms(preset, train=False, size=size))
    label = dataset_dict[args.train_split].features["label"]
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    if num_classes < 2:
        parser.error(f"argument --data: invalid value {args.data!r} (fewer than 2 classes)")
    info = {
        "source": str(args.data),
        "kind": kind,
        "preset": preset,
        "train_split": args.train_split,
        "eval_split": eval_split,
        "train_samples": len(train),
        "eval_samples": len(test),
        "num_classes": num_classes,
        "input_shape": list(test[0][0].shape),  # the deterministic transform
    }
    return TrainingData(train, test, info, num_classes, 1 if preset in _GRAYSCALE_PRESETS else 3)


def build_training_model(args: argparse.Namespace, data: TrainingData) -> nn.Module:
    """The ``--model`` network for ``data`` (``--vit-depth`` blocks for DeiT-small)."""
    if args.model == "deit_small":
        image_size = data.info["input_shape"][-1]
        depth = getattr(args, "vit_depth", DEIT_SMALL["num_layers"])
        if depth == DEIT_SMALL["num_layers"]:
            return deit_small(data.num_classes, data.in_channels, image_size=image_size)
        from torchvision.models import VisionTransformer

        config = {**DEIT_SMALL, "num_layers": depth}
        model = VisionTransformer(image_size=image_size, num_classes=data.num_classes, **config)
        if data.in_channels != 3:
            proj = model.conv_proj
            model.conv_proj = nn.Conv2d(data.in_channels, proj.out_channels, 16, 16)
        return model
    return build_model(args.model, data.num_classes, data.in_channels)


def build_training_optimizer(
    args: argparse.Namespace,
    model: nn.Module,
    total_steps: int,
    parser: argparse.ArgumentParser,
) -> Optimizer:
    """The ``--method`` optimizer over ``model``'s N:M parameter groups (``--exclude``
    kept dense), scheduled over ``total_steps`` optimizer steps."""
    exclude = None if args.exclude is None else list(args.exclude)
    try:
        groups = nm_param_groups(model, args.n, args.m, exclude=exclude)
    except ValueError as err:
        parser.error(f"argument --exclude: invalid value {args.exclude!r} ({err})")
    kwargs: dict[str, Any] = {
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
    }
    if args.method != "dense":
        kwargs.update(
            n=args.n,
            m=args.m,
            total_steps=total_steps,
            delta_t=args.delta_t,
            alpha=args.alpha,
            beta=args.beta,
            seed=args.seed,
        )
        for key in fixed_settings(args.method):
            kwargs.pop(key, None)
    return make_optimizer(args.method, groups, **kwargs)
