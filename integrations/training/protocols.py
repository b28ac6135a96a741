"""What the training loop needs of the objects it is given, as :class:`typing.Protocol`
classes checked with ``isinstance``: an optimizer that holds N:M masks
(:class:`MaskedOptimizer`; dense SGD or AdamW holds none), one that follows a mask schedule
(:class:`ScheduledOptimizer`) and a loader that reshuffles per epoch
(:class:`EpochLoader`).

.. note:: These say what the app reads, not what the library is: every N:M optimizer of
   :data:`bame_optim.methods.METHODS` (a :class:`~bame_optim.optim.base.NMOptimizer`) is a
   :class:`MaskedOptimizer`, and the scheduled ones (a
   :class:`~bame_optim.optim.masked.MaskedOptimizer`) are also :class:`ScheduledOptimizer`.
   ``isinstance`` checks that the methods exist, not their signatures.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["EpochLoader", "MaskedOptimizer", "ScheduledOptimizer"]


@runtime_checkable
class MaskedOptimizer(Protocol):
    """An optimizer holding N:M masks: what :class:`~bame_apps.integrations.accelerate.MaskSync`,
    :class:`~.mask_oscillation.MaskOscillation`, :class:`~.tracking.LiveLog` and
    ``metrics.json`` read."""

    param_groups: list[dict[str, Any]]

    def kept_mask(self, p: Tensor) -> Tensor | None:
        """The ``[K, M]`` bool mask of sparse parameter ``p`` (``None``: dense or not yet
        stepped)."""

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        """Whether the step with counter ``t`` may change a mask of ``group``."""

    def sparsity_report(self) -> list[dict[str, Any]]:
        """One row per sparse parameter: its pattern, density and phase."""


@runtime_checkable
class ScheduledOptimizer(Protocol):
    """An optimizer whose masks follow a schedule over the run's ``total_steps``."""

    def schedule_summary(self) -> str:
        """The schedule in one line, printed before training."""

    def check_finished(self) -> bool:
        """Warn when the run ended before the masks became final."""


@runtime_checkable
class EpochLoader(Protocol):
    """A loader whose order depends on the epoch (Accelerate's prepared loaders)."""

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration draws its order for."""
