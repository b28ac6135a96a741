"""The applications around the ``bame_optim`` library, installed beside it (not inside it):
``bame_apps.integrations`` (the training app, Accelerate and Trainer glue, datasets, models),
``bame_apps.examples`` and ``bame_apps.benchmarks`` (the repository's ``integrations/``,
``examples/`` and ``benchmarks/`` folders, mapped by ``[tool.setuptools.package-dir]``) and
``bame_apps.console`` (the console commands). The library never imports this package.
"""
