"""Float64 reference optimizers: slow, readable loops written straight from the paper's
equations and torch's update rules, the oracles the tests compare the fast optimizers against
(as ``schedule_free`` ships its reference). They import torch only and share no code with the
rest of the package.

* :class:`ReferenceBAME` / :class:`ReferenceBAMEAdamW`: BAMESGD / BAMEAdamW on one list of
  sparse parameters (:mod:`.bame`), with the mask updates of :mod:`.evolution` (LMA scores,
  the proposal, SAD, the oscillation EMA and OBF block by block: Eq. 4-10).
* :class:`ReferenceSRSTE`, :class:`ReferenceLBC`: the peers on dense weights (:mod:`.peers`).

Each takes ``step(grads, lr)``; compare its ``masks`` and weights (or buffers) with the
optimizer's after every step, in float64.
"""

from bame_optim.reference.bame import SEED_STRIDE, ReferenceBAME, ReferenceBAMEAdamW
from bame_optim.reference.evolution import evolve_blocks
from bame_optim.reference.peers import ReferenceLBC, ReferenceSRSTE, sgd_step

__all__ = [
    "SEED_STRIDE",
    "ReferenceBAME",
    "ReferenceBAMEAdamW",
    "ReferenceLBC",
    "ReferenceSRSTE",
    "evolve_blocks",
    "sgd_step",
]
