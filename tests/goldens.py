"""Golden files: compare output with a file kept beside its case; ``--update-goldens`` rewrites them.

One way to regenerate every golden in the repository: ``make goldens``
(``pytest --update-goldens``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest


class Goldens:
    def __init__(self, update: bool):
        self.update = update

    def check(self, path: Path, actual: str | bytes) -> None:
        """Assert ``actual`` equals the golden at ``path`` (or write it when updating)."""
        data = actual.encode("utf-8") if isinstance(actual, str) else actual
        if self.update:
            if not path.exists() or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; run `make goldens` to create it")
        expected = path.read_bytes()
        if expected != data:
            diff = "".join(difflib.unified_diff(
                expected.decode("utf-8", "replace").splitlines(True), data.decode("utf-8", "replace").splitlines(True),
                fromfile=str(path), tofile="actual", n=2))
            pytest.fail(f"output differs from golden {path} (run `make goldens` if the change is intended):\n"
                        f"{diff[:6000]}")
