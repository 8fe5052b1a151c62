"""The e-commerce services' shared state file, read without side effects.

``ecom_shared`` (imported only by worker processes) re-registers the example's
workers around this file; tests read the file through this module so that
importing it registers nothing in the test process.
"""

from __future__ import annotations

import os
import pickle

from examples.ecommerce_order import services


def load_state(path: str) -> services.Services:
    """The shared services as they are now (fresh ones before the first call)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return services.Services()
    with open(path, "rb") as fh:
        return pickle.load(fh)
