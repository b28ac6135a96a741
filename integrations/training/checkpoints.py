"""Training checkpoints: finding the complete ``checkpoints/epoch_NNNN`` folders of a run, and
:func:`save_checkpoint`, which writes one atomically (temporary folder, fsync, ``os.replace``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import json_default

__all__ = [
    "CHECKPOINT_DIR",
    "OSCILLATION_FILE",
    "TRAINER_STATE",
    "checkpoint_epoch",
    "complete_checkpoints",
    "find_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
"""Sub-folder of ``output_dir`` holding the checkpoints."""
TRAINER_STATE = "trainer_state.json"
"""The loop's own state in a checkpoint (epoch, step, history, times, run-defining config
fields). It is written last, so a folder holding it is complete."""
OSCILLATION_FILE = "mask_oscillation.pt"
"""The accumulated SAD tensors (:meth:`MaskOscillation.state_dict
<bame_apps.integrations.training.mask_oscillation.MaskOscillation.state_dict>`), in a
checkpoint and in ``output_dir``."""
_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)")


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints ``epoch_NNNN`` under ``root``, oldest first (temporary and
    partial folders are ignored)."""
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _CHECKPOINT_NAME.fullmatch(path.name) and (path / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=checkpoint_epoch)


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in a checkpoint folder's name (``epoch_0012`` -> 12)."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"Invalid checkpoint value: {str(path)!r} (not an epoch_NNNN folder)")
    return int(match.group(1))


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at ``path``: ``path`` itself if it is a complete checkpoint folder, else
    the latest complete one in ``path/checkpoints`` or ``path``; ``None`` if there is none."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    return None


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; best effort: platforms that cannot open or
    fsync a folder are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders themselves to disk."""
    for path in [*sorted(root.rglob("*")), root]:
        _fsync(path)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    epoch: int,
    extra: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Save the accelerator's state and ``extra`` as checkpoint ``root/epoch_NNNN``, atomically.

    Every process calls this (``save_state`` is collective). ``save_state`` writes into
    ``root/.tmp-epoch_NNNN``; the main process adds ``extra`` (``trainer_state`` (JSON) and
    ``oscillation`` (tensors), written last), fsyncs the folder and renames it to its final name
    with ``os.replace``. An existing folder of that name (an earlier attempt at the same epoch)
    is first renamed aside and deleted after. On any exception the temporary folder is removed
    and the exception propagates: the previous checkpoints are untouched. Then all but the
    latest ``keep`` complete checkpoints are deleted.
    """
    name = f"epoch_{epoch:04d}"
    final = root / name
    temporary = root / f".tmp-{name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if main:
            torch.save(extra["oscillation"], temporary / OSCILLATION_FILE)
            state_file = temporary / TRAINER_STATE
            state_file.write_text(
                json.dumps(extra["trainer_state"], indent=1, default=json_default)
            )
            _fsync_tree(temporary)
        accelerator.wait_for_everyone()
        if main:
            aside = root / f".old-{name}"
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(temporary, final)
            _fsync(root)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if main:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a hard kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
