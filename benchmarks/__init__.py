"""Reproducible performance measurements; each module prints its table and RESULTS.md records them."""
