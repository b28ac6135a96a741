"""The one frozen description of a training run, :class:`TrainingConfig`, and its validation.

A config is four frozen sections (:mod:`.sections`), one per group of the command line:
``inputs`` (data), ``network`` (model and method), ``optim`` (optimization) and ``outputs``
(outputs and checkpoints). Each field is declared once, with its default and its
:class:`~.options.Option` (help, flag, choices, bound), which :mod:`.cli` turns into the
scripts' flags.

Every field is checked when the config is built: a bad value raises :class:`ConfigError` (a
``ValueError``) whose message names the field and the value. Checks that need the data or the
file system (splits, ``exclude`` patterns, checkpoints) raise the same error later, from the
function that finds the problem. Only the command line
(:mod:`bame_apps.integrations.training.cli`) turns these errors into ``parser.error``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bame_optim.methods import (
    METHODS,
    accepted_keywords,
    fixed_settings,
    inert_keywords,
    method_name,
)

from .options import ConfigError, option_of
from .sections import (
    BASE_METHODS,
    MIXED_PRECISION,
    PRESETS,
    REPORT_TO,
    InputConfig,
    NetworkConfig,
    OptimConfig,
    OutputConfig,
)

__all__ = [
    "BASE_METHODS",
    "MIXED_PRECISION",
    "PRESETS",
    "REPORT_TO",
    "RUN_DEFINING",
    "SECTIONS",
    "ConfigError",
    "InputConfig",
    "NetworkConfig",
    "OptimConfig",
    "OutputConfig",
    "TrainingConfig",
    "config_dict",
    "json_default",
]


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



SECTIONS: dict[str, type] = {
    "inputs": InputConfig,
    "network": NetworkConfig,
    "optim": OptimConfig,
    "outputs": OutputConfig,
}
"""The sections of :class:`TrainingConfig`, by attribute, in the order of the command line."""

_SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
"""The section holding each field."""

RUN_DEFINING = tuple(
    f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
    if option_of(f).defines_run
)
"""Fields a resumed run must share with its checkpoint (they change what is computed)."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Everything a training run depends on, as four sections: ``inputs``
    (:class:`InputConfig`), ``network`` (:class:`NetworkConfig`), ``optim``
    (:class:`OptimConfig`), ``outputs`` (:class:`OutputConfig`); each section's fields say
    what they hold (their help). Build it once, usually from flat field values with
    :meth:`build`; it is validated on construction and never changed (derive another with
    :meth:`replace`, which validates again). The checks that span sections (the method's
    optimizer variant and OBF settings, DeiT's patch against the image size) run here.
    """

    inputs: InputConfig
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    outputs: OutputConfig

    @classmethod
    def build(cls, **values: Any) -> TrainingConfig:
        """The config of the flat field values ``values`` (``data`` and ``output_dir``
        required; any field of any section; the others their defaults). An unknown name
        raises ``TypeError``."""
        unknown = sorted(set(values) - set(_SECTION_OF))
        if unknown:
            raise TypeError(f"TrainingConfig has no field {unknown[0]!r}")
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in values.items():
            parts[_SECTION_OF[name]][name] = value
        return cls(**{name: SECTIONS[name](**parts[name]) for name in SECTIONS})

    def replace(self, **values: Any) -> TrainingConfig:
        """A copy with the flat field values ``values`` changed, validated again."""
        return TrainingConfig.build(**{**self.flat(), **values})

    def flat(self) -> dict[str, Any]:
        """``{field: value}`` over the sections, in their order (the values as held)."""
        return {
            f.name: getattr(getattr(self, name), f.name)
            for name, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)
        }

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Invalid {name} value: a {cls.__name__} is required")
        _validate_across(self)

    @property
    def registered_method(self) -> str:
        """The name of the method in :data:`bame_optim.methods.METHODS`:
        ``method_name(method, optimizer)`` (``bame`` with ``"adamw"``: ``bame_adamw``)."""
        return method_name(self.network.method, self.optim.optimizer)

    @property
    def obf(self) -> tuple[float, float]:
        """``(alpha, beta)`` with the defaults filled in: what the method fixes, else 0.5."""
        fixed = fixed_settings(self.registered_method)
        alpha = self.network.alpha if self.network.alpha is not None else fixed.get("alpha", 0.5)
        beta = self.network.beta if self.network.beta is not None else fixed.get("beta", 0.5)
        return float(alpha), float(beta)


def config_dict(config: TrainingConfig) -> dict[str, Any]:
    """``config`` as flat plain JSON values (:meth:`TrainingConfig.flat`), with ``alpha`` and
    ``beta`` filled in (what ``metrics.json`` and a checkpoint record)."""
    values = config.flat()
    values["alpha"], values["beta"] = config.obf
    return json.loads(json.dumps(values, default=json_default))


def _check_optimizer(config: TrainingConfig) -> None:
    """Raise :class:`ConfigError` naming ``optimizer`` when ``method`` has no variant for it."""
    method, optimizer = config.network.method, config.optim.optimizer
    try:
        method_name(method, optimizer)
    except ValueError:
        with_one = [name for name in BASE_METHODS if f"{name}_{optimizer}" in METHODS]
        raise ConfigError(
            "optimizer",
            optimizer,
            f"method {method} has no {optimizer} variant; the methods with one: "
            f"{', '.join(with_one)}",
        ) from None


def _validate_across(config: TrainingConfig) -> None:
    """Raise :class:`ConfigError` for the first check spanning sections that fails."""
    _check_optimizer(config)
    registered = config.registered_method
    fixed = fixed_settings(registered)
    for name in ("alpha", "beta"):
        value = getattr(config.network, name)
        if value is None:
            continue
        if name not in accepted_keywords(registered):
            raise ConfigError(name, value, f"method {registered} does not use {name}")
        if name in inert_keywords(registered):
            raise ConfigError(name, value, f"method {registered} has no evolve phase "
                              f"(it fixes t_i = t_f), so {name} would change nothing")
        if name in fixed and value != fixed[name]:
            raise ConfigError(name, value, f"method {registered} fixes {name}={fixed[name]}")
    patch, size = config.network.vit_patch, config.inputs.image_size
    if config.network.model == "deit_small" and size is not None and size % patch:
        raise ConfigError("image_size", size, f"DeiT needs a multiple of its patch size {patch}")
