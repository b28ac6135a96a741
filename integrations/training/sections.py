"""The four sections of a :class:`~.config.TrainingConfig`, one per group of the command
line: :class:`InputConfig` (data), :class:`NetworkConfig` (model and method),
:class:`OptimConfig` (optimization) and :class:`OutputConfig` (outputs and checkpoints).

Each field is declared once, with its default and its :class:`~.options.Option` (help, flag,
choices, bound), which :mod:`.cli` turns into the scripts' flags. Field names are unique
across the sections: a field's name is its key in :func:`~.config.config_dict`, in
:class:`~.options.ConfigError` and (with dashes) its flag. Each section checks its own fields
when built; the checks that span sections are :class:`~.config.TrainingConfig`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bame_optim.core.schedule import DEFAULT_DELTA_T
from bame_optim.core.validation import check_real_in, is_int, is_real
from bame_optim.methods import METHODS, OPTIMIZERS
from bame_optim.optim.adamw import ADAMW_DEFAULTS

from ..datasets import KINDS
from ..models import DEIT_SMALL, MODELS
from .options import ConfigError, check_options, option

__all__ = [
    "BASE_METHODS",
    "MIXED_PRECISION",
    "PRESETS",
    "REPORT_TO",
    "InputConfig",
    "NetworkConfig",
    "OptimConfig",
    "OutputConfig",
]

PRESETS = ("cifar10", "imagenet", "fashion-mnist", "mnist")
"""``preset`` values: the transform pipelines of
:func:`bame_apps.integrations.datasets.image_transforms`."""
MIXED_PRECISION = ("no", "fp16", "bf16")
"""``mixed_precision`` values (``None``: Accelerate's configuration)."""
REPORT_TO = ("none", "tensorboard", "wandb", "all")
"""``report_to`` values: the live-logging trackers (:mod:`.tracking`; ``all``: those of
tensorboard and wandb that are installed)."""
BASE_METHODS = tuple(name for name, record in METHODS.items() if record.optimizer == "sgd")
"""``method`` values: the methods of :data:`bame_optim.methods.METHODS` under their own names
(the AdamW variants, ``bame_adamw``..., are chosen with ``optimizer="adamw"``)."""



def _normalise(section: Any, paths: tuple[str, ...] = (), tuples: tuple[str, ...] = ()) -> None:
    """Normal forms of a frozen section: text as ``Path`` for ``paths``, lists as tuples."""
    for name in paths:
        if isinstance(getattr(section, name), str):
            object.__setattr__(section, name, Path(getattr(section, name)))
    for name in tuples:
        if isinstance(getattr(section, name), list):
            object.__setattr__(section, name, tuple(getattr(section, name)))


def _check_text(section: Any, name: str) -> None:
    value = getattr(section, name)
    if not isinstance(value, str) or not value:
        raise ConfigError(name, value, "a non-empty string is required")


def _check_flag(section: Any, name: str) -> None:
    if not isinstance(getattr(section, name), bool):
        raise ConfigError(name, getattr(section, name), "True or False is required")


@dataclass(frozen=True)
class InputConfig:
    """The data: where it is, its splits, transforms and subsets, and the loaders."""

    TITLE: ClassVar[str] = "data"

    data: str = option(
        required=True,
        help="a local dataset (CIFAR-10 python batches folder, IDX folder, image folder with "
        "train/ and test/ or val/, save_to_disk folder, parquet/arrow files) or a Hugging Face "
        "Hub name, name or owner/name (needs network); a path that does not exist fails at once",
    )
    data_kind: str | None = option(
        None, choices=KINDS, help="override the detected dataset kind"
    )
    cache_dir: Path | None = option(
        None, type=Path, help="datasets' Arrow cache (default: its own)"
    )
    train_split: str = option("train", help="default: {default}", defines_run=True)
    eval_split: str | None = option(
        None, help="default: the first of test, validation, val the data has"
    )
    preset: str | None = option(
        None,
        choices=PRESETS,
        defines_run=True,
        help="transform pipeline (default: from the data kind: cifar10, fashion-mnist, mnist; "
        "else {default_preset})",
    )
    default_preset: str = option(
        "cifar10", flag=None, choices=PRESETS, help="the preset of data whose kind implies none"
    )
    image_size: int | None = option(
        None,
        at_least=1,
        defines_run=True,
        help="crop size of the cifar10/imagenet presets and DeiT's input size "
        "(default: {default})",
    )
    max_train_samples: int | None = option(
        None,
        at_least=1,
        defines_run=True,
        help="train on a random subset of this many images (seeded by --seed)",
    )
    max_eval_samples: int | None = option(
        None, at_least=1, help="evaluate on a random subset of this many images (seeded by --seed)"
    )
    workers: int = option(4, at_least=0, help="loader workers ({default})")

    def __post_init__(self) -> None:
        if not isinstance(self.data, (str, Path)) or not str(self.data):
            raise ConfigError("data", self.data, "a dataset path or Hub name is required")
        _normalise(self, paths=("cache_dir",))
        check_options(self, ConfigError)
        _check_text(self, "train_split")
        if self.eval_split is not None and not isinstance(self.eval_split, str):
            raise ConfigError("eval_split", self.eval_split, "a split name or None is required")


@dataclass(frozen=True)
class NetworkConfig:
    """The model and its sparse-training method: the network, the N:M pattern, the layers
    kept dense and the mask evolution's settings."""

    TITLE: ClassVar[str] = "model and method"

    model: str = option("resnet32", choices=tuple(MODELS), defines_run=True, help="{default}")
    vit_depth: int = option(
        DEIT_SMALL["num_layers"],
        at_least=1,
        defines_run=True,
        needs_model="deit_small",
        help="encoder blocks of deit_small ({default}, the paper's; fewer: smoke tests)",
    )
    vit_width: int = option(
        DEIT_SMALL["hidden_dim"],
        at_least=64,
        defines_run=True,
        needs_model="deit_small",
        help="width of deit_small, a multiple of 64: heads = width / 64, MLP = 4 x width "
        "({default}, DeiT-S; 192: DeiT-Ti's width, for CPU runs)",
    )
    vit_patch: int = option(
        DEIT_SMALL["patch_size"],
        at_least=1,
        defines_run=True,
        needs_model="deit_small",
        help="patch size of deit_small; the image size must divide by it ({default}; "
        "e.g. 4 or 7 for 28x28 images)",
    )
    method: str = option(
        "bame", choices=BASE_METHODS, defines_run=True, help="default: {default}"
    )
    n: int = option(2, type=int, defines_run=True, help="kept per block ({default})")
    m: int = option(4, at_least=2, defines_run=True, help="block size ({default})")
    exclude: tuple[str, ...] | None = option(
        None,
        nargs="*",
        metavar="PATTERN",
        defines_run=True,
        help="module names to keep dense (fnmatch patterns); default: the stem and the "
        "classifier; give the flag with no pattern to make every eligible layer sparse",
    )
    delta_t: int = option(
        DEFAULT_DELTA_T,
        at_least=1,
        defines_run=True,
        help="mask update interval ΔT in optimizer steps ({default})",
    )
    alpha: float | None = option(
        None, type=float, defines_run=True,
        help="OBF alpha (default: what --method fixes, else 0.5)",
    )
    beta: float | None = option(
        None, type=float, defines_run=True,
        help="OBF beta (default: what --method fixes, else 0.5)",
    )

    def __post_init__(self) -> None:
        _normalise(self, tuples=("exclude",))
        check_options(self, ConfigError)
        if self.vit_width % 64:
            raise ConfigError(
                "vit_width", self.vit_width, "a multiple of 64 is required: heads of width 64"
            )
        if not is_int(self.n) or not 1 <= self.n < self.m:
            raise ConfigError("n", self.n, f"an integer 1 <= n < m = {self.m} is required")
        if self.exclude is not None and (
            not isinstance(self.exclude, tuple) or not all(isinstance(p, str) for p in self.exclude)
        ):
            raise ConfigError("exclude", self.exclude, "a sequence of module-name patterns")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None:
                check_real_in(name, value, 0.0, 1.0, high_open=False, error=ConfigError)


@dataclass(frozen=True)
class OptimConfig:
    """The optimization: the update rule and its hyperparameters, the length and batches of
    the run, the lr schedule, the loss, the seed and the device. The scripts' per-model
    defaults (DeiT's AdamW recipe for ``deit_small`` in ``train_imagenet``) are
    :mod:`.recipes`; a config built here has the plain defaults below (the paper's CIFAR-10
    recipe, section 4.1)."""

    TITLE: ClassVar[str] = "optimization"

    optimizer: str = option(
        "sgd",
        choices=OPTIMIZERS,
        filled=True,
        defines_run=True,
        help="the update rule: sgd, or adamw (the method's AdamW variant: dense, static and "
        "bame have one; AdamW gets no decay on 1-D parameters, position embeddings and class "
        "tokens) (default: {default}{recipes})",
    )
    epochs: int = option(300, at_least=1, filled=True, defines_run=True, help="default: {epochs}")
    batch_size: int = option(
        256,
        at_least=1,
        defines_run=True,
        help="per process; the global batch is this x processes x --grad-accum ({default})",
    )
    grad_accum: int = option(
        1, at_least=1, defines_run=True, help="accumulation steps ({default})"
    )
    lr: float = option(
        0.1, type=float, filled=True, defines_run=True,
        help="peak lr (default: {default}{recipes})",
    )
    momentum: float = option(
        0.9, type=float, filled=True, defines_run=True, help="sgd only (default: {default})"
    )
    betas: tuple[float, float] = option(
        ADAMW_DEFAULTS["betas"],
        type=float,
        nargs=2,
        metavar=("BETA1", "BETA2"),
        filled=True,
        defines_run=True,
        help="adamw only (default: {default})",
    )
    eps: float = option(
        ADAMW_DEFAULTS["eps"], type=float, filled=True, defines_run=True,
        help="adamw only (default: {default})",
    )
    weight_decay: float = option(
        5e-3,
        type=float,
        filled=True,
        defines_run=True,
        help="on weights; biases and norms get none, with adamw neither do position "
        "embeddings and class tokens (default: {default}{recipes})",
    )
    warmup_epochs: float = option(
        0.0,
        type=float,
        filled=True,
        defines_run=True,
        help="linear warm-up before the cosine decay (default: {default:g}, the paper states "
        "none{recipes}{warmup_cap})",
    )
    label_smoothing: float = option(
        0.0, type=float, filled=True, defines_run=True, help="default: {default}{recipes}"
    )
    seed: int = option(0, at_least=0, defines_run=True, help="{default}")
    mixed_precision: str | None = option(
        None,
        choices=MIXED_PRECISION,
        help="default: accelerate's configuration (no for plain python)",
    )
    cpu: bool = option(False, action="store_true", help="train on the CPU even with a GPU")
    channels_last: bool = option(
        False,
        action="store_true",
        help="convolution weights in the channels-last memory format: convolutions often run "
        "faster (mkldnn, cuDNN), and on the CPU the fused kept kernels read their N:M blocks "
        "as contiguous rows (0.6-0.9x the kernel time of contiguous 3x3 weights)",
    )

    def __post_init__(self) -> None:
        _normalise(self, tuples=("betas",))
        check_options(self, ConfigError)
        if not is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError("lr", self.lr, "a finite number > 0 is required")
        check_real_in("momentum", self.momentum, 0.0, 1.0, error=ConfigError)
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(is_real(b) for b in betas)):
            raise ConfigError("betas", betas, "two numbers (beta1, beta2) are required")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError("betas", betas, "each beta must be a finite number 0 <= beta < 1")
        if not is_real(self.eps) or not math.isfinite(self.eps) or self.eps <= 0:
            raise ConfigError("eps", self.eps, "a finite number > 0 is required")
        check_real_in("weight_decay", self.weight_decay, 0.0, math.inf, error=ConfigError)
        check_real_in("warmup_epochs", self.warmup_epochs, 0.0, self.epochs, error=ConfigError)
        check_real_in("label_smoothing", self.label_smoothing, 0.0, 1.0, error=ConfigError)
        _check_flag(self, "cpu")


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, its checkpoints and evaluations, and how it reports."""

    TITLE: ClassVar[str] = "outputs and checkpoints"

    output_dir: Path = option(
        type=Path, filled=True, help="default: runs/{script}-MODEL-METHOD-NofM"
    )
    checkpoint_every: int = option(
        1, at_least=0, help="epochs between checkpoints; 0: only at the end ({default})"
    )
    keep_checkpoints: int = option(2, at_least=1, help="latest kept ({default})")
    resume: str | Path | None = option(
        None,
        metavar="PATH|auto",
        help="continue from a checkpoint folder (or the latest one in a folder); auto: the "
        "latest in --output-dir, or start fresh if there is none",
    )
    eval_every: int = option(1, at_least=1, help="epochs between evaluations")
    progress: bool = option(
        True, flag="--no-progress", action="store_false", help="no progress bars"
    )
    script: str = option("train", flag=None, help="the name recorded in metrics.json")
    report_to: str = option(
        "none",
        choices=REPORT_TO,
        help="live logging through Accelerate's trackers: per optimizer step loss and lr, per "
        "mask update flips, frozen blocks and density, per epoch the metrics; tensorboard "
        "writes OUTPUT_DIR/tensorboard (pip install 'bame_optim[tensorboard]'); all: those of "
        "tensorboard and wandb installed ({default})",
    )

    def __post_init__(self) -> None:
        _normalise(self, paths=("output_dir",))
        if not isinstance(self.output_dir, Path):
            raise ConfigError("output_dir", self.output_dir, "a path is required")
        check_options(self, ConfigError)
        _check_text(self, "script")
        _check_flag(self, "progress")
        if self.resume is not None and (
            not isinstance(self.resume, (str, Path)) or not str(self.resume)
        ):
            raise ConfigError("resume", self.resume, "a checkpoint path or 'auto' is required")
