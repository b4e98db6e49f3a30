"""Runnable experiments: ``python -m experiments.NAME``."""

import genjax  # noqa: F401  (first: Ctrl-C while JAX is imported, see genjax._interrupt)
