"""Alias of :mod:`tools.gpu_check`, its former place: ``python -m benchmarks.gpu_check`` runs
``python -m tools.gpu_check`` with the same flags (from the root of a checkout; ``tools/`` is
not installed)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from tools.gpu_check import main

    sys.exit(main())
