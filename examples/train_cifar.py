"""Train an N:M sparse ResNet-32 or MobileNet-V2 on CIFAR-10 with BAME (or any peer method).

The defaults are the paper's CIFAR-10 recipe (BAME, ICML 2025, section 4.1): SGD with momentum
0.9, batch 256, initial lr 0.1 with cosine annealing (here per optimizer step), weight decay
5e-3, 300 epochs, ΔT = 100, α = β = 0.5; and the 2:4 pattern, the one every table of the paper
reports (``--n 1 --m 4`` and ``--n 1 --m 16`` give its other CIFAR rows). The stem and the
classifier stay dense, as in the peers' code; MobileNet-V2's depthwise convolutions too.

Runs under ``accelerate launch`` or plain ``python``::

    accelerate launch examples/train_cifar.py --data /data/cifar-10-batches-py
    python examples/train_cifar.py --data /data/cifar-10-batches-py --model mobilenet_v2 \\
        --n 1 --m 16 --output-dir runs/mbv2-1of16
    python examples/train_cifar.py --data ../shared/data/fashion-mnist --epochs 3 \\
        --max-train-samples 10000      # any local dataset; grayscale works too

The loop is the package :mod:`bame_apps.integrations.training` (one frozen ``TrainingConfig``
per run; the flags are its fields, see ``--help``).
"""

from __future__ import annotations

from collections.abc import Sequence

from bame_apps.integrations.training import ScriptConfig, TrainResult
from bame_apps.integrations.training import main as train

CONFIG = ScriptConfig(
    name="train_cifar",
    description=__doc__.split("\n\n")[0],
    models=("resnet32", "mobilenet_v2", "small_cnn"),
    default_model="resnet32",
    default_epochs={"*": 300},
    default_preset="cifar10",
    default_weight_decay=5e-3,
)
"""CIFAR-10: ResNet-32 (default) and MobileNet-V2 as in the paper's Table 1; ``small_cnn``
for quick checks."""


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Train as the command line ``argv`` says (``None``: ``sys.argv[1:]``); a bad flag exits
    with status 2 and a message naming it."""
    return train(argv, CONFIG)


if __name__ == "__main__":
    main()
