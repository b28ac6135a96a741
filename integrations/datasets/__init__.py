"""Image-classification data as 🤗 ``datasets`` objects, and torch loaders over them.

One module per concept; every public name is importable from here
(``bame_apps.integrations.datasets``):

* :mod:`.detect`: which kind of source a path or Hub name is (:func:`detect_kind`,
  :data:`KINDS`),
* :mod:`.load`: loading a source as a ``DatasetDict`` of ``"image"`` / ``"label"`` columns
  (:func:`load_image_dataset`, the label names of CIFAR-10, Fashion-MNIST and MNIST,
  :class:`DatasetUnavailableError`),
* :mod:`.transforms`: the ``torchvision.transforms.v2`` pipelines of the usual presets and
  their normalisation constants (:func:`image_transforms`),
* :mod:`.torch_data`: a split as a torch dataset and the training / test loaders
  (:class:`TorchImageDataset`, :func:`make_loaders`).
"""

from .detect import FASHION_MNIST_MD5, IMAGE_EXTENSIONS, KINDS, detect_kind
from .load import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    HUB_PROBE_TIMEOUT,
    MNIST_CLASSES,
    DatasetUnavailableError,
    load_image_dataset,
)
from .torch_data import TorchImageDataset, make_loaders
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    image_transforms,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "HUB_PROBE_TIMEOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "MNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "DatasetUnavailableError",
    "TorchImageDataset",
    "detect_kind",
    "image_transforms",
    "load_image_dataset",
    "make_loaders",
]
