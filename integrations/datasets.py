"""Image-classification data as 🤗 ``datasets`` objects, and torch loaders over them.

:func:`load_image_dataset` returns a :class:`datasets.DatasetDict` with splits such as
``"train"`` / ``"test"`` and two columns, ``"image"`` (:class:`datasets.Image`, decoded lazily to
a PIL image on access) and ``"label"`` (:class:`datasets.ClassLabel`). Sources (``kind``):

* ``"imagefolder"``: ``folder/train/<class>/*.png`` and ``folder/test/<class>/*.png``
  (``datasets.load_dataset("imagefolder")``; every image is opened once to check it, see
  ``verify_images``),
* ``"cifar10"``: the CIFAR-10 "python version" batches (:func:`.local_data.read_cifar10_batches`),
* ``"fashion-mnist"`` / ``"mnist"``: the four IDX files (:func:`.idx.load_idx_dataset`, MD5
  checksums verified when ``MD5SUMS.decompressed`` is present),
* ``"disk"``: a folder written by ``Dataset(Dict).save_to_disk`` (``datasets.load_from_disk``),
* ``"parquet"`` / ``"arrow"``: ``*.parquet`` / ``*.arrow`` files, e.g. from ``Dataset.to_parquet``
  (splits named after the files, ``train-*.parquet`` / ``test-*.parquet``, as ``datasets`` infers),
* ``"hub"``: a Hugging Face Hub name (``datasets.load_dataset(name)``); offline, or without
  network, this raises :class:`DatasetUnavailableError` naming the dataset, within a few
  seconds (one connection attempt to the Hub first, unless ``HF_HUB_OFFLINE`` is set or a
  proxy is configured).

With ``kind=None`` a path that exists is inspected (in the order above: IDX files, CIFAR batches,
a ``save_to_disk`` folder, parquet, arrow, then image files); a string that does not exist is a
Hub name only if it can be one (``name`` or ``owner/name`` whose ``owner`` is not a local
folder, see :func:`detect_kind`), else ``FileNotFoundError`` names the path at once.
Labels are checked when loaded: each split's labels must lie in ``0..num_classes-1`` of its
``ClassLabel`` (a ``ValueError`` names the source, the split, the value and its index).
Nothing here writes to ``~/.cache``: what ``datasets`` caches (the Arrow files built
from an image folder, parquet or arrow files, or a Hub download) goes to ``cache_dir``; pass a
folder you control (tests pass ``tmp_path``). ``cache_dir=None`` keeps the ``datasets`` default
(``$HF_DATASETS_CACHE``, else ``~/.cache/huggingface/datasets``).

IDX and CIFAR arrays are held in memory as uncompressed PGM/PPM bytes in the ``Image`` column:
building it takes ~0.2 s for the 70,000 Fashion-MNIST images (letting ``datasets`` encode the
arrays to PNG takes ~5 s), decoding is lossless and lazy, and the result saves to disk or parquet
like any image dataset.

:func:`make_loaders` wraps two splits in :class:`TorchImageDataset` (decode, transform, return
``(image_tensor, label)``) and torch ``DataLoader`` s; :func:`image_transforms` builds the usual
``torchvision.transforms.v2`` pipelines with the normalisation constants below.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.table import InMemoryTable
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from .idx import IDX_FILES, load_idx_dataset
from .local_data import CIFAR10_TRAIN_BATCHES, read_cifar10_batches

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
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

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 label names in label order (``batches.meta`` of the python version)."""
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST label names in label order (Xiao, Rasul and Vollgraf 2017, table 1)."""
MNIST_CLASSES = tuple(str(d) for d in range(10))

FASHION_MNIST_MD5 = frozenset(
    {
        "8181f5470baa50b63fa0f6fddb340f0a",  # t10k-images-idx3-ubyte
        "15d484375f8d13e6eb1aabb0c3f46965",  # t10k-labels-idx1-ubyte
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",  # train-images-idx3-ubyte
        "9018921c3c673c538a1fc5bad174d6f9",  # train-labels-idx1-ubyte
    }
)
"""Published MD5s of the decompressed Fashion-MNIST files: tell Fashion-MNIST from MNIST."""

KINDS = ("hub", "imagefolder", "cifar10", "fashion-mnist", "mnist", "disk", "parquet", "arrow")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_EXPECTED = (
    "expected IDX files (train-images-idx3-ubyte[.gz], ...), CIFAR-10 python batches "
    "(data_batch_1..5, test_batch), a save_to_disk folder (dataset_dict.json or state.json), "
    "*.parquet or *.arrow files, or an image folder (train/<class>/*.png, test/<class>/*.png)"
)


class DatasetUnavailableError(ConnectionError):
    """A Hub dataset could not be fetched (offline, or no network) and is not in the cache."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _why_local(source: str | Path) -> str | None:
    """Why ``source`` (which does not exist) is meant as a local path, or ``None`` if it may be
    a Hub name (the rule of :func:`detect_kind`)."""
    if not isinstance(source, str):
        return "it is a Path"
    if source.startswith((".", "/", "~")):
        return f"it starts with {source[0]!r}"
    if "\\" in source:  # a Windows separator; never in a Hub name
        return "it contains a backslash"
    if source.endswith("/"):
        return "it ends with '/'"
    parts = source.split("/")
    if len(parts) > 2:
        return "it has more than one '/'"
    if len(parts) == 2 and Path(parts[0]).exists():
        return f"{parts[0]!r} exists here"
    if not _HUB_NAME.fullmatch(source):
        return "it is not of the form 'name' or 'owner/name'"
    return None


def detect_kind(source: str | Path) -> str:
    """The ``kind`` :func:`load_image_dataset` would use for ``source`` (see module doc).

    A path that exists is inspected. A ``source`` that does not exist is a Hub name
    (``"hub"``) only if it is a string of the form ``name`` or ``owner/name`` (letters, digits,
    ``_ . -``) whose ``owner`` is not a file or folder of the working directory; anything else
    is a mistyped local path and raises ``FileNotFoundError`` at once, naming it and why it is
    not taken as a Hub name (e.g. ``./dat/x``, ``~/x``, ``/x``, ``a/b/c``, ``a\\b``, ``x/``, or
    ``data/x`` when ``data`` exists). No network is used here. Raises ``ValueError`` if an
    existing path holds nothing recognisable.
    """
    path = Path(source).expanduser()
    if not path.exists():
        reason = _why_local(source)
        if reason is None:
            return "hub"
        raise FileNotFoundError(
            f"no such file or folder: {path.absolute()} ({reason}, so not a Hugging Face Hub "
            f"name); a Hub dataset name looks like 'owner/name'"
        )
    if path.is_file():
        if path.suffix in (".parquet", ".arrow"):
            return path.suffix[1:]
        raise ValueError(f"{path}: not a dataset file; {_EXPECTED}")
    names = {p.name for p in path.iterdir()}
    idx_names = {n for pair in IDX_FILES.values() for n in pair}
    if names & (idx_names | {f"{n}.gz" for n in idx_names}):
        return _idx_kind(path)
    if names & {*CIFAR10_TRAIN_BATCHES, "test_batch"}:
        return "cifar10"
    if names & {"dataset_dict.json", "state.json"}:
        return "disk"
    files = [p for p in path.rglob("*") if p.is_file()]
    for suffix in (".parquet", ".arrow"):
        if any(p.suffix == suffix for p in files):
            return suffix[1:]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        return "imagefolder"
    raise ValueError(f"{path}: no dataset found; {_EXPECTED}")


def _idx_kind(folder: Path) -> str:
    """``"fashion-mnist"`` if the checksums are Fashion-MNIST's or the folder says so."""
    sums = folder / "MD5SUMS.decompressed"
    if sums.is_file() and FASHION_MNIST_MD5 & set(sums.read_text().split()):
        return "fashion-mnist"
    return "fashion-mnist" if "fashion" in folder.name.lower() else "mnist"


def load_image_dataset(
    source: str | Path,
    *,
    kind: str | None = None,
    cache_dir: str | Path | None = None,
    verify_images: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
) -> datasets.DatasetDict:
    """Load an image-classification dataset as a ``DatasetDict`` of ``"image"`` / ``"label"``.

    Args:
        source: a local path (folder or file) or a Hugging Face Hub name.
        kind: one of :data:`KINDS`; ``None`` detects it (:func:`detect_kind`).
        cache_dir: where ``datasets`` writes its Arrow cache (image folders, parquet, arrow,
            Hub downloads); ``None`` is the ``datasets`` default under ``~/.cache``.
        verify_images: for an image folder, open and decode every image once so that a
            corrupt or truncated file fails here, naming it (set ``False`` for very large folders;
            :class:`TorchImageDataset` still names a file that fails to decode later).
        image_column, label_column: the columns to rename to ``"image"`` / ``"label"``;
            ``None`` picks the only ``Image`` / ``ClassLabel`` column (e.g. ``"img"`` in the Hub's
            CIFAR-10).

    Raises:
        FileNotFoundError: a path or a file of the dataset is missing (the message names it).
        ValueError: a file is corrupt or the folder holds nothing recognisable (names it).
        DatasetUnavailableError: a Hub dataset that cannot be fetched (offline, no network).
    """
    if kind is None:
        kind = detect_kind(source)
    elif kind not in KINDS:
        raise ValueError(f"Invalid kind value: {kind!r} (one of {', '.join(KINDS)})")
    cache = None if cache_dir is None else str(cache_dir)
    if kind == "hub":
        dd = _load_hub(str(source), cache)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{kind} dataset path not found: {path}")
        if kind == "cifar10":
            (xs, ys), (xt, yt) = read_cifar10_batches(path)
            names = CIFAR10_CLASSES
            dd = datasets.DatasetDict(
                train=_in_memory(xs.transpose(0, 2, 3, 1), ys, names, "train"),
                test=_in_memory(xt.transpose(0, 2, 3, 1), yt, names, "test"),
            )
        elif kind in ("fashion-mnist", "mnist"):
            (xs, ys), (xt, yt) = load_idx_dataset(path)
            names = FASHION_MNIST_CLASSES if kind == "fashion-mnist" else MNIST_CLASSES
            dd = datasets.DatasetDict(
                train=_in_memory(xs, ys, names, "train"), test=_in_memory(xt, yt, names, "test")
            )
        elif kind == "disk":
            dd = _load_disk(path)
        elif kind in ("parquet", "arrow"):
            dd = _load_files(path, kind, cache)
        else:
            dd = _load_imagefolder(path, cache, verify_images)
    return _standardise(dd, str(source), image_column, label_column)


def _in_memory(
    images: np.ndarray, labels: np.ndarray, names: Sequence[str], split: str
) -> datasets.Dataset:
    """An in-memory Dataset of ``uint8 [N, H, W]`` or ``[N, H, W, 3]`` images, stored as
    PGM / PPM bytes (lossless, decoded by PIL; no per-image PNG compression)."""
    n, h, w = images.shape[:3]
    header = f"{'P6' if images.ndim == 4 else 'P5'}\n{w} {h}\n255\n".encode()
    images = np.ascontiguousarray(images, dtype=np.uint8)
    blobs = pa.array([header + image.tobytes() for image in images], type=pa.binary())
    column = pa.StructArray.from_arrays([blobs, pa.nulls(n, pa.string())], ["bytes", "path"])
    table = pa.table({"image": column, "label": pa.array(labels.astype(np.int64))})
    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=list(names))
    )
    return datasets.Dataset(
        InMemoryTable(table),
        info=datasets.DatasetInfo(features=features),
        split=datasets.NamedSplit(split),
    )


HUB_PROBE_TIMEOUT = 3.0
"""Seconds to wait for a connection to the Hub before a Hub name is given up as offline."""


def _hub_unreachable() -> str | None:
    """Why the Hub's endpoint cannot be reached now (one connection attempt with a
    :data:`HUB_PROBE_TIMEOUT` timeout), or ``None`` when it can. Without it, an offline
    ``load_dataset`` spends about 24 s in the Hub client's retries before failing."""
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    if endpoint.scheme in getproxies():  # through a proxy only: let the Hub client try
        return None
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as err:
        return f"no connection to {endpoint.hostname}:{port} within {HUB_PROBE_TIMEOUT:g} s: {err}"
    return None


def _load_hub(name: str, cache_dir: str | None) -> datasets.DatasetDict:
    offline = datasets.config.HF_HUB_OFFLINE
    unreachable = None if offline else _hub_unreachable()
    try:
        if unreachable is not None:
            raise ConnectionError(unreachable)
        return datasets.load_dataset(name, cache_dir=cache_dir)
    except ConnectionError as err:  # datasets' OfflineModeIsEnabled is a ConnectionError too
        why = " (HF_HUB_OFFLINE is set)" if offline else ""
        cached = "" if offline else " (set HF_HUB_OFFLINE=1 to use a cached copy)"
        raise DatasetUnavailableError(
            f"cannot load dataset {name!r} from the Hugging Face Hub{why}: it is not a local "
            f"path ({Path(name).resolve()} does not exist), the Hub cannot be reached and it is "
            f"not in the cache ({cache_dir or 'the datasets default cache'}){cached}. Pass a "
            f"local path instead: a save_to_disk folder, parquet files, an image folder "
            f"(train/<class>/*.png), CIFAR-10 python batches or IDX files. [{err}]"
        ) from err


def _load_disk(path: Path) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"{path}: cannot read this save_to_disk folder ({type(err).__name__}: {err}); "
            f"a file in it is missing, truncated or corrupt"
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({str(loaded.split or "train"): loaded})
    return loaded


def _load_files(path: Path, kind: str, cache_dir: str | None) -> datasets.DatasetDict:
    files = [path] if path.is_file() else sorted(path.rglob(f"*.{kind}"))
    if not files:
        raise FileNotFoundError(f"no *.{kind} files in {path}")
    for file in files:
        _check_table_file(file, kind)
    try:
        if path.is_file():
            return datasets.load_dataset(kind, data_files={"train": str(path)}, cache_dir=cache_dir)
        return datasets.load_dataset(kind, data_dir=str(path), cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as err:
        raise ValueError(
            f"{path}: datasets could not read the {kind} files {[str(f) for f in files]}: "
            f"{err.__cause__ or err}"
        ) from err


def _check_table_file(file: Path, kind: str) -> None:
    """Open ``file``'s footer / schema so that a truncated or corrupt file is named."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(file).schema_arrow  # noqa: B018 (reads the footer)
        else:  # datasets writes IPC streams; accept the IPC file format too
            with pa.memory_map(str(file)) as source:
                try:
                    pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    pa.ipc.open_file(source).schema  # noqa: B018
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{file}: not a readable {kind} file ({err}); truncated or corrupt"
        ) from err


def _load_imagefolder(path: Path, cache_dir: str | None, verify: bool) -> datasets.DatasetDict:
    dd = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    if verify:
        from PIL import Image as PILImage

        for split, ds in dd.items():
            if "image" not in ds.column_names:
                continue
            undecoded = ds.cast_column("image", datasets.Image(decode=False))["image"]
            for i, value in enumerate(undecoded):
                try:
                    with PILImage.open(value["path"]) as image:
                        image.load()
                except Exception as err:
                    raise ValueError(
                        f"{value['path']}: corrupt or truncated image ({split}[{i}]): {err}"
                    ) from err
    return dd


def _standardise(
    dd: datasets.DatasetDict, source: str, image_column: str | None, label_column: str | None
) -> datasets.DatasetDict:
    """Rename the image and label columns to ``"image"`` / ``"label"`` in every split and
    check the labels (:func:`_check_labels`)."""
    out = {}
    for split, ds in dd.items():
        image = image_column or _only(ds, datasets.Image, "image", source, split)
        label = label_column or _only(ds, datasets.ClassLabel, "label", source, split)
        for column in (image, label):
            if column not in ds.column_names:
                raise ValueError(f"{source}: split {split!r} has no column {column!r}")
        ds = ds.rename_columns({c: n for c, n in ((image, "image"), (label, "label")) if c != n})
        _check_labels(ds, source, split)
        out[split] = ds
    return datasets.DatasetDict(out)


def _check_labels(ds: datasets.Dataset, source: str, split: str) -> None:
    """Raise ``ValueError`` naming ``source``, ``split``, the value and its index if a label of
    a ``ClassLabel`` column is missing or outside ``0..num_classes-1`` (``datasets`` stores -1
    for "no label" and does not check labels written by ``cast_column`` or parquet files)."""
    feature = ds.features["label"]
    if not isinstance(feature, datasets.ClassLabel):
        return
    column = ds.with_format("arrow")["label"]  # the rows of a selection only
    if column.null_count:
        raise ValueError(f"{source}: split {split!r} has {column.null_count} missing labels")
    count = feature.num_classes
    low, high = (value.as_py() for value in pc.min_max(column).values())
    if low is None or (low >= 0 and high < count):
        return
    values = column.to_numpy()
    bad = np.flatnonzero((values < 0) | (values >= count))
    value = int(values[bad[0]])
    hint = " (-1 is datasets' 'no label')" if value == -1 else ""
    raise ValueError(
        f"{source}: split {split!r}: label {value} at index {int(bad[0])} is outside "
        f"0..{count - 1} ({count} classes){hint}; {bad.size} label(s) out of range"
    )


def _only(ds: datasets.Dataset, feature: type, role: str, source: str, split: str) -> str:
    found = [name for name, f in ds.features.items() if isinstance(f, feature)]
    if role in found or len(found) == 1:
        return role if role in found else found[0]
    hint = (
        " (an image folder needs one subfolder per class: train/<class>/*.png)"
        if role == "label"
        else ""
    )
    raise ValueError(
        f"{source}: split {split!r} has {len(found)} {feature.__name__} columns {found} among "
        f"{ds.column_names}; pass {role}_column={{name}}{hint}"
    )


# --------------------------------------------------------------------------------------------
# Transforms and loaders
# --------------------------------------------------------------------------------------------

_PRESETS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
}


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
    if preset not in _PRESETS:
        raise ValueError(f"Invalid preset value: {preset!r} (one of {', '.join(_PRESETS)})")
    default_mean, default_std = _PRESETS[preset]
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
