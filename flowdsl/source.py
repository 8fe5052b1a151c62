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


# --- limits -----------------------------------------------------------------

MAX_BYTES = 4 * 1024 * 1024  # a spec file larger than this is refused (FD102)
MAX_NODES = 500_000  # YAML nodes after alias expansion (FD106)
MAX_FLOW_DEPTH = 100  # [ { nesting (FD107), checked before any YAML parser runs
MAX_INDENT = 1000  # columns of block indentation (FD107), idem

_ALLOWED_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """The text of a spec file, or diagnostics FD101 (unreadable), FD102 (too large), FD110 (not UTF-8)."""
    import os

    from flowdsl.diagnostics import make

    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            return None, [make("FD102", f"file is {size} bytes; the limit is {MAX_BYTES} bytes", file=path)]
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        return None, [make("FD101", f"cannot read file: {exc.strerror or exc}", file=path)]
    if len(raw) > MAX_BYTES:
        return None, [make("FD102", f"file is larger than the limit of {MAX_BYTES} bytes", file=path)]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [make("FD110", f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                           file=path, line=line, column=col)]


def check_text(text: str, file: str | None) -> list[Diagnostic]:
    """Checks made before any parser sees the text: control characters, nesting depth.

    libyaml's C parser crashes on very deep nesting, and the Python one
    recurses, so depth is bounded here, on the raw text, first.
    """
    from flowdsl.diagnostics import make

    diags: list[Diagnostic] = []
    depth = 0
    quote = ""
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip(" -?")
        indent = len(line) - len(stripped)
        if indent > MAX_INDENT:
            diags.append(make("FD107", f"nesting too deep: indentation of {indent} columns (the limit is {MAX_INDENT})",
                              file=file, line=lineno, column=1))
            return diags
        for col, ch in enumerate(line, 1):
            if (ch < " " and ch not in "\t\r") or ch == "\x7f" or "\x80" <= ch <= "\x9f":
                diags.append(make("FD110", f"control character U+{ord(ch):04X} is not allowed in a spec",
                                  file=file, line=lineno, column=col))
                return diags
            if quote:
                if ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch == "#" and (col == 1 or line[col - 2] in " \t"):
                break
            elif ch in "[{":
                depth += 1
                if depth > MAX_FLOW_DEPTH:
                    diags.append(make("FD107", f"nesting too deep: more than {MAX_FLOW_DEPTH} levels of brackets",
                                      file=file, line=lineno, column=col))
                    return diags
            elif ch in "]}":
                depth = max(0, depth - 1)
        quote = ""  # a quoted scalar spanning lines is rare; only depth needs to be conservative
    return diags


def load_yaml(text: str, file: str | None = None) -> LoadedDoc:
    """Parse YAML text into plain JSON-like data with a position for every element.

    Safe by construction: only the core tags are accepted (no ``!!python/``),
    aliases are expanded under a node budget, nesting is bounded before parsing,
    duplicate keys are reported, and the result holds only dict, list, str, int,
    float, bool and None.
    """
    import yaml

    from flowdsl.diagnostics import make

    positions = Positions(file)
    pre = check_text(text, file)
    if pre:
        return LoadedDoc(None, positions, pre)
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        nodes = list(yaml.compose_all(text, Loader=loader_cls))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        where = {"line": mark.line + 1, "column": mark.column + 1} if mark else {}
        ctx = f" ({exc.context})" if exc.context and exc.problem else ""
        return LoadedDoc(None, positions, [make("FD103", f"{problem}{ctx}", file=file, **where)])
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        return LoadedDoc(None, positions, [make("FD103", f"invalid YAML: {exc}", file=file)])
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        empty = "the document is empty; expected a mapping with 'flowdsl', 'name' and 'steps'"
        return LoadedDoc(None, positions, [make("FD109", empty, file=file, line=1, column=1)])
    if len(nodes) > 1:
        m = nodes[1].start_mark
        return LoadedDoc(None, positions, [make("FD103", "expected a single YAML document, found another one here",
                                                file=file, line=m.line + 1, column=m.column + 1)])
    builder = _Builder(file, positions)
    try:
        if builder.size(nodes[0]) > MAX_NODES:
            return LoadedDoc(None, positions, [make(
                "FD106", f"the document expands to more than {MAX_NODES} nodes once its aliases are expanded",
                file=file, line=1, column=1)])
        data = builder.build(nodes[0], "")
    except RecursionError:
        return LoadedDoc(None, positions, [make("FD107", "nesting too deep", file=file, line=1, column=1)])
    if builder.diagnostics:
        return LoadedDoc(None, positions, builder.diagnostics)
    if not isinstance(data, dict):
        return LoadedDoc(None, positions, [make(
            "FD109", f"the document is a {_kind(data)}; expected a mapping with 'flowdsl', 'name' and 'steps'",
            file=file, line=1, column=1)])
    return LoadedDoc(data, positions, [])


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


class _Builder:
    """Turns a composed YAML node graph into plain data, recording positions."""

    def __init__(self, file: str | None, positions: Positions):
        import yaml

        self.file = file
        self.positions = positions
        self.diagnostics: list[Diagnostic] = []
        self._scalars = yaml.constructor.SafeConstructor()
        self._sizes: dict[int, int] = {}

    def size(self, node: Any) -> int:
        """Node count after alias expansion, memoised so a billion-laughs document costs nothing to measure."""
        import yaml

        key = id(node)
        if key in self._sizes:
            return self._sizes[key]
        self._sizes[key] = MAX_NODES + 1  # a cycle through aliases counts as too large
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(self.size(k) + self.size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(self.size(v) for v in node.value)
        else:
            total = 1
        self._sizes[key] = min(total, MAX_NODES + 1)
        return self._sizes[key]

    def _error(self, code: str, message: str, node: Any, path: str) -> None:
        from flowdsl.diagnostics import make

        m = node.start_mark
        self.diagnostics.append(make(code, message, path, file=self.file, line=m.line + 1, column=m.column + 1))

    def build(self, node: Any, path: str) -> Any:
        import yaml

        from flowdsl.diagnostics import join

        m = node.start_mark
        self.positions.positions[path] = (m.line + 1, m.column + 1)
        if node.tag not in _ALLOWED_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self._error("FD105", f"the YAML tag '{tag}' is not allowed (flowdsl loads plain data only)", node, path)
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            first: dict[str, int] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    self._error("FD201", "mapping keys must be plain strings", knode, path)
                    continue
                if knode.tag == "tag:yaml.org,2002:merge" or (knode.value == "<<" and not knode.style):
                    self._error("FD105", "YAML merge keys ('<<') are not supported; use 'defaults:'", knode, path)
                    continue
                key = knode.value
                sub = join(path, key)
                if key in first:
                    self._error("FD104", f"duplicate key '{key}' (first written on line {first[key]})", knode, sub)
                    continue
                first[key] = knode.start_mark.line + 1
                self.positions.key_positions[sub] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                out[key] = self.build(vnode, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, join(path, i)) for i, v in enumerate(node.value)]
        value = self._scalars.construct_object(node, deep=True)
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value  # dates stay the text written: the spec model is JSON
        if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
            self._error("FD201", f"'{node.value}' is not a finite number", node, path)
            return None
        return value
