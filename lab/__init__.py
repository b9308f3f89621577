"""Experiments beside the product: the shared-label tuple experiments (n-accuracy, relative information, FLOPs
sweet spot) and their command, `python -m lab.run_tuples`. Nothing in `models`, `cascade` or `service` imports
this package (an import-linter contract in pyproject.toml says so); it imports them."""
