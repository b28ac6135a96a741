"""Loading an image-classification source as a 🤗 ``datasets.DatasetDict``
(:func:`load_image_dataset`).

The result has splits such as ``"train"`` / ``"test"`` and two columns, ``"image"``
(:class:`datasets.Image`, decoded lazily to a PIL image on access) and ``"label"``
(:class:`datasets.ClassLabel`). Sources (``kind``, :data:`~.detect.KINDS`; ``None`` detects it
with :func:`~.detect.detect_kind`):

* ``"imagefolder"``: ``folder/train/<class>/*.png`` and ``folder/test/<class>/*.png``
  (``datasets.load_dataset("imagefolder")``; every image is opened once to check it, see
  ``verify_images``),
* ``"cifar10"``: the CIFAR-10 "python version" batches (:func:`..local_data.read_cifar10_batches`),
* ``"fashion-mnist"`` / ``"mnist"``: the four IDX files (:func:`..idx.load_idx_dataset`, MD5
  checksums verified when ``MD5SUMS.decompressed`` is present),
* ``"disk"``: a folder written by ``Dataset(Dict).save_to_disk`` (``datasets.load_from_disk``),
* ``"parquet"`` / ``"arrow"``: ``*.parquet`` / ``*.arrow`` files, e.g. from ``Dataset.to_parquet``
  (splits named after the files, ``train-*.parquet`` / ``test-*.parquet``, as ``datasets`` infers),
* ``"hub"``: a Hugging Face Hub name (``datasets.load_dataset(name)``); offline, or without
  network, this raises :class:`DatasetUnavailableError` naming the dataset, within a few
  seconds (one connection attempt to the Hub first, unless ``HF_HUB_OFFLINE`` is set or a
  proxy is configured).

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
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

from ..idx import load_idx_dataset
from ..local_data import read_cifar10_batches
from .detect import KINDS, detect_kind

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "HUB_PROBE_TIMEOUT",
    "MNIST_CLASSES",
    "DatasetUnavailableError",
    "load_image_dataset",
]

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


class DatasetUnavailableError(ConnectionError):
    """A Hub dataset could not be fetched (offline, or no network) and is not in the cache."""


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
