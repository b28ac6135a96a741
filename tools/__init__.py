"""Developer tools of the repository (not installed with the package): run them from the
repository root as ``python -m tools.NAME``."""
