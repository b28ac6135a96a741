"""Training-FLOPs accounting: the training FLOPs of an N:M method relative to dense training.

What is counted, each method's profile and the paper's numbers: docs/flops.md. The package has
three parts: :mod:`.layers` counts a model's layers (one batch-1 forward with hooks),
:mod:`.profiles` sums a sparse layer's densities over the schedule for each profile
(:class:`~bame_optim.methods.FlopsProfile`), and :mod:`.breakdown` composes the two.
"""

from bame_optim.flops.breakdown import FlopsBreakdown, flops_breakdown, training_flops_ratio
from bame_optim.flops.layers import LayerFlops, layer_flops
from bame_optim.flops.profiles import lbc_union_bounds, step_density_sums
from bame_optim.methods import FlopsProfile

__all__ = [
    "FlopsBreakdown",
    "FlopsProfile",
    "LayerFlops",
    "flops_breakdown",
    "layer_flops",
    "lbc_union_bounds",
    "step_density_sums",
    "training_flops_ratio",
]
