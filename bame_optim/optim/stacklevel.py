"""Where a warning of the package points: at the user's call, however deep the wiring."""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]

_INTERNAL_MODULES = ("bame_optim.optim.", "bame_optim.core.", "bame_optim.peers.",
                     "bame_optim.methods", "torch.", "accelerate.", "transformers.")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the first frame
    outside the optimizers, the method registry, torch and the wrappers that step them
    (Accelerate, transformers): the user's ``step()``, constructor or ``make_optimizer`` call,
    however deep the class hierarchy between them."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL_MODULES):
        frame, level = frame.f_back, level + 1
    return level
