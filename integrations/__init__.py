"""Adapters from :mod:`bame_optim` to third-party frameworks (installed as
``bame_apps.integrations``). Each adapter lives in its own module and imports its framework
only when that module is imported, so the core package keeps depending on torch alone."""
