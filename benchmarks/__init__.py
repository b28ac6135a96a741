"""Benchmarks that print tables. In a checkout run them from the repository root as
``python -m benchmarks.NAME``; installed, the package is ``bame_apps.benchmarks``
(``python -m bame_apps.benchmarks.NAME``, or the ``bame-bench-*`` commands of
:mod:`bame_apps.console`). Modules import each other relatively, so both names work."""
