"""bame_optim: N:M sparse training with BAME (Block-Aware Mask Evolution, ICML 2025).

``BAMESGD`` replaces ``torch.optim.SGD``, ``BAMEAdamW`` replaces ``torch.optim.AdamW``;
``nm_param_groups`` picks the sparse layers.
"""

from bame_optim.groups import nm_param_groups
from bame_optim.optim.adamw import BAMEAdamW
from bame_optim.optim.sgd import BAMESGD

__all__ = ["BAMESGD", "BAMEAdamW", "nm_param_groups"]
__version__ = "0.1.0"
