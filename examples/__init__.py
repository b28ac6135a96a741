"""The training scripts, installed as ``bame_apps.examples`` (console scripts
``bame-quickstart``, ``bame-train-cifar``, ``bame-train-imagenet``; see
:mod:`bame_apps.console`). In a checkout run them by path: ``python examples/NAME.py``."""
