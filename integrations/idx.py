"""The IDX files of MNIST and Fashion-MNIST (LeCun et al.; Xiao et al. 2017), read with checks.

A folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped, and
optionally ``MD5SUMS.decompressed`` (``<md5>  <name>`` per line, of the decompressed bytes), which
is verified when present. Every problem names the file: missing, corrupt gzip data, checksum
mismatch, a malformed checksum line (and its number), wrong magic number, truncated or oversized
payload, image/label count mismatch, a label outside ``0..num_classes-1`` (and its value).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_FILES", "load_idx_dataset", "read_idx"]

IMAGES_MAGIC = 2051
"""IDX magic of a uint8 tensor of rank 3 (images)."""
LABELS_MAGIC = 2049
"""IDX magic of a uint8 tensor of rank 1 (labels)."""
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CHECKSUMS = "MD5SUMS.decompressed"
NUM_CLASSES = 10
"""Classes of MNIST and Fashion-MNIST: labels are ``0..9``."""
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing IDX file {folder / name}(.gz) in {folder}")


def _checksums(folder: Path) -> dict[str, str]:
    file = folder / CHECKSUMS
    if not file.is_file():
        return {}
    sums = {}
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not _MD5.fullmatch(fields[0]):
            raise ValueError(
                f"{file}, line {number}: expected '<32 hex digit md5>  <file name>', got {line!r}"
            )
        digest, name = fields
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def read_idx(path: str | Path, magic: int, expected_md5: str | None = None) -> np.ndarray:
    """Read one IDX file (gzipped if it ends in ``.gz``) as a uint8 array.

    Raises ``ValueError`` naming ``path`` on a bad checksum, magic number or payload size.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path}: cannot decompress ({err}); the file is truncated or corrupt"
        ) from err
    if expected_md5 is not None:
        actual = hashlib.md5(raw).hexdigest()
        if actual != expected_md5:
            raise ValueError(
                f"{path}: MD5 {actual} of the decompressed data, expected {expected_md5}"
            )
    rank = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    payload = len(raw) - header
    if payload != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says {shape} = {int(np.prod(shape))} bytes of data, found {payload} "
            f"(truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise ValueError(
            f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
            f"0..{num_classes - 1} ({num_classes} classes); {bad.size} label(s) out of range"
        )


def load_idx_dataset(
    folder: str | Path, num_classes: int = NUM_CLASSES
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train_images, train_labels), (test_images, test_labels))`` from an IDX folder;
    images ``uint8 [N, H, W]``, labels ``uint8 [N]`` in ``0..num_classes-1`` (a label outside
    raises ``ValueError`` naming the file, the value and its index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"IDX data folder not found: {folder}")
    sums = _checksums(folder)
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = IDX_FILES[split]
        images = read_idx(_find(folder, images_name), IMAGES_MAGIC, sums.get(images_name))
        labels_path = _find(folder, labels_name)
        labels = read_idx(labels_path, LABELS_MAGIC, sums.get(labels_name))
        _check_labels(labels_path, labels, num_classes)
        if len(images) != len(labels):
            raise ValueError(
                f"{folder}: {split} split has {len(images)} images but {len(labels)} labels"
            )
        splits.append((images, labels))
    return splits[0], splits[1]
