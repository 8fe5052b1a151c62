"""The public Python API: one function per stage (load, validate, compile).

Stage: facade over the front ends, checks and compiler. Imports those stages;
nothing imports this module but ``flowdsl/__init__`` and the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowdsl.diagnostics import Diagnostic, Positions, SpecError, has_errors, join, make, sort_diagnostics
from flowdsl.source import MAX_NODES, MAX_TEXT, LoadedDoc

if TYPE_CHECKING:
    from flowdsl.model import Flow

YAML_SUFFIXES = (".yaml", ".yml")
TEXT_SUFFIXES = (".flow",)
#: codes placed at the key written in the file rather than at its value
_KEY_CODES = {"FD202", "FD302", "FD104", "FD312"}
#: nodes of a flow once its sub-flows are expanded (FD106): no more than one file may hold YAML nodes, so that
#: a spec is bounded the same way whether it is written in one file or spread over sub-flows
MAX_PLAN_NODES = MAX_NODES
#: characters of text (keys and string values) of a flow once its sub-flows are expanded (FD106), likewise
MAX_PLAN_TEXT = MAX_TEXT


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (when it is on) for one front-end pass.

    Loading and compiling allocate hundreds of thousands of long-lived objects and free no cycles
    worth collecting; the collector's repeated full passes over them cost a third of the time of a
    10,000-step spec. Reference counting still frees everything as usual.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


PathArg = str | os.PathLike[str]


def _path(value: Any, name: str, *, optional: bool = False) -> str:
    """A path argument as ``str``: a ``str`` or any ``os.PathLike`` (``pathlib.Path``); else a TypeError."""
    if value is None and optional:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        found = os.fspath(value)
        return found if isinstance(found, str) else os.fsdecode(found)
    expected = "a str, an os.PathLike (e.g. pathlib.Path) or None" if optional else \
        "a str or an os.PathLike (e.g. pathlib.Path)"
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def _text(value: Any, filename: str) -> str | LoadedDoc:
    """Spec text as ``str``: a ``str``, or bytes read as strict UTF-8 (a document carrying FD110 when they are
    not UTF-8, as for a file); any other type is a TypeError."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            from flowdsl.source import byte_position

            line, col = byte_position(raw, exc.start)
            return LoadedDoc(None, Positions(filename), [make(
                "FD110", f"text is not valid UTF-8 (byte 0x{raw[exc.start]:02x})", file=filename, line=line,
                column=col)])
    raise TypeError(f"text must be a str or UTF-8 bytes, got {type(value).__name__}")


def load_text(text: str | bytes, filename: PathArg = "spec.yaml") -> LoadedDoc:
    """Parse spec text (YAML, or the text syntax when ``filename`` ends in ``.flow``) into data with positions.

    ``text`` may be bytes: they are read as UTF-8 (FD110 when they are not)."""
    name = _path(filename, "filename")
    decoded = _text(text, name)
    if isinstance(decoded, LoadedDoc):
        return decoded
    with _gc_paused():
        return _load_text(decoded, name)


def _load_text(text: str, filename: str) -> LoadedDoc:
    if filename.endswith(TEXT_SUFFIXES):
        from flowdsl.source import check_size
        from flowdsl.textsyntax import parse_flow

        too_large = check_size(text, filename)
        return LoadedDoc(None, Positions(filename), too_large) if too_large else parse_flow(text, filename)
    from flowdsl.source import load_yaml

    return load_yaml(text, filename)


def load(path: PathArg) -> LoadedDoc:
    """Read and parse a spec file (``.yaml``/``.yml`` or ``.flow``); ``path`` is a str or ``os.PathLike``."""
    from flowdsl.source import not_regular_file, read_source

    path = _path(path, "path")

    if not path.endswith(YAML_SUFFIXES + TEXT_SUFFIXES):
        # what the path is comes first: `/dev/stdin` or a directory is no spec whatever its name
        why = not_regular_file(path)
        message = f"cannot read file: {why}" if why else "unknown file type; expected a .yaml, .yml or .flow file"
        return LoadedDoc(None, Positions(path), [make("FD101", message, file=path)])
    text, diags = read_source(path)
    if text is None:
        return LoadedDoc(None, Positions(path), diags)
    return load_text(text, path)


@dataclass
class CompileResult:
    """A compiled plan (None when the spec has errors), its source map and every diagnostic."""

    plan: dict[str, Any] | None
    source_map: dict[str, dict[str, Any]] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether a plan was compiled: no diagnostic is an error (warnings may remain)."""
        return self.plan is not None and not has_errors(self.diagnostics)


def _text_size(data: Any) -> int:
    """The characters of the keys and string values of a document's data."""
    size, stack = 0, [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(k) for k in value if isinstance(k, str))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return size


class _TooLarge(Exception):
    """The flow expands past ``MAX_PLAN_NODES`` once its sub-flows are expanded: compilation stops (FD106)."""

    def __init__(self, diag: Diagnostic):
        super().__init__(diag.message)
        self.diag = diag


class _Session:
    """One compilation: the files read so far and their positions, each sub-flow file's model (read and built
    once however often it is used), sub-flow recursion guard, and the size of each flow once expanded."""

    def __init__(self) -> None:
        self.positions: dict[str | None, Positions] = {}
        self.diags: list[Diagnostic] = []
        self.stack: list[str] = []
        #: resolved path -> (its model, or None and why it cannot be loaded)
        self.subflows: dict[str, tuple[Flow | None, str]] = {}
        #: id of a model -> (its file, resolved; its nodes and its characters of text once its sub-flows are
        #: expanded)
        self.sizes: dict[int, tuple[str, int, int]] = {}
        #: flows being built: the spec's, and the sub-flows it is reading (each within the one that uses it)
        self.building = 0

    def model(self, doc: LoadedDoc, file: str | None) -> Flow | None:
        from flowdsl.model import build_flow
        from flowdsl.schema import check_schema, set_aside

        self.positions[file] = doc.positions
        if doc.data is None:
            self.diags.extend(doc.diagnostics)
            return None
        text_syntax = bool(file and file.endswith(TEXT_SUFFIXES))
        schema_diags = [_with_file(d, file) for d in check_schema(doc.data, text_syntax=text_syntax)]
        self.diags.extend(doc.diagnostics + schema_diags)
        data = doc.data
        cut: list[str] = []
        if has_errors(schema_diags):
            # checked on without what the errors blame, when that changes nothing else (an unknown field,
            # a malformed option); else the checks stop here: they read the shape that is broken
            kept = set_aside(doc.data, schema_diags)
            if kept is None:
                return None
            data, cut = kept
        if file:
            self.stack.append(os.path.abspath(file))
        self.building += 1
        try:
            flow, diags = build_flow(data, file, self.load_subflow, doc.positions)
            self.diags.extend(d for d in diags if not any(d.path == c or d.path.startswith(c + "/") for c in cut))
            self.measure(flow, lambda: _text_size(data))
        finally:
            self.building -= 1
            if file:
                self.stack.pop()
        return flow

    def measure(self, flow: Flow, own_text: Callable[[], int]) -> None:
        """Record how many nodes and characters of text ``flow`` has once its sub-flows are expanded (each use
        adds all the nodes and text of its sub-flow, as the plan does); raise :class:`_TooLarge` at the use that
        takes it past either budget. ``own_text()``, the text of its own file, is counted only where it matters
        (in a sub-flow, or a flow that uses one: a spec without sub-flows is bounded by its file).

        The sizes of its sub-flows are known: each was measured when it was built. So a file including the next
        one twice, eighteen times over, is refused here, after reading eighteen files, instead of the compiler
        expanding its quarter of a million nodes — or, with a long description in the last file, terabytes."""
        from flowdsl.model import walk

        total = 0
        text = own_text() if self.building > 1 else None  # (a sub-flow: its text is counted at each use)
        for node in walk(flow.steps):
            total += 1
            if node.kind != "flow" or node.subflow is None:
                continue
            if text is None:
                text = own_text()
            sub_file, size, sub_text = self.sizes[id(node.subflow)]
            total += size
            text += sub_text
            if total > MAX_PLAN_NODES or text > MAX_PLAN_TEXT:
                chain = " → ".join(os.path.basename(p) for p in [*self.stack, sub_file]) if self.stack else \
                    os.path.basename(sub_file)
                what, its = (f"{MAX_PLAN_NODES} nodes", "nodes") if total > MAX_PLAN_NODES else \
                    (f"{MAX_PLAN_TEXT} characters of text (keys and values)", "text")
                raise _TooLarge(make(
                    "FD106", f"the flow expands to more than {what} once its sub-flows are expanded (each use of "
                    f"a sub-flow adds all of its {its}): {chain}", join(node.opts, "path"), file=node.loc.file))
        self.sizes[id(flow)] = (os.path.abspath(flow.file) if flow.file else "", total, text or 0)

    def load_subflow(self, rel: str, loc: Any) -> Flow | None:
        base = os.path.dirname(os.path.abspath(loc.file)) if loc.file else os.getcwd()
        path = os.path.normpath(os.path.join(base, rel))
        if path in self.stack:
            chain = " → ".join(os.path.basename(p) for p in [*self.stack, path])
            self.diags.append(make("FD308", f"sub-flow '{rel}' includes itself: {chain}", loc.path, file=loc.file))
            return None
        # read, checked and built once per file (its diagnostics said once), whatever the number of its uses
        key = os.path.realpath(path)
        if key not in self.subflows:
            self.subflows[key] = self.read_subflow(path)
        flow, why = self.subflows[key]
        if flow is None:
            self.diags.append(make("FD308", f"sub-flow '{rel}' cannot be loaded: {why}", loc.path, file=loc.file))
        return flow

    def read_subflow(self, path: str) -> tuple[Flow | None, str]:
        """The model of the sub-flow file at ``path``, or None and why it cannot be loaded."""
        doc = load(_shown(path))
        if doc.data is None and doc.diagnostics and all(d.code == "FD101" for d in doc.diagnostics):
            # an unreadable sub-flow is the including spec's error (FD308), not a usage error (FD101)
            return None, doc.diagnostics[0].message
        before = len(self.diags)
        flow = self.model(doc, _shown(path))
        if flow is None:
            return None, "; ".join(d.message for d in (self.diags[before:] or doc.diagnostics)[:1])
        return flow, ""

    def locate(self, diags: list[Diagnostic]) -> list[Diagnostic]:
        out = []
        for d in diags:
            pos = self.positions.get(d.file)
            out.append(pos.locate(d, key=d.code in _KEY_CODES) if pos else d)
        return sort_diagnostics(out)


def _shown(path: str) -> str:
    """``path`` as diagnostics show it: relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _with_file(d: Diagnostic, file: str | None) -> Diagnostic:
    from dataclasses import replace

    return replace(d, file=file)


def compile_loaded(doc: LoadedDoc, file: PathArg | None, *, check_workers: bool = False,
                   search_path: PathArg | None = None) -> CompileResult:
    """Check and compile a document already read (:func:`load` / :func:`load_text`)."""
    if not isinstance(doc, LoadedDoc):
        raise TypeError(f"doc must be the LoadedDoc of flowdsl.load() or flowdsl.load_text(), "
                        f"got {type(doc).__name__}")
    file = _path(file, "file", optional=True) or None
    search_path = _path(search_path, "search_path", optional=True) or None
    try:
        with _gc_paused():
            return _compile_checked(doc, file, check_workers, search_path)
    except RecursionError:
        # the front ends bound nesting (FD107); this is the net under the checks that walk the data recursively
        return CompileResult(None, {}, [make("FD107", "nesting too deep: the spec nests its steps or values too "
                                             "deeply to be checked", file=file)])


def _compile_checked(doc: LoadedDoc, file: str | None, check_workers: bool, search_path: str | None) -> CompileResult:
    from flowdsl.compiler import compile_flow

    session = _Session()
    try:
        flow = session.model(doc, file)
    except _TooLarge as stop:  # what was found before it still stands
        return CompileResult(None, {}, session.locate([*session.diags, stop.diag]))
    if flow is None:  # model-level errors do not hide the checks: compile_flow collects them all
        return CompileResult(None, {}, session.locate(session.diags))
    compiled = compile_flow(flow, check_workers=check_workers, search_path=search_path, extra=session.diags)
    diags = session.locate(compiled.diagnostics)
    source_map: dict[str, dict[str, Any]] = {}
    for key, (f, spec_path) in compiled.origins.items():
        line, col = session.positions[f].find(spec_path) if f in session.positions else (None, None)
        source_map[key] = {"file": f, "line": line, "column": col, "spec_path": spec_path}
    plan = compiled.plan if not has_errors(diags) else None
    return CompileResult(plan, source_map, diags)


def compile_spec(path: PathArg, *, check_workers: bool = False,
                 search_path: PathArg | None = None) -> CompileResult:
    """Load, check and compile a spec file (a str or ``os.PathLike``). ``check_workers`` imports the worker
    modules (from ``search_path``, default the current directory, then the spec's) and checks the names."""
    path = _path(path, "path")
    return compile_loaded(load(path), path, check_workers=check_workers, search_path=search_path)


def validate(path: PathArg, *, check_workers: bool = True, search_path: PathArg | None = None) -> list[Diagnostic]:
    """Every diagnostic for a spec file (a str or ``os.PathLike``), sorted (an empty list when it is valid)."""
    return compile_spec(path, check_workers=check_workers, search_path=search_path).diagnostics


def compile_text(text: str | bytes, *, filename: PathArg = "spec.yaml", check_workers: bool = False) -> dict[str, Any]:
    """Compile spec text (a str, or UTF-8 bytes) to a plan; raises :class:`SpecError` with every diagnostic
    when it has errors. ``filename`` (ending in ``.flow`` for the text syntax) is what diagnostics name."""
    name = _path(filename, "filename")
    result = compile_loaded(load_text(text, name), name, check_workers=check_workers)
    if result.plan is None:
        diagnostics = result.diagnostics
        if not name.endswith(".flow") and _TEXT_SYNTAX.match(text if isinstance(text, str) else
                                                             bytes(text).decode("utf-8", "replace")):
            hint = " (this looks like the text syntax: pass filename='NAME.flow')"
            diagnostics = [dataclasses.replace(d, message=d.message + hint) if d.code in ("FD103", "FD109") else d
                           for d in diagnostics]
        raise SpecError(diagnostics)
    return result.plan


#: text whose first statement is `flow NAME` (after blank lines and comments): the text syntax, read as YAML
_TEXT_SYNTAX = re.compile(r"\A\ufeff?(?:[ \t]*(?:#[^\n]*)?\r?\n)*flow[ \t]+[A-Za-z_]")


def plan_bytes(plan: dict[str, Any]) -> bytes:
    """Canonical bytes of a plan (sorted keys): identical for equivalent specs."""
    from flowdsl.compiler import plan_bytes as _pb

    if not isinstance(plan, dict):
        raise TypeError(f"plan must be an execution plan (a dict, the 'plan' of flowdsl.compile_spec()), "
                        f"got {type(plan).__name__}")
    return _pb(plan)
