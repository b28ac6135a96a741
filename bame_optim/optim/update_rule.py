"""An update rule as a record: what an optimizer over the state engine does to the weights.

:class:`~bame_optim.optim.masked.MaskedOptimizer` does everything but the update of the
weights (schedule, masks, state, checkpoints); the update is an :class:`UpdateRule`, the way
``torch.optim.AdamW`` is Adam with one flag: :data:`bame_optim.optim.sgd.SGD_RULE`,
:data:`bame_optim.optim.adamw.ADAMW_RULE` (docs/design.md section 6).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DenseStep", "KeptStep", "UpdateRule"]

State = dict[str, Any]

DenseStep = Callable[[MutableMapping[Tensor, State], dict[str, Any], list[Tensor]], None]
"""``dense_step(state, group, params)``: the torch update of a group's dense parameters with a
gradient, ``state`` the optimizer's (created per parameter as the torch optimizer creates it)."""

KeptStep = Callable[[dict[str, Any], list[Tensor], list[Tensor], list[State]], None]
"""``kept_step(group, params, grads, states)``: the update of the kept weights of a group's
sparse parameters with a gradient (plain tensors in the block layout, this rank's part), each
``state`` holding ``kept``, ``kept_count`` and the compact buffers; the step creates missing
buffers in ``state`` and stores the new ones there."""


@dataclass(frozen=True)
class UpdateRule:
    """The update of one torch optimizer on N:M sparse and dense parameters."""

    defaults: Mapping[str, Any]
    """The torch optimizer's keywords and their defaults (every one is a group key)."""
    buffers: tuple[str, ...]
    """Per-weight state, stored for kept weights only (``[K, kept_count]``)."""
    validate: Callable[[dict[str, Any], str], None]
    """``validate(group, owner)``: ``ValueError`` naming a bad hyper-parameter (the defaults
    are checked before the parameters, as torch checks ``lr`` first)."""
    dense_step: DenseStep
    kept_step: KeptStep
    dense_class: type[Optimizer]
    """The dense optimizer the rule follows on dense parameters (``torch_state_dict()``)."""
    upgrade_state: Callable[[State], None] | None = None
    """Brings one parameter's state of an older checkpoint to the current form, if needed."""
