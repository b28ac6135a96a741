"""Build and load the native CPU kernels (fused kept-SGD and kept-AdamW, the evolve passes): one
extension.

The extension is compiled with :func:`torch.utils.cpp_extension.load` on first use (never at
import) into a folder of the torch extensions cache (``TORCH_EXTENSIONS_DIR``, else torch's
default, ``~/.cache/torch_extensions/...``) named after everything that makes a build
incompatible or stale: the Python version, the torch version, the C++ ABI
(``torch._C._GLIBCXX_USE_CXX11_ABI``) and a hash of the sources and compiler flags. So two
virtual environments or checkouts never rebuild over each other, and an edited source gets a
new folder. The first compile of a folder prints one line to stderr (what, why, about how
long, where); later processes load the built library in well under a second.

Environment variables (read at every call):

* ``BAME_OPTIM_NO_NATIVE=1``: never build or use the native kernels (eager paths only).
* ``BAME_OPTIM_REQUIRE_NATIVE=1``: a kernel that cannot be built or loaded is an error
  (``RuntimeError``) instead of a warning and the eager fallback; CI sets it (``make test``).
* ``BAME_OPTIM_NO_AVX512=1``: the kept kernels take their AVX2 paths even where the CPU has
  AVX-512 (the AVX-512 paths are chosen at run time, per call: see :func:`avx512_allowed`;
  both give the same bits, so this only changes speed).

Pre-build (e.g. in a Docker image, or before a timed run) with
``python -m bame_optim.kernels.build`` (or ``make kernels``): it prints where it built and how
long it took.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "DISABLE_ENV",
    "FLAG_VALUES",
    "NO_AVX512_ENV",
    "REQUIRE_ENV",
    "SOURCES",
    "announce",
    "avx512_allowed",
    "build_directory",
    "build_key",
    "compile_seconds",
    "directory",
    "disabled",
    "error",
    "load",
    "loaded",
    "required",
]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "kept_sgd_cpu.cpp", CSRC / "kept_adamw_cpu.cpp", CSRC / "evolve_cpu.cpp",
           CSRC / "evolve_obf_cpu.cpp", CSRC / "evolve_apply_cpu.cpp", CSRC / "module.cpp")
"""The C++ sources of the extension (package data); :data:`HEADERS` are hashed with them."""
HEADERS = (CSRC / "kept_common.h", CSRC / "kept_move.h", CSRC / "kept_simd.h",
           CSRC / "kept_tiles.h", CSRC / "kept_tiles512.h", CSRC / "kept_streams.h",
           CSRC / "evolve_common.h", CSRC / "evolve_norm.h", CSRC / "evolve_chunks.h")

DISABLE_ENV = "BAME_OPTIM_NO_NATIVE"
"""Set (``1``, see :data:`FLAG_VALUES`) to disable the native kernels."""
REQUIRE_ENV = "BAME_OPTIM_REQUIRE_NATIVE"
"""Set (``1``) to make an unavailable native kernel an error."""
NO_AVX512_ENV = "BAME_OPTIM_NO_AVX512"
"""Set (``1``) to keep the kept kernels on their AVX2 paths."""
FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True,
               "": False, "0": False, "false": False, "no": False, "off": False}
"""What the three variables may hold (case and surrounding blanks ignored). Anything else is
a ``ValueError``: ``BAME_OPTIM_NO_AVX512=false`` must not switch AVX-512 off."""

NAME = "bame_optim_kernels"
EXPECTED_SECONDS = "a minute"
"""What the one-line build message promises (63 s on two busy cores, 27 s of CPU)."""
_ANNOUNCED = ".announced"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module", "error", "compile_seconds", "directory"


def _flag(name: str) -> bool:
    value = os.environ.get(name, "")
    flag = FLAG_VALUES.get(value.strip().lower())
    if flag is None:
        raise ValueError(
            f"Invalid {name} value: {value!r} (1, true, yes or on to set it; 0, false, no, off "
            "or empty to leave it unset)"
        )
    return flag


def disabled() -> bool:
    """Whether ``BAME_OPTIM_NO_NATIVE`` disables the native kernels (read now)."""
    return _flag(DISABLE_ENV)


def required() -> bool:
    """Whether ``BAME_OPTIM_REQUIRE_NATIVE`` makes an unavailable kernel an error (read now)."""
    return _flag(REQUIRE_ENV)


def avx512_allowed(avx512: bool | None = None) -> bool:
    """Whether a kept-kernel call may take its AVX-512 paths: ``avx512`` if given, else not
    ``BAME_OPTIM_NO_AVX512`` (read now). The kernel also asks the CPU (AVX-512 F, BW, DQ and
    VL), so True never runs AVX-512 code on a CPU without it."""
    return not _flag(NO_AVX512_ENV) if avx512 is None else bool(avx512)


def flags() -> list[str]:
    """Compiler flags: C++20 (the sources use ``std::bit_cast``; torch 2.11's extension
    builder passes ``-std=c++17``, 2.14's ``-std=c++20``, and the last ``-std`` counts),
    ``-ffp-contract=off`` (the kernels choose every fused multiply-add themselves), and on x86
    with AVX2 the AVX2 build of ATen's ``Vectorized``."""
    result = ["-std=c++20", "-O3", "-ffp-contract=off", "-fopenmp"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    ):
        result += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return result


def sources_hash(extra_flags: list[str] | None = None,
                 paths: Sequence[Path] | None = None) -> str:
    """SHA-256 (first 16 hex digits) of the sources, headers and compiler flags (``paths``:
    other sources, for a build of another tree, such as ``benchmarks.kernel_ab``'s)."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS) if paths is None else paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(flags() if extra_flags is None else extra_flags).encode())
    return digest.hexdigest()[:16]


def build_key(
    *,
    python: str | None = None,
    torch_version: str | None = None,
    abi: bool | None = None,
    source_hash: str | None = None,
) -> str:
    """The name of the build folder: Python version, torch version, C++ ABI and source hash
    (each defaults to this process's), e.g. ``py3.11-torch2.5.1+cpu-abi1-0123456789abcdef``."""
    if python is None:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if torch_version is None:
        torch_version = torch.__version__
    if abi is None:
        abi = bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    if source_hash is None:
        source_hash = sources_hash()
    return f"py{python}-torch{torch_version}-abi{int(abi)}-{source_hash}"


def build_directory(key: str | None = None, root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/bame_optim_kernels/<key>``; ``root`` defaults to ``TORCH_EXTENSIONS_DIR`` or
    torch's default extensions cache."""
    if root is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or _default_root()
    return Path(root) / NAME / (build_key() if key is None else key)


def _default_root() -> str:
    cpp_extension = _cpp_extension()
    return cpp_extension.get_default_build_root()


def announce(directory: Path, reason: str) -> bool:
    """Print the one-line build message for ``directory`` to stderr unless some process
    already did (a marker file there, created atomically); returns whether it printed."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(directory / _ANNOUNCED, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    print(
        f"bame_optim: compiling the native CPU kernels ({reason}; takes about {EXPECTED_SECONDS}, "
        f"once per cache) in {directory}",
        file=sys.stderr,
        flush=True,
    )
    return True


def _cpp_extension() -> ModuleType:
    # Importing cpp_extension logs a CUDA_HOME warning on CPU-only machines: not ours.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


def _built(directory: Path, name: str) -> bool:
    return any(directory.glob(f"{name}*.so")) or any(directory.glob(f"{name}*.pyd"))


def load() -> ModuleType | None:
    """The extension module, built on the first call of a process whose folder lacks it.

    Returns ``None`` when disabled, or (after one ``RuntimeWarning`` with the reason) when it
    cannot be built or loaded; with ``BAME_OPTIM_REQUIRE_NATIVE`` set that raises instead."""
    if disabled():
        return None
    if "module" not in _state and "error" not in _state:
        with _lock:
            if "module" not in _state and "error" not in _state:
                _build()
    if "error" in _state:
        if required():
            raise RuntimeError(
                f"the native CPU kernels are unavailable and {REQUIRE_ENV} is set: "
                f"{_state['error']}"
            )
        return None
    return _state["module"]  # type: ignore[return-value]


def loaded() -> ModuleType | None:
    """The extension module if some :func:`load` of this process already built or loaded it,
    else ``None`` (never builds: for checks that must not start a build)."""
    return _state.get("module")  # type: ignore[return-value]


def probe_once(
    load_module: Callable[[], ModuleType | None],
    state: dict[str, object],
    lock: threading.Lock,
    key: str,
    probe: Callable[[ModuleType], object],
    unavailable: str,
) -> ModuleType | None:
    """``load_module()``, then once per process ``state[key] = probe(module)`` (under
    ``lock``): a kernel's check that it rounds as ATen does here. A probe that raises
    ``RuntimeError`` makes the kernel unavailable for good (``state["error"]``): an error with
    ``BAME_OPTIM_REQUIRE_NATIVE``, else one ``RuntimeWarning`` naming ``unavailable`` (the
    subject, e.g. ``"the fused kept kernels are"``) and the eager path."""
    module = load_module()
    if module is None:
        return None
    if key not in state and "error" not in state:
        with lock:
            if key not in state and "error" not in state:
                try:
                    state[key] = probe(module)
                except RuntimeError as failure:
                    state["error"] = str(failure)
                    if required():
                        raise
                    warnings.warn(f"bame_optim: {unavailable} unavailable, using the eager "
                                  f"path ({failure})", RuntimeWarning, stacklevel=4)
    return None if "error" in state else module


def error() -> str | None:
    """Why the extension could not be built or loaded (``None`` if it was, or not tried)."""
    return _state.get("error")  # type: ignore[return-value]


def directory() -> Path | None:
    """The folder the extension was loaded from (``None`` before :func:`load` succeeded)."""
    return _state.get("directory")  # type: ignore[return-value]


def compile_seconds() -> float | None:
    """Seconds the first :func:`load` of this process spent loading (building) it."""
    return _state.get("compile_seconds")  # type: ignore[return-value]


def _build() -> None:
    try:
        cpp_extension = _cpp_extension()
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        extra = flags()
        digest = sources_hash(extra)
        directory = build_directory(build_key(source_hash=digest))
        name = f"{NAME}_{digest}"
        if not _built(directory, name):
            announce(directory, "first use with this Python, torch and these sources")
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        module = cpp_extension.load(
            name=name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=extra,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            verbose=False,
        )
        _state["compile_seconds"] = time.perf_counter() - start
        _state["directory"] = directory
        _state["module"] = module
    except Exception as failure:  # a missing compiler, a build error
        _state["error"] = f"{type(failure).__name__}: {failure}"
        if not required():
            warnings.warn(
                f"bame_optim: the native CPU kernels are unavailable, using the eager paths "
                f"({_state['error']})",
                RuntimeWarning,
                stacklevel=4,
            )
