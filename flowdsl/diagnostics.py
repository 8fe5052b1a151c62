"""Diagnostics: the one error type for everything a spec can get wrong.

Stage: shared by every front-end stage (loader, text syntax, schema, checks,
compiler). Imports nothing from flowdsl. Checks *collect* diagnostics instead
of stopping at the first; each diagnostic knows its file, line, column and the
JSON pointer of the spec element it is about. The catalogue of codes lives in
``CODES`` and is documented, with an example each, in docs/diagnostics.md.
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from flowdsl.shown import visible

Severity = Literal["error", "warning"]

#: a byte that is not UTF-8 in a file name or an argument, as Python keeps it (``surrogateescape``: U+DC80-U+DCFF)
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def shown(text: object) -> str:
    """``text`` as a message shows it: each byte of a path (or an argument) that was not UTF-8, which Python keeps
    as a lone surrogate (``b\\udce9d.yaml``), written ``\\xNN`` (``b\\xe9d.yaml``), as ``--set`` shows such bytes.
    Every other character is left as it is."""
    said = str(text)
    if said.isascii() or not _UNDECODABLE.search(said):
        return said
    return _UNDECODABLE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", said)


#: the bidirectional formatting characters that reorder the text after them as it is displayed: the embeddings
#: (U+202A, U+202B), the overrides (U+202D, U+202E) and their end (U+202C), the isolates (U+2066-U+2068) and theirs
#: (U+2069) — what "Trojan Source" (CVE-2021-42574) hides code with. Refused anywhere in a spec (FD111)
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
#: the implicit marks (LEFT-TO-RIGHT MARK, RIGHT-TO-LEFT MARK, ARABIC LETTER MARK): invisible letters of one
#: direction, which prose in right-to-left languages uses; refused where a spec names or computes (FD111)
BIDI_MARKS = re.compile("[\u061c\u200e\u200f]")
#: both kinds
BIDI_ANY = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

#: characters of a user's value that a message quotes, at most
QUOTED_LENGTH = 70


def quote(value: object, limit: int = QUOTED_LENGTH) -> str:
    """A value of the user's (a name, an id, a key, some text) as a message quotes it: ``'text'``, with its
    characters that a message must not hold escaped (:func:`flowdsl.shown.visible`), and cut to ``limit``
    characters (ending ``...``) when it is longer, so that a value of any size makes a message of bounded length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"'{visible(text)}'"


#: code -> (severity, short title). Codes are stable: never renumber one.
CODES: dict[str, tuple[Severity, str]] = {
    # FD1xx: reading the file
    "FD101": ("error", "file cannot be read"),
    "FD102": ("error", "file too large"),
    "FD103": ("error", "YAML syntax error"),
    "FD104": ("error", "duplicate key"),
    "FD105": ("error", "forbidden YAML tag"),
    "FD106": ("error", "too many aliases or nodes"),
    "FD107": ("error", "nesting too deep"),
    "FD108": ("error", "text syntax error"),
    "FD109": ("error", "document is not a mapping"),
    "FD110": ("error", "invalid characters"),
    "FD111": ("error", "bidirectional control character"),
    # FD2xx: shape of the document, workers
    "FD201": ("error", "schema violation"),
    "FD202": ("error", "unknown field"),
    "FD203": ("error", "unsupported language version"),
    "FD204": ("error", "unknown worker"),
    "FD205": ("error", "worker module cannot be imported"),
    "FD206": ("error", "invalid input schema"),
    # FD3xx: structure
    "FD301": ("error", "duplicate id"),
    "FD302": ("error", "invalid id"),
    "FD303": ("error", "unknown step reference"),
    "FD304": ("error", "dependency cycle"),
    "FD305": ("error", "needs names a node outside its list"),
    "FD306": ("warning", "unreachable step"),
    "FD307": ("error", "conflicting outputs of concurrent nodes"),
    "FD308": ("error", "sub-flow cannot be loaded"),
    "FD309": ("error", "option not allowed here"),
    "FD310": ("warning", "loop variable read without $"),
    "FD311": ("warning", "text that names a field"),
    "FD312": ("warning", "switch case that never matches the value it spells"),
    "FD313": ("warning", "retry filter that names no exception class"),
    "FD314": ("warning", "read of a value that only a concurrent node writes"),
    "FD315": ("warning", "read of a value that only a step the run may pass over writes"),
    "FD316": ("error", "signal waited for by two waits"),
    "FD317": ("error", "signal wait inside a for_each without a key"),
    # FD4xx: policies
    "FD401": ("error", "invalid duration"),
    "FD402": ("error", "invalid retry policy"),
    # FD5xx: expressions
    "FD501": ("error", "expression syntax error"),
    "FD502": ("error", "undefined variable"),
    "FD503": ("error", "function not allowed"),
    "FD504": ("error", "reference to a step that is not an ancestor"),
    # FD6xx: LLM steps
    "FD601": ("error", "malformed LLM signature"),
    "FD602": ("error", "unknown LLM field type"),
    "FD603": ("error", "LLM demo does not match the signature"),
    "FD604": ("error", "LLM step's 'with' does not match the signature's inputs"),
    # FD7xx: flow test files (docs/testing.md); a test file's shape is FD1xx/FD2xx as a spec's, durations FD401
    "FD701": ("error", "test names no step of the flow"),
    "FD702": ("error", "test script or expectation does not fit the step"),
    "FD703": ("error", "flow or input under test cannot be used"),
}


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a spec, located in the file and in the document."""

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str = ""
    severity: Severity = "error"
    #: the value the message quotes after "found ", as Python prints it, for a number the file may have written
    #: otherwise (``1.10`` is read as 1.1): :meth:`Positions.locate` puts the text as written in its place
    found: str | None = field(default=None, compare=False, repr=False)
    #: placed at the value even when its code is placed at the key: an FD302 for an id written as a value
    #: (``name: my-flow``), where the key (an FD302 for a step's name) is the usual place
    at_value: bool = field(default=False, compare=False, repr=False)

    def location(self) -> str:
        """``file:line:col`` (the parts that are known)."""
        parts = [visible(shown(self.file)) if self.file else "<spec>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def format(self) -> str:
        """The compiler-style line: ``orders.yaml:14:7: error FD204: ...``."""
        where = f" (at {visible(self.path)})" if self.path and self.line is None else ""
        return f"{self.location()}: {self.severity} {self.code}: {visible(shown(self.message))}{where}"

    def to_json(self) -> dict[str, object]:
        """The fields in the documented order: code, severity, message, file, line, column, path."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "file": self.file,
                "line": self.line, "column": self.column, "path": self.path}

    def sort_key(self) -> tuple[str, int, int, str, str]:
        """The order diagnostics are reported in: by file, line, column, then code and message."""
        return (self.file or "", self.line or 0, self.column or 0, self.code, self.message)


def make(code: str, message: str, path: str = "", **where: object) -> Diagnostic:
    """A diagnostic with the catalogue's severity for ``code``; its message made one line
    (:func:`flowdsl.shown.visible`), whatever text of the user's it quotes."""
    severity = CODES[code][0]
    return Diagnostic(code=code, message=visible(message), path=path, severity=severity, **where)  # type: ignore[arg-type]


def sort_diagnostics(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sorted by file, line, column, code; exact duplicates removed."""
    return sorted(set(diags), key=Diagnostic.sort_key)


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diags)


def to_json_text(diags: Iterable[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in sort_diagnostics(diags)], indent=2, ensure_ascii=False)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a candidate is close to ``word``, else ``""``."""
    return Suggestions(candidates).hint(word)


#: comparisons one :class:`Suggestions` makes with every name before it narrows its search
SUGGESTION_BUDGET = 100_000
#: names taken on each side of a word, in each of the two sort orders, once the budget is spent
_NEIGHBOURS = 16


class Suggestions:
    """"did you mean" over one set of names, asked any number of times (every unknown name of a list).

    The suggestion is difflib's closest name (a ratio of at least 0.6; of two as close, the greater). Until
    :data:`SUGGESTION_BUDGET` comparisons have been made the word is compared with every name, so a spec of a
    normal size always gets that closest name; past it (thousands of unknown names among thousands of ids, in
    a hostile spec) only with the few dozen names that sort next to it, forwards and read backwards — a typo
    keeps one end of a name — so that each further question takes a bounded time.
    """

    def __init__(self, candidates: Iterable[str]):
        self.names = sorted(set(candidates))
        self.budget = SUGGESTION_BUDGET
        self._backwards: list[tuple[str, str]] | None = None

    def hint(self, word: str) -> str:
        """`` (did you mean 'x'?)`` when a name is close to ``word``, else ``""``."""
        pool: Sequence[str] = self.names
        if len(pool) > self.budget:
            pool = self._near(word)
        else:
            self.budget -= len(pool)
        close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else ""

    def _near(self, word: str) -> list[str]:
        if self._backwards is None:
            self._backwards = sorted((name[::-1], name) for name in self.names)
        i = bisect.bisect_left(self.names, word)
        near = set(self.names[max(0, i - _NEIGHBOURS):i + _NEIGHBOURS])
        j = bisect.bisect_left(self._backwards, (word[::-1], ""))
        near.update(name for _, name in self._backwards[max(0, j - _NEIGHBOURS):j + _NEIGHBOURS])
        return sorted(near)


class SpecError(Exception):
    """Raised by the public API when a spec has errors; carries every diagnostic."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = sort_diagnostics(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''}: see .diagnostics)" \
            if len(errors) > 1 else ""
        super().__init__(errors[0].format() + more if errors else "invalid spec")


@dataclass
class Positions:
    """JSON pointer -> (line, column) for one source file, both 1-based.

    ``key_positions`` holds where a mapping *key* was written (for errors about
    the key itself, such as an unknown field); ``positions`` where the value is.
    """

    file: str | None
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: the source text of a number whose value Python prints differently (``1e306`` prints ``1e+306``,
    #: ``0x10`` prints ``16``), for messages that quote a value as the user wrote it
    written: dict[str, str] = field(default_factory=dict)
    #: the mapping keys written in quotes or with a tag (``"1.5":``, ``!!str 1.5:``; in the text syntax a case
    #: label or a key of a ``{...}`` value written as a string): strings as the user said, where a plain key
    #: that reads as a number is most often meant as one (a switch case: FD312)
    quoted_keys: set[str] = field(default_factory=set)

    def find(self, pointer: str, *, key: bool = False) -> tuple[int | None, int | None]:
        """Position of ``pointer``, or of its nearest ancestor that has one."""
        table = self.key_positions if key else self.positions
        p = pointer
        while True:
            if p in table:
                return table[p]
            if key and p in self.positions:
                return self.positions[p]
            if not p:
                return (None, None)
            p = p.rsplit("/", 1)[0]

    def locate(self, diag: Diagnostic, *, key: bool = False) -> Diagnostic:
        """``diag`` with file, line and column filled in from its JSON path."""
        diag = self.as_written(diag)
        if diag.line is not None:
            return diag if diag.file else replace(diag, file=self.file)
        line, col = self.find(diag.path, key=key and not diag.at_value)
        return replace(diag, file=self.file, line=line, column=col)

    def as_written(self, diag: Diagnostic) -> Diagnostic:
        """``diag`` quoting the number it found as the file wrote it (``found 1.10``, not ``found 1.1``)."""
        text = self.written.get(diag.path) if diag.found is not None else None
        if text is None or f"found {diag.found}" not in diag.message:
            return diag
        shown = text if len(text) <= 40 else text[:37] + "..."
        return replace(diag, message=diag.message.replace(f"found {diag.found}", f"found {shown}", 1), found=None)


def _token(part: object) -> str:
    """One reference token of a JSON pointer, with its leading '/' (RFC 6901 escaping)."""
    text = part if type(part) is str else str(part)
    if "~" in text or "/" in text:
        text = text.replace("~", "~0").replace("/", "~1")
    return "/" + text


def pointer(*parts: object) -> str:
    """A JSON pointer from path parts (RFC 6901 escaping)."""
    return "".join([_token(p) for p in parts])


def join(base: str, *parts: object) -> str:
    if len(parts) == 1:  # the usual case: one key or index below ``base``
        return base + _token(parts[0])
    return base + "".join([_token(p) for p in parts])


def tokens(path: str) -> list[str]:
    """The reference tokens of a JSON pointer (RFC 6901)."""
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]] if path else []


def walk_pointer(data: object, parts: list[str]) -> object:
    """The element of ``data`` at the reference tokens ``parts``, or None when there is none."""
    for t in parts:
        if isinstance(data, dict):
            data = data.get(t)
        elif isinstance(data, list) and t.isdigit() and int(t) < len(data):
            data = data[int(t)]
        else:
            return None
    return data


# --- setting bad values aside ----------------------------------------------------------------

#: options whose value nothing else refers to: one that is wrong (a schema violation, a number that is
#: not finite) is set aside, so that the rest of the spec is still checked and every diagnostic is
#: reported in one run, with no error caused by its absence
SET_ASIDE = frozenset({"retry", "timeout", "concurrency", "description", "compensate", "fallback", "with", "when",
                       "fail_when", "version", "defaults"})


#: group keywords and ``wait``, in the order the schema tries them (a mapping holding one is that node, its other
#: keys its options; see :func:`node_keyword` for ``wait``)
_GROUPS = ("sequence", "parallel", "for_each", "switch", "flow", "wait")


def node_keyword(node: Mapping[object, object]) -> str | None:
    """The keyword of a mapping in a list of nodes, as the schema reads it: a group's (in :data:`_GROUPS`' order of
    precedence), ``wait``, or None for a step.

    A mapping whose one key is ``wait`` and whose value is a mapping of options or nothing is a step named ``wait``
    (``- wait: {worker: w}``, ``- wait:``), as it was before ``wait`` became a keyword; any other mapping that
    holds ``wait`` is a wait (``- wait: approval``, with its options beside it)."""
    for kw in _GROUPS:
        if kw in node:
            if kw == "wait" and len(node) == 1 and (node[kw] is None or isinstance(node[kw], dict)):
                return None
            return kw
    return None


#: options that hold more options (``defaults: {compensate: {retry: ...}}``, a compensation's mapping)
_OPTION_BLOCKS = frozenset({"defaults", "compensate"})


def option_positions(data: object, parts: list[str]) -> list[int]:
    """The indexes of the reference tokens ``parts`` that name an option where ``data`` has one.

    An option is a key of the document, of ``defaults`` (and its ``compensate``), of a step's options
    (the mapping under its name), of a compensation's mapping, or of a group or a wait. A step's name is no
    option, and nothing inside an option's value is one either — not a key of ``input``, ``with`` or ``output``,
    nor a label of a switch case (those belong to the user) — except the nodes of a group's ``steps``,
    ``branches``, ``cases`` and ``default``.
    """
    found: list[int] = []
    state, value = "options", data  # what ``parts[i]`` is below ``value``
    for i, t in enumerate(parts):
        if state == "options":
            if not isinstance(value, dict) or t not in value:
                break
            found.append(i)
            value = value[t]
            if t in ("steps", "branches", "default"):
                state = "nodes"
            elif t == "cases":
                state = "cases"
            elif t not in _OPTION_BLOCKS:
                break
        elif state == "nodes" or state == "cases":
            if isinstance(value, list) and t.isdigit() and int(t) < len(value):
                value = value[int(t)]
            elif state == "cases" and isinstance(value, dict) and t in value:
                value, state = value[t], "nodes"
                continue
            else:
                break
            if not isinstance(value, dict):
                break
            state = "options" if node_keyword(value) is not None else "step"
        else:  # "step": ``t`` is a step's name; its options come next
            if not isinstance(value, dict) or t not in value:
                break
            value, state = value[t], "options"
    return found


def aside_option(path: str, data: object) -> list[str] | None:
    """The reference tokens of the innermost option around ``path`` in ``data`` that can be set aside, or None.

    Options are matched where an option can be (:func:`option_positions`): a step named ``timeout``, or a key
    ``retry`` inside ``input``, is not one.
    """
    parts = tokens(path)
    inner = max((i for i in option_positions(data, parts) if parts[i] in SET_ASIDE), default=None)
    return None if inner is None else parts[: inner + 1]


def drop_options(data: object, cuts: list[list[str]]) -> list[str] | None:
    """Delete the options at ``cuts`` (reference tokens) from ``data``, in place; their pointers.

    An option cut whole takes the cuts inside it with it. None (and ``data`` possibly changed) when a
    cut is not a key of a mapping in ``data``.
    """
    done: list[str] = []
    for parts in sorted(cuts, key=len):
        path = pointer(*parts)
        if any(path == p or path.startswith(p + "/") for p in done):
            continue
        parent = walk_pointer(data, parts[:-1])
        if not isinstance(parent, dict) or parts[-1] not in parent:
            return None
        del parent[parts[-1]]
        done.append(path)
    return done


def set_aside_values(data: object, diags: list[Diagnostic], bad: list[str]) -> object:
    """What a front end returns as its data when the values at the pointers ``bad`` were unreadable.

    Each is set aside with the innermost option around it (:data:`SET_ASIDE`), so that the checks still
    report everything else; None (the document is not checked further) when one is not inside such an
    option. ``diags`` (the front end's diagnostics, which say what was wrong) must hold errors: the data
    returned is never compiled into a plan.
    """
    if not bad or not has_errors(diags):
        return None
    cuts = [aside_option(p, data) for p in bad]
    if any(c is None for c in cuts):
        return None
    return data if drop_options(data, [c for c in cuts if c is not None]) is not None else None
