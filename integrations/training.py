"""The training loop shared by ``examples/train_cifar.py`` and ``examples/train_imagenet.py``.

A script describes itself with a :class:`ScriptConfig` (its models, default epochs, data
preset, weight decay) and calls :func:`main`; everything else lives here:

* **Arguments** (:func:`build_parser`, :func:`parse_args`): data, model, method (any of
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
* **Checkpoints** (:func:`save_checkpoint`): ``accelerator.save_state`` into
  ``checkpoints/.tmp-epoch_NNNN``, the loop's own state (``trainer_state.json``,
  ``mask_oscillation.pt``) added, files fsynced, then one ``os.replace`` to
  ``checkpoints/epoch_NNNN``: a crash leaves either the whole checkpoint or none. The latest
  ``--keep-checkpoints`` are kept. ``--resume auto`` continues from the latest one.
* **Outputs** in ``--output-dir``: ``metrics.json`` (per-epoch train loss and accuracy, eval
  loss and accuracy, learning rate, mask changes; wall times; arguments; final accuracy;
  training-FLOPs ratio from :func:`bame_optim.flops.training_flops_ratio`; the optimizer's
  ``sparsity_report()``), ``curves.png`` (loss and accuracy), ``mask_oscillation.png`` (the
  paper's Figure 2: accumulated SAD per N:M block) and ``mask_oscillation.pt`` (the per-block
  accumulated SAD tensors). Times: ``train_seconds`` / ``eval_seconds`` summed over epochs,
  ``wall_seconds`` the epoch loops' wall time (all invocations of a resumed run, set-up
  excluded), ``this_invocation_seconds`` this process from start to end.

Mask oscillation (:class:`MaskOscillation`): after every optimizer step that may have changed
a mask (the schedule's update steps, :func:`bame_optim.schedule.is_update_step`; every step for
SR-STE and LBC, whose masks move at every step), the masks are read with
``optimizer.kept_mask(p)`` and each block's ``SAD_k = sum |B_old - B_new|`` (Eq. 7) is added to
its total. Only blocks whose previous mask already held exactly N kept weights count, so BAME's
gradual pruning from dense to N:M is not counted as oscillation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from bame_optim import nm_param_groups
from bame_optim.flops import training_flops_ratio
from bame_optim.methods import METHODS, fixed_settings, make_optimizer
from bame_optim.schedule import DEFAULT_DELTA_T, is_update_step

from .accelerate import MaskSync, unwrap_optimizer
from .datasets import (
    KINDS,
    DatasetUnavailableError,
    TorchImageDataset,
    detect_kind,
    image_transforms,
    load_image_dataset,
)
from .models import DEIT_SMALL, build_model, deit_small

__all__ = [
    "CHECKPOINT_DIR",
    "PRESETS",
    "SCHEDULED_MASK_METHODS",
    "EpochSampler",
    "MaskOscillation",
    "ScriptConfig",
    "TrainResult",
    "build_parser",
    "checkpoint_epoch",
    "cosine_lr",
    "epoch_seed",
    "find_checkpoint",
    "main",
    "parse_args",
    "plot_curves",
    "plot_mask_oscillation",
    "run",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
"""Sub-folder of ``--output-dir`` holding the checkpoints."""
TRAINER_STATE = "trainer_state.json"
"""The loop's own state in a checkpoint (epoch, step, history, times, run-defining args). It
is written last, so a folder holding it is complete."""
OSCILLATION_FILE = "mask_oscillation.pt"
_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)")
PRESETS = ("cifar10", "imagenet", "fashion-mnist", "mnist")
"""``--preset`` values: the transform pipelines of
:func:`bame_optim.integrations.datasets.image_transforms`."""
_PRESET_OF_KIND = {"cifar10": "cifar10", "fashion-mnist": "fashion-mnist", "mnist": "mnist"}
_GRAYSCALE_PRESETS = frozenset({"fashion-mnist", "mnist"})
SCHEDULED_MASK_METHODS = frozenset({"static", "rigl", "lma", "bame", "bame_bidir", "asp"})
"""Methods whose masks change only on the schedule's update steps (DESIGN.md section 3); the
others (``srste``, ``lbc``) may change them at every step."""
RUN_DEFINING = (
    "model",
    "method",
    "n",
    "m",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "delta_t",
    "alpha",
    "beta",
    "seed",
    "max_train_samples",
    "image_size",
    "preset",
    "exclude",
    "train_split",
    "vit_depth",
)
"""Arguments a resumed run must share with the checkpoint (they change what is computed)."""


# --------------------------------------------------------------------------------------------
# Configuration and arguments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptConfig:
    """What differs between the training scripts.

    Attributes:
        name: the script's name (``"train_cifar"``), used in the default output folder.
        description: the ``--help`` description.
        models: the ``--model`` choices (keys of :data:`bame_optim.integrations.models.MODELS`).
        default_model: the default ``--model``.
        default_epochs: epochs per model name (``"*"``: any other model).
        default_preset: the transform preset for data whose kind does not imply one.
        default_weight_decay: the default ``--weight-decay``.
        default_image_size: the default ``--image-size`` (``None``: the data's own size).
    """

    name: str
    description: str
    models: tuple[str, ...]
    default_model: str
    default_epochs: dict[str, int]
    default_preset: str
    default_weight_decay: float
    default_image_size: int | None = None
    epilog: str = field(default="")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value} (an integer >= 1 is required)")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid value {value} (an integer >= 0 is required)")
    return number


def _finite_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"invalid value {value} (a finite number is required)")
    return number


def build_parser(config: ScriptConfig) -> argparse.ArgumentParser:
    """The command line of a training script (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        prog=f"{config.name}.py",
        description=config.description,
        epilog=config.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        help="a local dataset (CIFAR-10 python batches folder, IDX folder, image folder with "
        "train/ and test/ or val/, save_to_disk folder, parquet/arrow files) or a Hugging Face "
        "Hub name (needs network)",
    )
    data.add_argument("--data-kind", choices=KINDS, help="override the detected dataset kind")
    data.add_argument("--cache-dir", type=Path, help="datasets' Arrow cache (default: its own)")
    data.add_argument("--train-split", default="train", help="default: %(default)s")
    data.add_argument(
        "--eval-split", help="default: the first of test, validation, val the data has"
    )
    data.add_argument(
        "--preset",
        choices=PRESETS,
        help="transform pipeline (default: from the data kind: cifar10, fashion-mnist, mnist; "
        f"else {config.default_preset})",
    )
    data.add_argument(
        "--image-size",
        type=_positive_int,
        default=config.default_image_size,
        help="crop size of the cifar10/imagenet presets and DeiT's input size "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--max-train-samples",
        type=_positive_int,
        help="train on a random subset of this many images (seeded by --seed)",
    )
    data.add_argument(
        "--max-eval-samples",
        type=_positive_int,
        help="evaluate on a random subset of this many images (seeded by --seed)",
    )
    data.add_argument(
        "--workers", type=_non_negative_int, default=4, help="loader workers (%(default)s)"
    )

    model = parser.add_argument_group("model and method")
    model.add_argument(
        "--model", choices=config.models, default=config.default_model, help="%(default)s"
    )
    if "deit_small" in config.models:
        model.add_argument(
            "--vit-depth",
            type=_positive_int,
            default=DEIT_SMALL["num_layers"],
            help="encoder blocks of deit_small (%(default)s, the paper's; fewer: smoke tests)",
        )
    model.add_argument("--method", choices=METHODS, default="bame", help="default: %(default)s")
    model.add_argument("--n", type=_positive_int, default=2, help="kept per block (%(default)s)")
    model.add_argument("--m", type=_positive_int, default=4, help="block size (%(default)s)")
    model.add_argument(
        "--exclude",
        nargs="*",
        metavar="PATTERN",
        help="module names to keep dense (fnmatch patterns); default: the stem and the "
        "classifier; give the flag with no pattern to make every eligible layer sparse",
    )
    model.add_argument(
        "--delta-t",
        type=_positive_int,
        default=DEFAULT_DELTA_T,
        help="mask update interval ΔT in optimizer steps (%(default)s)",
    )
    model.add_argument("--alpha", type=_finite_float, help="OBF alpha (default: 0.5; lma: 0)")
    model.add_argument("--beta", type=_finite_float, help="OBF beta (default: 0.5)")

    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--epochs",
        type=_positive_int,
        help="default: "
        + ", ".join(f"{k} {v}" for k, v in config.default_epochs.items() if k != "*"),
    )
    optim.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="per process; the global batch is this x processes x --grad-accum (%(default)s)",
    )
    optim.add_argument(
        "--grad-accum", type=_positive_int, default=1, help="accumulation steps (%(default)s)"
    )
    optim.add_argument("--lr", type=_finite_float, default=0.1, help="peak lr (%(default)s)")
    optim.add_argument("--momentum", type=_finite_float, default=0.9, help="%(default)s")
    optim.add_argument(
        "--weight-decay",
        type=_finite_float,
        default=config.default_weight_decay,
        help="on weights; biases and norms get none (%(default)s)",
    )
    optim.add_argument(
        "--warmup-epochs",
        type=_finite_float,
        default=0.0,
        help="linear warm-up before the cosine decay (%(default)s: the paper states none)",
    )
    optim.add_argument("--label-smoothing", type=_finite_float, default=0.0, help="%(default)s")
    optim.add_argument("--seed", type=_non_negative_int, default=0, help="%(default)s")
    optim.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        help="default: accelerate's configuration (no for plain python)",
    )
    optim.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")

    out = parser.add_argument_group("outputs and checkpoints")
    out.add_argument(
        "--output-dir",
        type=Path,
        help=f"default: runs/{config.name}-MODEL-METHOD-NofM",
    )
    out.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=1,
        help="epochs between checkpoints; 0: only at the end (%(default)s)",
    )
    out.add_argument(
        "--keep-checkpoints", type=_positive_int, default=2, help="latest kept (%(default)s)"
    )
    out.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint folder (or the latest one in a folder); auto: the "
        "latest in --output-dir, or start fresh if there is none",
    )
    out.add_argument(
        "--eval-every", type=_positive_int, default=1, help="epochs between evaluations"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(
    argv: Sequence[str] | None,
    config: ScriptConfig,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """Parse and validate a training script's command line.

    Fills the defaults that depend on other flags (``--epochs`` per model, ``--output-dir``)
    and resolves ``--resume`` to a checkpoint folder (``args.resume_from``, ``None`` for a
    fresh start). Every invalid value exits through ``parser.error`` with a message that names
    the flag and the value.
    """
    parser = parser or build_parser(config)
    args = parser.parse_args(None if argv is None else list(argv))

    def fail(flag: str, value: Any, why: str) -> None:
        parser.error(f"argument {flag}: invalid value {value!r} ({why})")

    if args.m < 2:
        fail("--m", args.m, "m >= 2 is required")
    if not 1 <= args.n < args.m:
        fail("--n", args.n, f"1 <= n < m = {args.m} is required")
    if args.lr <= 0:
        fail("--lr", args.lr, "lr > 0 is required")
    if not 0 <= args.momentum < 1:
        fail("--momentum", args.momentum, "0 <= momentum < 1 is required")
    if args.weight_decay < 0:
        fail("--weight-decay", args.weight_decay, ">= 0 is required")
    if args.warmup_epochs < 0:
        fail("--warmup-epochs", args.warmup_epochs, ">= 0 is required")
    if not 0 <= args.label_smoothing < 1:
        fail("--label-smoothing", args.label_smoothing, "0 <= value < 1 is required")
    fixed = fixed_settings(args.method)
    for name in ("alpha", "beta"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            fail(f"--{name}", value, "0 <= value <= 1 is required")
        if value is not None and name in fixed and value != fixed[name]:
            fail(f"--{name}", value, f"method {args.method} fixes {name}={fixed[name]}")
        if value is None:
            setattr(args, name, fixed.get(name, 0.5))
    if args.epochs is None:
        args.epochs = config.default_epochs.get(args.model, config.default_epochs.get("*", 1))
    if args.warmup_epochs >= args.epochs:
        fail("--warmup-epochs", args.warmup_epochs, f"must be < --epochs {args.epochs}")
    if args.model == "deit_small" and args.image_size is not None and args.image_size % 16:
        fail("--image-size", args.image_size, "DeiT-small needs a multiple of its patch size 16")
    if args.output_dir is None:
        run_name = f"{config.name}-{args.model}-{args.method}-{args.n}of{args.m}"
        args.output_dir = Path("runs") / run_name
    if args.output_dir.exists() and not args.output_dir.is_dir():
        fail("--output-dir", str(args.output_dir), "exists and is not a folder")
    args.resume_from = _resolve_resume(args, parser)
    return args


def _complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints ``epoch_NNNN`` under ``root``, oldest first (temporary and
    partial folders are ignored)."""
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _CHECKPOINT_NAME.fullmatch(path.name) and (path / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=checkpoint_epoch)


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in a checkpoint folder's name (``epoch_0012`` -> 12)."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"Invalid checkpoint value: {str(path)!r} (not an epoch_NNNN folder)")
    return int(match.group(1))


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at ``path``: ``path`` itself if it is a complete checkpoint folder, else
    the latest complete one in ``path/checkpoints`` or ``path``; ``None`` if there is none."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        found = _complete_checkpoints(root)
        if found:
            return found[-1]
    return None


def _resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    own = _complete_checkpoints(args.output_dir / CHECKPOINT_DIR)
    if args.resume is None:
        if own:
            parser.error(
                f"argument --output-dir: invalid value '{args.output_dir}' (it already holds "
                f"checkpoints up to {own[-1].name}; pass --resume auto to continue that run, or "
                f"choose another --output-dir)"
            )
        return None
    if args.resume == "auto":
        return own[-1] if own else None
    target = Path(args.resume).expanduser()
    if not target.exists():
        parser.error(f"argument --resume: invalid value '{args.resume}' (no such folder)")
    found = find_checkpoint(target)
    if found is None:
        parser.error(
            f"argument --resume: invalid value '{args.resume}' (no complete checkpoint: expected "
            f"a folder holding {TRAINER_STATE}, or epoch_NNNN folders)"
        )
    if own and found.resolve() != own[-1].resolve():
        parser.error(
            f"argument --resume: invalid value '{args.resume}' (--output-dir already holds the "
            f"checkpoint {own[-1].name} of another point of a run; resume into another "
            f"--output-dir, or pass --resume auto to continue from {own[-1].name})"
        )
    return found


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
# Mask oscillation (the paper's Figure 2)
# --------------------------------------------------------------------------------------------


class MaskOscillation:
    """Accumulated SAD (Eq. 7) per N:M block, read from ``optimizer.kept_mask(p)``.

    Call :meth:`after_step` after every ``optimizer.step()`` (skipped ones included). It reads
    the masks when a real step ran whose counter ``t`` is a mask-update step of its group
    (:func:`bame_optim.schedule.is_update_step`), or after every real step when
    ``every_step`` (methods whose masks move at every step). For every sparse parameter,
    ``SAD_k = sum_m |B_old[k, m] - B_new[k, m]|`` is added to ``sad[name][k]`` for the blocks
    whose old mask kept exactly ``n`` weights (the N:M phase: BAME's gradual pruning is not
    counted as oscillation). :attr:`cycles` counts the reads that compared N:M blocks.

    The state (:meth:`state_dict`) holds the totals; the previous masks are read again from the
    optimizer on construction, which is exact after a resume since masks do not change between
    steps.
    """

    def __init__(self, optimizer: Optimizer, *, every_step: bool = False) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self.every_step = every_step
        self.sad: dict[str, Tensor] = {}
        self._cycles: Tensor | int = 0
        self._params: list[tuple[str, Tensor, int]] = []
        for g, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if group.get("sparse", False):
                    name = names[j] if names else f"group{g}.param{j}"
                    self._params.append((name, p, group["n"]))
        self._last = {name: self.optimizer.kept_mask(p) for name, p, _ in self._params}
        self._seen = self._steps()

    def _steps(self) -> list[int]:
        return [group["step"] for group in self.optimizer.param_groups]

    def _due(self, old: list[int], new: list[int]) -> bool:
        if self.every_step:
            return old != new
        groups = self.optimizer.param_groups
        return any(
            is_update_step(t, g["delta_t"], g["t_i"], g["t_f"])
            for g, a, b in zip(groups, old, new, strict=True)
            for t in range(a, b)
        )

    def after_step(self) -> bool:
        """Read the masks if a real step since the last call may have changed them; returns
        whether it read them."""
        steps = self._steps()
        old, self._seen = self._seen, steps
        if not self._due(old, steps):
            return False
        compared: Tensor | None = None  # any N:M block compared (on the device: no sync)
        for name, p, n in self._params:
            new = self.optimizer.kept_mask(p)
            previous = self._last[name]
            self._last[name] = new
            if new is None or previous is None:
                continue
            at_budget = previous.sum(dim=-1) == n
            change = (previous != new).sum(dim=-1, dtype=torch.int32) * at_budget
            total = self.sad.get(name)
            self.sad[name] = change if total is None else total + change
            compared = at_budget.any() if compared is None else compared | at_budget.any()
        if compared is not None:
            self._cycles = self._cycles + compared.to(torch.int64)
        return True

    @property
    def cycles(self) -> int:
        """Reads that compared two masks in at least one N:M block (the paper's LMA cycles
        ``c`` of Eq. 7, for BAME)."""
        return int(self._cycles)

    def total(self) -> int:
        """All accumulated SAD (mask entries that changed, summed over reads)."""
        return int(sum(int(t.sum()) for t in self.sad.values()))

    def state_dict(self) -> dict[str, Any]:
        """``{"sad": {name: int32 [K] CPU tensor}, "cycles": int}``."""
        return {"sad": {k: v.cpu() for k, v in self.sad.items()}, "cycles": self.cycles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of :meth:`state_dict` (onto the parameters' devices)."""
        devices = {name: p.device for name, p, _ in self._params}
        self.sad = {k: v.to(devices.get(k, torch.device("cpu"))) for k, v in state["sad"].items()}
        self._cycles = int(state["cycles"])

    def summary(self) -> dict[str, Any]:
        """Per layer and overall: blocks, total and maximum SAD, the share of blocks that never
        changed, and the share of all changes held by the 10% most-changed blocks."""
        layers = {name: _sad_summary(t.cpu()) for name, t in self.sad.items()}
        every = torch.cat([t.cpu() for t in self.sad.values()]) if self.sad else None
        overall = _sad_summary(every) if every is not None else {}
        return {"cycles": self.cycles, "overall": overall, "layers": layers}


def _sad_summary(sad: Tensor) -> dict[str, Any]:
    blocks = sad.numel()
    total = int(sad.sum())
    top = max(1, blocks // 10)
    top_total = int(sad.sort(descending=True).values[:top].sum()) if blocks else 0
    return {
        "blocks": blocks,
        "total": total,
        "max": int(sad.max()) if blocks else 0,
        "mean": total / blocks if blocks else 0.0,
        "never_changed": float((sad == 0).float().mean()) if blocks else 1.0,
        "top10_share": top_total / total if total else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders themselves to disk (best effort on
    platforms that cannot fsync a folder)."""
    for path in [*sorted(root.rglob("*")), root]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    epoch: int,
    extra: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Save the accelerator's state and ``extra`` as checkpoint ``root/epoch_NNNN``, atomically.

    Every process calls this (``save_state`` is collective). ``save_state`` writes into
    ``root/.tmp-epoch_NNNN``; the main process adds ``extra`` (``trainer_state`` (JSON) and
    ``oscillation`` (tensors), written last), fsyncs the folder and renames it to its final name
    with ``os.replace``. An existing folder of that name (an earlier attempt at the same epoch)
    is first renamed aside and deleted after. On any exception the temporary folder is removed
    and the exception propagates: the previous checkpoints are untouched. Then all but the
    latest ``keep`` complete checkpoints are deleted.
    """
    name = f"epoch_{epoch:04d}"
    final = root / name
    temporary = root / f".tmp-{name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if main:
            torch.save(extra["oscillation"], temporary / OSCILLATION_FILE)
            state_file = temporary / TRAINER_STATE
            state_file.write_text(json.dumps(extra["trainer_state"], indent=1, default=_json))
            _fsync_tree(temporary)
        accelerator.wait_for_everyone()
        if main:
            aside = root / f".old-{name}"
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(temporary, final)
            _fsync_tree_dir(root)
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if main:
        for old in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a hard kill
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib imported here only)
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training and evaluation loss (left) and accuracy (right) per epoch, as a PNG."""
    figure = _figure(10, 4)
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    evaluated = [row for row in history if row.get("eval_accuracy") is not None]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    acc_ax.plot(epochs, [100 * row["train_accuracy"] for row in history], "o-", label="train")
    if evaluated:
        eval_epochs = [row["epoch"] for row in evaluated]
        loss_ax.plot(eval_epochs, [row["eval_loss"] for row in evaluated], "s-", label="eval")
        acc_ax.plot(
            eval_epochs, [100 * row["eval_accuracy"] for row in evaluated], "s-", label="eval"
        )
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path


def plot_mask_oscillation(sad: dict[str, Tensor], cycles: int, path: Path, title: str = "") -> Path:
    """The paper's Figure 2 for this run, as a PNG: the accumulated SAD of every N:M block of
    the sparse layer with the most mask changes, in block order (left), and the distribution of
    accumulated SAD over all blocks of all sparse layers (right, log-scale counts)."""
    figure = _figure(11, 4)
    layer_ax, hist_ax = figure.subplots(1, 2)
    totals = {name: int(t.sum()) for name, t in sad.items()}
    if not totals or not any(totals.values()):
        for ax in (layer_ax, hist_ax):
            ax.text(0.5, 0.5, "no N:M mask change observed", ha="center", va="center")
            ax.set_axis_off()
    else:
        name = max(totals, key=totals.__getitem__)
        values = sad[name].cpu()
        layer_ax.plot(range(values.numel()), values.tolist(), ".", ms=2, color="tab:blue")
        layer_ax.set(
            xlabel=f"N:M block index of {name}",
            ylabel="accumulated SAD",
            title=f"{name}: {values.numel()} blocks",
        )
        every = torch.cat([t.cpu() for t in sad.values()])
        counts = torch.bincount(every.to(torch.int64))
        levels = torch.arange(counts.numel())
        shown = counts > 0
        xs, ys = levels[shown].tolist(), counts[shown].tolist()
        if len(xs) <= 200:  # one bar per SAD value
            hist_ax.bar(xs, ys, width=0.9, color="tab:orange", log=True)
        else:  # thousands of bar patches take seconds to draw
            hist_ax.semilogy(xs, ys, ".-", color="tab:orange")
        never = float((every == 0).float().mean())
        hist_ax.set(
            xlabel="accumulated SAD per block",
            ylabel="blocks (log scale)",
            title=f"all {every.numel()} blocks: {100 * never:.1f}% never changed",
        )
    figure.suptitle((title + " — " if title else "") + f"{cycles} N:M mask updates compared")
    figure.savefig(path, dpi=120)
    return path


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


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(json.dumps(vars(args), default=_json))


def _pick_eval_split(dataset_dict: Any, requested: str | None) -> str | None:
    if requested is not None:
        return requested if requested in dataset_dict else None
    for name in ("test", "validation", "val"):
        if name in dataset_dict:
            return name
    return None


def _subset(split: Any, count: int | None, seed: int) -> Any:
    if count is None or count >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(split), generator=generator)[:count].sort().values
    return split.select(indices.tolist(), keep_in_memory=True)


@dataclass
class _Data:
    train: TorchImageDataset
    eval: TorchImageDataset
    info: dict[str, Any]
    num_classes: int
    in_channels: int


def _load_data(
    args: argparse.Namespace,
    config: ScriptConfig,
    parser: argparse.ArgumentParser,
    accelerator: Accelerator,
) -> _Data:
    try:
        kind = args.data_kind or detect_kind(args.data)
        with accelerator.main_process_first():
            dataset_dict = load_image_dataset(args.data, kind=kind, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError, DatasetUnavailableError) as err:
        parser.error(f"argument --data: invalid value {args.data!r} ({err})")
    if args.train_split not in dataset_dict:
        parser.error(
            f"argument --train-split: invalid value {args.train_split!r} (the data has splits "
            f"{list(dataset_dict)})"
        )
    eval_split = _pick_eval_split(dataset_dict, args.eval_split)
    if eval_split is None:
        parser.error(
            f"argument --eval-split: invalid value {args.eval_split!r} (the data has splits "
            f"{list(dataset_dict)})"
        )
    preset = args.preset or _PRESET_OF_KIND.get(kind, config.default_preset)
    args.preset = preset
    train_split = _subset(dataset_dict[args.train_split], args.max_train_samples, args.seed)
    eval_split_data = _subset(dataset_dict[eval_split], args.max_eval_samples, args.seed)
    size = args.image_size if preset in ("cifar10", "imagenet") else None
    train = TorchImageDataset(train_split, image_transforms(preset, train=True, size=size))
    test = TorchImageDataset(eval_split_data, image_transforms(preset, train=False, size=size))
    label = dataset_dict[args.train_split].features["label"]
    num_classes = int(getattr(label, "num_classes", 0) or 0)
    if num_classes < 2:
        parser.error(f"argument --data: invalid value {args.data!r} (fewer than 2 classes)")
    info = {
        "source": str(args.data),
        "kind": kind,
        "preset": preset,
        "train_split": args.train_split,
        "eval_split": eval_split,
        "train_samples": len(train),
        "eval_samples": len(test),
        "num_classes": num_classes,
        "input_shape": list(test[0][0].shape),  # the deterministic transform
    }
    return _Data(train, test, info, num_classes, 1 if preset in _GRAYSCALE_PRESETS else 3)


def _build_model(args: argparse.Namespace, data: _Data) -> nn.Module:
    if args.model == "deit_small":
        image_size = data.info["input_shape"][-1]
        depth = getattr(args, "vit_depth", DEIT_SMALL["num_layers"])
        if depth == DEIT_SMALL["num_layers"]:
            return deit_small(data.num_classes, data.in_channels, image_size=image_size)
        from torchvision.models import VisionTransformer

        config = {**DEIT_SMALL, "num_layers": depth}
        model = VisionTransformer(image_size=image_size, num_classes=data.num_classes, **config)
        if data.in_channels != 3:
            proj = model.conv_proj
            model.conv_proj = nn.Conv2d(data.in_channels, proj.out_channels, 16, 16)
        return model
    return build_model(args.model, data.num_classes, data.in_channels)


def _build_optimizer(
    args: argparse.Namespace,
    model: nn.Module,
    total_steps: int,
    parser: argparse.ArgumentParser,
) -> Optimizer:
    exclude = None if args.exclude is None else list(args.exclude)
    try:
        groups = nm_param_groups(model, args.n, args.m, exclude=exclude)
    except ValueError as err:
        parser.error(f"argument --exclude: invalid value {args.exclude!r} ({err})")
    kwargs: dict[str, Any] = {
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
    }
    if args.method != "dense":
        kwargs.update(
            n=args.n,
            m=args.m,
            total_steps=total_steps,
            delta_t=args.delta_t,
            alpha=args.alpha,
            beta=args.beta,
            seed=args.seed,
        )
        for key in fixed_settings(args.method):
            kwargs.pop(key, None)
    return make_optimizer(args.method, groups, **kwargs)


def _check_compatible(
    saved: dict[str, Any], args: argparse.Namespace, world: int, parser: argparse.ArgumentParser
) -> None:
    current = _args_dict(args)
    for key in RUN_DEFINING:
        if key in saved["args"] and saved["args"][key] != current.get(key):
            flag = "--" + key.replace("_", "-")
            parser.error(
                f"argument {flag}: invalid value {current.get(key)!r} (the checkpoint "
                f"{args.resume_from} was made with {flag} {saved['args'][key]!r}; a resumed run "
                f"must use the same value)"
            )
    if saved.get("world_size", world) != world:
        parser.error(
            f"argument --resume: invalid value '{args.resume}' (the checkpoint was made with "
            f"{saved['world_size']} processes, this run has {world}: the batches would differ)"
        )


def _flops_ratio(
    args: argparse.Namespace, model: nn.Module, input_shape: Sequence[int], total_steps: int
) -> tuple[float | None, str]:
    note = (
        "training FLOPs relative to dense training of the same steps, from "
        "bame_optim.flops.training_flops_ratio (Linear/Conv layers run through their module)"
    )
    if any(isinstance(mod, nn.MultiheadAttention) for mod in model.modules()):
        note += (
            "; not counted: nn.MultiheadAttention's in_proj and out_proj (called functionally) "
            "and the attention matmuls"
        )
    extra: dict[str, Any] = {}
    if args.method == "asp":
        extra = {"pretrain_steps": 0, "finetune_steps": total_steps}
        note += "; asp: no dense pre-training in this run (pretrain_steps=0)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nm_param_groups warned at set-up
        try:
            ratio = training_flops_ratio(
                model,
                tuple(input_shape),
                args.method,
                n=args.n,
                m=args.m,
                total_steps=total_steps,
                delta_t=args.delta_t,
                exclude=None if args.exclude is None else list(args.exclude),
                **extra,
            )
        except (ValueError, RuntimeError) as err:
            return None, f"{note}; not computed: {err}"
    return ratio, note


def _evaluate(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, show: bool
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over the evaluation set (duplicates of uneven sharding
    dropped by ``gather_for_metrics``)."""
    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not show):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            loss, hit = accelerator.gather_for_metrics((loss, logits.argmax(1) == y))
            losses.append(loss)
            hits.append(hit)
    loss_all, hit_all = torch.cat(losses), torch.cat(hits)
    return float(loss_all.mean()), float(hit_all.float().mean())


def run(
    args: argparse.Namespace,
    config: ScriptConfig,
    parser: argparse.ArgumentParser | None = None,
    argv: Sequence[str] | None = None,
) -> TrainResult:
    """Train as ``args`` say (see the module docstring) and return the :class:`TrainResult`."""
    parser = parser or build_parser(config)
    started = time.perf_counter()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
    )
    main_process = accelerator.is_main_process
    show = accelerator.is_local_main_process and not args.no_progress
    world = accelerator.num_processes
    set_seed(args.seed)

    data = _load_data(args, config, parser, accelerator)
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
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    set_seed(args.seed)  # the initial weights depend on the seed only
    model = _build_model(args, data)
    optimizer = _build_optimizer(args, model, total_steps, parser)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    sparse_method = args.method != "dense"
    if args.method == "bame_bidir":
        from bame_optim.bidir import attach_backward_masks

        attach_backward_masks(accelerator.unwrap_model(model), unwrap_optimizer(inner))

    history: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    times = {"train_seconds": 0.0, "eval_seconds": 0.0, "wall_seconds": 0.0}
    oscillation_state = None
    if args.resume_from is not None:
        saved = json.loads((args.resume_from / TRAINER_STATE).read_text())
        _check_compatible(saved, args, world, parser)
        accelerator.load_state(str(args.resume_from))
        start_epoch, global_step = saved["epoch"], saved["global_step"]
        history = saved["history"]
        times.update(saved["times"])
        oscillation_file = args.resume_from / OSCILLATION_FILE
        if oscillation_file.is_file():
            oscillation_state = torch.load(oscillation_file, weights_only=True)
        accelerator.print(
            f"resumed from {args.resume_from} (epoch {start_epoch}, step {global_step})"
        )

    sync = MaskSync(optimizer, accelerator) if sparse_method else None
    tracker = None
    if sparse_method:
        tracker = MaskOscillation(inner, every_step=args.method not in SCHEDULED_MASK_METHODS)
        if oscillation_state is not None:
            tracker.load_state_dict(oscillation_state)

    output_dir: Path = args.output_dir
    checkpoints = output_dir / CHECKPOINT_DIR
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"{config.name}: {args.model} {args.method} {args.n}:{args.m} on {data.info['source']} "
        f"({data.info['train_samples']} train / {data.info['eval_samples']} eval images), "
        f"{world} process(es) on {accelerator.device}, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps"
    )
    invocation_start = time.perf_counter()
    wall_before = times["wall_seconds"]

    def trainer_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "global_step": global_step,
            "history": history,
            "times": times,
            "args": {k: _args_dict(args).get(k) for k in RUN_DEFINING},
            "world_size": world,
        }

    for epoch in range(start_epoch, args.epochs):
        set_seed(epoch_seed(args.seed, epoch), device_specific=True)
        sampler.set_epoch(epoch)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        epoch_start = time.perf_counter()
        changes_before = tracker.total() if tracker is not None else 0
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        lr = cosine_lr(global_step, total_steps, args.lr, warmup_steps)
        bar = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not show
        )
        for index, (x, y) in enumerate(bar):
            with accelerator.accumulate(model):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lr = cosine_lr(global_step, total_steps, args.lr, warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                global_step += 1
            if sync is not None:
                sync.after_step()
            if tracker is not None and main_process:
                tracker.after_step()
            with torch.no_grad():  # summed on the device: no host sync per step
                sums[0] += loss.detach().double() * len(y)
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += len(y)
            if show and index % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        bar.close()
        sums = accelerator.reduce(sums, reduction="sum")
        train_seconds = time.perf_counter() - epoch_start
        times["train_seconds"] += train_seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": lr,
            "train_loss": float(sums[0] / sums[2]),
            "train_accuracy": float(sums[1] / sums[2]),
            "eval_loss": None,
            "eval_accuracy": None,
            "train_seconds": train_seconds,
        }
        if tracker is not None:
            row["mask_changes"] = tracker.total() - changes_before
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            eval_start = time.perf_counter()
            row["eval_loss"], row["eval_accuracy"] = _evaluate(
                model, eval_loader, accelerator, show
            )
            row["eval_seconds"] = time.perf_counter() - eval_start
            times["eval_seconds"] += row["eval_seconds"]
        history.append(row)
        times["wall_seconds"] = wall_before + time.perf_counter() - invocation_start
        accelerator.print(
            f"epoch {epoch + 1}/{args.epochs} step {global_step} lr {lr:.4g} "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"
            + (
                f" | eval loss {row['eval_loss']:.4f} acc {100 * row['eval_accuracy']:.2f}%"
                if row["eval_accuracy"] is not None
                else ""
            )
            + f" | {train_seconds:.1f}s"
        )
        last = epoch + 1 == args.epochs
        if last or (args.checkpoint_every and (epoch + 1) % args.checkpoint_every == 0):
            save_checkpoint(
                accelerator,
                checkpoints,
                epoch + 1,
                {
                    "trainer_state": trainer_state(epoch + 1),
                    "oscillation": tracker.state_dict() if tracker is not None else {},
                },
                keep=args.keep_checkpoints,
            )

    times["wall_seconds"] = wall_before + time.perf_counter() - invocation_start
    unwrapped = accelerator.unwrap_model(model)
    metrics: dict[str, Any] = {}
    if main_process:
        metrics = _final_metrics(
            args,
            config,
            argv,
            data,
            unwrapped,
            inner,
            tracker,
            history,
            times,
            world=world,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            global_step=global_step,
            device=str(accelerator.device),
            invocation_seconds=time.perf_counter() - started,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(metrics, unwrapped, inner, output_dir, tracker)


def _final_metrics(
    args: argparse.Namespace,
    config: ScriptConfig,
    argv: Sequence[str] | None,
    data: _Data,
    model: nn.Module,
    optimizer: Optimizer,
    tracker: MaskOscillation | None,
    history: list[dict[str, Any]],
    times: dict[str, float],
    **facts: Any,
) -> dict[str, Any]:
    """Write ``metrics.json`` (atomically), the plots and ``mask_oscillation.pt``; return the
    metrics as read back from the JSON text."""
    output_dir: Path = args.output_dir
    ratio, note = _flops_ratio(args, model, data.info["input_shape"], facts["total_steps"])
    evaluated = [row for row in history if row["eval_accuracy"] is not None]
    report = optimizer.sparsity_report() if hasattr(optimizer, "sparsity_report") else []
    title = f"{args.model} {args.method} {args.n}:{args.m}"
    plots = [str(plot_curves(history, output_dir / "curves.png", title))]
    oscillation = None
    if tracker is not None:
        torch.save(tracker.state_dict(), output_dir / OSCILLATION_FILE)
        plots.append(
            str(
                plot_mask_oscillation(
                    tracker.sad, tracker.cycles, output_dir / "mask_oscillation.png", title
                )
            )
        )
        oscillation = tracker.summary()
    metrics = {
        "script": config.name,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "args": _args_dict(args),
        "data": data.info,
        "world_size": facts["world"],
        "device": facts["device"],
        "global_batch_size": args.batch_size * facts["world"] * args.grad_accum,
        "steps_per_epoch": facts["steps_per_epoch"],
        "total_steps": facts["total_steps"],
        "steps_done": facts["global_step"],
        "epochs_done": len(history),
        "history": history,
        "final_eval_accuracy": evaluated[-1]["eval_accuracy"] if evaluated else None,
        "best_eval_accuracy": max(row["eval_accuracy"] for row in evaluated) if evaluated else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "times": {**times, "this_invocation_seconds": facts["invocation_seconds"]},
        "training_flops_ratio": ratio,
        "training_flops_note": note,
        "sparsity_report": report,
        "mask_oscillation": oscillation,
        "plots": plots,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    path = output_dir / "metrics.json"
    temporary = path.with_suffix(".json.tmp")
    text = json.dumps(metrics, indent=1, default=_json)
    temporary.write_text(text)
    os.replace(temporary, path)
    return json.loads(text)  # what the file holds (tuples as lists)


def main(argv: Sequence[str] | None, config: ScriptConfig) -> TrainResult:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) for the script ``config`` and train."""
    parser = build_parser(config)
    args = parse_args(argv, config, parser)
    return run(args, config, parser, argv)
