"""Launch a test worker in two real processes with ``torchrun`` (gloo on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def exit_worker() -> None:
    """Leave a ``run_ranks`` worker whose results are on disk, without finalizing the
    interpreter. Gloo's worker threads can still be joinable when it finalizes, and a rank then
    aborts after saving ("terminate called without an active exception": about 1 run in 30
    under load here; in both workers, and on CI). An exception in the worker's ``main`` still
    exits non-zero, as this only runs after it returned."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, out: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run ``tests/<worker>`` on ``WORLD`` processes with ``out`` and ``args``; return the
    ``rank{r}.pt`` each rank saved in ``out``. A failed run fails the test with its output."""
    # TORCH_EXTENSIONS_DIR stays: without it every rank loads the native kernel from the shared
    # default folder, which another checkout's build may have just replaced (a rebuild per rank).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCH")) or k == "TORCH_EXTENSIONS_DIR"}
    path = [str(ROOT), env.get("PYTHONPATH", "")]
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in path if p))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / worker),
        str(out),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    saved = sorted(path.name for path in out.glob("rank*.pt"))
    assert done.returncode == 0, (
        f"torchrun exited {done.returncode}; rank files written: {saved or 'none'}\n"
        + done.stdout[-4000:]
        + done.stderr[-4000:]
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
