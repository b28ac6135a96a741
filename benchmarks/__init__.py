"""Benchmarks that print tables. In a checkout run them from the repository root as
``python -m benchmarks.NAME``; installed, the package is ``bame_optim.benchmarks``
(``python -m bame_optim.benchmarks.NAME``, or the ``bame-bench-*`` commands of
:mod:`bame_optim.console`). Modules import each other relatively, so both names work."""
