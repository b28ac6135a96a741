"""The training scripts, installed as ``bame_optim.examples`` (console scripts
``bame-quickstart``, ``bame-train-cifar``, ``bame-train-imagenet``; see
:mod:`bame_optim.console`). In a checkout run them by path: ``python examples/NAME.py``."""
