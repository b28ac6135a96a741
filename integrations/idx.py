"""The IDX files of MNIST and Fashion-MNIST (LeCun et al.; Xiao et al. 2017), read with checks.

A folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped, and
optionally ``MD5SUMS.decompressed`` (``<md5>  <name>`` per line, of the decompressed bytes), which
is verified when present. Every problem names the file: missing, checksum mismatch, wrong
magic number, truncated or oversized payload, image/label count mismatch.
"""

from __future__ import annotations

import gzip
import hashlib
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
    for line in file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def read_idx(path: str | Path, magic: int, expected_md5: str | None = None) -> np.ndarray:
    """Read one IDX file (gzipped if it ends in ``.gz``) as a uint8 array.

    Raises ``ValueError`` naming ``path`` on a bad checksum, magic number or payload size.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
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


def load_idx_dataset(
    folder: str | Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train_images, train_labels), (test_images, test_labels))`` from an IDX folder;
    images ``uint8 [N, H, W]``, labels ``uint8 [N]``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"IDX data folder not found: {folder}")
    sums = _checksums(folder)
    splits = []
    for split in ("train", "test"):
        images_name, labels_name = IDX_FILES[split]
        images = read_idx(_find(folder, images_name), IMAGES_MAGIC, sums.get(images_name))
        labels = read_idx(_find(folder, labels_name), LABELS_MAGIC, sums.get(labels_name))
        if len(images) != len(labels):
            raise ValueError(
                f"{folder}: {split} split has {len(images)} images but {len(labels)} labels"
            )
        splits.append((images, labels))
    return splits[0], splits[1]
