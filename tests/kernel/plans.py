"""Plans for the kernel tests: specs written as Python data or YAML, compiled by the real compiler."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from flowdsl import compile_spec, compile_text


def spec_text(steps: list[Any], **top: Any) -> str:
    """YAML text of a spec with these steps and top-level keys (``flowdsl`` and ``name`` filled in)."""
    return yaml.safe_dump({"flowdsl": 1, "name": top.pop("name", "t"), **top, "steps": steps}, sort_keys=False)


@functools.lru_cache(maxsize=512)
def _compile(text: str) -> Any:
    return compile_text(text)


def plan_of(steps: list[Any], **top: Any) -> dict[str, Any]:
    """The compiled plan of a spec given as Python data (cached: tests must not mutate it)."""
    return _compile(spec_text(steps, **top))  # type: ignore[no-any-return]


def plan_yaml(text: str) -> dict[str, Any]:
    return _compile(text)  # type: ignore[no-any-return]


def plan_files(tmp: Path, files: dict[str, str], main: str = "main.yaml") -> dict[str, Any]:
    """Write spec files (a flow and its sub-flows) into ``tmp`` and compile ``main``."""
    for name, text in files.items():
        (tmp / name).write_text(text)
    result = compile_spec(str(tmp / main))
    assert result.plan is not None, result.diagnostics
    return result.plan
