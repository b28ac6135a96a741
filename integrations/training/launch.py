"""The launch check of the training scripts: :func:`check_launch` refuses processes that were
launched to train together but would each train alone (:class:`LaunchError`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

__all__ = ["LaunchError", "check_launch"]

_CPU_RECIPE = (
    "on CPUs give the script --cpu (TrainingConfig.build(cpu=True)): "
    "`torchrun --nproc_per_node 2 examples/train_cifar.py --cpu --data ...` or "
    "`accelerate launch --multi_gpu --num_processes 2 examples/train_cifar.py --cpu --data ...`"
)


class LaunchError(RuntimeError):
    """The processes were launched so that each would train alone (:func:`check_launch`)."""


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def check_launch(num_processes: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a launch whose processes would not train together.

    A launcher that starts several processes (``torchrun``, ``accelerate launch --multi_gpu``)
    sets ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``. If Accelerate nevertheless set up one process
    (``num_processes == 1``: e.g. no GPU and no ``--cpu``), each process would train the whole
    run alone and write the same output folder: raises :class:`LaunchError` with the CPU
    recipe. ``accelerate launch --cpu --num_processes N`` starts one process whatever ``N`` is
    (it sets ``MASTER_ADDR`` but no ``WORLD_SIZE``): that gets a ``UserWarning`` with the
    recipe and trains on the one process. ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    world = max(_env_int(environ, "WORLD_SIZE"), _env_int(environ, "LOCAL_WORLD_SIZE"))
    if num_processes != 1:
        return
    if world > 1:
        shown = ", ".join(
            f"{k}={environ[k]}" for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE") if k in environ
        )
        raise LaunchError(
            f"{world} processes were launched ({shown}) but Accelerate set up a single-process "
            f"run in each (no GPU for them, or no --cpu): each would train the whole run alone "
            f"and write the same output folder. To train with several processes "
            f"{_CPU_RECIPE}; on GPUs check that torch sees them (torch.cuda.device_count())."
        )
    use_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if use_cpu and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ:
        warnings.warn(
            f"accelerate launch --cpu runs one process whatever --num_processes says: training "
            f"with 1 process. To train with several processes {_CPU_RECIPE}",
            UserWarning,
            stacklevel=2,
        )
