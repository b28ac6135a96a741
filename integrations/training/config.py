"""The one frozen description of a training run, :class:`TrainingConfig`, and its validation.

Every field is checked when the config is built: a bad value raises :class:`ConfigError` (a
``ValueError``) whose message names the field and the value. Checks that need the data or the
file system (splits, ``exclude`` patterns, checkpoints) raise the same error later, from the
function that finds the problem. Only the command line
(:mod:`bame_optim.integrations.training.cli`) turns these errors into ``parser.error``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bame_optim.core.schedule import DEFAULT_DELTA_T
from bame_optim.core.validation import (
    check_int,
    check_one_of,
    check_real_in,
    is_int,
    is_real,
)
from bame_optim.methods import (
    METHODS,
    OPTIMIZERS,
    accepted_keywords,
    fixed_settings,
    inert_keywords,
    method_name,
)
from bame_optim.optim.adamw import ADAMW_DEFAULTS

from ..datasets import KINDS
from ..models import DEIT_SMALL, MODELS

__all__ = [
    "BASE_METHODS",
    "MIXED_PRECISION",
    "PRESETS",
    "REPORT_TO",
    "RUN_DEFINING",
    "ConfigError",
    "TrainingConfig",
    "config_dict",
    "json_default",
]

PRESETS = ("cifar10", "imagenet", "fashion-mnist", "mnist")
"""``preset`` values: the transform pipelines of
:func:`bame_optim.integrations.datasets.image_transforms`."""
MIXED_PRECISION = ("no", "fp16", "bf16")
"""``mixed_precision`` values (``None``: Accelerate's configuration)."""
REPORT_TO = ("none", "tensorboard", "wandb", "all")
"""``report_to`` values: the live-logging trackers (:mod:`.tracking`; ``all``: those of
tensorboard and wandb that are installed)."""
BASE_METHODS = tuple(name for name, record in METHODS.items() if record.optimizer == "sgd")
"""``method`` values: the methods of :data:`bame_optim.methods.METHODS` under their own names
(the AdamW variants, ``bame_adamw``..., are chosen with ``optimizer="adamw"``)."""
RUN_DEFINING = (
    "model",
    "method",
    "optimizer",
    "n",
    "m",
    "epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "momentum",
    "betas",
    "eps",
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
    "vit_width",
    "vit_patch",
)
"""Fields a resumed run must share with its checkpoint (they change what is computed)."""


class ConfigError(ValueError):
    """An invalid value of one field of :class:`TrainingConfig`.

    Attributes:
        field: the field's name (``"epochs"``).
        value: the offending value.
        reason: why it is invalid (the part of the message in parentheses).
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"Invalid {field} value: {_shown(value)} ({reason})")


def _shown(value: Any) -> str:
    """``repr`` of a value, paths as their quoted text."""
    return repr(str(value)) if isinstance(value, Path) else repr(value)


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: paths and other objects as strings, sets and
    tuples as lists, tensors through ``tolist()``."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run depends on (defaults: the paper's CIFAR-10 recipe, section
    4.1). Build it once; it is validated on construction and never changed (derive another
    with :func:`dataclasses.replace`, which validates again).

    Data: ``data`` (a local dataset or a Hub name), ``data_kind`` (one of
    :data:`~bame_optim.integrations.datasets.KINDS`, ``None``: detected), ``cache_dir``,
    ``train_split``, ``eval_split`` (``None``: the first of test, validation, val),
    ``preset`` (one of :data:`PRESETS`; ``None``: from the data kind, else
    ``default_preset``), ``image_size`` (crop size of the cifar10/imagenet presets and DeiT's
    input; ``None``: the data's own), ``max_train_samples`` / ``max_eval_samples`` (seeded
    random subsets), ``workers`` (loader processes).

    Model and method: ``model`` (a key of :data:`~bame_optim.integrations.models.MODELS`),
    ``vit_depth``, ``vit_width`` and ``vit_patch`` (DeiT-small's encoder blocks, width and
    patch size; the heads are ``vit_width / 64`` and the MLP ``4 x vit_width``, as in DeiT:
    ``vit_width=192`` is DeiT-Ti's width), ``method`` (one of :data:`BASE_METHODS`), ``n`` and
    ``m`` (N:M), ``exclude`` (module-name patterns kept dense; ``None``: the stem and
    classifier), ``delta_t`` (mask update interval), ``alpha`` and ``beta`` (OBF; ``None``:
    what the method fixes, else 0.5).

    Optimization: ``optimizer`` (one of :data:`bame_optim.methods.OPTIMIZERS`: the method runs
    as :attr:`registered_method`, e.g. ``bame`` with ``"adamw"`` as ``bame_adamw``),
    ``epochs``, ``batch_size`` (per process), ``grad_accum``, ``lr`` (peak, cosine annealed to 0
    per optimizer step), ``momentum`` (SGD only), ``betas`` and ``eps`` (AdamW only),
    ``weight_decay`` (with AdamW none on 1-D parameters, position embeddings and class tokens;
    with SGD none on 1-D parameters), ``warmup_epochs`` (linear warm-up), ``label_smoothing``,
    ``seed``, ``mixed_precision`` (one of :data:`MIXED_PRECISION`; ``None``: Accelerate's
    configuration), ``cpu``. The scripts' per-model defaults (DeiT's AdamW recipe for
    ``deit_small`` in ``train_imagenet``) are :mod:`.recipes`; a config built here has the
    plain defaults below.

    Outputs: ``output_dir``, ``checkpoint_every`` (epochs; 0: only at the end),
    ``keep_checkpoints``, ``resume`` (a checkpoint folder, a folder holding checkpoints, or
    ``"auto"``: the latest in ``output_dir`` if any), ``eval_every`` (epochs), ``progress``
    (progress bars), ``script`` (the name recorded in ``metrics.json``), ``report_to`` (one of
    :data:`REPORT_TO`: live logging through Accelerate's trackers, :mod:`.tracking`; whether
    the tracker's package is installed is checked when the run starts).
    """

    data: str
    output_dir: Path
    data_kind: str | None = None
    cache_dir: Path | None = None
    train_split: str = "train"
    eval_split: str | None = None
    preset: str | None = None
    default_preset: str = "cifar10"
    image_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    workers: int = 4
    model: str = "resnet32"
    vit_depth: int = DEIT_SMALL["num_layers"]
    vit_width: int = DEIT_SMALL["hidden_dim"]
    vit_patch: int = DEIT_SMALL["patch_size"]
    method: str = "bame"
    optimizer: str = "sgd"
    n: int = 2
    m: int = 4
    exclude: tuple[str, ...] | None = None
    delta_t: int = DEFAULT_DELTA_T
    alpha: float | None = None
    beta: float | None = None
    epochs: int = 300
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = ADAMW_DEFAULTS["betas"]
    eps: float = ADAMW_DEFAULTS["eps"]
    weight_decay: float = 5e-3
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    mixed_precision: str | None = None
    cpu: bool = False
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    resume: str | Path | None = None
    eval_every: int = 1
    progress: bool = True
    script: str = "train"
    report_to: str = "none"

    def __post_init__(self) -> None:
        # normal forms (a frozen dataclass sets them through object.__setattr__)
        if isinstance(self.output_dir, str):
            object.__setattr__(self, "output_dir", Path(self.output_dir))
        if isinstance(self.cache_dir, str):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        _validate(self)

    @property
    def registered_method(self) -> str:
        """The name of the method in :data:`bame_optim.methods.METHODS`:
        ``method_name(method, optimizer)`` (``bame`` with ``"adamw"``: ``bame_adamw``)."""
        return method_name(self.method, self.optimizer)

    @property
    def obf(self) -> tuple[float, float]:
        """``(alpha, beta)`` with the defaults filled in: what the method fixes, else 0.5."""
        fixed = fixed_settings(self.registered_method)
        alpha = self.alpha if self.alpha is not None else fixed.get("alpha", 0.5)
        beta = self.beta if self.beta is not None else fixed.get("beta", 0.5)
        return float(alpha), float(beta)


def config_dict(config: TrainingConfig) -> dict[str, Any]:
    """``config`` as plain JSON values, with ``alpha`` and ``beta`` filled in (what
    ``metrics.json`` and a checkpoint record)."""
    values = asdict(config)
    values["alpha"], values["beta"] = config.obf
    return json.loads(json.dumps(values, default=json_default))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_optimizer(config: TrainingConfig) -> None:
    """Raise :class:`ConfigError` naming ``optimizer`` when ``method`` has no variant for it."""
    try:
        method_name(config.method, config.optimizer)
    except ValueError:
        with_one = [name for name in BASE_METHODS if f"{name}_{config.optimizer}" in METHODS]
        raise ConfigError(
            "optimizer",
            config.optimizer,
            f"method {config.method} has no {config.optimizer} variant; the methods with one: "
            f"{', '.join(with_one)}",
        ) from None


def _validate(config: TrainingConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid field of ``config``."""
    if not isinstance(config.data, (str, Path)) or not str(config.data):
        raise ConfigError("data", config.data, "a dataset path or Hub name is required")
    if not isinstance(config.output_dir, Path):
        raise ConfigError("output_dir", config.output_dir, "a path is required")
    check_one_of("data_kind", config.data_kind, KINDS, optional=True, error=ConfigError)
    check_one_of("preset", config.preset, PRESETS, optional=True, error=ConfigError)
    check_one_of("default_preset", config.default_preset, PRESETS, error=ConfigError)
    check_one_of("model", config.model, tuple(MODELS), error=ConfigError)
    check_one_of("method", config.method, BASE_METHODS, error=ConfigError)
    check_one_of("optimizer", config.optimizer, OPTIMIZERS, error=ConfigError)
    _check_optimizer(config)
    check_one_of(
        "mixed_precision", config.mixed_precision, MIXED_PRECISION, optional=True,
        error=ConfigError,
    )
    check_one_of("report_to", config.report_to, REPORT_TO, error=ConfigError)
    for name in ("train_split", "script"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ConfigError(name, getattr(config, name), "a non-empty string is required")
    if config.eval_split is not None and not isinstance(config.eval_split, str):
        raise ConfigError("eval_split", config.eval_split, "a split name or None is required")
    for name in ("image_size", "max_train_samples", "max_eval_samples"):
        check_int(name, getattr(config, name), 1, optional=True, error=ConfigError)
    for name in ("vit_depth", "vit_patch", "delta_t", "epochs", "batch_size", "grad_accum"):
        check_int(name, getattr(config, name), 1, error=ConfigError)
    check_int("vit_width", config.vit_width, 64, error=ConfigError)
    if config.vit_width % 64:
        raise ConfigError(
            "vit_width", config.vit_width, "a multiple of 64 is required: heads of width 64"
        )
    for name in ("keep_checkpoints", "eval_every"):
        check_int(name, getattr(config, name), 1, error=ConfigError)
    for name in ("workers", "seed", "checkpoint_every"):
        check_int(name, getattr(config, name), 0, error=ConfigError)
    check_int("m", config.m, 2, error=ConfigError)
    if not is_int(config.n) or not 1 <= config.n < config.m:
        raise ConfigError("n", config.n, f"an integer 1 <= n < m = {config.m} is required")
    if config.exclude is not None and (
        not isinstance(config.exclude, tuple) or not all(isinstance(p, str) for p in config.exclude)
    ):
        raise ConfigError("exclude", config.exclude, "a sequence of module-name patterns")
    if not is_real(config.lr) or not math.isfinite(config.lr) or config.lr <= 0:
        raise ConfigError("lr", config.lr, "a finite number > 0 is required")
    check_real_in("momentum", config.momentum, 0.0, 1.0, error=ConfigError)
    betas = config.betas
    if not (isinstance(betas, tuple) and len(betas) == 2 and all(is_real(b) for b in betas)):
        raise ConfigError("betas", betas, "two numbers (beta1, beta2) are required")
    if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError("betas", betas, "each beta must be a finite number 0 <= beta < 1")
    if not is_real(config.eps) or not math.isfinite(config.eps) or config.eps <= 0:
        raise ConfigError("eps", config.eps, "a finite number > 0 is required")
    check_real_in("weight_decay", config.weight_decay, 0.0, math.inf, error=ConfigError)
    check_real_in("warmup_epochs", config.warmup_epochs, 0.0, config.epochs, error=ConfigError)
    check_real_in("label_smoothing", config.label_smoothing, 0.0, 1.0, error=ConfigError)
    registered = config.registered_method
    fixed = fixed_settings(registered)
    for name in ("alpha", "beta"):
        value = getattr(config, name)
        if value is None:
            continue
        check_real_in(name, value, 0.0, 1.0, high_open=False, error=ConfigError)
        if name not in accepted_keywords(registered):
            raise ConfigError(name, value, f"method {registered} does not use {name}")
        if name in inert_keywords(registered):
            raise ConfigError(name, value, f"method {registered} has no evolve phase "
                              f"(it fixes t_i = t_f), so {name} would change nothing")
        if name in fixed and value != fixed[name]:
            raise ConfigError(name, value, f"method {registered} fixes {name}={fixed[name]}")
    patch = config.vit_patch
    if config.model == "deit_small" and config.image_size is not None and config.image_size % patch:
        raise ConfigError(
            "image_size", config.image_size, f"DeiT needs a multiple of its patch size {patch}"
        )
    for name in ("cpu", "progress"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(name, getattr(config, name), "True or False is required")
    if config.resume is not None and (
        not isinstance(config.resume, (str, Path)) or not str(config.resume)
    ):
        raise ConfigError("resume", config.resume, "a checkpoint path or 'auto' is required")
