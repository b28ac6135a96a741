"""``python -m bame_optim.kernels.build``: build (or find) the native CPU kernels now, and say
where and how long it took (see :mod:`bame_optim.kernels.native`). Exits with an error
message if they cannot be built or ``BAME_OPTIM_NO_NATIVE`` is set."""

from __future__ import annotations

import time

from bame_optim.kernels import native

__all__ = ["main"]


def main() -> None:
    """Build (or load) the extension and print its folder and the seconds it took."""
    if native.disabled():
        raise SystemExit(f"{native.DISABLE_ENV} is set: nothing to build")
    start = time.perf_counter()
    if native.load() is None:
        raise SystemExit(f"bame_optim: building the native CPU kernels failed: {native.error()}")
    print(f"bame_optim native CPU kernels ready in {native.directory()} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
