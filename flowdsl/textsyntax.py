"""Front end: the text syntax (``.flow`` files), read and written.

Stage: front end. Imports ``flowdsl.diagnostics``, ``flowdsl.source``, ``json``
and, lazily, ``lark`` (importing flowdsl stays fast) and ``flowdsl.convert``
(where ``to_flow``'s writer lives).

``parse_flow`` reads a ``.flow`` text into exactly the plain data the YAML form
of the same spec loads to, with the position of every element keyed by its JSON
pointer; ``to_flow`` writes spec data as canonical ``.flow`` text, so that
``parse_flow(to_flow(d)).data == d``. The grammar is ``grammar/flowdsl.lark``
(shipped in the wheel as ``flowdsl/_data/flowdsl.lark``). Lark builds its
LALR(1) tables; ``_Parser`` drives them with a lean loop of its own, because
Lark's generic tree builder and position propagation cost more than the parse
itself (a 10,000-step file parses in a fraction of a second this way). Its
lexer applies the two rules a grammar cannot state: a word is a keyword only
where the parser can accept that keyword, and newlines inside JSON values do
not end statements.
"""

from __future__ import annotations

import functools
import gc
import json
import re
from pathlib import Path
from typing import Any

from flowdsl.diagnostics import BIDI_CONTROLS, Diagnostic, Positions, did_you_mean, join, make, set_aside_values
from flowdsl.source import (
    EMPTY_DOCUMENT,
    WORD_VALUES,
    LoadedDoc,
    NumberError,
    bad_character,
    bidi_character,
    bidi_characters,
    byte_position,
    control_character,
    read_number,
    too_deep,
)

#: deepest nesting of JSON values and of blocks (FD107 beyond)
MAX_DEPTH = 100

#: option keywords: every key of a node's options, of ``llm:`` and of ``defaults:``
#: (``undo`` is the text syntax's word for ``compensate``)
OPTION_KEYS = (
    "worker", "compensate", "with", "output", "when", "fail_when", "on_failure", "needs", "retry", "timeout",
    "fallback", "description", "llm", "signature", "instructions", "module", "lm", "demos", "redact",
    "items", "as", "concurrency", "on", "path", "signal", "key", "for",
)  # fmt: skip
#: header statements written ``keyword value``
TOP_KEYS = ("flowdsl", "version", "description", "input", "timeout")
#: keys of an ``llm:`` mapping; in an ``llm`` statement these options go there
LLM_KEYS = ("signature", "instructions", "module", "lm", "demos", "redact")
#: options whose value is a list of names (``needs a, b`` or ``needs [a, b]``)
NAME_LISTS = ("needs", "redact")
#: group keyword -> the key holding its nodes (a switch has cases, a sub-flow none)
BODIES = {"sequence": "steps", "parallel": "branches", "for_each": "steps"}
NODE_KEYWORDS = ("step", "llm", "wait", "sequence", "parallel", "for_each", "switch", "flow")
KEYWORDS = frozenset((*OPTION_KEYS, *TOP_KEYS, *NODE_KEYWORDS, "undo", "workers", "defaults", "case", "default")) | {
    "true",
    "false",
    "null",
}

#: token shapes, as in the grammar's terminals (the writer uses them to decide what needs quotes)
WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[./-][A-Za-z0-9_]+)*")
NUMBER_RE = re.compile(r"-?[0-9](?:[eE][+-][0-9]+|[0-9A-Za-z_.])*")
#: a NUMBER token is a number when ``flowdsl.source.read_number`` reads it as one (as the YAML loader
#: does); any other (10s, 1m30s, 0777, 1_000) is a string
#: characters a .flow text may not contain (FD110); the writer escapes them inside strings
BAD_CHAR_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


_STRING_PART = re.compile(r'(?:[^"\\\n]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')


def _bad_string(text: str, start: int, line: int, col: int) -> tuple[str, int, int]:
    """Why the string starting at ``text[start]`` (a '"' at ``line``:``col``) cannot be read, and where: its first
    escape that JSON has not, or its end missing on its line."""
    end = _STRING_PART.match(text, start + 1).end()  # type: ignore[union-attr]  # (it matches, if only nothing)
    if text.startswith("\\", end) and text[end + 1 : end + 2] not in ("", "\n"):
        if text.startswith("\\u", end):
            digits = re.match(r"[0-9a-fA-F]{0,3}", text[end + 2 :])
            escape = "\\u" + (digits.group() if digits else "")
            why = "'\\u' takes 4 hex digits"
        else:
            escape = text[end : end + 2]
            why = 'a string takes the JSON escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX'
        return f"invalid escape '{escape}' in a string: {why}", line, col + end - start
    return ("unclosed string: a string is written in double quotes on one line (write a line break as \\n)",
            line, col)


#: keywords that are values, not statements or options: read as names in a line of names (`{ null }`)
_VALUES = frozenset({"true", "false", "null"})


#: option keywords of wait nodes, which came after the text syntax's first version: a bare one in a line of step
#: names is a step of that name, as it was before (files written then hold such lines; ``flowdsl convert`` now writes
#: ``step key`` on a line of its own)
_LATER_KEYWORDS = frozenset({"signal", "key", "for"})


def _keyword_as_step(word: str) -> str:
    """Why a bare keyword in a line of step names is refused: it was read as a step, where the writer meant an
    option (``as line`` in a for_each's body gave steps ``as`` and ``line``)."""
    said = f"'{word}' is a keyword, not a step name here"
    if word in OPTION_KEYS or word in NAME_LISTS or word == "undo":
        said += ": a group's options go on its own line, before its '{'"
    return said + f"; {_step_named(word)}"


def _step_named(word: str) -> str:
    """How a step named by the keyword ``word`` (its id and its worker) is written."""
    return f"a step whose worker is named '{word}' is written `step {word}` on a line of its own, any options after it"


class _Problem(Exception):
    """A syntax problem found while lexing or building (becomes one diagnostic)."""

    def __init__(self, code: str, message: str, line: int, column: int):
        super().__init__(message)
        self.code, self.message, self.line, self.column = code, message, line, column


# ---------------------------------------------------------------------------- parsing


def _grammar_text() -> str:
    """The grammar: shipped in the wheel as package data, else the source checkout's grammar/."""
    from importlib import resources

    packaged = resources.files("flowdsl") / "_data" / "flowdsl.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).parent.parent / "grammar" / "flowdsl.lark").read_text(encoding="utf-8")


class _Tok:
    __slots__ = ("column", "line", "type", "value")

    def __init__(self, type: str, value: str, line: int, column: int):
        self.type, self.value, self.line, self.column = type, value, line, column


class _Node:
    """A parse-tree node: its rule, its children (_Node and _Tok), where it starts."""

    __slots__ = ("children", "column", "data", "line")

    def __init__(self, data: str, children: list[Any], line: int, column: int):
        self.data, self.children, self.line, self.column = data, children, line, column


_SPLICE, _EXPAND, _KEEP = 0, 1, 2


def _slot(text: str, start: int) -> str | None:
    """The ``${ … }`` at ``start``, to its matching ``}`` on the same line (braces inside it counted), or None."""
    depth = 0
    for i in range(start + 1, len(text)):
        char = text[i]
        if char == "\n":
            return None
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start:i + 1]
    return None


class _Parser:
    """The grammar's LALR(1) tables (built by Lark) driven by a lean loop that builds light nodes.

    The tree is the one Lark would build (``_rule``s and anonymous tokens left
    out, ``?rule``s with one child replaced by it); every node and token knows
    its line and column.
    """

    def __init__(self) -> None:
        import lark
        from lark.parsers.lalr_analysis import Shift

        grammar = lark.Lark(_grammar_text(), parser="lalr", lexer="basic", maybe_placeholders=False)
        table = grammar.parser.parser.parser.parse_table
        shapes = {}
        for rule in grammar.rules:
            # (index, spliced) of each symbol that appears in the tree
            plan = tuple(
                (i, not sym.is_term and sym.name.startswith("_"))
                for i, sym in enumerate(rule.expansion)
                if not (sym.is_term and sym.filter_out)
            )
            reuse = bool(plan) and plan[0] == (0, True)  # extend the first symbol's list in place
            origin = str(rule.origin.name)  # Lark's names are Tokens, slow to compare
            kind = _SPLICE if origin.startswith("_") else _EXPAND if rule.options.expand1 else _KEEP
            shapes[rule] = (kind, str(rule.alias or origin), reuse, plan[reuse:], len(rule.expansion), origin)
        self.actions: dict[int, dict[str, tuple[bool, Any]]] = {
            state: {str(sym): (True, arg) if act is Shift else (False, shapes[arg]) for sym, (act, arg) in acts.items()}
            for state, acts in table.states.items()
        }
        self.start = table.start_states["start"]
        self.literals = {t.name: t.pattern.value for t in grammar.terminals if t.pattern.type == "str"}
        self.keywords = {v: k for k, v in self.literals.items() if v.isidentifier()}
        punct = {v: k for k, v in self.literals.items() if not v.isidentifier()}
        ignored = "|".join(t.pattern.value for t in grammar.terminals if t.name in grammar.ignore_tokens)
        parts = [
            f"(?P<{t.name}>{t.pattern.value})"
            for t in grammar.terminals
            if t.pattern.type == "re" and t.name not in grammar.ignore_tokens
        ]
        punct_re = f"(?P<PUNCT>[{re.escape(''.join(punct))}])"
        # each match: what is ignored before a token, then the token (or one character that is none), or the end
        # of the text: without that, a text ending in ignored text (a comment with no newline after it, spaces)
        # would fail to match there, and matching would start again one character further, inside the comment
        # (reading its words as tokens) or the spaces (quadratic)
        self.punct, self.regex = punct, re.compile(
            f"(?:{ignored})*+(?:{'|'.join(parts)}|{punct_re}|(?P<EOF>\\Z)|(?P<ERROR>.))")
        self.value_keys = {self.keywords[k] for k in (*OPTION_KEYS, *TOP_KEYS, "undo")}
        self.shift_cache: dict[tuple[Any, ...], bool] = {}

    def can_shift(self, stack: list[int], ttype: str) -> bool:
        """Would the parser, in the state ``stack``, accept a token of type ``ttype``?"""
        key = (*stack, ttype)
        if key in self.shift_cache:
            return self.shift_cache[key]
        actions, stack = self.actions, list(stack)
        while True:
            act = actions[stack[-1]].get(ttype)
            if act is None or act[0]:
                result = act is not None
                break
            size, origin = act[1][4:]
            if size:
                del stack[-size:]
            if origin == "start":
                result = ttype == "$END"
                break
            stack.append(actions[stack[-1]][origin][1])
        if len(self.shift_cache) > 100_000:
            self.shift_cache.clear()
        self.shift_cache[key] = result
        return result

    def tokens(self, text: str, stack: list[int], opened: list[tuple[str, int, bool]],
               statement: list[str] | None = None) -> Any:
        """The tokens of ``text``, ending with ``$END``; keywords are decided against the parser's ``stack``.

        ``opened`` is kept as the brackets not yet closed: (bracket, line, whether it opens a JSON value);
        ``statement`` (one item) as the keyword of the statement read last (``wait``…), whose options are the
        ones a message lists.
        """
        statement = statement if statement is not None else [""]
        keywords, punct, actions, value_keys = self.keywords, self.punct, self.actions, self.value_keys
        line, line_start, json_depth, block_depth, prev, end = 1, 0, 0, 0, "", 0
        for m in self.regex.finditer(text):
            kind = m.lastgroup
            assert kind is not None  # (every match is one of the named groups)
            if kind == "EOF":
                break
            value = m.group(kind)
            start, end = m.span(kind)
            col = start - line_start + 1
            if kind == "_NL":
                tok_line = line
                line += value.count("\n")
                line_start = start + value.rfind("\n") + 1
                if not json_depth:
                    yield _Tok("_NL", value, tok_line, col)
                continue
            if kind == "PUNCT":
                kind = punct[value]
                is_json = kind == "LSQB" or (kind == "LBRACE" and bool(json_depth or prev in value_keys))
                if kind == "LSQB" or kind == "LBRACE":
                    opened.append((value, line, is_json))
                elif opened and (kind == "RSQB" or kind == "RBRACE"):
                    opened.pop()
                if is_json:
                    json_depth += 1
                elif kind == "LBRACE":
                    block_depth += 1
                elif json_depth and (kind == "RBRACE" or kind == "RSQB"):
                    json_depth -= 1
                elif block_depth and kind == "RBRACE":
                    block_depth -= 1
                if json_depth > MAX_DEPTH or block_depth > MAX_DEPTH:
                    raise _Problem("FD107", f"nesting deeper than {MAX_DEPTH} levels", line, col)
            elif kind == "WORD":
                if value in keywords:
                    kw = keywords[value]
                    act = actions[stack[-1]].get(kw)
                    if act is not None and (act[0] or self.can_shift(stack, kw)):
                        kind = kw
                        if value in _STATEMENT_STARTS:
                            statement[0] = value
            elif kind == "ERROR":
                if value == '"':
                    raise _Problem("FD108", *_bad_string(text, start, line, col))
                what = f"unexpected character {value!r}, expected {self.expected(stack, statement[0])[0]}"
                if text.startswith("${", start):  # YAML's habit: an expression is a string in the text syntax
                    slot = _slot(text, start)
                    shown = slot if slot is not None and len(slot) <= 60 and '"' not in slot else "${ … }"
                    what += f'; quote an expression: "{shown}"'
                raise _Problem("FD108", what, line, col)
            prev = kind
            yield _Tok(kind, value, line, col)
        yield _Tok("$END", "", line, end - line_start + 1)

    def parse(self, text: str) -> _Node:
        actions, stack = self.actions, [self.start]
        values: list[Any] = []
        opened: list[tuple[str, int, bool]] = []
        statement = [""]
        tokens = self.tokens(text, stack, opened, statement)
        tok = next(tokens)
        while True:
            act = actions[stack[-1]].get(tok.type)
            if act is None:
                what = self.unexpected(tok, stack, statement[0])
                if tok.type == "WORD" and tok.value in ("h", "m", "s", "ms") and len(values) >= 2 and \
                        getattr(values[-1], "type", "") == "NUMBER" and getattr(values[-2], "type", "") == "TIMEOUT":
                    what = (f"unexpected '{tok.value}' after the number {values[-1].value}: a duration is written "
                            f"without spaces: '{values[-1].value}{tok.value}'")
                after = values[-1] if values else None
                if isinstance(after, _Tok) and after.value in NODE_KEYWORDS and after.type != "WORD" \
                        and tok.type in ("_NL", "$END", "RBRACE"):  # (`wait` alone on its line: a statement's start)
                    what += f"; '{after.value}' starts a statement: `{after.value} <name>`" + (
                        f" ({_step_named(after.value)})" if after.value != "step" else "")
                if tok.type == "COLON" and isinstance(after, _Tok) and after.type != "WORD" and after.value in KEYWORDS:
                    which = "options" if after.value in (*OPTION_KEYS, *TOP_KEYS, "undo") else "keywords"
                    what += f"; {which} take no ':' in the text syntax: write '{after.value} <value>'"
                if opened and (tok.type == "$END" or (opened[-1][2] and tok.line > opened[-1][1])):
                    # (a JSON value spans lines: one left open reads the next statements as its own)
                    what += f" (the '{opened[-1][0]}' on line {opened[-1][1]} is not closed)"
                raise _Problem("FD108", what, tok.line, tok.column)
            if act[0]:
                stack.append(act[1])
                values.append(tok)
                tok = next(tokens)
                continue
            kind, name, reuse, plan, size, origin = act[1]
            if size:
                popped = values[-size:]
                del values[-size:], stack[-size:]
                children = popped[0] if reuse else []
                for i, splice in plan:
                    if splice:
                        children += popped[i]
                    else:
                        children.append(popped[i])
                first = popped[0]
                while type(first) is list:
                    first = first[0] if first else tok
            else:
                first, children = tok, []
            if kind == _SPLICE:
                node = children
            elif kind == _EXPAND and len(children) == 1:
                node = children[0]
            else:
                node = _Node(name, children, first.line, first.column)
            if origin == "start":
                return node  # type: ignore[return-value]
            stack.append(actions[stack[-1]][origin][1])
            values.append(node)

    def expected(self, stack: list[int], statement: str = "") -> tuple[str, set[str]]:
        """What the parser would accept in the state ``stack``, in words; and the keywords among it. In a wait
        (``statement``), its options are the ones a wait has."""
        candidates = [t for t in self.actions[stack[-1]] if t.isupper() or t == "$END"]
        expected = {t for t in candidates if self.can_shift(stack, t)} or set(candidates)
        literals = self.literals
        keywords = {literals[t] for t in expected if literals.get(t, "").isidentifier()}
        words, options = keywords - {"true", "false", "null"}, keywords & {*OPTION_KEYS, "undo"}
        if len(options) > 4:
            words -= options
            if statement == "wait":  # (the grammar takes any option after any statement: the model says more)
                keywords = (keywords - options) | set(WAIT_OPTIONS)
        listed = [w for w in _STATEMENTS if w in words] + sorted(words - set(_STATEMENTS))
        if len(options) > 4 and statement == "wait":
            listed.append("an option of a wait (" + ", ".join(WAIT_OPTIONS) + ")")
        elif len(options) > 4:
            examples = [w for w in _OPTION_EXAMPLES if w in options][:5]
            listed.append("an option (" + ", ".join(examples) + ", ...)")
        rest = {t for t in expected if not literals.get(t, "").isidentifier()}
        if {"STRING", "NUMBER", "LSQB"} <= expected:
            listed.append("a value")
            rest -= _VALUE_TERMINALS
        listed += sorted((_TERMINAL_WORDS.get(t, t) for t in rest), key=lambda w: (w.startswith("end"), w))
        return (listed[0] if len(listed) == 1 else "one of: " + ", ".join(listed)), keywords

    def unexpected(self, tok: _Tok, stack: list[int], statement: str = "") -> str:
        want, keywords = self.expected(stack, statement)
        if tok.type in ("$END", "_NL"):
            found = "end of input" if tok.type == "$END" else "end of line"
        else:
            found = repr(tok.value if len(tok.value) <= 40 else tok.value[:37] + "...")
            found = "string " + found if tok.type == "STRING" else found
        hint = did_you_mean(tok.value, keywords) if tok.type == "WORD" else ""
        return f"unexpected {found}, expected {want}{hint}"


@functools.cache
def _parser() -> _Parser:
    return _Parser()


def parse_flow(text: str | bytes, file: str | None = None) -> LoadedDoc:
    """Read a ``.flow`` text: its data (as the YAML form would load), positions and diagnostics.

    ``data`` is None when the text cannot be read: a syntax error (FD108), a
    duplicate key or option (FD104), an invalid character (FD110), a bidirectional control
    character (FD111: every line that holds one is reported, with what else is wrong), nesting
    that is too deep (FD107) or no statement at all (FD109). A number that is not finite (FD201) is set aside
    with the option around it, as the YAML loader does (``flowdsl.source.LoadedDoc``).
    """
    positions = Positions(file)
    if isinstance(text, bytes):
        raw = text
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line, col = byte_position(raw, e.start)
            msg = f"file is not valid UTF-8 (byte 0x{raw[e.start]:02x})"
            return LoadedDoc(None, positions, [make("FD110", msg, file=file, line=line, column=col)])
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    bad = bad_character(text, file)
    if bad:
        return LoadedDoc(None, positions, bad)
    bidi = bidi_characters(text, file)  # (reading goes on: what else is wrong is reported with them)
    builder = _Builder(positions, file)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # parsing allocates many small objects and frees none: collections would only cost time
    try:
        data = builder.document(_parser().parse(text))
    except _Problem as p:
        if any((d.line, d.column) == (p.line, p.column) for d in bidi):  # the lexer's word on that character
            return LoadedDoc(None, positions, bidi)
        return LoadedDoc(None, positions, [*bidi, make(p.code, p.message, file=file, line=p.line, column=p.column)])
    finally:
        if gc_was_enabled:
            gc.enable()
    diagnostics = [*bidi, *builder.diagnostics]
    if diagnostics:
        if len(builder.bad_values) < len(diagnostics):
            return LoadedDoc(None, positions, diagnostics)
        data = set_aside_values(data, diagnostics, builder.bad_values)  # type: ignore[assignment]
        if data is None:
            return LoadedDoc(None, positions, diagnostics)
    deep = too_deep(data)
    if deep is not None:
        deep_line, deep_col = positions.find(deep)
        message = f"nesting too deep: more than {MAX_DEPTH} levels of mappings and lists once read as data"
        return LoadedDoc(None, positions, [make("FD107", message, file=file, line=deep_line, column=deep_col)])
    return LoadedDoc(data, positions, builder.diagnostics)


#: how the expected-token list names terminals that are not keywords
_TERMINAL_WORDS = {
    "WORD": "a name", "STRING": "a string", "NUMBER": "a number", "LBRACE": "'{'", "RBRACE": "'}'",
    "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "COLON": "':'", "_NL": "end of line",
    "$END": "end of input",
}  # fmt: skip
_VALUE_TERMINALS = {"STRING", "WORD", "NUMBER", "TRUE", "FALSE", "NULL", "LBRACE", "LSQB"}
_STATEMENTS = (*NODE_KEYWORDS, "workers", "defaults", *TOP_KEYS, "case", "default")
#: the keywords that start a statement and are no option too (``timeout`` is both)
_STATEMENT_STARTS = frozenset((*NODE_KEYWORDS, "workers", "defaults", "case", "default"))
_OPTION_EXAMPLES = ("undo", "with", "output", "when", "needs", "retry", "timeout", "items", "on", "path")
#: a wait's options, in the order the writer writes them (``flowdsl.convert.WAIT_ORDER``)
WAIT_OPTIONS = ("signal", "key", "timeout", "for", "output", "on_failure", "when", "needs", "description")


def _scalar(tok: _Tok) -> Any:
    """The value of a token, by the rule the YAML loader applies to plain scalars (``flowdsl.source``).

    Raises NumberError for a number a spec cannot hold.
    """
    kind, text = tok.type, tok.value
    if kind == "WORD":
        return WORD_VALUES.get(text, text)
    if kind == "STRING":
        return json.loads(text, strict=False)
    if kind == "NUMBER":
        number = read_number(text)
        return text if number is None else number
    return {"TRUE": True, "FALSE": False, "NULL": None}[kind]


def _key(tok: _Tok) -> str:
    """A mapping key or case label: read as written, always a string (as the YAML loader does)."""
    return json.loads(tok.value, strict=False) if tok.type == "STRING" else tok.value


def _sub(base: str, key: Any) -> str:
    """``join(base, key)``, quicker for the usual keys (no ``~`` or ``/``)."""
    key = str(key)
    return join(base, key) if "~" in key or "/" in key else f"{base}/{key}"


class _Builder:
    """Turns the parse tree into spec data, recording positions as it goes."""

    def __init__(self, positions: Positions, file: str | None):
        self.pos, self.keys, self.file = positions.positions, positions.key_positions, file
        self.written = positions.written
        self.quoted = positions.quoted_keys
        self.diagnostics: list[Diagnostic] = []
        self.bad_values: list[str] = []  # pointers of numbers that are not finite (FD201): set aside

    def scalar(self, tok: _Tok, ptr: str, *, key: bool = False, name: bool = False) -> Any:
        """The value of ``tok`` at ``ptr``, checked as the YAML loader checks its scalars: FD201 for a number
        that is not finite, FD110 for a control character, escaped or not, FD111 for an escaped bidirectional
        control character (or a mark, in a key). A mapping key (``key``) and a
        name (``name``: where the grammar takes only a name) are read as written, always strings."""
        try:
            value = _key(tok) if key or name else _scalar(tok)
        except NumberError as exc:
            self.diagnostics.append(make("FD201", str(exc), ptr, file=self.file, line=tok.line, column=tok.column))
            self.bad_values.append(ptr)
            return None
        if tok.type == "STRING" and (bad := control_character(value, key=key)):
            self.diagnostics.append(make("FD110", bad, ptr, file=self.file, line=tok.line, column=tok.column))
        elif (tok.type == "STRING" and (bidi := bidi_character(value, key=key))
              and not BIDI_CONTROLS.search(tok.value)):  # (one written as it is was found in the text: FD111 there)
            self.diagnostics.append(make("FD111", bidi, ptr, file=self.file, line=tok.line, column=tok.column))
        elif tok.type == "NUMBER" and type(value) in (int, float) and str(value) != tok.value:
            self.written[ptr] = tok.value  # quoted as written in messages (FD401)
        return value

    def put(self, target: dict[str, Any], base: str, key: str, at: Any, what: str,
            written: str | None = None) -> str | None:
        """The pointer for ``key`` in ``target``, or None (and FD104, naming ``written``: the word in the file,
        when it is not the key) when it is already there."""
        ptr = _sub(base, key)
        if key in target:
            msg = f"duplicate {what} '{written or key}' (first written on line {self.keys[ptr][0]})"
            self.diagnostics.append(make("FD104", msg, ptr, file=self.file, line=at.line, column=at.column))
            return None
        self.keys[ptr] = (at.line, at.column)
        return ptr

    def document(self, tree: _Node) -> dict[str, Any]:
        if not tree.children:  # as the YAML loader says of a file of comments (without it: FD201, no 'name')
            raise _Problem("FD109", EMPTY_DOCUMENT, 1, 1)
        doc: dict[str, Any] = {}
        steps: list[Any] = []
        self.pos[""] = (tree.line, tree.column)
        for st in tree.children:
            kind, kids = st.data, st.children
            if kind == "top_option":
                if (ptr := self.put(doc, "", kids[0].value, kids[0], "statement")) is not None:
                    doc[kids[0].value] = self.value(kids[1], ptr)
            elif kind in ("flow_name", "workers", "defaults"):
                key = "name" if kind == "flow_name" else kind
                if (ptr := self.put(doc, "", key, st, "statement", "flow" if kind == "flow_name" else None)) is None:
                    continue
                if kind == "flow_name":
                    doc[key] = self.scalar_at(kids[0], ptr)
                elif kind == "workers":
                    doc[key] = self.names(kids[0], ptr)
                else:
                    self.pos[ptr] = (kids[0].line, kids[0].column) if kids else (st.line, st.column)
                    doc[key] = self.options(kids, {}, ptr)
            else:
                steps.append(self.node(st, f"/steps/{len(steps)}"))
        if steps:
            self.pos["/steps"] = self.pos["/steps/0"]
            doc["steps"] = steps
        return doc if "flowdsl" in doc else {"flowdsl": 1, **doc}

    def scalar_at(self, tok: _Tok, ptr: str) -> Any:
        """A name (or an llm statement's signature string) at ``ptr``."""
        self.pos[ptr] = (tok.line, tok.column)
        return self.scalar(tok, ptr, name=True)

    def value(self, node: Any, ptr: str) -> Any:
        self.pos[ptr] = (node.line, node.column)
        if type(node) is _Tok:
            return self.scalar(node, ptr)
        if node.data == "array":
            return [self.value(c, f"{ptr}/{i}") for i, c in enumerate(node.children)]
        out: dict[str, Any] = {}
        for pair in node.children:
            ktok, v = pair.children
            key = self.scalar(ktok, _sub(ptr, _key(ktok)), key=True)
            if (sub := self.put(out, ptr, key, ktok, "key")) is not None:
                if ktok.type == "STRING":
                    self.quoted.add(sub)
                out[key] = self.value(v, sub)
        return out

    def names(self, node: _Node, ptr: str) -> list[Any]:
        first = node.children[0]
        if type(first) is _Node:
            return list(self.value(first, ptr))
        self.pos[ptr] = (first.line, first.column)
        return [self.scalar_at(t, f"{ptr}/{i}") for i, t in enumerate(node.children)]

    def options(self, items: list[_Node], target: dict[str, Any], base: str, llm: bool = False) -> Any:
        """Options (and option blocks) into ``target``; in an llm statement, LLM keys into ``target["llm"]``."""
        for item in items:
            if item.data == "opt_block":
                self.options(item.children, target, base, llm)
                continue
            ktok, v = item.children
            key = "compensate" if ktok.value == "undo" else ktok.value
            where, at = target, base
            if llm and key in LLM_KEYS:
                where, at = target["llm"], base + "/llm"
            elif llm and key == "llm":  # the statement is the block already
                self.diagnostics.append(make("FD104", "an 'llm' statement holds the llm block's options itself: "
                                             "write them after its name (`llm NAME \"in -> out\" lm openai/gpt-4o`), "
                                             "or write `step NAME llm {...}`", _sub(base, key), file=self.file,
                                             line=ktok.line, column=ktok.column))
                continue
            if (ptr := self.put(where, at, key, ktok, "option", ktok.value)) is not None:
                where[key] = self.names(v, ptr) if key in NAME_LISTS else self.value(v, ptr)
        return target

    def node(self, tree: _Node, ptr: str) -> Any:
        kind, kids = tree.data, tree.children
        if kind != "step" and kind != "llm":
            return self.group(tree, ptr)  # (a wait too: its keyword, its id, its options)
        name_tok, rest = kids[0], kids[1:]
        self.pos[ptr] = at = (name_tok.line, name_tok.column)
        if kind == "step" and not rest:
            return self.scalar(name_tok, ptr, name=True)
        name = self.scalar(name_tok, _sub(ptr, _key(name_tok)), key=True)  # the key of the step's options
        sub = _sub(ptr, name)
        self.pos[sub] = self.keys[sub] = at
        if kind == "step" and type(rest[0]) is _Tok:
            return {name: None}
        opts: dict[str, Any] = {}
        if kind == "llm":
            opts["llm"] = {}
            self.pos[sub + "/llm"] = self.keys[sub + "/llm"] = (tree.line, tree.column)
            if rest and type(rest[0]) is _Tok:
                self.keys[sub + "/llm/signature"] = (rest[0].line, rest[0].column)
                opts["llm"]["signature"] = self.scalar_at(rest[0], sub + "/llm/signature")
                rest = rest[1:]
        return {name: self.options(rest, opts, sub, kind == "llm")}

    def group(self, tree: _Node, ptr: str) -> dict[str, Any]:
        keyword = "flow" if tree.data == "subflow" else tree.data
        kids = tree.children
        self.pos[ptr] = self.keys[f"{ptr}/{keyword}"] = (tree.line, tree.column)
        data: dict[str, Any] = {keyword: self.scalar_at(kids[0], f"{ptr}/{keyword}")}
        for item in kids[1:]:
            if item.data == "option" or item.data == "opt_block":
                self.options([item], data, ptr)
            elif item.data == "body":
                key = BODIES[keyword]
                if (sub := self.put(data, ptr, key, item, "key")) is not None:
                    data[key] = self.nodes(item, sub)
            else:
                self.cases(item, data, ptr)
        return data

    def nodes(self, body: _Node, ptr: str) -> list[Any]:
        self.pos[ptr] = (body.line, body.column)
        out: list[Any] = []
        for item in body.children:
            sub = f"{ptr}/{len(out)}"
            if (type(item) is _Tok and item.type == "WORD" and item.value in KEYWORDS and item.value not in _VALUES
                    and item.value not in _LATER_KEYWORDS):
                self.diagnostics.append(make("FD108", _keyword_as_step(item.value), sub, file=self.file,
                                             line=item.line, column=item.column))
            out.append(self.node(item, sub) if type(item) is _Node else self.scalar_at(item, sub))
        return out

    def cases(self, block: _Node, data: dict[str, Any], ptr: str) -> None:
        if (cases_ptr := self.put(data, ptr, "cases", block, "key")) is None:
            return
        self.pos[cases_ptr] = (block.line, block.column)
        cases: dict[str, Any] = {}
        for item in block.children:
            if item.data == "case":
                label, body = item.children
                key = self.scalar(label, _sub(cases_ptr, _key(label)), key=True)
                if (sub := self.put(cases, cases_ptr, key, label, "case")) is not None:
                    if label.type == "STRING":
                        self.quoted.add(sub)
                    cases[key] = self.nodes(body, sub)
            elif (sub := self.put(data, ptr, "default", item, "case")) is not None:
                data["default"] = self.nodes(item.children[0], sub)
        data["cases"] = cases
        if "default" in data:  # after the cases, as YAML writes them (and the data keeps the order it is read in)
            data["default"] = data.pop("default")


# ---------------------------------------------------------------------------- writing


def to_flow(data: dict[str, Any]) -> str:
    """Canonical ``.flow`` text for spec ``data`` (as the YAML loader produces it).

    ``parse_flow(to_flow(d)).data == d`` for every spec the schema accepts.
    Raises ValueError, naming the JSON pointer, for data the text syntax cannot
    express (keys the language does not have, non-finite numbers). The writer
    lives in ``flowdsl.convert`` beside the YAML writer; both write keys in the
    canonical order.
    """
    from flowdsl.convert import write_flow

    return write_flow(data)
