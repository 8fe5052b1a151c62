"""Front end: reading YAML spec files with source positions, safely.

Stage: front end. Imports ``flowdsl.diagnostics`` only (and PyYAML, lazily).

The document is built straight from the YAML parser's event stream, by a loop
with an explicit stack, never by PyYAML's composer: libyaml's parser is a state
machine that is safe at any depth, but composing (C or Python) recurses once per
nesting level, and the C composer overflows the stack and crashes the process
past ~40,000 levels. Bounds are applied while the events arrive, before any
node beyond them is built: depth (FD107), nodes and characters of text after alias
expansion (FD106, so a billion-laughs document, of short or of long strings, stops
after at most ``MAX_NODES`` units of work and ``MAX_TEXT`` characters), and size
(FD102) before the parser sees the text at all.

Scalars are resolved by YAML 1.2's core schema, with the few restrictions that
make it agree with the text syntax (``read_number``, ``WORD_VALUES``): no YAML 1.1
``yes``/``on``/``0777``/``1_000``/``1:30``, which stay strings. A number that is
not finite is set aside with the option around it (FD201), so that the rest of
the spec is still checked.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowdsl.diagnostics import BIDI_ANY, BIDI_CONTROLS, Diagnostic, Positions, join, make, set_aside_values


@dataclass
class LoadedDoc:
    """A spec document as plain data, where each part of it was written, and what went wrong reading it.

    ``data`` is None when the document could not be read at all. When a value could not be read (a
    number that is not finite) and only then, ``data`` is the rest of the document, without the option
    around that value, and ``diagnostics`` say what was wrong: it is checked, never compiled.
    """

    data: Any
    positions: Positions
    diagnostics: list[Diagnostic] = field(default_factory=list)


# --- limits -----------------------------------------------------------------

MAX_BYTES = 4 * 1024 * 1024  # a spec larger than this is refused (FD102)
MAX_NODES = 500_000  # YAML nodes after alias expansion (FD106)
#: characters of text (keys and scalar values) after alias expansion (FD106): no more than a file of ``MAX_BYTES``
#: can hold written out, so that aliases of long strings cannot make a document larger than the largest file
MAX_TEXT = MAX_BYTES
MAX_DEPTH = 100  # nested mappings and lists (FD107); a real spec nests a few dozen levels at most
TOO_DEEP = f"nesting too deep: more than {MAX_DEPTH} levels of mappings and lists"

_CORE = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ = _CORE + "str", _CORE + "map", _CORE + "seq"
#: scalar tags that are kept as the text written (a spec is JSON: no dates, no '=' values)
_TEXT_TAGS = {_STR, _CORE + "timestamp", _CORE + "value", _CORE + "merge"}
_VALUE_TAGS = {_CORE + "int", _CORE + "float", _CORE + "bool", _CORE + "null"}
#: control characters: never in a spec's text, nor in a string written with escapes ("\x07");
#: tab, newline and carriage return are allowed in values, but not in keys. A lone surrogate (half of a
#: UTF-16 pair, such as the escape "\ud800") is no character at all: refused wherever it is
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_KEY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: what the text of a spec may not hold: control characters, lone surrogates, non-characters
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def control_character(text: str, *, key: bool = False) -> str | None:
    """The FD110 message for the first control character in a string (a key when ``key``), else None.

    Both front ends apply it to every string once escapes are read, so ``"\\u001b"`` is refused as a
    raw ESC would be, and ``"\\ud800"`` (a lone surrogate, which no UTF-8 file can hold) too.
    """
    bad = (_KEY_CONTROL if key else _CONTROL).search(text)
    if bad is None:
        return None
    code = ord(bad.group())
    where = "a key" if key else "a spec"
    if 0xD800 <= code <= 0xDFFF:
        return (f"lone surrogate U+{code:04X} is not allowed in {where}: it is half of a UTF-16 surrogate pair, "
                "not a character")
    return f"control character U+{code:04X} is not allowed in {where}"


#: lines of a spec's text whose bidirectional control character is reported (FD111), at most: the first of each
MAX_BIDI_LINES = 20


def _bidi_name(char: str) -> str:
    import unicodedata

    return f"U+{ord(char):04X} ({unicodedata.name(char)})"


def bidi_character(text: str, *, key: bool = False) -> str | None:
    """The FD111 message for the first bidirectional control character in a string once its escapes are read,
    else None: an embedding, override or isolate anywhere; in a key (``key``) one of the marks (U+200E, U+200F,
    U+061C) too. Both front ends apply it to every key and string value; :func:`bidi_characters` finds the ones
    written as they are, in the text."""
    bad = (BIDI_ANY if key else BIDI_CONTROLS).search(text)
    if bad is None:
        return None
    char = bad.group()
    if BIDI_CONTROLS.match(char):
        return _bidi_message(char, ", even as an escape")
    return (f"bidirectional mark {_bidi_name(char)} is not allowed in a key: it is invisible, and can change the "
            "order in which the text around it is displayed (marks are allowed in text values)")


def _bidi_message(char: str, how: str = "") -> str:
    return (f"bidirectional control character {_bidi_name(char)} is not allowed in a spec{how}: it makes the text "
            "after it display in another order than it is read")


def bidi_characters(text: str, file: str | None) -> list[Diagnostic]:
    """FD111 at the first bidirectional control character (embedding, override, isolate) written as it is on each
    line of ``text`` that holds one — in a key, a value or a comment — for the first :data:`MAX_BIDI_LINES` such
    lines. Unlike FD110, reading goes on: these characters do not stop a parser."""
    if BIDI_CONTROLS.search(text) is None:
        return []
    bom = int(text.startswith("\ufeff"))
    lines = _Lines(text[bom:])
    found: list[Diagnostic] = []
    match = BIDI_CONTROLS.search(text, bom)
    while match is not None and len(found) < MAX_BIDI_LINES:
        line, column = lines.where(match.start() - bom)
        found.append(make("FD111", _bidi_message(match.group()), file=file, line=line, column=column))
        if line >= len(lines.starts):
            break
        match = BIDI_CONTROLS.search(text, lines.starts[line] + bom)  # from the next line on
    return found


# --- how scalars are read: the one rule of both syntaxes (docs/language.md, "How values are read") -------

#: the words that are values; every other word is a string
WORD_VALUES: dict[str, Any] = {
    "true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
    "null": None, "Null": None, "NULL": None,
}  # fmt: skip
#: YAML only (the text syntax cannot write them): ``~`` and nothing at all are null
_YAML_NULLS = ("~", "")
#: decimal integers without leading zeros; ``0o`` octal and ``0x`` hexadecimal integers
_INT_RE = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_RADIX_RE = re.compile(r"0(?:o[0-7]+|x[0-9a-fA-F]+)\Z")
#: decimal numbers with a fraction or an exponent (``1.5``, ``1.``, ``.5``, ``1e3``), no leading zeros
_FLOAT_RE = re.compile(r"[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
#: YAML's names for infinity and not-a-number: read as numbers, and refused (not JSON)
_SPECIAL_RE = re.compile(r"[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z")
#: longest integer read, in decimal digits (Python refuses to convert longer ones to and from text)
MAX_DIGITS = 4000
#: the smallest integer of more than ``MAX_DIGITS`` decimal digits
_TOO_MANY_DIGITS = 10**MAX_DIGITS


class NumberError(ValueError):
    """A scalar that spells a number a spec cannot hold: not finite, or too many digits."""


def read_number(text: str) -> int | float | None:
    """The number a plain (unquoted) scalar spells, or None when it is a string.

    Raises NumberError (its message says what was found and expected) for ``.inf``, ``.nan``, a
    number beyond the range of a double (``1e999``) and an integer of more than ``MAX_DIGITS`` digits
    (counted in decimal, however it is written: ``0x`` and ``0o`` integers by their value).
    """
    if _INT_RE.match(text):
        if len(text.lstrip("+-")) > MAX_DIGITS:
            raise NumberError(f"the number '{text[:20]}...' has more than {MAX_DIGITS} digits")
        return int(text)
    if _RADIX_RE.match(text):
        integer = int(text[2:], 8 if text[1] == "o" else 16)  # linear in the length: bases 8 and 16
        if integer >= _TOO_MANY_DIGITS:
            raise NumberError(f"the number '{text[:20]}...' has more than {MAX_DIGITS} digits once written in "
                              f"decimal; expected an integer of at most {MAX_DIGITS} digits")
        return integer
    if _FLOAT_RE.match(text) and any(c in text for c in ".eE"):
        value = float(text)
        if not math.isfinite(value):
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise NumberError(f"'{shown}' is not a finite number: it is beyond the largest number, about "
                              "1.8e308; expected a finite number")
        return value
    if _SPECIAL_RE.match(text):
        raise NumberError(f"'{text}' is not a finite number; expected a finite number (a spec holds JSON data)")
    return None


_BOOL_TAG, _NULL_TAG, _INT_TAG, _FLOAT_TAG = (_CORE + t for t in ("bool", "null", "int", "float"))


def _construct(tag: str, text: str, implicit: bool) -> Any:
    """The value of a scalar resolved (``implicit``) or tagged ``tag``; NumberError or ValueError when it
    does not spell one."""
    if tag == _BOOL_TAG and isinstance(WORD_VALUES.get(text), bool):
        return WORD_VALUES[text]
    if tag == _NULL_TAG and (text in _YAML_NULLS or (text in WORD_VALUES and WORD_VALUES[text] is None)):
        return None
    if tag in (_INT_TAG, _FLOAT_TAG):
        value = read_number(text)
        if isinstance(value, int) and tag == _INT_TAG:
            return value
        if value is not None and tag == _FLOAT_TAG:
            return value if implicit else float(value)
    raise ValueError(f"'{text[:40]}' is not a valid {tag.replace(_CORE, '!!')}")


@functools.cache
def core_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    """PyYAML implicit resolvers (first character -> [(tag, regexp)]) for the rule above: YAML 1.2's core
    schema, with no leading-zero integers. The loader resolves plain scalars with these; the YAML writer
    quotes every string that these (or PyYAML's YAML 1.1 ones) would read as something else."""
    import yaml

    class CoreResolver(yaml.resolver.BaseResolver):
        yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012

    # tried in this order for a scalar's first character: a float pattern that matches an integer never
    # sees one, since the int pattern matched first
    CoreResolver.add_implicit_resolver(_BOOL_TAG, re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z"),
                                       list("tTfF"))
    CoreResolver.add_implicit_resolver(_NULL_TAG, re.compile(r"(?:~|null|Null|NULL|)\Z"), ["~", "n", "N", ""])
    CoreResolver.add_implicit_resolver(_INT_TAG, re.compile(f"{_INT_RE.pattern}|{_RADIX_RE.pattern}"),
                                       list("-+0123456789"))
    CoreResolver.add_implicit_resolver(_FLOAT_TAG, re.compile(f"{_FLOAT_RE.pattern}|{_SPECIAL_RE.pattern}"),
                                       list("-+.0123456789"))
    return CoreResolver.yaml_implicit_resolvers


@functools.cache
def core_loader() -> Any:
    """PyYAML's safe loader (libyaml's when available) resolving plain scalars by :func:`core_resolvers`.

    ``yaml.load(text, Loader=core_loader())`` reads values as flowdsl does; ``load_yaml`` drives its
    parser itself (positions, bounds) and resolves with the same table.
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return type("CoreLoader", (base,), {"yaml_implicit_resolvers": core_resolvers()})


class _Stop(Exception):
    """A problem after which the rest of the document is not read."""

    def __init__(self, diag: Diagnostic):
        super().__init__(diag.message)
        self.diag = diag


def _child(path: str, key: str | int) -> str:
    """``join(path, key)`` for one part, without the escaping work when there is nothing to escape."""
    if type(key) is str and ("~" in key or "/" in key):
        return join(path, key)
    return f"{path}/{key}"


#: line breaks as a text editor counts them, and as the text syntax reads them: CR LF, LF, or CR alone
_BREAK = re.compile(r"\r\n?|\n")


class _Lines:
    """Where each line of a text starts, to turn a character index into a 1-based line and column."""

    __slots__ = ("starts",)

    def __init__(self, text: str):
        self.starts = [0, *(m.end() for m in _BREAK.finditer(text))]

    def where(self, index: int) -> tuple[int, int]:
        index = max(index, 0)
        line = bisect.bisect_right(self.starts, index)
        return line, index - self.starts[line - 1] + 1


def _where(text: str, index: int) -> tuple[int, int]:
    """The line and column of ``text[index]``, both 1-based, counting CR LF, LF and a lone CR as line breaks."""
    return _Lines(text).where(index)


def _mark_position(mark: Any) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


class _Marks:
    """Where the YAML parser's marks are in the text, as a text editor shows it (line breaks: CR LF, LF, CR).

    libyaml (and PyYAML's Python parser) also break lines at U+2028 and U+2029 (and U+0085, which
    ``check_text`` refuses first), so in a text holding one, later marks' line and column are off: there
    the position is computed from the mark's character index instead. libyaml's index does not count a
    leading byte order mark; the Python parser's does.
    """

    def __init__(self, text: str, loader: Any):
        import yaml

        bom = text.startswith("\ufeff")
        #: characters of ``text`` before the parser's index 0
        self.skip = 1 if bom and isinstance(loader, getattr(yaml, "CSafeLoader", ())) else 0
        self.bom = int(bom)
        self.lines = _Lines(text[self.bom:]) if "\u2028" in text or "\u2029" in text else None
        #: ``position(mark)``: the (line, column) of a mark
        self.position = _mark_position if self.lines is None else self._shifted

    def index(self, mark: Any) -> int:
        """The index in the text of the character at ``mark``."""
        return int(mark.index) + self.skip

    def _shifted(self, mark: Any) -> tuple[int, int]:
        assert self.lines is not None
        return self.lines.where(self.index(mark) - self.bom)


def too_deep(data: Any, limit: int = MAX_DEPTH) -> str | None:
    """The JSON pointer of the first element nested deeper than ``limit`` mappings/lists, else None.

    The YAML loader enforces the limit while it parses; front ends that build data another way
    (the text syntax) check their result with this, so both syntaxes accept the same nesting.
    """
    from flowdsl.diagnostics import join

    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, ptr = stack.pop()
        if isinstance(value, dict | list):
            if depth >= limit:
                return ptr
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, depth + 1, join(ptr, k)) for k, v in items)
    return None


#: what a path that is not a regular file is, for the FD101 message
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """Why a file of ``mode`` cannot be a spec (``not a regular file (a FIFO)``), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind})"


def not_regular_file(path: str) -> str | None:
    """Why ``path`` names no regular file (``not a regular file (a directory)``), or None when it does or
    cannot be looked at (reading it then says why). Nothing is opened."""
    try:
        return _not_regular(os.stat(path).st_mode)
    except OSError:
        return None


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """The text of a spec file, or diagnostics FD101 (unreadable, or not a regular file), FD102 (too large),
    FD110 (not UTF-8).

    Only a regular file (or a link to one) is read: opening a FIFO waits for a writer, forever, and a
    device (``/dev/stdin``, ``/dev/zero``) is no spec file. The path is checked before it is opened, and
    the file opened (without waiting) is checked again, in case the path was replaced in between.
    """
    try:
        why = _not_regular(os.stat(path).st_mode)
        if why is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            with open(fd, "rb") as fh:
                info = os.fstat(fd)
                why = _not_regular(info.st_mode)
                if why is None and info.st_size > MAX_BYTES:
                    return None, [make("FD102", f"file is {info.st_size} bytes; the limit is {MAX_BYTES} bytes",
                                       file=path)]
                raw = fh.read(MAX_BYTES + 1) if why is None else b""
    except OSError as exc:
        return None, [make("FD101", f"cannot read file: {exc.strerror or exc}", file=path)]
    if why is not None:
        return None, [make("FD101", f"cannot read file: {why}", file=path)]
    if len(raw) > MAX_BYTES:
        return None, [make("FD102", f"file is larger than the limit of {MAX_BYTES} bytes", file=path)]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line, col = byte_position(raw, exc.start)
        return None, [make("FD110", f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                           file=path, line=line, column=col)]


def byte_position(raw: bytes, start: int) -> tuple[int, int]:
    """The line and column (1-based; in characters, as a text editor counts them) of the byte ``raw[start]``,
    the first that is not UTF-8: everything before it is."""
    before = raw[:start].decode("utf-8").removeprefix("\ufeff")
    return _where(before, len(before))


def check_size(text: str | bytes, file: str | None) -> list[Diagnostic]:
    """FD102 when ``text`` is more than ``MAX_BYTES`` bytes (UTF-8) long, else nothing."""
    if len(text) <= MAX_BYTES // 4 or (isinstance(text, bytes) and len(text) <= MAX_BYTES):
        return []
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        return [make("FD102", f"the spec is {size} bytes; the limit is {MAX_BYTES} bytes", file=file)]
    return []


def check_text(text: str, file: str | None) -> list[Diagnostic]:
    """Checks made before any parser sees the text: its size (FD102) and control characters (FD110)."""
    too_large = check_size(text, file)
    if too_large:
        return too_large
    return bad_character(text, file)


def bad_character(text: str, file: str | None) -> list[Diagnostic]:
    """FD110 at the first character a spec's text may not hold (a control character, a lone surrogate, a
    noncharacter), else nothing: what both front ends check before parsing."""
    bad = _BAD_TEXT.search(text)
    if bad is None:
        return []
    line, col = _where(text, bad.start())
    code = ord(bad.group())
    what = ("invalid character (not UTF-8)" if 0xD800 <= code <= 0xDFFF
            else "noncharacter" if code >= 0xFFFE else "control character")
    return [make("FD110", f"{what} U+{code:04X} is not allowed in a spec", file=file, line=line, column=col)]


def load_yaml(text: str, file: str | None = None) -> LoadedDoc:
    """Parse YAML text into plain JSON-like data with a position for every element.

    Safe by construction: only the core tags are accepted (no ``!!python/``),
    aliases are expanded under a budget of nodes and one of characters, nesting
    depth and size are bounded, duplicate keys are reported, bidirectional
    control characters too (FD111), and the result holds only dict, list, str,
    int, float, bool and None. Mapping keys are the text written.
    """
    import yaml

    positions = Positions(file)
    pre = check_text(text, file)
    if pre:
        return LoadedDoc(None, positions, pre)
    bidi = bidi_characters(text, file)  # (reading goes on: what else is wrong is reported with them)
    loader = core_loader()(text)
    marks = _Marks(text, loader)
    builder = _Builder(loader, file, positions, marks.position, text, marks.index)
    try:
        data = builder.run()
    except _Stop as stop:  # what was found before it still stands
        return LoadedDoc(None, positions, [*bidi, *builder.diagnostics, stop.diag])
    except yaml.MarkedYAMLError as exc:
        return LoadedDoc(None, positions, [*bidi, _syntax_error(exc, text, marks, file)])
    except (yaml.YAMLError, ValueError) as exc:
        return LoadedDoc(None, positions, [*bidi, make("FD103", f"invalid YAML: {exc}", file=file)])
    finally:
        loader.dispose()
    diagnostics = [*bidi, *builder.diagnostics]
    if diagnostics:
        unreadable = len(builder.bad_values) < len(diagnostics) or not isinstance(data, dict)
        kept = None if unreadable else set_aside_values(data, diagnostics, builder.bad_values)
        return LoadedDoc(kept, positions, diagnostics)
    if not builder.documents:
        return LoadedDoc(None, positions, [make("FD109", EMPTY_DOCUMENT, file=file, line=1, column=1)])
    if not isinstance(data, dict):
        return LoadedDoc(None, positions, [make(
            "FD109", f"the document is a {_kind(data)}; expected a mapping with 'flowdsl', 'name' and 'steps'",
            file=file, line=1, column=1)])
    return LoadedDoc(data, positions, [])


#: FD109 for a file with nothing but comments and blank lines, in either syntax
EMPTY_DOCUMENT = "the document is empty; expected a mapping with 'flowdsl', 'name' and 'steps'"

_TAB_MESSAGE = ("found a tab: YAML cannot be indented with tabs, nor can a tab separate '-' or 'key:' from what "
                "follows in block style; use spaces")


def _syntax_error(exc: Any, text: str, marks: _Marks, file: str | None) -> Diagnostic:
    """The diagnostic for a YAML parser error: FD103 saying what the parser found, where.

    FD107 for libyaml's own depth bound (PyYAML >= 6.0.4), FD110 for an escape that writes no character
    (``"\\ud800"``: the rule of ``control_character``, applied by libyaml before any string is built).
    """
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    where: dict[str, Any] = {}
    if mark is not None:
        where["line"], where["column"] = marks.position(mark)
    if problem.startswith("exceeded maximum nesting depth"):
        return make("FD107", TOO_DEEP, file=file, **where)
    if problem == "found invalid Unicode character escape code" and mark is not None:
        message = _bad_escape(text, marks.index(mark))
        if message is not None:  # at the string, as for the escape of a control character
            string = exc.context_mark or mark
            line, column = marks.position(string)
            return make("FD110", message, file=file, line=line, column=column)
    ctx = f" ({exc.context})" if exc.context and exc.problem else ""
    if ctx and exc.context_mark and exc.problem_mark:
        started = marks.position(exc.context_mark)[0]
        if started != marks.position(exc.problem_mark)[0]:
            ctx = f" ({exc.context} started on line {started})"
    if mark is not None and text[marks.index(mark):marks.index(mark) + 1] == "\t":
        return make("FD103", _TAB_MESSAGE, file=file, **where)
    if mark is not None:
        ctx += _indent_hint(exc, text, marks) or _quote_hint(text, marks.index(mark))
    separator = _SEPARATOR.search(text)
    if separator is not None:  # the YAML reader takes it for a line break, and the error shows a mess instead
        line = _where(text, separator.start())[0]
        ctx += (f"; note: line {line} holds U+{ord(separator.group()):04X}, which the YAML reader takes for a line "
                "break: write that value in quotes")
    return make("FD103", f"{problem}{ctx}", file=file, **where)


def _line_text(text: str, lines: _Lines, line: int) -> str:
    """The text of the 1-based ``line``, without its line break."""
    end = lines.starts[line] if line < len(lines.starts) else len(text)
    return text[lines.starts[line - 1]:end].rstrip("\r\n")


def _indent_hint(exc: Any, text: str, marks: _Marks) -> str:
    """For a key indented between two levels — one space short of its siblings (libyaml: "did not find expected
    key" in a block mapping, at the first character of a line): the columns the keys around it start at.

    The mapping started at the context mark has its keys at that mark's column; the lines after it that are
    indented deeper are the value of its last key. A line starting between the two belongs to neither.
    """
    if (exc.problem != "did not find expected key" or exc.context != "while parsing a block mapping"
            or exc.context_mark is None or exc.problem_mark is None):
        return ""
    lines = _Lines(text)
    at = marks.index(exc.problem_mark)
    line, column = lines.where(at)
    if text[lines.starts[line - 1]:at].strip(" "):
        return ""  # not at the first character of its line: not a matter of indentation
    started, keys = lines.where(marks.index(exc.context_mark))
    inner: tuple[int, int] | None = None  # (column, line) where the block inside the mapping's last key starts
    for n in range(line - 1, started, -1):
        body = _line_text(text, lines, n)
        content = body.lstrip(" ")
        if not content or content.startswith("#"):
            continue
        indent = len(body) - len(content) + 1
        if indent <= keys:
            break
        if inner is None or indent <= inner[0]:
            inner = (indent, n)
    if inner is None or not keys < column < inner[0]:
        return ""
    return (f"; check the indentation of line {line}: it starts at column {column}, but the mapping started on "
            f"line {started} has its keys at column {keys}, and the block inside it (line {inner[1]}) starts at "
            f"column {inner[0]}; a key starts in exactly the column of its sibling keys")


def _quote_hint(text: str, at: int) -> str:
    """For a parser error just after a double-quoted value that opens an expression (``${``) and does not close it:
    a ``"`` inside a double-quoted expression (``"${ amount + "x" }"``) ended the value. How to write it instead."""
    j = at - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    if j < 0 or text[j] != '"':
        return ""
    first = max(0, j - 2000)
    k = text.rfind('"', first, j)  # the opening quote: the nearest '"' before that no backslash escapes
    while k >= 0 and (k - len(text[first:k].rstrip("\\")) - first) % 2:
        k = text.rfind('"', first, k)
    if k < 0:
        return ""
    value = text[k + 1:j]
    opened = value.rfind("${")
    if opened < 0 or "}" in value[opened:] or "\n" in value or "\r" in value:
        return ""
    said = f"; note: the value {text[k:j + 1]} ends at the '\"' that was meant to start a string inside its expression"
    rest = re.match(r'[^"\r\n\\]*"[^"\r\n\\]*\}\s*"', text[at:at + 2000])
    meant = text[k + 1:at + rest.end() - 1] if rest else ""
    if not rest or "'" in meant or "\\" in meant:  # (an escape means something else inside '...')
        return f"{said}: write the expression's strings in single quotes, or quote the whole value with '...'"
    return (f"{said}: write the expression's strings in single quotes (\"{meant.replace(chr(34), chr(39))}\"), or "
            f"quote the whole value with '...' ('{meant}')")


#: LINE SEPARATOR and PARAGRAPH SEPARATOR: breaks for PyYAML (YAML 1.1), plain characters for YAML 1.2
_SEPARATOR = re.compile("[\u2028\u2029]")


def _bad_escape(text: str, index: int) -> str | None:
    """For libyaml's refusal of the escape whose hex digits start at ``text[index]``: the FD110 message; None
    when the text there is not such an escape."""
    width = {"u": 4, "U": 8}.get(text[index - 1:index])
    digits = text[index:index + width] if width is not None else ""
    if width is None or not re.fullmatch(f"[0-9a-fA-F]{{{width}}}", digits):
        return None
    code = int(digits, 16)
    escape = f"\\{text[index - 1]}{digits}"
    if 0xD800 <= code <= 0xDFFF:
        return (f"the escape '{escape}' writes the lone surrogate U+{code:04X}, which is not allowed in a spec: it "
                "is half of a UTF-16 surrogate pair, not a character; write the character itself, or escape it "
                "as \\U and 8 hex digits ('\\U0001F600')")
    return f"the escape '{escape}' writes U+{code:X}, which is beyond U+10FFFF, the last Unicode character"


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


#: a mapping entry whose value is read and dropped (its key was a duplicate or not a string)
_DROP = object()
#: a mapping key that is a mapping or a list, being read (and dropped): its value comes next
_DROP_KEY = object()


class _Frame:
    """A mapping or list being built: its data, JSON pointer, nodes below it, and the pending key."""

    __slots__ = ("anchor", "chars", "data", "key", "keys", "ok", "path", "size")

    def __init__(self, data: Any, path: str, anchor: str | None, ok: bool, chars: int):
        self.data = data
        self.path = path
        self.anchor = anchor
        self.ok = ok  # False: an error was reported here; the finished value is dropped
        self.size = 1
        self.chars = chars  # the document's characters of text before it: its own are those counted since
        self.key: Any = None  # mapping: the key awaiting its value (None: next scalar is a key)
        self.keys: dict[str, int] = {}  # mapping: key -> line it was first written on


class _Builder:
    """Turns the parser's events into plain data, recording positions; no recursion."""

    def __init__(self, loader: Any, file: str | None, positions: Positions,
                 position: Callable[[Any], tuple[int, int]] = _mark_position, text: str = "",
                 index: Callable[[Any], int] | None = None):
        import yaml

        self.loader = loader
        self.text = text  # the text parsed, and the index in it of a mark: where a scalar is written
        self.index = index if index is not None else (lambda mark: int(mark.index))
        self.file = file
        self.positions = positions
        self.position = position  # a mark's (line, column) in the text (``_Marks.position``)
        self.diagnostics: list[Diagnostic] = []
        self.documents = 0
        self.total = 0  # nodes, aliases expanded (FD106)
        self.chars = 0  # characters of keys and scalar values, aliases expanded (FD106)
        #: anchor -> (value, nodes, characters of text); None while the anchored node is open
        self.anchors: dict[str, tuple[Any, int, int] | None] = {}
        self.resolvers = loader.yaml_implicit_resolvers
        self.events = yaml.events
        self.bad_values: list[str] = []  # pointers of numbers that are not finite (FD201): set aside
        self.bad_anchors: set[str] = set()  # anchors of such numbers
        self.rejected: set[str] = set()  # anchors of scalars refused (FD105, FD110, FD201): reported there

    # --- reporting --------------------------------------------------------------

    def _diag(self, code: str, message: str, mark: Any, path: str) -> Diagnostic:
        line, column = self.position(mark)
        return make(code, message, path, file=self.file, line=line, column=column)

    def anchor(self, name: str, value: Any, *, bad: bool = False, rejected: bool = False, chars: int = 0) -> None:
        """Record the scalar anchored as ``name`` (a later anchor of the same name replaces it). ``bad``: a number
        that is not finite, set aside wherever an alias repeats it; ``rejected``: a value refused, reported
        where it is written, and an alias of it is refused without a second report."""
        self.anchors[name] = (value, 1, chars)
        for flagged, on in ((self.bad_anchors, bad), (self.rejected, rejected)):
            if on:
                flagged.add(name)
            else:
                flagged.discard(name)

    def error(self, code: str, message: str, mark: Any, path: str) -> None:
        self.diagnostics.append(self._diag(code, message, mark, path))

    def stop(self, code: str, message: str, mark: Any, path: str = "") -> _Stop:
        return _Stop(self._diag(code, message, mark, path))

    def count(self, n: int, mark: Any) -> None:
        self.total += n
        if self.total > MAX_NODES:
            raise self.stop("FD106", f"the document expands to more than {MAX_NODES} nodes once its aliases are "
                            "expanded", mark)

    def count_text(self, n: int, mark: Any) -> None:
        """Count ``n`` more characters of text (a scalar's, or all those an alias repeats): FD106 past the budget."""
        self.chars += n
        if self.chars > MAX_TEXT:
            raise self.stop("FD106", f"the document expands to more than {MAX_TEXT} characters of text (keys and "
                            "values) once its aliases are expanded", mark)

    # --- the event loop -----------------------------------------------------------

    def run(self) -> Any:
        ev = self.events
        scalar_ev, alias_ev, map_ev, seq_ev = ev.ScalarEvent, ev.AliasEvent, ev.MappingStartEvent, ev.SequenceStartEvent
        ends = (ev.MappingEndEvent, ev.SequenceEndEvent)
        get = self.loader.get_event
        stack: list[_Frame] = []
        root: Any = None
        while True:
            event = get()
            kind = type(event)
            top = stack[-1] if stack else None
            if kind is scalar_ev or kind is alias_ev:
                if top is not None and top.key is None and type(top.data) is dict:
                    self.key(top, event)
                    continue
                path = self.child_path(top)
                if kind is scalar_ev:
                    self.total += 1
                    self.chars += len(event.value)
                    if self.total > MAX_NODES or self.chars > MAX_TEXT:
                        self.count(0, event.start_mark)
                        self.count_text(0, event.start_mark)
                    value, size, ok = self.scalar(event, path)
                else:
                    value, size, ok = self.alias(event, path)
                if top is None:
                    root = value
                else:
                    top.size += size
                    self.place(top, value if ok else None)
            elif kind is map_ev or kind is seq_ev:
                mark = event.start_mark
                if len(stack) >= MAX_DEPTH:
                    raise self.stop("FD107", TOO_DEEP, mark, self.child_path(top))
                self.count(1, mark)
                ok = True
                if top is not None and top.key is None and type(top.data) is dict:
                    self.error("FD201", "mapping keys must be plain strings", mark, top.path)
                    top.key = _DROP_KEY
                    ok = False
                path = self.child_path(top)
                self.positions.positions[path] = self.position(mark)
                tag = event.tag
                if tag is not None and tag != "!" and tag != (_MAP if kind is map_ev else _SEQ):
                    self.bad_tag(tag, mark, path, "a mapping" if kind is map_ev else "a list")
                    ok = False
                if event.anchor is not None:
                    self.anchors[event.anchor] = None
                    self.bad_anchors.discard(event.anchor)
                    self.rejected.discard(event.anchor)
                stack.append(_Frame({} if kind is map_ev else [], path, event.anchor, ok, self.chars))
            elif kind in ends:
                frame = stack.pop()
                value = frame.data if frame.ok else None
                if frame.anchor is not None:
                    self.anchors[frame.anchor] = (value, frame.size, self.chars - frame.chars)
                if not stack:
                    root = value
                else:
                    stack[-1].size += frame.size
                    self.place(stack[-1], value)
            elif kind is ev.DocumentStartEvent:
                self.documents += 1
                if self.documents > 1:
                    raise self.stop("FD103", "expected a single YAML document, found another one here",
                                    event.start_mark)
                self.anchors = {}
            elif kind is ev.StreamEndEvent:
                return root

    def child_path(self, top: _Frame | None) -> str:
        if top is None:
            return ""
        if type(top.data) is list:
            return _child(top.path, len(top.data))
        return top.path if top.key is _DROP or top.key is _DROP_KEY else _child(top.path, top.key)

    def place(self, frame: _Frame, value: Any) -> None:
        if type(frame.data) is list:
            frame.data.append(value)
        elif frame.key is _DROP_KEY:
            frame.key = _DROP  # the key was read; its value is next
        else:
            if frame.key is not _DROP:
                frame.data[frame.key] = value
            frame.key = None

    def key(self, frame: _Frame, event: Any) -> None:
        mark = event.start_mark
        if type(event) is self.events.AliasEvent:
            value, _, ok = self.alias(event, frame.path)
            if event.anchor in self.rejected:  # refused where it is written: nothing more to say
                frame.key = _DROP
                return
            if not ok or not isinstance(value, str):
                self.error("FD201", "mapping keys must be plain strings", mark, frame.path)
                frame.key = _DROP
                return
            key = value
        else:
            self.total += 1
            key = event.value
            self.count_text(len(key), mark)
            tag = event.tag
            anchor = event.anchor
            if tag is not None and tag != "!" and tag not in _TEXT_TAGS and tag not in _VALUE_TAGS:
                self.bad_tag(tag, mark, frame.path)
                frame.key = _DROP
                if anchor is not None:
                    self.anchor(anchor, None, rejected=True)
                return
            if key == "<<" and event.implicit[0]:
                self.error("FD105", "YAML merge keys ('<<') are not supported; use 'defaults:'", mark, frame.path)
                frame.key = _DROP
                if anchor is not None:
                    self.anchor(anchor, None, rejected=True)
                return
            if anchor is not None:
                self.anchor(anchor, key, rejected=control_character(key) is not None, chars=len(key))
        sub = _child(frame.path, key)
        bad = control_character(key, key=True)
        if bad:
            self.error("FD110", bad, mark, sub)
            frame.key = _DROP
            return
        bidi = bidi_character(key, key=True)
        if bidi and not (type(event) is self.events.ScalarEvent and self.raw_bidi(event)):
            self.error("FD111", bidi, mark, sub)
            frame.key = _DROP
            return
        first = frame.keys.get(key)
        if first is not None:
            self.error("FD104", f"duplicate key '{key}' (first written on line {first})", mark, sub)
            frame.key = _DROP
            return
        at = self.position(mark)
        frame.keys[key] = at[0]
        frame.key = key
        self.positions.key_positions[sub] = at
        if type(event) is not self.events.ScalarEvent or event.tag is not None or not event.implicit[0]:
            self.positions.quoted_keys.add(sub)  # quoted or tagged: a string as the user said (an alias: not known)

    def alias(self, event: Any, path: str) -> tuple[Any, int, bool]:
        mark = event.start_mark
        self.positions.positions[path] = self.position(mark)
        if event.anchor in self.rejected:  # the anchored value was refused, and said so where it is written
            return None, 1, False
        if event.anchor not in self.anchors:
            raise self.stop("FD103", f"found undefined alias '{event.anchor}'", mark, path)
        target = self.anchors[event.anchor]
        if target is None:
            raise self.stop("FD106", f"alias '{event.anchor}' refers to a node that contains it (an endless "
                            "document)", mark, path)
        value, size, chars = target
        self.count(size, mark)
        self.count_text(chars, mark)
        if event.anchor in self.bad_anchors:
            self.bad_values.append(path)
            return None, size, False
        return value, size, True

    def bad_tag(self, tag: str, mark: Any, path: str, on: str = "") -> None:
        shown = tag.replace(_CORE, "!!")
        if on and tag in (*_TEXT_TAGS, *_VALUE_TAGS, _MAP, _SEQ):  # a core tag, on the wrong kind of node
            self.error("FD105", f"the YAML tag '{shown}' cannot tag {on}", mark, path)
            return
        self.error("FD105", f"the YAML tag '{shown}' is not allowed (flowdsl loads plain data only)", mark, path)

    def scalar(self, event: Any, path: str) -> tuple[Any, int, bool]:
        mark = event.start_mark
        self.positions.positions[path] = self.position(mark)
        text = event.value
        tag = event.tag
        implicit = tag is None or tag == "!"
        if implicit:
            tag = _STR
            if event.tag is None and event.implicit[0]:  # `! 5` (the non-specific tag) is the string "5"
                for candidate, regexp in self.resolvers.get(text[:1], ()):
                    if regexp.match(text):
                        tag = candidate
                        break
        if tag in _TEXT_TAGS:
            value: Any = text
        elif tag in _VALUE_TAGS:
            try:
                value = _construct(tag, text, implicit)
            except NumberError as exc:
                self.error("FD201", str(exc), mark, path)
                self.bad_values.append(path)
                if event.anchor is not None:  # an alias of it is set aside too (reported once, here)
                    self.anchor(event.anchor, None, bad=True)
                return None, 1, False
            except ValueError as exc:
                return self.refuse("FD201", str(exc), event, path)
        else:
            self.bad_tag(tag, mark, path)
            if event.anchor is not None:
                self.anchor(event.anchor, None, rejected=True)
            return None, 1, False
        if type(value) is str:
            bad = control_character(value)
            if bad:
                return self.refuse("FD110", bad, event, path)
            bidi = bidi_character(value)
            if bidi and not self.raw_bidi(event):  # (one written as it is was found in the text: FD111 there)
                return self.refuse("FD111", bidi, event, path)
        elif type(value) in (int, float) and str(value) != text:
            self.positions.written[path] = text  # quoted as written in messages (FD401)
        if event.anchor is not None:
            self.anchor(event.anchor, value, chars=len(text))
        return value, 1, True

    def raw_bidi(self, event: Any) -> bool:
        """Whether the text of the scalar ``event`` holds a bidirectional control character as it is (reported
        where it is, by :func:`bidi_characters`)."""
        start, end = self.index(event.start_mark), self.index(event.end_mark)
        return BIDI_CONTROLS.search(self.text, start, end) is not None

    def refuse(self, code: str, message: str, event: Any, path: str) -> tuple[Any, int, bool]:
        """Report a scalar that cannot be read; an alias of it is refused with it (``rejected``)."""
        self.error(code, message, event.start_mark, path)
        if event.anchor is not None:
            self.anchor(event.anchor, None, rejected=True)
        return None, 1, False
