"""ASP: NVIDIA's Automatic SParsity recipe (Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks"; the paper's Table 1 "ASP").

Train dense, prune once to N:M by weight magnitude, then fine-tune with the mask fixed.
:class:`ASPSGD` is the fine-tuning optimizer: at its first step it keeps the N largest ``|W|``
of every block of the (pre-trained) weights and never changes the mask again. The dense
pre-training is an ordinary run (``torch.optim.SGD`` or ``BAMESGD(..., sparse=False)``).

Training-FLOPs profile: dense for the pre-training steps; fine-tuning with a sparse forward
and, on hardware that exploits it, sparse backward products at density N/M.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bame_optim.core.evolution import magnitude_mask
from bame_optim.core.nm import param_to_blocks
from bame_optim.optim.bame_sgd import BAMESGD
from bame_optim.optim.sharded import local_tensor

__all__ = ["ASPSGD"]


class ASPSGD(BAMESGD):
    """Fixed-mask sparse fine-tuning after one-shot magnitude N:M pruning.

    Takes :class:`BAMESGD`'s arguments; the schedule is fixed to ``t_i = t_f = 0`` (the mask
    is chosen at the first step and never changes), so ``total_steps`` is not needed.
    """

    def __init__(self, params, lr: float = 1e-3, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("t_i", 0)
        kwargs.setdefault("t_f", 0)
        super().__init__(params, lr, *args, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in ("t_i", "t_f"):
            if group[name] != 0:
                raise ValueError(
                    f"Invalid {name} value: {group[name]} (ASP prunes once, at step 0)"
                )

    def _start_mask(self, p: Tensor, kept: Tensor, group: dict[str, Any], index: int) -> Tensor:
        return magnitude_mask(param_to_blocks(local_tensor(p), group["m"]), kept, group["n"])
