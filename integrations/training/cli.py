"""The command line of the training scripts, the only layer that knows about ``argparse``.

:class:`ScriptConfig` says what differs between the scripts (models, default epochs, preset,
weight decay, per-model recipes), :func:`build_parser` makes a script's parser,
:func:`parse_config` turns a command line into a :class:`~.config.TrainingConfig` (the flags not
given from the model's :class:`~.recipes.Recipe`, else the script's defaults), and :func:`main`
parses and trains. A
:class:`~.config.ConfigError` of the library (raised when the config is built, or by the run for
data, splits, ``--exclude`` patterns and checkpoints) exits through ``parser.error`` (status 2)
with a message that names the flag and the value; a :class:`~.launch.LaunchError` (processes
that would each train alone) exits with status 2 and its one-line reason, without the usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from bame_optim.core.schedule import DEFAULT_DELTA_T
from bame_optim.methods import OPTIMIZERS, method_name
from bame_optim.optim.adamw import ADAMW_DEFAULTS

from ..datasets import KINDS
from ..models import DEIT_SMALL
from .config import (
    BASE_METHODS,
    MIXED_PRECISION,
    PRESETS,
    REPORT_TO,
    ConfigError,
    TrainingConfig,
)
from .loop import LaunchError, TrainResult, run
from .recipes import Recipe, fill_optimization
from .tracking import check_report_to

__all__ = ["ScriptConfig", "build_parser", "flag_of", "main", "parse_config"]


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
        epilog: text after the ``--help`` flag list.
        recipes: per model name, the :class:`~.recipes.Recipe` whose values fill the
            optimization flags not given (``train_imagenet``: DeiT's for ``deit_small``).
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
    recipes: Mapping[str, Recipe] = field(default_factory=dict)


_SCRIPT_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "betas": ADAMW_DEFAULTS["betas"],
    "eps": ADAMW_DEFAULTS["eps"],
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
}
"""The optimization defaults of every script (the paper's SGD recipe; ``weight_decay``:
:attr:`ScriptConfig.default_weight_decay`), for the flags neither given nor set by a recipe."""


def _recipe_note(script: ScriptConfig, name: str) -> str:
    """``"; deit_small: 0.05"``: what the recipes of ``script`` set field ``name`` to."""
    notes = []
    for model, recipe in script.recipes.items():
        value = getattr(recipe, "base_lr" if name == "lr" else name)
        shown = f"{value:g} x global batch / {recipe.base_batch}" if name == "lr" else f"{value}"
        notes.append(f"{model}: {shown}")
    return "; " + ", ".join(notes) if notes else ""


def _epochs_note(epochs: Mapping[str, int]) -> str:
    """``--epochs``'s default: per model, and ``"*"`` (any other model) last."""
    named = [f"{k} {v}" for k, v in epochs.items() if k != "*"]
    if "*" in epochs:
        named.append(f"other models {epochs['*']}" if named else str(epochs["*"]))
    return ", ".join(named)


def _prog(script: ScriptConfig) -> str:
    """The name ``usage:`` shows: the console command that runs the script (``bame-train-cifar``)
    when it was started as one, else ``SCRIPT.py``."""
    from bame_optim.console import SCRIPTS

    command = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if command in SCRIPTS and SCRIPTS[command][0] == script.name:
        return command
    return f"{script.name}.py"


def build_parser(script: ScriptConfig) -> argparse.ArgumentParser:
    """The command line of the training script ``script`` (``--help`` lists it); every flag
    sets the :class:`~.config.TrainingConfig` field of its name."""
    parser = argparse.ArgumentParser(
        prog=_prog(script),
        description=script.description,
        epilog=script.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        help="a local dataset (CIFAR-10 python batches folder, IDX folder, image folder with "
        "train/ and test/ or val/, save_to_disk folder, parquet/arrow files) or a Hugging Face "
        "Hub name, name or owner/name (needs network); a path that does not exist fails at once",
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
        f"else {script.default_preset})",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=script.default_image_size,
        help="crop size of the cifar10/imagenet presets and DeiT's input size "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--max-train-samples",
        type=int,
        help="train on a random subset of this many images (seeded by --seed)",
    )
    data.add_argument(
        "--max-eval-samples",
        type=int,
        help="evaluate on a random subset of this many images (seeded by --seed)",
    )
    data.add_argument("--workers", type=int, default=4, help="loader workers (%(default)s)")

    model = parser.add_argument_group("model and method")
    model.add_argument(
        "--model", choices=script.models, default=script.default_model, help="%(default)s"
    )
    if "deit_small" in script.models:
        model.add_argument(
            "--vit-depth",
            type=int,
            default=DEIT_SMALL["num_layers"],
            help="encoder blocks of deit_small (%(default)s, the paper's; fewer: smoke tests)",
        )
        model.add_argument(
            "--vit-width",
            type=int,
            default=DEIT_SMALL["hidden_dim"],
            help="width of deit_small, a multiple of 64: heads = width / 64, MLP = 4 x width "
            "(%(default)s, DeiT-S; 192: DeiT-Ti's width, for CPU runs)",
        )
        model.add_argument(
            "--vit-patch",
            type=int,
            default=DEIT_SMALL["patch_size"],
            help="patch size of deit_small; the image size must divide by it (%(default)s; "
            "e.g. 4 or 7 for 28x28 images)",
        )
    model.add_argument(
        "--method", choices=BASE_METHODS, default="bame", help="default: %(default)s"
    )
    model.add_argument("--n", type=int, default=2, help="kept per block (%(default)s)")
    model.add_argument("--m", type=int, default=4, help="block size (%(default)s)")
    model.add_argument(
        "--exclude",
        nargs="*",
        metavar="PATTERN",
        help="module names to keep dense (fnmatch patterns); default: the stem and the "
        "classifier; give the flag with no pattern to make every eligible layer sparse",
    )
    model.add_argument(
        "--delta-t",
        type=int,
        default=DEFAULT_DELTA_T,
        help="mask update interval ΔT in optimizer steps (%(default)s)",
    )
    for name in ("alpha", "beta"):
        model.add_argument(
            f"--{name}", type=float, help=f"OBF {name} (default: what --method fixes, else 0.5)"
        )

    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="the update rule: sgd, or adamw (the method's AdamW variant: dense, static and "
        "bame have one; AdamW gets no decay on 1-D parameters, position embeddings and class "
        "tokens) (default: sgd" + _recipe_note(script, "optimizer") + ")",
    )
    optim.add_argument(
        "--epochs",
        type=int,
        help="default: " + _epochs_note(script.default_epochs),
    )
    optim.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="per process; the global batch is this x processes x --grad-accum (%(default)s)",
    )
    optim.add_argument("--grad-accum", type=int, default=1, help="accumulation steps (%(default)s)")
    optim.add_argument(
        "--lr", type=float, help="peak lr (default: 0.1" + _recipe_note(script, "lr") + ")"
    )
    optim.add_argument("--momentum", type=float, help="sgd only (default: 0.9)")
    optim.add_argument(
        "--betas",
        type=float,
        nargs=2,
        metavar=("BETA1", "BETA2"),
        help="adamw only (default: {:g} {:g})".format(*ADAMW_DEFAULTS["betas"]),
    )
    optim.add_argument("--eps", type=float, help=f"adamw only (default: {ADAMW_DEFAULTS['eps']})")
    optim.add_argument(
        "--weight-decay",
        type=float,
        help="on weights; biases and norms get none, with adamw neither do position "
        "embeddings and class tokens (default: "
        f"{script.default_weight_decay}" + _recipe_note(script, "weight_decay") + ")",
    )
    optim.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear warm-up before the cosine decay (default: 0, the paper states none"
        + _recipe_note(script, "warmup_epochs")
        + (", at most half the epochs" if script.recipes else "")
        + ")",
    )
    optim.add_argument(
        "--label-smoothing",
        type=float,
        help="default: 0.0" + _recipe_note(script, "label_smoothing"),
    )
    optim.add_argument("--seed", type=int, default=0, help="%(default)s")
    optim.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="default: accelerate's configuration (no for plain python)",
    )
    optim.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")

    out = parser.add_argument_group("outputs and checkpoints")
    out.add_argument(
        "--output-dir",
        type=Path,
        help=f"default: runs/{script.name}-MODEL-METHOD-NofM",
    )
    out.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        help="epochs between checkpoints; 0: only at the end (%(default)s)",
    )
    out.add_argument("--keep-checkpoints", type=int, default=2, help="latest kept (%(default)s)")
    out.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint folder (or the latest one in a folder); auto: the "
        "latest in --output-dir, or start fresh if there is none",
    )
    out.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default="none",
        help="live logging through Accelerate's trackers: per optimizer step loss and lr, per "
        "mask update flips, frozen blocks and density, per epoch the metrics; tensorboard "
        "writes OUTPUT_DIR/tensorboard (pip install 'bame_optim[tensorboard]'); all: those of "
        "tensorboard and wandb installed (%(default)s)",
    )
    return parser


_FLAGS = {"progress": "--no-progress"}


def flag_of(name: str) -> str:
    """The command-line flag of the :class:`~.config.TrainingConfig` field ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _exit(parser: argparse.ArgumentParser, err: ConfigError) -> NoReturn:
    value = str(err.value) if isinstance(err.value, Path) else err.value
    parser.error(f"argument {flag_of(err.field)}: invalid value {value!r} ({err.reason})")


def parse_config(
    argv: Sequence[str] | None,
    script: ScriptConfig,
    parser: argparse.ArgumentParser | None = None,
) -> TrainingConfig:
    """The :class:`~.config.TrainingConfig` of the command line ``argv`` (``None``:
    ``sys.argv[1:]``) for ``script``.

    Fills the defaults that depend on other flags (``--epochs`` per model, the optimization
    flags from the model's :class:`~.recipes.Recipe` if the script has one, which is printed,
    ``--output-dir`` ``runs/SCRIPT-MODEL-METHOD-NofM`` with the registered method name, e.g.
    ``bame_adamw``). An invalid value, or a ``--report-to`` tracker whose package is not
    installed, exits through ``parser.error``.
    """
    parser = parser or build_parser(script)
    args = parser.parse_args(None if argv is None else list(argv))
    values: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in fields(TrainingConfig) if hasattr(args, f.name)
    }
    if values["epochs"] is None:
        values["epochs"] = script.default_epochs.get(args.model, script.default_epochs.get("*", 1))
    if values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    defaults = {**_SCRIPT_DEFAULTS, "weight_decay": script.default_weight_decay}
    try:
        chosen = fill_optimization(values, script.recipes.get(args.model), defaults)
    except ConfigError as err:
        _exit(parser, err)
    if values["output_dir"] is None:
        try:
            method = method_name(args.method, values["optimizer"])
        except ValueError:  # the config names the error
            method = args.method
        run_name = f"{script.name}-{args.model}-{method}-{args.n}of{args.m}"
        values["output_dir"] = Path("runs") / run_name
    if values["exclude"] is not None:
        values["exclude"] = tuple(values["exclude"])
    values.update(
        progress=not args.no_progress,
        script=script.name,
        default_preset=script.default_preset,
    )
    try:
        config = TrainingConfig(**values)
        check_report_to(config)
    except ConfigError as err:
        _exit(parser, err)
    if chosen is not None and os.environ.get("RANK", "0") == "0":
        print(chosen, flush=True)
    return config


def main(argv: Sequence[str] | None, script: ScriptConfig) -> TrainResult:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) for ``script`` and train; a config error
    found during the run (data, splits, patterns, checkpoints) exits through
    ``parser.error`` too, and so does a launch that :func:`~.launch.check_launch` refuses."""
    parser = build_parser(script)
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv, script, parser)
    try:
        return run(config, argv=argv)
    except ConfigError as err:
        _exit(parser, err)
    except LaunchError as err:  # the reason alone: a usage per launched process buries it
        parser.exit(2, f"{parser.prog}: error: {err}\n")
