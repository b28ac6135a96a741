"""Per-model training recipes: the defaults a training script uses for the optimization flags
the command line leaves out (:class:`Recipe`, :data:`DEIT_RECIPE`).

A script lists its recipes by model name (:attr:`~.cli.ScriptConfig.recipes`);
:func:`~.cli.parse_config` fills every optimization flag that was not given from the model's
recipe, prints what it chose, and leaves the flags that were given alone. The recipe is one
optimizer's: an explicit ``--optimizer`` other than the recipe's turns the whole recipe off (the
script's own defaults apply, e.g. the paper's SGD recipe for ``--optimizer sgd``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bame_optim.methods import METHODS, method_name

from .config import BASE_METHODS, ConfigError

__all__ = ["DEIT_RECIPE", "RECIPE_FIELDS", "Recipe", "fill_optimization", "launched_processes"]

RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "warmup_epochs", "label_smoothing")
"""The :class:`~.config.TrainingConfig` fields a :class:`Recipe` sets."""


@dataclass(frozen=True)
class Recipe:
    """A model's optimization defaults.

    Attributes:
        name: whose recipe it is (printed: ``"DeiT"``).
        optimizer: ``"sgd"`` or ``"adamw"`` (:data:`bame_optim.methods.OPTIMIZERS`).
        base_lr: the peak lr for a global batch of ``base_batch`` images.
        base_batch: the lr scales linearly with the global batch: ``base_lr x batch /
            base_batch``.
        weight_decay: on the decayed parameters.
        warmup_epochs: linear warm-up before the cosine decay, at most half of the run
            (:meth:`warmup_for`: a short run warms up for half its epochs).
        label_smoothing: of the cross-entropy loss.
    """

    name: str
    optimizer: str
    base_lr: float
    base_batch: int
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float

    def lr_for(self, global_batch: int) -> float:
        """The peak lr for ``global_batch`` images per optimizer step (linear scaling)."""
        return self.base_lr * global_batch / self.base_batch

    def warmup_for(self, epochs: int) -> float:
        """The warm-up of an ``epochs``-epoch run: :attr:`warmup_epochs`, capped at half the
        run so that a short run still anneals."""
        return min(float(self.warmup_epochs), epochs / 2)

    def values(self, *, epochs: int, global_batch: int) -> dict[str, Any]:
        """The :data:`RECIPE_FIELDS` of a run of ``epochs`` epochs and ``global_batch`` images
        per optimizer step, as :class:`~.config.TrainingConfig` keywords
        (``TrainingConfig.build(..., **DEIT_RECIPE.values(epochs=300, global_batch=1024))``)."""
        return {
            "optimizer": self.optimizer,
            "lr": self.lr_for(global_batch),
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_for(epochs),
            "label_smoothing": self.label_smoothing,
        }

    def describe(self, name: str, *, epochs: int, global_batch: int) -> str:
        """How field ``name`` gets its value for this run (``"5e-4 x global batch 256 / 512"``)."""
        if name == "lr":
            return f"{self.base_lr:g} x global batch {global_batch} / {self.base_batch}"
        if name == "warmup_epochs" and self.warmup_for(epochs) < self.warmup_epochs:
            return f"{self.warmup_epochs:g} capped at half of the {epochs} epochs"
        return ""


DEIT_RECIPE = Recipe(
    name="DeiT",
    optimizer="adamw",
    base_lr=5e-4,
    base_batch=512,
    weight_decay=0.05,
    warmup_epochs=5.0,
    label_smoothing=0.1,
)
"""DeiT's optimization (Touvron et al. 2021, Table 9): AdamW, lr ``5e-4 x batch / 512`` with
5 warm-up epochs then cosine decay, weight decay 0.05 (none on 1-D parameters, the position
embedding and the class token: :func:`bame_optim.nm_param_groups` with ``weight_decay``), label
smoothing 0.1. Its augmentations and regularizers (RandAugment, Mixup, CutMix, random erasing,
repeated augmentation, stochastic depth) are not part of this package."""


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes a launcher started (``WORLD_SIZE``, set by ``torchrun`` and
    ``accelerate launch``; 1 without a launcher or with an unreadable value), for the global
    batch of a recipe's lr before Accelerate is set up. ``environ``: ``os.environ``."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def fill_optimization(
    values: dict[str, Any], recipe: Recipe | None, defaults: Mapping[str, Any]
) -> str | None:
    """Fill, in place, the optimization fields of ``values`` (the parsed command line as
    :class:`~.config.TrainingConfig` keywords) that were not given (``None``).

    They come from ``recipe`` (the lr scaled to the global batch ``batch_size x grad_accum x``
    :func:`launched_processes`), unless ``optimizer`` was given as another optimizer than the
    recipe's, and then from ``defaults`` (the script's: :data:`RECIPE_FIELDS`, ``momentum``,
    ``betas``, ``eps``). Raises :class:`~.config.ConfigError` naming the field for a flag of the
    other optimizer (``momentum`` with adamw, ``betas`` or ``eps`` with sgd), and naming
    ``method`` for a method without a variant for the recipe's optimizer when ``optimizer``
    was not given. Returns the line that says what the recipe chose, and what was given
    (``None``: no recipe).
    """
    model = values["model"]
    given = {
        name: values[name]
        for name in (*RECIPE_FIELDS, "momentum", "betas", "eps")
        if values.get(name) is not None
    }
    line = None
    if recipe is not None and given.get("optimizer", recipe.optimizer) != recipe.optimizer:
        line = (
            f"{model}: --optimizer {given['optimizer']} given, so not {recipe.name}'s "
            f"{recipe.optimizer} recipe: the script's defaults for the flags not given"
        )
        recipe = None
    if recipe is not None:
        batch, accum, processes = values["batch_size"], values["grad_accum"], launched_processes()
        epochs, global_batch = values["epochs"], batch * accum * processes
        chosen = []
        for name, value in recipe.values(epochs=epochs, global_batch=global_batch).items():
            if name in given:
                continue
            values[name] = value
            how = recipe.describe(name, epochs=epochs, global_batch=global_batch)
            if name == "lr":
                how += f"; {batch} per process x {processes} process(es) x {accum} accumulated"
            chosen.append(f"{_flag(name)} {_shown(value)}" + (f" ({how})" if how else ""))
        given_flags = [f"{_flag(k)} {_shown(v)}" for k, v in given.items() if k in RECIPE_FIELDS]
        line = f"{model}: {recipe.name}'s recipe for the flags not given: " + (
            ", ".join(chosen) or "none"
        )
        if given_flags:
            line += "; given: " + ", ".join(given_flags)
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    optimizer, method = values["optimizer"], values["method"]
    if optimizer != "sgd" and "momentum" in given:
        raise ConfigError(
            "momentum", given["momentum"], f"--optimizer {optimizer} has no momentum; see --betas"
        )
    for name in ("betas", "eps"):
        if optimizer != "adamw" and name in given:
            raise ConfigError(name, given[name], f"AdamW's, and --optimizer is {optimizer}")
    if recipe is not None and "optimizer" not in given and method in BASE_METHODS:
        try:
            method_name(method, optimizer)
        except ValueError:
            with_one = [m for m in BASE_METHODS if f"{m}_{optimizer}" in METHODS]
            raise ConfigError(
                "method",
                method,
                f"it has no {optimizer} variant, and {optimizer} is the optimizer of {model}'s "
                f"default recipe, {recipe.name}'s: give --optimizer sgd, or a method with an "
                f"{optimizer} variant: {', '.join(with_one)}",
            ) from None
    return line
