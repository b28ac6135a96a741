"""The training loop shared by ``examples/train_cifar.py`` and ``examples/train_imagenet.py``.

A script describes itself with a :class:`~bame_optim.integrations.training_args.ScriptConfig`
(its models, default epochs, data preset, weight decay) and calls :func:`main`. This module
holds the loop, the data, model and optimizer set-up, the schedule and the sampler; the other
parts live in their own modules:

* **Arguments** (:mod:`bame_optim.integrations.training_args`): data, model, method (any of
  :data:`bame_optim.methods.METHODS`), N:M pattern, the paper's recipe as defaults (SGD, lr 0.1,
  momentum 0.9, cosine schedule per optimizer step, batch 256, ΔT = 100, α = β = 0.5), quick-run
  limits, checkpointing and resuming. A bad value exits through ``parser.error`` (status 2)
  with a message naming the flag and the value.
* **Data** through :mod:`bame_optim.integrations.datasets` (``--data``: a local CIFAR-10
  python-batches folder, IDX folder, image folder, ``save_to_disk`` folder, parquet/arrow
  files, or a Hub name when online).
* **Loop** (:func:`run`) under 🤗 Accelerate: ``accelerate launch`` or plain ``python``; gradient
  accumulation with ``accelerator.accumulate``; the optimizer's ``total_steps`` and the cosine
  schedule count optimizer steps (``ceil(batches per process / accumulation)`` per epoch);
  :class:`~bame_optim.integrations.accelerate.MaskSync` after every step.
* **Reproducible data order**: the training order of epoch ``e`` is a permutation drawn from a
  generator seeded with ``(seed, e)`` (:class:`EpochSampler`), and the global RNGs (augmentation,
  worker seeds, dropout) are re-seeded from ``(seed, e, rank)`` at the start of every epoch, so
  a run resumed at an epoch boundary computes exactly what the uninterrupted run computes.
* **Checkpoints** (:func:`~bame_optim.integrations.checkpoints.save_checkpoint`):
  ``accelerator.save_state`` into ``checkpoints/.tmp-epoch_NNNN``, the loop's own state
  (``trainer_state.json``, ``mask_oscillation.pt``) added, files fsynced, then one
  ``os.replace`` to ``checkpoints/epoch_NNNN``: a crash leaves either the whole checkpoint or
  none. The latest ``--keep-checkpoints`` are kept. ``--resume auto`` continues from the latest
  one.
* **Outputs** in ``--output-dir`` (:mod:`bame_optim.integrations.training_metrics`,
  :mod:`bame_optim.integrations.training_plots`): ``metrics.json`` (per-epoch train loss and
  accuracy, eval loss and accuracy, learning rate, mask changes; wall times; arguments; final
  accuracy; training-FLOPs ratio from :func:`bame_optim.flops.training_flops_ratio`; the
  optimizer's ``sparsity_report()``), ``curves.png`` (loss and accuracy),
  ``mask_oscillation.png`` (the paper's Figure 2: accumulated SAD per N:M block) and
  ``mask_oscillation.pt`` (the per-block accumulated SAD tensors). Times: ``train_seconds`` /
  ``eval_seconds`` summed over epochs, ``wall_seconds`` the epoch loops' wall time (all
  invocations of a resumed run, set-up excluded), ``this_invocation_seconds`` this process from
  start to end.

Mask oscillation (:class:`~bame_optim.integrations.mask_oscillation.MaskOscillation`): after
every optimizer step that may have changed a mask (the schedule's update steps,
:func:`bame_optim.core.schedule.is_update_step`; every step for SR-STE and LBC, whose masks move at
every step), the masks are read with ``optimizer.kept_mask(p)`` and each block's
``SAD_k = sum |B_old - B_new|`` (Eq. 7) is added to its total. Only blocks whose previous mask
already held exactly N kept weights count, so BAME's gradual pruning from dense to N:M is not
counted as oscillation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .accelerate import MaskSync, unwrap_optimizer
from .checkpoints import CHECKPOINT_DIR, OSCILLATION_FILE, TRAINER_STATE, save_checkpoint
from .mask_oscillation import SCHEDULED_MASK_METHODS, MaskOscillation
from .training_args import (
    RUN_DEFINING,
    ScriptConfig,
    args_dict,
    build_parser,
    check_resume_compatible,
    parse_args,
)
from .training_metrics import write_metrics
from .training_setup import (
    TrainingData,
    build_training_model,
    build_training_optimizer,
    load_training_data,
)

__all__ = [
    "EpochSampler",
    "TrainResult",
    "cosine_lr",
    "epoch_seed",
    "main",
    "run",
]


# --------------------------------------------------------------------------------------------
# Schedules, seeds, sampler
# --------------------------------------------------------------------------------------------


def cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up to ``peak`` over
    ``warmup_steps`` (``peak * (step + 1) / warmup_steps``), then cosine annealing to 0 over
    the remaining steps, ``peak * (1 + cos(pi * s / S)) / 2`` with ``s = step - warmup_steps``,
    ``S = total_steps - warmup_steps`` (``torch.optim.lr_scheduler.CosineAnnealingLR`` with
    ``T_max = S``, stepped once per optimizer step)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global RNGs during ``epoch`` (distinct per epoch, below 2**31; the
    process index is added by ``set_seed(..., device_specific=True)``)."""
    return (seed * 1_000_003 + 7919 * (epoch + 1)) % (2**31 - 1024)


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(size)`` that depends only on ``(seed, epoch)``.

    Call :meth:`set_epoch` before iterating (``DataLoaderShard.set_epoch`` forwards it). The
    order does not depend on any RNG state, so a resumed run sees the same order. It has no
    ``generator`` attribute on purpose: Accelerate then leaves it alone, and every process
    draws the same permutation (Accelerate's ``BatchSamplerShard`` splits the batches).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`run` returns: the metrics written to ``metrics.json``, the trained model and
    the optimizer (both unwrapped from Accelerate), and the output folder."""

    metrics: dict[str, Any]
    model: nn.Module
    optimizer: Optimizer
    output_dir: Path
    oscillation: MaskOscillation | None = None


@dataclass
class _Progress:
    """Where the run stands: what a checkpoint's ``trainer_state.json`` carries."""

    epoch: int = 0  # epochs done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    times: dict[str, float] = field(
        default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0, "wall_seconds": 0.0}
    )

    def trainer_state(self, args: argparse.Namespace, world: int) -> dict[str, Any]:
        current = args_dict(args)
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "times": self.times,
            "args": {k: current.get(k) for k in RUN_DEFINING},
            "world_size": world,
        }


@dataclass
class _Loop:
    """What the epochs run on: the prepared (Accelerate-wrapped) loaders, model and optimizer,
    the optimizer inside its wrapper, the step counts, and the mask bookkeeping of sparse
    methods."""

    accelerator: Accelerator
    sampler: EpochSampler
    train_loader: DataLoader
    eval_loader: DataLoader
    model: nn.Module
    optimizer: Optimizer
    inner: Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    show: bool
    sync: MaskSync | None = None
    tracker: MaskOscillation | None = None


def _prepare(
    args: argparse.Namespace, config: ScriptConfig, parser: argparse.ArgumentParser
) -> tuple[_Loop, TrainingData]:
    """Data, loaders, model and optimizer, prepared by a new ``Accelerator``."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
    )
    set_seed(args.seed)
    data = load_training_data(args, config, parser, accelerator)
    sampler = EpochSampler(len(data.train), args.seed)
    common: dict[str, Any] = {
        "num_workers": args.workers,
        "pin_memory": accelerator.device.type == "cuda",
    }
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler, **common)
    eval_loader = DataLoader(data.eval, batch_size=args.batch_size, shuffle=False, **common)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    total_steps = args.epochs * steps_per_epoch

    set_seed(args.seed)  # the initial weights depend on the seed only
    model = build_training_model(args, data)
    optimizer = build_training_optimizer(args, model, total_steps, parser)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    if args.method == "bame_bidir":
        from bame_optim.peers.bidir import attach_backward_masks

        attach_backward_masks(accelerator.unwrap_model(model), unwrap_optimizer(inner))
    loop = _Loop(
        accelerator,
        sampler,
        train_loader,
        eval_loader,
        model,
        optimizer,
        inner,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        show=accelerator.is_local_main_process and not args.no_progress,
    )
    return loop, data


def _resume(
    args: argparse.Namespace, accelerator: Accelerator, parser: argparse.ArgumentParser
) -> tuple[_Progress, dict[str, Any] | None]:
    """The progress to start from, and the saved mask oscillation state (``None``: none):
    fresh, or loaded with the accelerator's state from ``args.resume_from``."""
    progress = _Progress()
    if args.resume_from is None:
        return progress, None
    saved = json.loads((args.resume_from / TRAINER_STATE).read_text())
    check_resume_compatible(saved, args, accelerator.num_processes, parser)
    accelerator.load_state(str(args.resume_from))
    progress.epoch, progress.global_step = saved["epoch"], saved["global_step"]
    progress.history = saved["history"]
    progress.times.update(saved["times"])
    oscillation_state = None
    oscillation_file = args.resume_from / OSCILLATION_FILE
    if oscillation_file.is_file():
        oscillation_state = torch.load(oscillation_file, weights_only=True)
    accelerator.print(
        f"resumed from {args.resume_from} (epoch {progress.epoch}, step {progress.global_step})"
    )
    return progress, oscillation_state


def _train_epoch(
    args: argparse.Namespace, loop: _Loop, progress: _Progress, epoch: int
) -> dict[str, Any]:
    """Train one epoch; return its history row (no evaluation yet)."""
    accelerator, model, optimizer = loop.accelerator, loop.model, loop.optimizer
    tracker = loop.tracker
    main_process = accelerator.is_main_process
    set_seed(epoch_seed(args.seed, epoch), device_specific=True)
    loop.sampler.set_epoch(epoch)
    if hasattr(loop.train_loader, "set_epoch"):
        loop.train_loader.set_epoch(epoch)
    model.train()
    epoch_start = time.perf_counter()
    changes_before = tracker.total() if tracker is not None else 0
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    lr = cosine_lr(progress.global_step, loop.total_steps, args.lr, loop.warmup_steps)
    bar = tqdm(
        loop.train_loader,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        leave=False,
        disable=not loop.show,
    )
    for index, (x, y) in enumerate(bar):
        with accelerator.accumulate(model):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                lr = cosine_lr(progress.global_step, loop.total_steps, args.lr, loop.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            progress.global_step += 1
        if loop.sync is not None:
            loop.sync.after_step()
        if tracker is not None and main_process:
            tracker.after_step()
        with torch.no_grad():  # summed on the device: no host sync per step
            sums[0] += loss.detach().double() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
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


def _train(args: argparse.Namespace, loop: _Loop, progress: _Progress) -> None:
    """The epochs from ``progress.epoch`` on: train, evaluate every ``--eval-every`` epochs and
    at the end, checkpoint every ``--checkpoint-every`` epochs and at the end. The wall time of
    this call is added to ``progress.times["wall_seconds"]``."""
    accelerator, tracker = loop.accelerator, loop.tracker
    invocation_start = time.perf_counter()
    wall_before = progress.times["wall_seconds"]

    def record_wall_time() -> None:
        progress.times["wall_seconds"] = wall_before + time.perf_counter() - invocation_start

    for epoch in range(progress.epoch, args.epochs):
        row = _train_epoch(args, loop, progress, epoch)
        last = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every == 0 or last:
            _evaluate(loop, row, progress.times)
        progress.history.append(row)
        progress.epoch = epoch + 1
        record_wall_time()
        accelerator.print(_epoch_line(row, args.epochs))
        if last or (args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0):
            save_checkpoint(
                accelerator,
                args.output_dir / CHECKPOINT_DIR,
                epoch + 1,
                {
                    "trainer_state": progress.trainer_state(args, accelerator.num_processes),
                    "oscillation": tracker.state_dict() if tracker is not None else {},
                },
                keep=args.keep_checkpoints,
            )
    record_wall_time()


def run(
    args: argparse.Namespace,
    config: ScriptConfig,
    parser: argparse.ArgumentParser | None = None,
    argv: Sequence[str] | None = None,
) -> TrainResult:
    """Train as ``args`` say (see the module docstring) and return the :class:`TrainResult`."""
    parser = parser or build_parser(config)
    started = time.perf_counter()
    loop, data = _prepare(args, config, parser)
    accelerator = loop.accelerator
    progress, oscillation_state = _resume(args, accelerator, parser)
    if args.method != "dense":
        loop.sync = MaskSync(loop.optimizer, accelerator)
        every_step = args.method not in SCHEDULED_MASK_METHODS
        loop.tracker = MaskOscillation(loop.inner, every_step=every_step)
        if oscillation_state is not None:
            loop.tracker.load_state_dict(oscillation_state)

    output_dir: Path = args.output_dir
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"{config.name}: {args.model} {args.method} {args.n}:{args.m} on {data.info['source']} "
        f"({data.info['train_samples']} train / {data.info['eval_samples']} eval images), "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"{loop.steps_per_epoch} steps/epoch, {loop.total_steps} steps"
    )
    _train(args, loop, progress)

    unwrapped = accelerator.unwrap_model(loop.model)
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        metrics = write_metrics(
            args,
            config,
            argv,
            data.info,
            unwrapped,
            loop.inner,
            loop.tracker,
            progress.history,
            progress.times,
            world=accelerator.num_processes,
            steps_per_epoch=loop.steps_per_epoch,
            total_steps=loop.total_steps,
            global_step=progress.global_step,
            device=str(accelerator.device),
            invocation_seconds=time.perf_counter() - started,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(metrics, unwrapped, loop.inner, output_dir, loop.tracker)


def main(argv: Sequence[str] | None, config: ScriptConfig) -> TrainResult:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) for the script ``config`` and train."""
    parser = build_parser(config)
    args = parse_args(argv, config, parser)
    return run(args, config, parser, argv)
