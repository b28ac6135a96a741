"""The command line of the training scripts, the only layer that knows about ``argparse``.

:class:`ScriptConfig` says what differs between the scripts (models, default epochs, preset,
weight decay, per-model recipes), :func:`build_parser` makes a script's parser from the
sections of :class:`~.config.TrainingConfig` (one group per section, one flag per field, its
help, choices, type and default read from the field and its :class:`~.options.Option`: no
default is written here),
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
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from bame_optim.methods import method_name

from .config import SECTIONS, ConfigError, TrainingConfig
from .loop import LaunchError, TrainResult, run
from .options import option_of
from .recipes import RECIPE_FIELDS, Recipe, fill_optimization
from .tracking import check_report_to

__all__ = ["ScriptConfig", "build_parser", "flag_of", "main", "parse_config"]


@dataclass(frozen=True)
class ScriptConfig:
    """What differs between the training scripts.

    Attributes:
        name: the script's name (``"train_cifar"``), used in the default output folder.
        description: the ``--help`` description.
        models: the ``--model`` choices (keys of :data:`bame_apps.integrations.models.MODELS`).
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
    from bame_apps.console import SCRIPTS

    command = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if command in SCRIPTS and SCRIPTS[command][0] == script.name:
        return command
    return f"{script.name}.py"


def _help_values(script: ScriptConfig) -> dict[str, str]:
    """What the help templates of :mod:`.sections` name besides ``{default}``."""
    return {
        "script": script.name,
        "default_preset": script.default_preset,
        "epochs": _epochs_note(script.default_epochs),
        "warmup_cap": ", at most half the epochs" if script.recipes else "",
    }


def _defaults(script: ScriptConfig) -> dict[str, Any]:
    """The fields whose default ``script`` sets (the others: the sections' defaults)."""
    return {
        "model": script.default_model,
        "image_size": script.default_image_size,
        "weight_decay": script.default_weight_decay,
    }


def _shown_default(value: Any) -> Any:
    """A default as the help template gets it: a pair as its text (``0.9 0.999``), any other
    value as it is (the template may format it: ``{default:g}``)."""
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" for v in value)
    return value


def build_parser(script: ScriptConfig) -> argparse.ArgumentParser:
    """The command line of the training script ``script`` (``--help`` lists it): one group per
    section of :class:`~.config.TrainingConfig`, one flag per field with a flag
    (:class:`~.options.Option`), which sets the field of its name."""
    parser = argparse.ArgumentParser(
        prog=_prog(script),
        description=script.description,
        epilog=script.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    overrides, names = _defaults(script), _help_values(script)
    for section in SECTIONS.values():
        group = parser.add_argument_group(section.TITLE)
        for spec_field in fields(section):
            name, spec = spec_field.name, option_of(spec_field)
            flag = spec.flag_for(name)
            if flag is None or (spec.needs_model and spec.needs_model not in script.models):
                continue
            default = overrides.get(name, spec_field.default)
            if default is dataclasses.MISSING:
                default = None
            recipes = _recipe_note(script, name) if name in RECIPE_FIELDS else ""
            text = spec.help.format(default=_shown_default(default), recipes=recipes, **names)
            kwargs: dict[str, Any] = {"dest": name, "help": text}
            if spec.action is not None:
                kwargs["action"] = spec.action
            else:
                kwargs["default"] = None if spec.filled or spec.required else default
                choices = script.models if name == "model" else spec.choices
                for key, value in (
                    ("type", spec.parse_type),
                    ("choices", choices),
                    ("nargs", spec.nargs),
                    ("metavar", spec.metavar),
                ):
                    if value is not None:
                        kwargs[key] = value
            if spec.required:
                kwargs["required"] = True
            group.add_argument(flag, **kwargs)
    return parser


def flag_of(name: str) -> str:
    """The command-line flag of the :class:`~.config.TrainingConfig` field ``name``."""
    for section in SECTIONS.values():
        for spec_field in fields(section):
            if spec_field.name == name:
                return option_of(spec_field).flag_for(name) or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def _filled_defaults(script: ScriptConfig) -> dict[str, Any]:
    """The values of the filled flags (:attr:`~.options.Option.filled`) neither given nor set
    by a recipe: the sections' defaults, ``weight_decay`` the script's (``epochs`` per model
    and ``output_dir`` from the run's name are filled before and after)."""
    overrides = _defaults(script)
    return {
        f.name: overrides.get(f.name, f.default)
        for section in SECTIONS.values()
        for f in fields(section)
        if option_of(f).filled and f.name not in ("epochs", "output_dir")
    }


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
    values: dict[str, Any] = vars(args)
    if values["epochs"] is None:
        values["epochs"] = script.default_epochs.get(args.model, script.default_epochs.get("*", 1))
    if values["betas"] is not None:
        values["betas"] = tuple(values["betas"])
    try:
        chosen = fill_optimization(values, script.recipes.get(args.model), _filled_defaults(script))
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
    values.update(script=script.name, default_preset=script.default_preset)
    try:
        config = TrainingConfig.build(**values)
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
