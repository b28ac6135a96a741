"""Console scripts of the installed applications (``[project.scripts]`` of ``pyproject.toml``).

The repository's ``examples/`` and ``benchmarks/`` folders are installed as the packages
``bame_apps.examples`` and ``bame_apps.benchmarks`` (``[tool.setuptools.package-dir]``), so
after ``pip install "bame_optim[examples]"`` they run without a checkout, as these commands or
as ``python -m bame_apps.examples.NAME`` / ``python -m bame_apps.benchmarks.NAME``:

* ``bame-quickstart``, ``bame-train-cifar``, ``bame-train-imagenet``: ``main()`` of
  ``bame_apps.examples.quickstart`` / ``.train_cifar`` / ``.train_imagenet`` (in a checkout:
  ``python examples/NAME.py``);
* ``bame-bench-accuracy``, ``bame-bench-ablation``, ``bame-bench-step``, ``bame-bench-memory``,
  ``bame-bench-flops``, ``bame-bench-kernel``, ``bame-bench-semi-structured``,
  ``bame-bench-lm``, ``bame-bench-vit-step``: ``main()`` of ``bame_apps.benchmarks.accuracy``
  / ``.ablation`` / ``.step`` / ``.memory`` / ``.flops_table`` / ``.kept_sgd_kernel`` /
  ``.semi_structured`` / ``.lm`` / ``.vit_step`` (in a checkout: ``python -m
  benchmarks.NAME``).

Each function here imports its script only when called (a command imports only what it runs)
and returns ``None``: the scripts' ``main`` returns the run's results, and a console script
passes its function's return value to :func:`sys.exit`, which would print them and exit 1.

Differences from a checkout run: ``bame-bench-accuracy`` writes to ``./runs/accuracy`` (the
current directory) unless ``--out`` says otherwise, where ``python -m benchmarks.accuracy``
writes into the checkout, and it needs ``--data PATH`` for Fashion-MNIST (``docs/data.md``),
since its default data folder is relative to the checkout; likewise ``bame-bench-ablation``
(which also needs ``--data PATH``) writes to ``./runs/ablation`` and ``bame-bench-lm`` to
``./runs/lm`` unless ``--output-dir`` says otherwise. ``tools/gpu_check.py`` has no
command: it runs the repository's test files and needs a checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "SCRIPTS",
    "bench_ablation",
    "bench_accuracy",
    "bench_flops",
    "bench_kernel",
    "bench_lm",
    "bench_memory",
    "bench_semi_structured",
    "bench_step",
    "bench_vit_step",
    "quickstart",
    "train_cifar",
    "train_imagenet",
]

SCRIPTS: dict[str, tuple[str, str]] = {
    "bame-quickstart": ("quickstart", "bame_apps.examples.quickstart"),
    "bame-train-cifar": ("train_cifar", "bame_apps.examples.train_cifar"),
    "bame-train-imagenet": ("train_imagenet", "bame_apps.examples.train_imagenet"),
    "bame-bench-accuracy": ("bench_accuracy", "bame_apps.benchmarks.accuracy"),
    "bame-bench-ablation": ("bench_ablation", "bame_apps.benchmarks.ablation"),
    "bame-bench-step": ("bench_step", "bame_apps.benchmarks.step"),
    "bame-bench-memory": ("bench_memory", "bame_apps.benchmarks.memory"),
    "bame-bench-flops": ("bench_flops", "bame_apps.benchmarks.flops_table"),
    "bame-bench-kernel": ("bench_kernel", "bame_apps.benchmarks.kept_sgd_kernel"),
    "bame-bench-semi-structured": (
        "bench_semi_structured",
        "bame_apps.benchmarks.semi_structured",
    ),
    "bame-bench-lm": ("bench_lm", "bame_apps.benchmarks.lm"),
    "bame-bench-vit-step": ("bench_vit_step", "bame_apps.benchmarks.vit_step"),
}
"""``{command: (function of this module, module whose main() it runs)}``; ``pyproject.toml``
declares each command as ``bame_apps.console:<function>`` (checked by the tests)."""

ACCURACY_OUT = Path("runs") / "accuracy"
"""Where ``bame-bench-accuracy`` writes without ``--out``: relative to the current directory."""
ABLATION_OUT = Path("runs") / "ablation"
"""Where ``bame-bench-ablation`` writes without ``--output-dir``: relative to the current
directory."""
LM_OUT = Path("runs") / "lm"
"""Where ``bame-bench-lm`` writes without ``--output-dir``: relative to the current directory."""


def _arguments(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def _main_of(module: str) -> Callable[..., object]:
    main: Callable[..., object] = importlib.import_module(module).main
    return main


def quickstart(argv: Sequence[str] | None = None) -> None:
    """``bame-quickstart``: dense SGD vs static N:M vs BAME on one small real dataset."""
    _main_of(SCRIPTS["bame-quickstart"][1])(_arguments(argv))


def train_cifar(argv: Sequence[str] | None = None) -> None:
    """``bame-train-cifar``: an N:M sparse ResNet-32 / MobileNet-V2 on CIFAR-10."""
    _main_of(SCRIPTS["bame-train-cifar"][1])(_arguments(argv))


def train_imagenet(argv: Sequence[str] | None = None) -> None:
    """``bame-train-imagenet``: an N:M sparse ResNet-18/50 or DeiT-small on ImageNet-1K."""
    _main_of(SCRIPTS["bame-train-imagenet"][1])(_arguments(argv))


def bench_accuracy(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-accuracy``: every method's test accuracy; writes to ``./runs/accuracy``
    unless ``--out`` is given (a later ``--out`` overrides the one put first here)."""
    _main_of(SCRIPTS["bame-bench-accuracy"][1])(["--out", str(ACCURACY_OUT), *_arguments(argv)])


def bench_ablation(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-ablation``: the paper's Table 3 and Fig. 3 ablations of BAME at 1:16; writes
    to ``./runs/ablation`` unless ``--output-dir`` is given (a later one overrides this)."""
    _main_of(SCRIPTS["bame-bench-ablation"][1])(
        ["--output-dir", str(ABLATION_OUT), *_arguments(argv)]
    )


def bench_step(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-step``: optimizer-step time of BAMESGD against ``torch.optim.SGD``
    (``--optimizer adamw``: BAMEAdamW against ``torch.optim.AdamW``)."""
    _main_of(SCRIPTS["bame-bench-step"][1])(_arguments(argv))


def bench_memory(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-memory``: optimizer-state bytes per method and phase against SGD."""
    _main_of(SCRIPTS["bame-bench-memory"][1])(_arguments(argv))


def bench_flops(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-flops``: the training-FLOPs table of ``docs/flops.md``.

    The script takes no flags; this parses the command line anyway, so ``--help`` prints what
    it does and an unknown flag exits 2 instead of being ignored.
    """
    module = importlib.import_module(SCRIPTS["bame-bench-flops"][1])
    doc = (module.__doc__ or "").split("\n\n")[0]
    argparse.ArgumentParser(description=doc).parse_args(_arguments(argv))
    module.main()


def bench_kernel(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-kernel``: the fused CPU kept-SGD kernel against the eager path and SGD."""
    _main_of(SCRIPTS["bame-bench-kernel"][1])(_arguments(argv))


def bench_semi_structured(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-semi-structured``: 2:4 semi-structured GEMMs and training step on CUDA."""
    _main_of(SCRIPTS["bame-bench-semi-structured"][1])(_arguments(argv))


def bench_lm(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-lm``: a small GPT-2 on the Python standard library through the Trainer;
    writes to ``./runs/lm`` unless ``--output-dir`` is given (a later one overrides this)."""
    _main_of(SCRIPTS["bame-bench-lm"][1])(["--output-dir", str(LM_OUT), *_arguments(argv)])


def bench_vit_step(argv: Sequence[str] | None = None) -> None:
    """``bame-bench-vit-step``: DeiT training-step time with BAMEAdamW against AdamW."""
    _main_of(SCRIPTS["bame-bench-vit-step"][1])(_arguments(argv))
