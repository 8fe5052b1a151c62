"""Front end: reading YAML spec files with source positions, safely.

Stage: front end. Imports ``flowdsl.diagnostics`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowdsl.diagnostics import Diagnostic, Positions


@dataclass
class LoadedDoc:
    """A spec document as plain data, where each part of it was written, and what went wrong reading it.

    ``data`` is None when the document could not be read at all.
    """

    data: Any
    positions: Positions
    diagnostics: list[Diagnostic] = field(default_factory=list)
