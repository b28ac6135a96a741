"""The training loop shared by ``examples/train_cifar.py`` and ``examples/train_imagenet.py``:
:func:`run` trains as one :class:`~.config.TrainingConfig` says and returns a
:class:`TrainResult`.

* **Loop** under 🤗 Accelerate (``accelerate launch``, ``torchrun`` or plain ``python``;
  :func:`~.launch.check_launch` refuses processes that would each train alone): gradient
  accumulation with ``accelerator.accumulate``; the optimizer's ``total_steps`` and the lr
  schedule (:func:`~.lr_schedule.make_lr_scheduler`, stepped after every optimizer step that
  ran) count optimizer steps (``ceil(batches per process / accumulation)`` per epoch);
  :class:`~bame_apps.integrations.accelerate.MaskSync` after every step; train loss and
  accuracy count every sample once (:func:`batch_sums`).
* **Reproducible data order** (:mod:`.sampling`): a resumed run sees the same batches and
  augmentation as the uninterrupted run.
* **Checkpoints** (:func:`~.checkpoints.save_checkpoint`): ``accelerator.save_state`` (model,
  optimizer, lr scheduler, RNGs) plus the loop's own state, written atomically every
  ``checkpoint_every`` epochs and at the end; ``resume`` continues from one
  (:mod:`.resume`).
* **Outputs** in ``output_dir`` (:mod:`.metrics`, :mod:`.plots`): ``metrics.json`` (rewritten
  atomically after every epoch), ``curves.png``, ``mask_oscillation.png`` and
  ``mask_oscillation.pt``; live logging to Accelerate's trackers (``report_to``,
  :mod:`.tracking`). Times:
  ``train_seconds`` / ``eval_seconds`` summed over epochs, ``wall_seconds`` the epoch loops'
  wall time (all invocations of a resumed run, set-up excluded), ``this_invocation_seconds``
  this process from start to end.

Mask oscillation (:class:`~.mask_oscillation.MaskOscillation`): after every optimizer step that
may have changed a mask, each N:M block's ``SAD_k = sum |B_old - B_new|`` (Eq. 7) is added to
its total (blocks whose previous mask already held exactly N kept weights only, so BAME's
gradual pruning is not counted as oscillation).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import set_seed
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bame_optim.methods import get_method

from ..accelerate import MaskSync, optimizer_steps, unwrap_optimizer
from .build import build_training_model, build_training_optimizer
from .checkpoints import CHECKPOINT_DIR, OSCILLATION_FILE, TRAINER_STATE, save_checkpoint
from .config import RUN_DEFINING, TrainingConfig, config_dict
from .data import TrainingData, load_training_data
from .launch import LaunchError, check_launch
from .lr_schedule import make_lr_scheduler
from .mask_oscillation import MaskOscillation
from .metrics import MetricsWriter, run_title
from .protocols import EpochLoader, MaskedOptimizer, ScheduledOptimizer
from .resume import check_resume_compatible, resolve_resume
from .sampling import EpochSampler, epoch_seed
from .tracking import LiveLog, accelerator_kwargs

__all__ = ["LaunchError", "TrainResult", "batch_sums", "check_launch", "run"]


@dataclass
class TrainResult:
    """What :func:`run` returns: the metrics written to ``metrics.json``, the trained model and
    the optimizer (both unwrapped from Accelerate), the output folder, the mask oscillation
    totals (``None`` for dense training) and the config as run (``preset`` filled in)."""

    metrics: dict[str, Any]
    model: nn.Module
    optimizer: Optimizer
    output_dir: Path
    oscillation: MaskOscillation | None = None
    config: TrainingConfig | None = None


@dataclass
class _Progress:
    """Where the run stands: what a checkpoint's ``trainer_state.json`` carries."""

    epoch: int = 0  # epochs done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    times: dict[str, float] = field(
        default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0, "wall_seconds": 0.0}
    )

    def trainer_state(self, config: TrainingConfig, world: int) -> dict[str, Any]:
        current = config_dict(config)
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "times": self.times,
            "args": {k: current.get(k) for k in RUN_DEFINING},
            "world_size": world,
        }


@dataclass(frozen=True)
class _Loop:
    """What the epochs run on: the prepared (Accelerate-wrapped) loaders, model and optimizer,
    the optimizer inside its wrapper, the lr scheduler, the step counts, the mask
    bookkeeping of sparse methods, the live log (``None``: ``report_to="none"``) and the
    ``metrics.json`` writer (``None`` off the main process). :func:`_prepare` builds what
    training needs; :func:`run` derives the loop with the bookkeeping (after resuming, whose
    state it reads) by :func:`dataclasses.replace`."""

    config: TrainingConfig
    accelerator: Accelerator
    sampler: EpochSampler
    train_loader: DataLoader
    eval_loader: DataLoader
    model: nn.Module
    optimizer: Optimizer
    inner: Optimizer
    scheduler: LRScheduler
    steps_per_epoch: int
    total_steps: int
    show: bool
    sync: MaskSync | None = None
    tracker: MaskOscillation | None = None
    live: LiveLog | None = None
    metrics: MetricsWriter | None = None


def _prepare(config: TrainingConfig) -> tuple[_Loop, TrainingData]:
    """Data, loaders, model, optimizer and lr scheduler, prepared by a new ``Accelerator``
    (the scheduler registered for its checkpoints). The loop's config has the data's preset."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.optim.grad_accum,
        mixed_precision=config.optim.mixed_precision,
        cpu=config.optim.cpu,
        **accelerator_kwargs(config),
    )
    check_launch(accelerator.num_processes)
    set_seed(config.optim.seed)
    data = load_training_data(config, accelerator)
    config = config.replace(preset=data.preset)
    sampler = EpochSampler(len(data.train), config.optim.seed)
    common: dict[str, Any] = {
        "num_workers": config.inputs.workers,
        "pin_memory": accelerator.device.type == "cuda",
    }
    batch = config.optim.batch_size
    train_loader = DataLoader(data.train, batch_size=batch, sampler=sampler, **common)
    eval_loader = DataLoader(data.eval, batch_size=batch, shuffle=False, **common)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    steps_per_epoch = optimizer_steps(len(train_loader), 1, config.optim.grad_accum)
    total_steps = optimizer_steps(len(train_loader), config.optim.epochs, config.optim.grad_accum)

    set_seed(config.optim.seed)  # the initial weights depend on the seed only
    model = build_training_model(config, data)
    optimizer = build_training_optimizer(config, model, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    attach = get_method(config.registered_method).attach
    if attach is not None:  # e.g. bame_bidir's backward masks
        attach(accelerator.unwrap_model(model), unwrap_optimizer(inner))
    # Not accelerator.prepare(scheduler): Accelerate would step it once per process per step.
    warmup_steps = min(total_steps, round(config.optim.warmup_epochs * steps_per_epoch))
    scheduler = make_lr_scheduler(inner, total_steps, warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    loop = _Loop(
        config,
        accelerator,
        sampler,
        train_loader,
        eval_loader,
        model,
        optimizer,
        inner,
        scheduler,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        show=accelerator.is_local_main_process and config.outputs.progress,
    )
    return loop, data


def _resume(loop: _Loop, checkpoint: Path | None) -> tuple[_Progress, dict[str, Any] | None]:
    """The progress to start from, and the saved mask oscillation state (``None``: none):
    fresh, or loaded with the accelerator's state from ``checkpoint``."""
    progress = _Progress()
    if checkpoint is None:
        return progress, None
    accelerator = loop.accelerator
    saved = json.loads((checkpoint / TRAINER_STATE).read_text())
    check_resume_compatible(saved, loop.config, accelerator.num_processes, checkpoint)
    accelerator.load_state(str(checkpoint))
    progress.epoch, progress.global_step = saved["epoch"], saved["global_step"]
    progress.history = saved["history"]
    progress.times.update(saved["times"])
    oscillation_state = None
    oscillation_file = checkpoint / OSCILLATION_FILE
    if oscillation_file.is_file():
        oscillation_state = torch.load(oscillation_file, weights_only=True)
    accelerator.print(
        f"resumed from {checkpoint} (epoch {progress.epoch}, step {progress.global_step})"
    )
    return progress, oscillation_state


def _train_epoch(loop: _Loop, progress: _Progress, epoch: int) -> dict[str, Any]:
    """Train one epoch; return its history row (no evaluation yet). ``lr`` is the lr of the
    epoch's last optimizer step."""
    config, accelerator = loop.config, loop.accelerator
    model, optimizer = loop.model, loop.optimizer
    tracker, live = loop.tracker, loop.live
    main_process = accelerator.is_main_process
    set_seed(epoch_seed(config.optim.seed, epoch), device_specific=True)
    loop.sampler.set_epoch(epoch)
    if isinstance(loop.train_loader, EpochLoader):
        loop.train_loader.set_epoch(epoch)
    model.train()
    epoch_start = time.perf_counter()
    changes_before = tracker.total() if tracker is not None else 0
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    lr = float(loop.scheduler.get_last_lr()[0])
    bar = tqdm(
        loop.train_loader,
        desc=f"epoch {epoch + 1}/{config.optim.epochs}",
        leave=False,
        disable=not loop.show,
    )
    for index, (x, y) in enumerate(bar):
        with accelerator.accumulate(model):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.optim.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                lr = float(loop.inner.param_groups[0]["lr"])
            optimizer.step()
            optimizer.zero_grad()
        if live is not None:
            live.add_loss(loss)
        skipped = accelerator.optimizer_step_was_skipped
        if accelerator.sync_gradients and not skipped:
            loop.scheduler.step()
            progress.global_step += 1
        if live is not None and accelerator.sync_gradients:
            live.after_step(progress.global_step, lr, skipped=skipped)
        if loop.sync is not None:
            loop.sync.after_step()
        if tracker is not None and main_process:
            tracker.after_step()
        sums += batch_sums(accelerator, loss, logits, y, config.optim.label_smoothing)
        if loop.show and index % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
    bar.close()
    sums = accelerator.reduce(sums, reduction="sum")
    train_seconds = time.perf_counter() - epoch_start
    progress.times["train_seconds"] += train_seconds
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": progress.global_step,
        "lr": lr,
        "train_loss": float(sums[0] / sums[2]),
        "train_accuracy": float(sums[1] / sums[2]),
        "eval_loss": None,
        "eval_accuracy": None,
        "train_seconds": train_seconds,
    }
    if tracker is not None:
        row["mask_changes"] = tracker.total() - changes_before
    return row


def batch_sums(
    accelerator: Accelerator,
    loss: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``[loss sum, correct, samples]`` (float64, on the device) of one training batch of this
    process, such that their sum over the epoch's batches and the processes counts every sample
    once. Under several processes Accelerate fills the epoch's last round of batches with
    samples from its start (every process gets a full batch); on that round the per-sample
    losses and hits are gathered with ``gather_for_metrics``, which drops the padding, and the
    main process alone adds them. Other batches add ``loss * len(y)`` (``loss`` the batch mean)
    without any communication or host sync."""
    with torch.no_grad():
        sums = torch.zeros(3, dtype=torch.float64, device=logits.device)
        hits = (logits.argmax(1) == y).double()
        if accelerator.num_processes > 1 and accelerator.gradient_state.end_of_dataloader:
            losses = F.cross_entropy(
                logits.detach().float(), y, reduction="none", label_smoothing=label_smoothing
            )
            losses, hits = accelerator.gather_for_metrics((losses.double(), hits))
            if accelerator.is_main_process:
                sums[0], sums[1], sums[2] = losses.sum(), hits.sum(), len(hits)
            return sums
        sums[0], sums[1], sums[2] = loss.detach().double() * len(y), hits.sum(), len(y)
        return sums


def _evaluate(loop: _Loop, row: dict[str, Any], times: dict[str, float]) -> None:
    """Evaluate into ``row``: mean loss and accuracy over the evaluation set (duplicates of
    uneven sharding dropped by ``gather_for_metrics``) and the time it took."""
    eval_start = time.perf_counter()
    loop.model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for x, y in tqdm(loop.eval_loader, desc="eval", leave=False, disable=not loop.show):
            logits = loop.model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            loss, hit = loop.accelerator.gather_for_metrics((loss, logits.argmax(1) == y))
            losses.append(loss)
            hits.append(hit)
    loss_all, hit_all = torch.cat(losses), torch.cat(hits)
    row["eval_loss"], row["eval_accuracy"] = float(loss_all.mean()), float(hit_all.float().mean())
    row["eval_seconds"] = time.perf_counter() - eval_start
    times["eval_seconds"] += row["eval_seconds"]


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The line printed after an epoch."""
    line = (
        f"epoch {row['epoch']}/{epochs} step {row['step']} lr {row['lr']:.4g} "
        f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"
    )
    if row["eval_accuracy"] is not None:
        line += f" | eval loss {row['eval_loss']:.4f} acc {100 * row['eval_accuracy']:.2f}%"
    return line + f" | {row['train_seconds']:.1f}s"


def _train(loop: _Loop, progress: _Progress) -> None:
    """The epochs from ``progress.epoch`` on: train, evaluate every ``eval_every`` epochs and
    at the end, checkpoint every ``checkpoint_every`` epochs and at the end. The wall time of
    this call is added to ``progress.times["wall_seconds"]``."""
    config, accelerator, tracker = loop.config, loop.accelerator, loop.tracker
    invocation_start = time.perf_counter()
    wall_before = progress.times["wall_seconds"]

    def record_wall_time() -> None:
        progress.times["wall_seconds"] = wall_before + time.perf_counter() - invocation_start

    for epoch in range(progress.epoch, config.optim.epochs):
        row = _train_epoch(loop, progress, epoch)
        last = epoch + 1 == config.optim.epochs
        if (epoch + 1) % config.outputs.eval_every == 0 or last:
            _evaluate(loop, row, progress.times)
        progress.history.append(row)
        progress.epoch = epoch + 1
        record_wall_time()
        accelerator.print(_epoch_line(row, config.optim.epochs))
        if loop.live is not None:
            loop.live.end_epoch(row)
        if loop.metrics is not None and not last:  # the end writes the complete file
            loop.metrics.write(progress.history, progress.times, progress.global_step, final=False)
        every = config.outputs.checkpoint_every
        if last or (every and (epoch + 1) % every == 0):
            save_checkpoint(
                accelerator,
                config.outputs.output_dir / CHECKPOINT_DIR,
                epoch + 1,
                {
                    "trainer_state": progress.trainer_state(config, accelerator.num_processes),
                    "oscillation": tracker.state_dict() if tracker is not None else {},
                },
                keep=config.outputs.keep_checkpoints,
            )
    record_wall_time()


def run(config: TrainingConfig, *, argv: Sequence[str] | None = None) -> TrainResult:
    """Train as ``config`` says (see the module docstring) and return the
    :class:`TrainResult`. ``argv`` is only recorded in ``metrics.json`` (the command line the
    config came from). Invalid data, splits, ``exclude`` patterns or checkpoints, and a
    ``report_to`` tracker whose package is missing, raise :class:`~.config.ConfigError` naming
    the field, before any training."""
    started = time.perf_counter()
    checkpoint = resolve_resume(config)
    loop, data = _prepare(config)
    config, accelerator = loop.config, loop.accelerator
    progress, oscillation_state = _resume(loop, checkpoint)
    sync, tracker = None, None
    if isinstance(loop.inner, MaskedOptimizer):  # an N:M method (dense SGD has no masks)
        sync = MaskSync(loop.optimizer, accelerator)
        every_step = not get_method(config.registered_method).scheduled_masks
        tracker = MaskOscillation(loop.inner, every_step=every_step)
        if oscillation_state is not None:
            tracker.load_state_dict(oscillation_state)

    output_dir = config.outputs.output_dir
    unwrapped = accelerator.unwrap_model(loop.model)
    metrics_writer, live = None, None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_writer = MetricsWriter(
            config,
            data.info,
            unwrapped,
            loop.inner,
            tracker,
            argv=argv,
            world=accelerator.num_processes,
            device=str(accelerator.device),
            steps_per_epoch=loop.steps_per_epoch,
            total_steps=loop.total_steps,
            resumed_from=checkpoint,
            started=started,
        )
    if accelerator.log_with:
        live = LiveLog(
            accelerator,
            loop.inner,
            scheduled_masks=get_method(config.registered_method).scheduled_masks,
            mask_interval=config.network.delta_t,
        )
        live.start(config, progress.global_step)
    loop = dataclasses.replace(
        loop, sync=sync, tracker=tracker, live=live, metrics=metrics_writer
    )
    if isinstance(loop.inner, ScheduledOptimizer):
        accelerator.print(loop.inner.schedule_summary())
    accelerator.print(
        f"{config.outputs.script}: {run_title(config)} on "
        f"{data.info['source']} ({data.info['train_samples']} train / "
        f"{data.info['eval_samples']} eval images), {accelerator.num_processes} process(es) on "
        f"{accelerator.device}, {loop.steps_per_epoch} steps/epoch, {loop.total_steps} steps"
    )
    _train(loop, progress)
    if isinstance(loop.inner, ScheduledOptimizer) and accelerator.is_main_process:
        loop.inner.check_finished()  # warns if the run ended before t_i (total_steps too large)

    metrics: dict[str, Any] = {}
    if loop.metrics is not None:
        metrics = loop.metrics.write(
            progress.history, progress.times, progress.global_step, final=True
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(metrics, unwrapped, loop.inner, output_dir, loop.tracker, config)
