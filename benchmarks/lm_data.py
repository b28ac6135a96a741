"""The text of :mod:`benchmarks.lm`: the ``.py`` files of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``, present on every machine), as byte-level tokens
(vocabulary 256) packed into fixed-length blocks, in a 🤗 ``datasets.DatasetDict``.

* **Files.** Every ``*.py`` under the stdlib folder, except third-party packages installed
  into it (``site-packages`` / ``dist-packages``). Each is named by its path relative to that
  folder, with ``/`` separators.
* **Split, by file.** A file is in ``validation`` when the first 8 hex digits of the SHA-256 of
  its relative path, modulo 100, are below ``val_percent``; else in ``train``. The split depends
  only on the path (not on the file's size, the byte caps or the order of the listing), so a
  file never moves between splits and no file is in both.
* **Order and caps.** Within a split, files come in the order of that hash (which mixes the
  library's folders; the alphabetical order would fill a small cap with ``asyncio/``), and are
  taken until the split's byte cap: the last file taken is cut at the cap.
* **Tokens.** The bytes of each file followed by one ``0`` byte (:data:`SEPARATOR`, the
  end-of-file token; Python sources hold no NUL byte), concatenated in that order and cut into
  blocks of ``block_size`` tokens; the tail shorter than a block is dropped. Each block is one
  example ``{"input_ids": [...], "labels": [...]}`` with equal lists (the causal-LM models of
  ``transformers`` shift the labels themselves).

The same interpreter gives the same blocks on every machine; another Python version gives
another text (its standard library differs), so results of different versions do not compare.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SEPARATOR",
    "VOCAB_SIZE",
    "StdlibText",
    "load_stdlib_text",
    "split_of",
    "stdlib_files",
    "stdlib_root",
]

VOCAB_SIZE = 256
"""Byte-level tokens: one token per byte value."""
SEPARATOR = 0
"""The token appended after every file (the end-of-file token)."""
SPLITS = ("train", "validation")
_THIRD_PARTY = frozenset({"site-packages", "dist-packages"})


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (``/`` separators, sorted) of the ``.py`` files under ``root`` (default
    :func:`stdlib_root`), without ``site-packages`` / ``dist-packages``."""
    root = stdlib_root() if root is None else root
    paths = (path.relative_to(root) for path in root.rglob("*.py") if path.is_file())
    return sorted(p.as_posix() for p in paths if not _THIRD_PARTY & set(p.parts))


def _digest(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()


def split_of(relative: str, val_percent: int) -> str:
    """``"validation"`` or ``"train"``: the split of the file at ``relative`` (module
    docstring)."""
    return "validation" if int(_digest(relative)[:8], 16) % 100 < val_percent else "train"


def _take(root: Path, files: list[str], cap: int) -> Iterator[dict[str, Any]]:
    """``{"path", "content"}`` of ``files`` in order, until ``cap`` bytes (separators
    included); the last file cut to fit."""
    left = cap
    for relative in files:
        if left <= 0:
            return
        content = (root / relative).read_bytes()[: left - 1]
        left -= len(content) + 1
        yield {"path": relative, "content": content}


def _pack(batch: dict[str, list[Any]], block_size: int) -> dict[str, list[list[int]]]:
    """The ``map`` function: the files of ``batch`` (the whole split) as blocks of tokens."""
    import numpy as np

    separator = bytes([SEPARATOR])
    text = b"".join(content + separator for content in batch["content"])
    count = len(text) // block_size
    tokens = np.frombuffer(text, dtype=np.uint8)[: count * block_size].astype(np.int64)
    blocks = tokens.reshape(count, block_size).tolist()
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


@dataclass(frozen=True)
class StdlibText:
    """The packed blocks of both splits and what they hold."""

    blocks: Any
    """``datasets.DatasetDict`` with ``train`` and ``validation``: ``input_ids``, ``labels``."""
    paths: dict[str, list[str]]
    """Relative paths of the files taken per split, in order (the last one possibly cut)."""
    bytes: dict[str, int]
    """Bytes taken per split, separators included (the tail short of a block is dropped)."""
    root: Path

    def describe(self) -> str:
        """One line: files, bytes and blocks per split."""
        parts = [
            f"{split} {len(self.paths[split])} files, {self.bytes[split] / 1e3:.0f} kB, "
            f"{len(self.blocks[split])} blocks"
            for split in SPLITS
        ]
        return f"stdlib text of {self.root}: " + "; ".join(parts)


def load_stdlib_text(
    block_size: int,
    train_bytes: int,
    val_bytes: int,
    val_percent: int = 10,
    root: Path | None = None,
) -> StdlibText:
    """The standard library's ``.py`` files, split by file, capped at ``train_bytes`` /
    ``val_bytes`` and packed into blocks of ``block_size`` tokens (module docstring).

    Raises ``ValueError`` naming the argument when a split would hold no block (a cap smaller
    than one block, or a split with no file).
    """
    from datasets import Dataset, DatasetDict
    from datasets.utils import logging as datasets_logging

    if block_size < 1:
        raise ValueError(f"Invalid block_size value: {block_size!r} (must be >= 1)")
    if not 0 < val_percent < 100:
        raise ValueError(f"Invalid val_percent value: {val_percent!r} (between 1 and 99)")
    root = stdlib_root() if root is None else root
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for relative in sorted(stdlib_files(root), key=_digest):
        by_split[split_of(relative, val_percent)].append(relative)
    caps = {"train": train_bytes, "validation": val_bytes}
    blocks, paths, sizes = {}, {}, {}
    for split in SPLITS:
        taken = list(_take(root, by_split[split], caps[split]))
        sizes[split] = sum(len(row["content"]) + 1 for row in taken)
        if sizes[split] < block_size:
            name = "train_bytes" if split == "train" else "val_bytes"
            raise ValueError(
                f"Invalid {name} value: {caps[split]!r} ({split} holds {sizes[split]} bytes, "
                f"less than one block of {block_size})"
            )
        paths[split] = [row["path"] for row in taken]
        table = Dataset.from_dict(
            {"path": paths[split], "content": [row["content"] for row in taken]}
        )
        bars = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()  # one map over one batch: no bar wanted
        try:
            blocks[split] = table.map(
                _pack, batched=True, batch_size=None, remove_columns=table.column_names,
                fn_kwargs={"block_size": block_size}, keep_in_memory=True,
            )
        finally:
            if bars:
                datasets_logging.enable_progress_bar()
    return StdlibText(DatasetDict(blocks), paths, sizes, root)
