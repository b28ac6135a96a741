"""Image transforms of the usual presets (:func:`image_transforms`), with the per-channel
normalisation statistics of each dataset: PIL image -> normalised ``float32 [C, H, W]`` tensor
(``torchvision.transforms.v2``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PRESETS",
    "image_transforms",
]

# Normalisation statistics of images scaled to [0, 1], per channel.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""CIFAR-10 per-channel mean over the 50,000 training images (Krizhevsky 2009 data)."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""CIFAR-10 per-channel std over all training pixels (not the often-copied 0.2023, 0.1994,
0.2010, which averages per-image stds)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet-1k mean, as used by torchvision's pretrained models (``torchvision.models`` docs)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet-1k std, as used by torchvision's pretrained models."""
FASHION_MNIST_MEAN = (0.2860,)
"""Fashion-MNIST training-set pixel mean (``shared/data/README.md``; checked in the tests)."""
FASHION_MNIST_STD = (0.3530,)
"""Fashion-MNIST training-set pixel std (``shared/data/README.md``; checked in the tests)."""
MNIST_MEAN = (0.1307,)
"""MNIST training-set pixel mean (as in PyTorch's ``examples/mnist``)."""
MNIST_STD = (0.3081,)
"""MNIST training-set pixel std (as in PyTorch's ``examples/mnist``)."""

PRESETS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
}
"""``{preset: (mean, std)}`` of :func:`image_transforms`."""


def image_transforms(
    preset: str,
    *,
    train: bool,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """PIL image -> normalised ``float32 [C, H, W]`` tensor (``torchvision.transforms.v2``).

    * ``"cifar10"`` (CIFAR-like, RGB): train ``RandomCrop(size or 32, padding=4)`` +
      ``RandomHorizontalFlip``; test nothing extra.
    * ``"imagenet"`` (RGB): train ``RandomResizedCrop(size or 224)`` + ``RandomHorizontalFlip``;
      test ``Resize(size * 8 / 7)`` (256 for 224) + ``CenterCrop(size)``.
    * ``"fashion-mnist"`` / ``"mnist"`` (1 channel): no augmentation.

    ``mean`` / ``std`` override the preset's constants. Random augmentations draw from torch's
    RNG: each ``DataLoader`` worker's is seeded from the loader's generator; with
    ``num_workers=0`` they use the global RNG (seed it with ``torch.manual_seed``).
    """
    if preset not in PRESETS:
        raise ValueError(f"Invalid preset value: {preset!r} (one of {', '.join(PRESETS)})")
    default_mean, default_std = PRESETS[preset]
    steps: list[Any] = [v2.ToImage()]
    if preset == "cifar10":
        steps.append(v2.RGB())
        if train:
            steps += [v2.RandomCrop(size or 32, padding=4), v2.RandomHorizontalFlip()]
    elif preset == "imagenet":
        size = size or 224
        steps.append(v2.RGB())
        if train:
            steps += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(round(size * 8 / 7), antialias=True), v2.CenterCrop(size)]
    else:
        steps.append(v2.Grayscale(1))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean or default_mean), std=list(std or default_std)),
    ]
    return v2.Compose(steps)
