"""Train an N:M sparse ResNet-18, ResNet-50 or DeiT-small on ImageNet-1K with BAME (or any peer
method).

Defaults of the ResNets, from the paper (BAME, ICML 2025, section 4.1), which states one recipe
for all its networks: SGD with momentum 0.9, batch 256, initial lr 0.1 with cosine annealing
(here per optimizer step), ΔT = 100, α = β = 0.5; 120 epochs; the 2:4 pattern (every row of its
Table 2 has it; ``--n 1 --m 4`` / ``--n 1 --m 16`` give the others). Not stated by the paper,
chosen here: weight decay 1e-4 (the usual ImageNet value for SGD, torchvision's reference
recipe; the paper gives 5e-3 for CIFAR-10 only), no warm-up (``--warmup-epochs``), no label
smoothing (``--label-smoothing``), the standard augmentation (random-resized crop and flip at
224, resize 256 + center crop for evaluation).

Defaults of DeiT-small (300 epochs): DeiT's optimization recipe (Touvron et al. 2021,
:data:`~bame_apps.integrations.training.recipes.DEIT_RECIPE`), for each flag not given:
``--optimizer adamw`` (the method's AdamW variant: ``bame`` runs as ``bame_adamw``,
:class:`bame_optim.BAMEAdamW`; ``dense`` as ``torch.optim.AdamW``), ``--lr`` 5e-4 x global
batch / 512 (batch x processes x ``--grad-accum``), ``--weight-decay 0.05`` (none on 1-D
parameters, the position embedding and the class token), ``--warmup-epochs 5`` (at most half
the epochs) then cosine, ``--label-smoothing 0.1``; the script prints what it chose. DeiT's
augmentations (RandAugment, Mixup, CutMix, random erasing) and stochastic depth are not
included. ``--optimizer sgd`` gives the paper's SGD recipe above instead (the paper trains
DeiT-small with it). ``--vit-depth``, ``--vit-width`` (192: DeiT-Ti's width) and
``--vit-patch`` make smaller ViTs for CPU runs. The stem (first conv / patch embedding) and the
classifier stay dense; DeiT's attention ``in_proj`` (Q, K, V) and ``out_proj``, and its MLP
layers are N:M.

Runs under ``accelerate launch`` or plain ``python``::

    accelerate launch --multi_gpu --num_processes 8 examples/train_imagenet.py \\
        --data /data/imagenet --model resnet50 --batch-size 32     # 8 x 32 = 256
    accelerate launch --multi_gpu --num_processes 8 examples/train_imagenet.py \\
        --data /data/imagenet --model deit_small --batch-size 128  # AdamW, lr 1e-3
    python examples/train_imagenet.py --data ../shared/data/fashion-mnist --model deit_small \\
        --vit-width 192 --vit-depth 4 --vit-patch 4 --image-size 28 --epochs 4 \\
        --max-train-samples 6000 --cpu --no-progress     # a small ViT on CPU

``--data`` is an image folder with ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (or a
saved ``datasets`` folder, parquet files, IDX files, or a Hub name when online).
The loop is the package :mod:`bame_apps.integrations.training` (one frozen ``TrainingConfig``
per run; the flags are its fields, see ``--help``).
"""

from __future__ import annotations

from collections.abc import Sequence

from bame_apps.integrations.training import ScriptConfig, TrainResult
from bame_apps.integrations.training import main as train
from bame_apps.integrations.training.recipes import DEIT_RECIPE

CONFIG = ScriptConfig(
    name="train_imagenet",
    description=__doc__.split("\n\n")[0],
    models=("resnet18", "resnet50", "deit_small", "small_cnn"),
    default_model="resnet50",
    default_epochs={"resnet18": 120, "resnet50": 120, "deit_small": 300, "*": 120},
    default_preset="imagenet",
    default_weight_decay=1e-4,
    default_image_size=224,
    recipes={"deit_small": DEIT_RECIPE},
)
"""ImageNet-1K: ResNet-18, ResNet-50 and DeiT-small as in the paper's Table 2 (DeiT-small with
DeiT's AdamW recipe by default); ``small_cnn`` for quick checks."""


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Train as the command line ``argv`` says (``None``: ``sys.argv[1:]``); a bad flag exits
    with status 2 and a message naming it."""
    return train(argv, CONFIG)


if __name__ == "__main__":
    main()
