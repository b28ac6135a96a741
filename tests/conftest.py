"""Shared test fixtures: writers of small on-disk datasets, a small N:M model + optimizer, the
example scripts imported by path, and a fresh Accelerate state; and the hypothesis profiles.

Test modules take these as fixtures instead of importing helpers from one another. Each
fixture returns a plain function (session-scoped, so module-scoped fixtures can use them).

Hypothesis profiles, chosen by ``HYPOTHESIS_PROFILE`` (default ``ci``): ``ci`` runs
:data:`tests.strategies.CI_EXAMPLES` examples per property test (a test's
``@examples(k)`` runs ``k`` instead), ``dev`` ten times as many. Neither has a deadline: a
test asserts results, never how long it took.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import settings
from torch import nn

from .strategies import CI_EXAMPLES

PROFILE_ENV = "HYPOTHESIS_PROFILE"
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None)
settings.register_profile("dev", max_examples=10 * CI_EXAMPLES, deadline=None)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encode ``array`` as uint8 IDX bytes: 4-byte big-endian magic, dims, then the payload."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, seed: int = 0, checksums: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny gzipped (Fashion-)MNIST IDX folder (12 train, 5 test images of 28x28).

    With ``checksums`` also writes ``MD5SUMS.decompressed``. Returns the arrays by file stem.
    """
    from bame_apps.integrations.idx import IMAGES_MAGIC, LABELS_MAGIC

    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (12, 28, 28)), IMAGES_MAGIC),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, 12), LABELS_MAGIC),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (5, 28, 28)), IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 5), LABELS_MAGIC),
    }
    folder.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, (array, magic) in arrays.items():
        raw = idx_bytes(array, magic)
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        sums.append(f"{hashlib.md5(raw).hexdigest()}  {name}")
    if checksums:
        (folder / "MD5SUMS.decompressed").write_text("\n".join(sums) + "\n")
    return {name: array for name, (array, _) in arrays.items()}


def write_cifar_folder(folder: Path, per_batch: int = 4, seed: int = 0) -> None:
    """Write a tiny CIFAR-10 python-pickle folder: ``data_batch_1..5`` and ``test_batch``,
    each a dict with ``b"data"`` (uint8 ``[per_batch, 3072]``) and ``b"labels"``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def model_and_optimizer(method: str = "bame", **kwargs: Any) -> tuple[nn.Sequential, Any]:
    """A seeded 8-16-16-3 MLP and its 1:4 mask optimizer ``method`` (24 steps, delta_t 2);
    ``kwargs`` override the schedule."""
    from bame_optim import nm_param_groups
    from bame_optim.methods import make_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    schedule = {"total_steps": 24, "delta_t": 2, "n": 1, "m": 4} | kwargs
    opt = make_optimizer(method, nm_param_groups(model, 1, 4), lr=0.5, momentum=0.9, **schedule)
    return model, opt


@pytest.fixture(scope="session", name="idx_bytes")
def idx_bytes_fixture() -> Callable[[np.ndarray, int], bytes]:
    """The IDX encoder :func:`idx_bytes`."""
    return idx_bytes


@pytest.fixture(scope="session", name="write_idx_folder")
def write_idx_folder_fixture() -> Callable[..., dict[str, np.ndarray]]:
    """The IDX folder writer :func:`write_idx_folder`."""
    return write_idx_folder


@pytest.fixture(scope="session", name="write_cifar_folder")
def write_cifar_folder_fixture() -> Callable[..., None]:
    """The CIFAR-10 folder writer :func:`write_cifar_folder`."""
    return write_cifar_folder


@pytest.fixture(scope="session", name="model_and_optimizer")
def model_and_optimizer_fixture() -> Callable[..., tuple[nn.Sequential, Any]]:
    """The factory :func:`model_and_optimizer`."""
    return model_and_optimizer


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/NAME.py`` by its path, as ``python examples/NAME.py`` runs it."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", name="load_example")
def load_example_fixture() -> Callable[[str], ModuleType]:
    return load_example


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (as ``accelerate.test_utils`` does)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session", name="reset_accelerate")
def reset_accelerate_fixture() -> Callable[[], None]:
    return reset_accelerate


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide state: the test starts and ends on a fresh one."""
    reset_accelerate()
    yield
    reset_accelerate()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test skipped for want of CUDA without the ``cuda`` marker: ``python -m
    tools.gpu_check`` runs the CUDA tests by that marker (``-m cuda``), so such a test would
    never run on a GPU."""
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("cuda") is None
        and any("cuda" in str(mark.kwargs.get("reason", "")).lower()
                for mark in item.iter_markers("skipif"))
    ]
    if unmarked:
        raise pytest.UsageError(
            f"skipped without CUDA but not marked @pytest.mark.cuda: {', '.join(unmarked)}"
        )


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny tensors (more threads only spin and compete)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_interpreted(test_file: str, expected: int, timeout: float) -> None:
    """Run the ``test_kernel_*`` tests of ``test_file`` in a child pytest with
    ``TRITON_INTERPRET=1`` and no CUDA device (Triton's interpreter runs the kernels on CPU
    tensors); fail unless exactly ``expected`` pass and none is skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
         "no:xdist", test_file, "-k", "test_kernel_"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert summary.startswith(f"{expected} passed"), summary  # none skipped


@pytest.fixture(scope="session", name="run_interpreted")
def run_interpreted_fixture() -> Callable[[str, int, float], None]:
    """The child-pytest runner :func:`run_interpreted`."""
    return run_interpreted
