"""A ``transformers.Trainer`` callback for N:M optimizers (recipe: ``docs/hf_trainer.md``).

.. code-block:: python

    trainer = Trainer(..., optimizers=(opt, scheduler), callbacks=[NMCheck()])

At the end of ``trainer.train()`` :class:`NMCheck` calls the optimizer's
:meth:`~bame_optim.optim.masked.MaskedOptimizer.check_finished`, which warns when training
stopped before ``t_i`` (``total_steps`` larger than the steps the Trainer ran, e.g. counted in
batches under gradient accumulation), so the model is not N:M; ``NMCheck(finalize=True)`` then
also prunes it to N:M with ``finalize_masks()``. Needs ``transformers``
(``pip install 'bame_optim[transformers]'``).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from bame_apps.integrations.accelerate import unwrap_optimizer

__all__ = ["NMCheck"]


class NMCheck(TrainerCallback):
    """Check at the end of training that the masks reached N:M.

    Args:
        finalize: when they did not, call ``finalize_masks()`` (save the model after
            ``trainer.train()``: the Trainer's last checkpoint predates it).
    """

    def __init__(self, *, finalize: bool = False) -> None:
        self.finalize = finalize
        self.finished: bool | None = None
        """The result of ``check_finished()`` at the last end of training."""

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = unwrap_optimizer(kwargs["optimizer"])
        check = getattr(optimizer, "check_finished", None)
        if check is None:  # a peer without a schedule: nothing to finish
            return
        self.finished = check()
        if not self.finished and self.finalize:
            optimizer.finalize_masks()
