"""Live logging of a training run through 🤗 Accelerate's trackers (``--report-to``).

``report_to`` (one of :data:`REPORT_TO`) names the trackers: ``tensorboard`` (the extra
``bame_optim[tensorboard]``), ``wandb``, ``all`` (those of the two that are installed) or
``none`` (the default: nothing is logged and the loop does no extra work).
:func:`check_report_to` refuses a tracker whose package is missing with a
:class:`~.config.ConfigError` naming the field, the value and the package, before any training.

:func:`accelerator_kwargs` gives ``Accelerator(log_with=..., project_config=...)``; TensorBoard
writes its event files to ``OUTPUT_DIR/tensorboard/SCRIPT/`` (the hyperparameters in a
time-stamped folder inside), wandb runs in project ``SCRIPT`` with the output folder's name as
run name and its files in ``OUTPUT_DIR/wandb/``. :class:`LiveLog` starts the trackers with the
config as plain scalars (:func:`hparams`) and logs, at ``step`` = optimizer steps done:

* after every optimizer step: ``train/loss`` (the mean of the step's micro-batch losses,
  averaged over the processes) and ``train/lr`` (the lr the step used). Losses stay on the
  device and are read in one transfer every ``flush_every`` steps and at the end of an epoch.
* after every optimizer step that may have updated a mask (the optimizer's
  ``mask_update_due``; for methods whose masks may change at every step, such as SR-STE, only
  every ``mask_interval`` steps), from ``sparsity_report()``: ``mask/flips`` (mask entries that
  changed at each parameter's last mask update), ``mask/frozen_blocks`` (blocks OBF froze
  then) and ``mask/density`` (kept fraction over all sparse weights), and the same per sparse
  parameter as ``mask_flips/NAME``, ``mask_frozen_blocks/NAME`` and ``mask_density/NAME``.
* after every epoch: ``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/eval_loss``,
  ``epoch/eval_accuracy`` (evaluated epochs), ``epoch/mask_changes`` and ``epoch/epoch``.

A resumed run continues at its checkpoint's step; TensorBoard hides the events the
interrupted run had logged after it (``purge_step``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available
from torch.optim import Optimizer

from .config import REPORT_TO, ConfigError, TrainingConfig, config_dict
from .protocols import MaskedOptimizer

__all__ = [
    "REPORT_TO",
    "TENSORBOARD_DIR",
    "LiveLog",
    "accelerator_kwargs",
    "check_report_to",
    "hparams",
    "trackers_of",
]

TENSORBOARD_DIR = "tensorboard"
"""The folder of ``output_dir`` TensorBoard writes into (one sub-folder per script name)."""
_TRACKERS = ("tensorboard", "wandb")
_INSTALL = {
    "tensorboard": "pip install 'bame_optim[tensorboard]' (or pip install tensorboard)",
    "wandb": "pip install wandb",
}


def _installed(tracker: str) -> bool:
    """Whether the package of ``tracker`` is installed (as Accelerate decides it)."""
    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[tracker]()


def trackers_of(report_to: str) -> list[str]:
    """The trackers ``report_to`` names: ``[]`` for ``none``, the installed ones of
    ``tensorboard`` and ``wandb`` for ``all``. Raises :class:`~.config.ConfigError` (field
    ``report_to``) for an unknown value, a tracker whose package is not installed, or ``all``
    with neither installed."""
    if report_to not in REPORT_TO:
        raise ConfigError("report_to", report_to, f"one of {', '.join(REPORT_TO)} is required")
    if report_to == "none":
        return []
    if report_to == "all":
        found = [name for name in _TRACKERS if _installed(name)]
        if not found:
            raise ConfigError(
                "report_to",
                report_to,
                "neither tensorboard nor wandb is installed: "
                + "; ".join(f"{name}: {_INSTALL[name]}" for name in _TRACKERS),
            )
        return found
    if not _installed(report_to):
        raise ConfigError(
            "report_to",
            report_to,
            f"the {report_to} package is not installed: {_INSTALL[report_to]}, "
            "or choose another --report-to",
        )
    return [report_to]


def check_report_to(config: TrainingConfig) -> list[str]:
    """The trackers of ``config.outputs.report_to`` (:func:`trackers_of`, which raises)."""
    return trackers_of(config.outputs.report_to)


def accelerator_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """The keywords of ``Accelerator`` that set up the trackers of ``config.outputs.report_to``
    (``{}`` for ``none``): ``log_with`` and a ``project_config`` whose logging folder is
    ``output_dir/tensorboard``."""
    trackers = check_report_to(config)
    if not trackers:
        return {}
    project = ProjectConfiguration(
        project_dir=str(config.outputs.output_dir),
        logging_dir=str(config.outputs.output_dir / TENSORBOARD_DIR),
    )
    return {"log_with": trackers, "project_config": project}


def hparams(values: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``values`` as the plain scalars TensorBoard's hyperparameters accept: booleans, numbers
    and strings kept, ``None`` dropped, lists and tuples joined with commas, paths and anything
    else as text, nested mappings flattened to ``outer.inner`` keys."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            inner = hparams(value)
            flat.update({f"{key}.{k}": v for k, v in inner.items()})
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(str(item) for item in value)
        else:
            flat[key] = str(value)
    return flat


class LiveLog:
    """Logs a run's steps, mask updates and epochs to the accelerator's trackers (see the
    module docstring). Every process makes the same calls (the losses are averaged over the
    processes); only the main process writes.

    Args:
        accelerator: an ``Accelerator`` made with :func:`accelerator_kwargs`.
        optimizer: the optimizer inside Accelerate's wrapper (its ``param_groups`` hold the
            lr and the step counters).
        scheduled_masks: masks change only on the schedule's update steps (else mask scalars
            are logged every ``mask_interval`` steps while ``mask_update_due`` holds).
        mask_interval: steps between mask logs of methods without scheduled masks.
        flush_every: optimizer steps whose losses are read from the device at once.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer: Optimizer,
        *,
        scheduled_masks: bool = True,
        mask_interval: int = 100,
        flush_every: int = 20,
    ) -> None:
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.scheduled_masks = scheduled_masks
        self.mask_interval = max(1, mask_interval)
        self.flush_every = max(1, flush_every)
        self.masked = isinstance(optimizer, MaskedOptimizer)
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        self._seen = self._steps()

    def start(self, config: TrainingConfig, global_step: int = 0) -> None:
        """Start the trackers: project ``config.outputs.script``, the config
        (:func:`config_dict`) as hyperparameters; a resumed run (``global_step`` steps done at
        its checkpoint) hides the TensorBoard events of later steps."""
        output_dir = config.outputs.output_dir
        init_kwargs: dict[str, dict[str, Any]] = {
            "wandb": {"name": Path(output_dir).name, "dir": str(output_dir)}
        }
        if global_step:  # hide what the interrupted run logged after its checkpoint
            init_kwargs["tensorboard"] = {"purge_step": global_step + 1}
        values = hparams(config_dict(config))
        values["world_size"] = self.accelerator.num_processes
        self.accelerator.init_trackers(
            config.outputs.script, config=values, init_kwargs=init_kwargs
        )
        self._seen = self._steps()

    def _steps(self) -> list[int]:
        return [int(group.get("step", 0)) for group in self.optimizer.param_groups]

    def add_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss to the current optimizer step (no host sync)."""
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._micro_batches += 1

    def after_step(self, step: int, lr: float, *, skipped: bool = False) -> None:
        """After the optimizer step that made ``step`` steps done (``skipped``: an fp16 step
        that did not run, whose losses are dropped): queue its loss and lr, and log the
        masks if the step may have updated them."""
        loss, self._loss_sum = self._loss_sum, None
        count, self._micro_batches = self._micro_batches, 0
        old, new = self._seen, self._steps()
        self._seen = new
        if skipped or loss is None:
            return
        self._pending.append((step, lr, loss / count))
        if len(self._pending) >= self.flush_every:
            self.flush()
        if self.masked and self._mask_due(old, new, step):
            self.log_masks(step)

    def _mask_due(self, old: list[int], new: list[int], step: int) -> bool:
        groups = self.optimizer.param_groups
        due = any(
            self.optimizer.mask_update_due(group, t)
            for group, a, b in zip(groups, old, new, strict=True)
            for t in range(a, b)
        )
        return due and (self.scheduled_masks or step % self.mask_interval == 0)

    def flush(self) -> None:
        """Log the queued steps' ``train/loss`` and ``train/lr`` (one device-to-host copy;
        every process must call it at the same points)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([loss for _, _, loss in pending])
        if self.accelerator.num_processes > 1:
            losses = self.accelerator.reduce(losses, reduction="mean")
        for (step, lr, _), loss in zip(pending, losses.tolist(), strict=True):
            self.accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)

    def log_masks(self, step: int) -> None:
        """Log the mask scalars of ``sparsity_report()`` at ``step`` (main process only)."""
        if not self.accelerator.is_main_process:
            return
        rows = [row for row in self.optimizer.sparsity_report() if row["sparse"]]
        if not rows:
            return
        sizes = [_numel(row["shape"]) for row in rows]
        kept = sum(row["density"] * size for row, size in zip(rows, sizes, strict=True))
        values: dict[str, float | int] = {
            "mask/flips": sum(int(row["flips"]) for row in rows),
            "mask/frozen_blocks": sum(int(row["frozen_blocks"]) for row in rows),
            "mask/density": kept / sum(sizes),
        }
        for row in rows:
            for key in ("flips", "frozen_blocks", "density"):
                values[f"mask_{key}/{row['name']}"] = row[key]
        self.accelerator.log(values, step=step)

    def end_epoch(self, row: Mapping[str, Any]) -> None:
        """Flush the queued steps and log the epoch's history ``row`` at its ``step``."""
        self.flush()
        keys = ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "mask_changes")
        values = {f"epoch/{key}": row[key] for key in keys if row.get(key) is not None}
        values["epoch/epoch"] = row["epoch"]
        self.accelerator.log(values, step=row["step"])


def _numel(shape: Any) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total
