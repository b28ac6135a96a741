"""What one field of a config section says about itself: :class:`Option`, the field metadata
that both validation (:mod:`.config`) and the command line (:mod:`.cli`) read, so that a
field's default, choices, bound and help are written once, beside the field.

:class:`ConfigError` is the error of a field's bad value; :func:`option` declares a
field; :func:`option_of` reads it back; :func:`check_options`
runs the checks the metadata states (choices, integer bounds) for every field of a section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from bame_optim.core.validation import ErrorFactory, check_int, check_one_of

__all__ = ["ConfigError", "Option", "check_options", "option", "option_of"]


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



@dataclass(frozen=True)
class Option:
    """The metadata of one config field.

    Attributes:
        help: the ``--help`` text, a :meth:`str.format` template: ``{default}`` is the flag's
            default (a pair as ``0.9 0.999``); the command line supplies the other names it
            uses (:mod:`.cli`).
        flag: the command-line flag (``""``: ``--`` and the field's name with dashes;
            ``None``: no flag, the script sets the field).
        choices: the allowed values (``None``: any; a default of ``None`` is allowed too).
        at_least: an integer field's lower bound (``None``: not an integer field).
        type: the flag's ``argparse`` type (``None``: ``int`` when ``at_least`` is set, else
            the text).
        nargs, metavar, action: passed to ``argparse`` (``action="store_false"`` for a
            ``--no-...`` flag of a ``True`` default).
        required: the flag must be given.
        filled: the flag's parser default is ``None`` and :func:`~.cli.parse_config` fills the
            value when it is not given (from a recipe, the script or the field's default), so
            that it can tell a given value from a default.
        defines_run: a resumed run must share the value with its checkpoint (it changes what
            is computed).
        needs_model: the flag exists only in scripts offering this model (``deit_small``).
    """

    help: str
    flag: str | None = ""
    choices: tuple[Any, ...] | None = None
    at_least: int | None = None
    type: Callable[[str], Any] | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    action: str | None = None
    required: bool = False
    filled: bool = False
    defines_run: bool = False
    needs_model: str | None = None

    def flag_for(self, name: str) -> str | None:
        """The flag of the field ``name`` (``None``: none)."""
        if self.flag is None:
            return None
        return self.flag or "--" + name.replace("_", "-")

    @property
    def parse_type(self) -> Callable[[str], Any] | None:
        """The ``argparse`` type of the flag."""
        return self.type or (int if self.at_least is not None else None)


def option(default: Any = MISSING, **metadata: Any) -> Any:
    """A dataclass field with the default ``default`` (none: required) and the
    :class:`Option` built from ``metadata``."""
    return dataclasses.field(default=default, metadata={"option": Option(**metadata)})


def option_of(field: dataclasses.Field[Any]) -> Option:
    """The :class:`Option` of a field declared with :func:`option`."""
    return field.metadata["option"]


def check_options(section: Any, error: ErrorFactory) -> None:
    """Raise ``error(name, value, reason)`` for the first field of the dataclass instance
    ``section`` that breaks its :class:`Option`'s choices or integer bound (a field whose
    default is ``None`` may be ``None``)."""
    for field in dataclasses.fields(section):
        spec, value = option_of(field), getattr(section, field.name)
        optional = field.default is None
        if spec.choices is not None:
            check_one_of(field.name, value, spec.choices, optional=optional, error=error)
        if spec.at_least is not None:
            check_int(field.name, value, spec.at_least, optional=optional, error=error)
