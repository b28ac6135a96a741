"""Command-line pieces the benchmarks share: N:M pattern arguments, the ``--device`` check and
CSV output."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["nm_pattern", "resolve_device", "write_csv"]


def nm_pattern(text: str) -> tuple[int, int]:
    """``argparse`` type of an ``N:M`` pattern such as ``2:4`` (``1 <= N < M``)."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid N:M pattern {text!r} (e.g. 2:4)") from None
    if not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"invalid N:M pattern {text!r} (need 1 <= N < M)")
    return n, m


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device ``name``, after allocating on it; an unusable one is a parser error."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"argument --device: cannot use {name!r}: {err}")
    return device


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` as CSV, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
