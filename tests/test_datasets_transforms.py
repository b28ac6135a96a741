"""The image transforms of the usual presets (``integrations/datasets/transforms.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bame_apps.integrations.datasets import FASHION_MNIST_MEAN, image_transforms


def test_transform_shapes_and_dtypes():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    grey = Image.fromarray(np.full((28, 28), round(255 * FASHION_MNIST_MEAN[0]), np.uint8))
    for train in (True, False):
        x = image_transforms("cifar10", train=train)(rgb)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        x = image_transforms("cifar10", train=train)(grey)  # greyscale input becomes RGB
        assert x.shape[0] == 3
        x = image_transforms("imagenet", train=train)(rgb.resize((300, 200)))
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    x = image_transforms("fashion-mnist", train=False)(grey)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.01  # the mean pixel normalises to ~0
    x = image_transforms("mnist", train=True)(rgb)
    assert x.shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"Invalid preset value: 'svhn'"):
        image_transforms("svhn", train=True)
