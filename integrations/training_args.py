"""A training script's command line: :class:`ScriptConfig` (what differs between the scripts),
:func:`build_parser`, :func:`parse_args` with its validation, and resolving and checking
``--resume`` against a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bame_optim.core.schedule import DEFAULT_DELTA_T
from bame_optim.methods import METHODS, fixed_settings

from .checkpoints import (
    CHECKPOINT_DIR,
    TRAINER_STATE,
    complete_checkpoints,
    find_checkpoint,
    json_default,
)
from .datasets import KINDS
from .models import DEIT_SMALL

__all__ = [
    "PRESETS",
    "RUN_DEFINING",
    "ScriptConfig",
    "args_dict",
    "build_parser",
    "check_resume_compatible",
    "parse_args",
]

PRESETS = ("cifar10", "imagenet", "fashion-mnist", "mnist")
"""``--preset`` values: the transform pipelines of
:func:`bame_optim.integrations.datasets.image_transforms`."""
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


def _resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    own = complete_checkpoints(args.output_dir / CHECKPOINT_DIR)
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


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as plain JSON values (what ``metrics.json`` and a checkpoint record)."""
    return json.loads(json.dumps(vars(args), default=json_default))


def check_resume_compatible(
    saved: dict[str, Any], args: argparse.Namespace, world: int, parser: argparse.ArgumentParser
) -> None:
    """Exit through ``parser.error`` unless the checkpoint's ``saved`` trainer state was made
    with this run's :data:`RUN_DEFINING` arguments and ``world`` processes."""
    current = args_dict(args)
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
