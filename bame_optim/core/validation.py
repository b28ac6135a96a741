"""Argument checks shared by the optimizers, the mask rules, the FLOPs accounting and the
training config: one message format, ``Invalid {name} value: {value!r} ({reason})``.

Each ``check_*`` raises ``error(name, value, reason)``: a ``ValueError`` by default
(:func:`invalid`); the training config passes its ``ConfigError`` (a ``ValueError`` subclass
that keeps the field, the value and the reason). Nothing here knows about tensors of
parameters or optimizer state; a Tensor is accepted only where torch's optimizers accept one
(``lr``, ``betas``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

__all__ = [
    "ErrorFactory",
    "check_adamw_hyper",
    "check_fraction",
    "check_int",
    "check_nonnegative",
    "check_one_of",
    "check_real_in",
    "check_sgd_hyper",
    "invalid",
    "is_int",
    "is_real",
]

ErrorFactory = Callable[[str, Any, str], Exception]
"""Builds the exception of a check from the argument's name, its value and the reason."""


def invalid(name: str, value: Any, reason: str) -> ValueError:
    """``ValueError("Invalid {name} value: {value!r} ({reason})")``."""
    return ValueError(f"Invalid {name} value: {value!r} ({reason})")


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, minimum: int, *, optional: bool = False, error: ErrorFactory = invalid
) -> Any:
    """``value`` unless it is not an integer ``>= minimum`` (``None`` passes when
    ``optional``)."""
    if optional and value is None:
        return value
    if not is_int(value) or value < minimum:
        raise error(name, value, f"an integer >= {minimum} is required")
    return value


def check_fraction(
    name: str, value: Any, *, one: bool = True, error: ErrorFactory = invalid
) -> None:
    """A number in ``[0, 1]``, or in ``[0, 1)`` when ``one`` is ``False``."""
    inside = is_real(value) and (0 <= value <= 1 if one else 0 <= value < 1)
    if not inside:
        raise error(name, value, "must be in [0, 1]" if one else "must be in [0, 1)")


def check_nonnegative(
    name: str,
    value: Any,
    *,
    finite: bool = True,
    tensor: bool = False,
    optional: bool = False,
    error: ErrorFactory = invalid,
) -> None:
    """A number ``>= 0`` ("a float >= 0 is required"): NaN never passes, infinity only when
    ``finite`` is ``False`` (as in torch's optimizers), a one-element Tensor only when
    ``tensor``, ``None`` only when ``optional``."""
    if optional and value is None:
        return
    number = is_real(value) or (tensor and isinstance(value, Tensor))
    if not number or not value >= 0 or (finite and not value < math.inf):
        raise error(name, value, "a float >= 0 is required")


def check_real_in(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_open: bool = True,
    error: ErrorFactory = invalid,
) -> None:
    """A finite number ``low <= value < high`` (``<= high`` when not ``high_open``)."""
    ok = is_real(value) and math.isfinite(value) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bound = f"< {high}" if high_open else f"<= {high}"
        raise error(name, value, f"a finite number {low} <= value {bound} is required")


def check_one_of(
    name: str,
    value: Any,
    choices: Iterable[Any],
    *,
    optional: bool = False,
    error: ErrorFactory = invalid,
) -> None:
    """One of ``choices`` (``None`` passes when ``optional``)."""
    if optional and value is None:
        return
    choices = tuple(choices)
    if value not in choices:
        raise error(name, value, f"one of {', '.join(map(str, choices))} is required")


def _check_tensor_lr(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"Invalid lr value: a Tensor lr must be one floating element, got "
                         f"shape {tuple(lr.shape)} dtype {lr.dtype}")


def check_sgd_hyper(group: dict[str, Any]) -> None:
    """:class:`torch.optim.SGD`'s hyper-parameters of a param group: ``lr`` (a number or a
    one-element floating Tensor), ``momentum``, ``dampening``, ``weight_decay`` ``>= 0``, and
    ``nesterov`` only with a momentum and no dampening."""
    _check_tensor_lr(group)
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        check_nonnegative(name, group[name], finite=False, tensor=name == "lr")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov value: True (Nesterov momentum requires a momentum and zero "
            f"dampening; got momentum={group['momentum']}, dampening={group['dampening']})"
        )


def check_adamw_hyper(group: dict[str, Any]) -> None:
    """:class:`torch.optim.AdamW`'s hyper-parameters of a param group: ``lr`` (a number, or a
    one-element floating Tensor without ``foreach=True``), ``eps`` and ``weight_decay``
    ``>= 0``, ``betas`` two numbers (or one-element floating Tensors) in ``[0, 1)``. Stores
    ``betas`` as a tuple of floats (Tensors kept)."""
    _check_tensor_lr(group)
    if isinstance(group["lr"], Tensor) and group["foreach"]:
        raise ValueError("Invalid foreach value: True (a Tensor lr needs foreach=False or "
                         "None, as in torch.optim.AdamW)")
    for name in ("lr", "eps", "weight_decay"):
        check_nonnegative(name, group[name], finite=False, tensor=name == "lr")
    betas = group["betas"]
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_is_scalar(b) for b in betas)
        or not all(0 <= float(b) < 1 for b in betas)
    ):
        raise ValueError(f"Invalid betas value: {betas!r} (two floats in [0, 1) are required, "
                         "or one-element floating Tensors)")
    group["betas"] = tuple(b if isinstance(b, Tensor) else float(b) for b in betas)


def _is_scalar(value: object) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return is_real(value)
