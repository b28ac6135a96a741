"""Which kind of image-classification source a path or name is (:func:`detect_kind`).

The kinds (:data:`KINDS`) are those :func:`~bame_apps.integrations.datasets.load_image_dataset`
reads. A path that exists is inspected, in this order: IDX files (Fashion-MNIST when its
``MD5SUMS.decompressed`` lists Fashion-MNIST's checksums or the folder's name says so, else
MNIST), CIFAR-10 python batches, a ``save_to_disk`` folder, parquet, arrow, then image files
(an image folder). A string that does not exist is a Hub name only if it can be one (``name`` or
``owner/name`` whose ``owner`` is not a local folder); anything else is a mistyped local path,
and ``FileNotFoundError`` names it at once. No network is used here.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..idx import IDX_FILES
from ..local_data import CIFAR10_TRAIN_BATCHES

__all__ = ["FASHION_MNIST_MD5", "IMAGE_EXTENSIONS", "KINDS", "detect_kind"]

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
