"""LLM step signatures: parsing, normalizing and checking the fields of an ``llm:`` block.

Stage: shared by the compiler (which normalizes signatures into the plan) and
the LLM step engine (``flowdsl.llm``, which checks values against them).
Imports the standard library and ``flowdsl.source`` (for its one rule on control characters) only — never
dspy — so the compiler stays fast.

A normalized signature is plain JSON, the form the plan holds (docs/plan.md)::

    {"inputs":  [{"name": "customer_name", "type": "str", "desc": None, "enum": None}, ...],
     "outputs": [{"name": "tone", "type": "str", "desc": None, "enum": ["formal", "friendly"]}, ...]}

Two source forms produce it: the DSPy signature string
(``"customer_name, total: float -> greeting, next_steps: list[str]"``, parsed by
:func:`parse_signature`) and the typed-fields mapping of the YAML form
(:func:`normalize_fields`). :func:`coerce_value` converts a value to a field's
declared type or says why it cannot; the engine uses it on model answers and
run inputs, the checks use it on demos (:func:`check_llm_block`).
"""

from __future__ import annotations

import ast
import decimal
import difflib
import json
import math
import re
import sys
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from flowdsl.source import control_character

#: the field types a signature may declare
TYPES: tuple[str, ...] = ("str", "int", "float", "bool", "list[str]", "list[int]", "list[float]", "dict")
#: the modules an llm step may use
MODULES: tuple[str, ...] = ("predict", "chain_of_thought")
#: the output field ChainOfThought adds; a chain_of_thought step may not declare it
REASONING_FIELD = "reasoning"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_MAX_NAME = 64
_ENUM_TYPES = ("str", "int", "float", "bool")
_FIELD_KEYS = ("type", "desc", "enum")
# Names DSPy signatures (pydantic models) cannot hold as fields, or that shadow their methods.
_RESERVED = frozenset(
    {
        "instructions", "signature", "fields", "input_fields", "output_fields", "append", "prepend",
        "insert", "delete", "equals", "with_instructions", "with_updated_fields", "append_instructions",
        "dump_state", "load_state", "construct", "copy", "dict", "json", "schema", "schema_json",
        "validate", "from_orm", "parse_obj", "parse_raw", "parse_file", "update_forward_refs",
    }
)
# Keyword arguments DSPy's ``Predict`` takes for itself (dspy/predict/predict.py, ``_forward_preprocess``):
# an input field of one of these names would crash the call (lm, config, new_signature) or never reach the
# model (demos, prediction, signature). Outputs may use them.
_PREDICT_ARGS = frozenset({"lm", "config", "demos", "new_signature", "prediction", "signature"})
# Names DSPy's adapters (dspy/adapters) take for themselves: ChatAdapter and BAMLAdapter end every answer with
# the marker ``[[ ## completed ## ]]``, which a field of that name would be read from (an answer of the marker
# alone would pass); every adapter writes the call's log probabilities into the outputs as ``logprobs``.
_ADAPTER_NAMES = {"completed": "the marker '[[ ## completed ## ]]' that ends every answer of DSPy's ChatAdapter",
                  "logprobs": "the output they put the model's log probabilities under"}
# Common type names from other languages and typing spellings -> the flowdsl type. Keys are written without
# spaces: a type is looked up with its spaces removed.
_TYPE_HINTS = {
    "string": "str", "text": "str", "integer": "int", "number": "float", "double": "float",
    "boolean": "bool", "list": "list[str]", "array": "list[str]", "object": "dict", "List[str]": "list[str]",
    "List[int]": "list[int]", "List[float]": "list[float]", "Dict": "dict", "dict[str,Any]": "dict",
    "Dict[str,Any]": "dict", "dict[str,str]": "dict", "Dict[str,str]": "dict", "Any": "dict", "json": "dict",
}


class SignatureError(ValueError):
    """A malformed LLM signature.

    ``offset`` is the 0-based character offset in the signature string (None for
    the mapping form); ``path`` is a JSON pointer inside the signature mapping
    (``/outputs/tone/enum``, empty for the string form); ``code`` is the
    diagnostic code the compiler reports (FD601 malformed, FD602 unknown type).
    ``field`` names the field when the error is about that field's type (or, in the mapping form, its spec)
    alone: such an error does not stop :func:`read_signature` reading the rest.
    """

    def __init__(self, message: str, offset: int | None = None, *, path: str = "", code: str = "FD601"):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.path = path
        self.code = code
        self.text: str | None = None  # the signature string, set by parse_signature
        self.field: str | None = None  # the field whose type (or spec) alone is wrong

    def describe(self) -> str:
        """The message with where it is in the signature string, for diagnostics.

        The place is given inside the signature (``at character 8 of the signature: "strng, b -> c"``),
        not as a line and column of the file: a folded or quoted YAML scalar does not keep its characters
        where the file has them.
        """
        if self.offset is None or self.text is None:
            return self.message
        rest = self.text[self.offset:]
        if not rest.strip():
            return f"{self.message} (at the end of the signature)"
        shown = " ".join(rest.split())
        shown = shown if len(shown) <= 30 else shown[:29] + "…"
        return f"{self.message} (at character {self.offset + 1} of the signature: {_show(shown)})"


def parse_signature(text: str) -> dict[str, list[dict[str, Any]]]:
    """Parse a DSPy-style signature string into the normalized ``{"inputs", "outputs"}`` form.

    Each side of ``->`` is a comma-separated list of ``name`` or ``name: type``
    (type ``str`` when omitted). Types: see :data:`TYPES`, plus
    ``Literal["a", "b"]`` for an enum. Raises :class:`SignatureError`.
    """
    if not isinstance(text, str):
        raise SignatureError(f"a signature string was expected, found {type(text).__name__}", 0)
    signature, errors = read_signature(text)
    if errors:
        raise errors[0]
    assert signature is not None
    return signature


def read_signature(signature: str | Mapping[str, Any]) -> tuple[dict[str, list[dict[str, Any]]] | None,
                                                              list[SignatureError]]:
    """Read either source form past the errors of single fields: the normalized signature and every error, in
    the order found (what the checks report at once).

    An error about one field's type (a string form's ``name: type``; a mapping form's field spec) has its
    ``field`` set, and the reading goes on with that field standing as a ``str`` in the signature. Any other
    error stops it: it is the last of the errors and the signature is None. No error: ``(signature, [])``,
    as :func:`parse_signature` or :func:`normalize_fields` returns it.
    """
    errors: list[SignatureError] = []
    result: dict[str, list[dict[str, Any]]] | None = None
    try:
        result = _parse_string(signature, errors) if isinstance(signature, str) else \
            _normalize_fields(signature, errors)
    except SignatureError as exc:
        errors.append(exc)
    if isinstance(signature, str):
        for error in errors:
            error.text = signature
    return (None if errors and errors[-1].field is None else result), errors


def _parse_string(text: str, errors: list[SignatureError]) -> dict[str, list[dict[str, Any]]]:
    arrows = [i for i, ch in _top_level(text) if text.startswith("->", i)]
    if not arrows:
        raise SignatureError(
            f"found no '->' in {text.strip()!r}; expected 'inputs -> outputs', e.g. 'question -> answer'",
            len(text),
        )
    if len(arrows) > 1:
        raise SignatureError("found a second '->'; expected exactly one, between the inputs and the outputs",
                             arrows[1])
    arrow = arrows[0]
    inputs = _parse_side(text, 0, arrow, "inputs", errors)
    outputs = _parse_side(text, arrow + 2, len(text), "outputs", errors)
    seen = {f["name"]: off for f, off in inputs}
    for f, off in outputs:
        if f["name"] in seen:
            raise SignatureError(
                f"found '{f['name']}' both among the inputs and the outputs; expected each field on one side only",
                off
            )
    return {"inputs": [f for f, _ in inputs], "outputs": [f for f, _ in outputs]}


def normalize_fields(mapping_form: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Normalize the typed-fields form ``{"inputs": {name: spec}, "outputs": {name: spec}}``.

    A field spec is a type string (``"list[str]"``), ``None`` (``str``), or a
    mapping with ``type``, ``desc`` and ``enum`` (each optional; with ``enum``
    and no ``type`` the type follows the values). Field order is kept as written.
    Raises :class:`SignatureError` with ``path`` set.
    """
    errors: list[SignatureError] = []
    try:
        signature = _normalize_fields(mapping_form, errors)
    except SignatureError as exc:
        errors.append(exc)
    if errors:
        raise errors[0]
    return signature


def _normalize_fields(mapping_form: Any, errors: list[SignatureError]) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(mapping_form, Mapping):
        raise SignatureError(f"a signature mapping with 'inputs' and 'outputs' was expected, "
                             f"found {_kind(mapping_form)}")
    for key in mapping_form:
        if key not in ("inputs", "outputs"):
            raise SignatureError(f"unknown key '{key}' in the signature; expected 'inputs' and 'outputs'"
                                 + _did_you_mean(str(key), ("inputs", "outputs")), path=f"/{_esc(key)}")
    result: dict[str, list[dict[str, Any]]] = {}
    names: dict[str, str] = {}
    for side in ("inputs", "outputs"):
        fields = mapping_form.get(side)
        if not isinstance(fields, Mapping) or not fields:
            found = "nothing" if fields is None else ("an empty mapping" if not fields else _kind(fields))
            raise SignatureError(f"the signature's '{side}' must map at least one field name to its type; "
                                 f"found {found}", path=f"/{side}")
        result[side] = []
        for name, spec in fields.items():
            path = f"/{side}/{_esc(name)}"
            problem = _name_problem(name, side)
            if problem:
                raise SignatureError(problem, path=path)
            if name in names:
                raise SignatureError(
                    f"found '{name}' both among the inputs and the outputs; expected each field on one side only",
                    path=path,
                )
            names[name] = side
            try:
                result[side].append(_field_from_spec(name, spec, path))
            except SignatureError as exc:  # about this field alone: the others are read on
                exc.field = name
                errors.append(exc)
                result[side].append({"name": name, "type": "str", "desc": None, "enum": None})
    return result


def normalize_signature(signature: str | Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Normalize either source form; an already normalized signature is checked and returned as is."""
    if isinstance(signature, str):
        return parse_signature(signature)
    sides = ("inputs", "outputs")
    if isinstance(signature, Mapping) and all(isinstance(signature.get(s), list) for s in sides):
        for side in ("inputs", "outputs"):
            for i, f in enumerate(signature[side]):
                if not isinstance(f, Mapping) or f.get("type") not in TYPES or _name_problem(f.get("name"), side):
                    raise SignatureError(f"not a normalized field: {f!r}", path=f"/{side}/{i}")
        return {s: [dict(f) for f in signature[s]] for s in ("inputs", "outputs")}
    return normalize_fields(signature)


def coerce_value(field: Mapping[str, Any], value: Any) -> Any:
    """Convert ``value`` to ``field``'s declared type, or raise ``ValueError`` saying why not.

    ``value`` is JSON data or the text of a model's answer; the rules are those of
    docs/llm.md, the same for model answers, fallback results, run inputs and demos:

    - ``str``: text as it is; a number, boolean, list or object becomes its JSON text; null is refused;
    - ``int``: an integer, a number with no fractional part (``3.0``), or text written as one in decimal
      (``"42"``, ``"-7"``, ``"3.0"``, ``"1e3"``); not ``"0x10"``, ``"1_000"``, ``"true"`` or a boolean;
    - ``float``: a finite number, or text written as one in decimal (``"9.5"``, ``"1e3"``);
    - ``bool``: a boolean, or the text ``true``/``false``/``yes``/``no`` in any case; not ``1``/``0``;
    - ``list[T]``: a list, or text that is a JSON list, each item converted by ``T``'s rule;
    - ``dict``: an object, or text that is a JSON object;
    - an enum: converted by its type's rule, then equal to one of the listed values.

    Text is trimmed and one pair of surrounding quotes dropped before a number, boolean or enum value is
    read. The result is JSON-serializable.
    """
    ftype = field.get("type") or "str"
    converted = _coerce(ftype, value)
    enum = field.get("enum")
    if enum is not None:
        if isinstance(converted, str):
            converted = _unquote(converted.strip())
        if not any(_same(converted, e) for e in enum):
            raise ValueError(f"{_show(value)} is not one of: {', '.join(_show(e) for e in enum)}")
        converted = next(e for e in enum if _same(converted, e))
    return converted


def check_llm_block(llm: Mapping[str, Any], untyped: Collection[str] = ()) -> list[tuple[str, str, str]]:
    """Problems of a normalized ``llm`` block beyond its signature: ``(code, pointer, message)``.

    Checks the module name, a ``reasoning`` input or output under ``chain_of_thought``,
    that ``redact`` names input fields, and that each demo gives every field of
    the signature a value of its type (FD603). Pointers are relative to the
    ``llm`` block. ``untyped``: the fields whose type is in error (:func:`read_signature`), whose demo values
    are not checked.
    """
    problems: list[tuple[str, str, str]] = []
    signature = llm.get("signature") or {}
    module = llm.get("module") or "predict"
    if module not in MODULES:
        problems.append(("FD201", "/module", f"unknown module '{module}'; expected one of: "
                         f"{', '.join(MODULES)}{_did_you_mean(str(module), MODULES)}"))
    fields = [*signature.get("inputs", []), *signature.get("outputs", [])]
    outputs = signature.get("outputs", [])
    if module == "chain_of_thought" and any(f["name"] == REASONING_FIELD for f in outputs):
        problems.append(("FD601", "/signature", "chain_of_thought adds its own 'reasoning' output; "
                         "rename the output field 'reasoning'"))
    if module == "chain_of_thought" and any(f["name"] == REASONING_FIELD for f in signature.get("inputs", [])):
        # DSPy would drop the input's value without a word: its signature's 'reasoning' is that output
        problems.append(("FD601", "/signature", "chain_of_thought adds its own 'reasoning' output, so an input "
                         "named 'reasoning' would not reach the model; rename the input field 'reasoning'"))
    inputs = [f["name"] for f in signature.get("inputs", [])]
    redact = llm.get("redact") or []
    for i, name in enumerate(redact if isinstance(redact, list | tuple) else ()):
        if name not in inputs:
            what = "an output field" if any(f["name"] == name for f in outputs) else "not a field of the signature"
            problems.append(("FD601", f"/redact/{i}", f"redact names '{name}', which is {what}; expected an "
                             f"input field: {', '.join(inputs)}{_did_you_mean(str(name), inputs)}"))
    demos = llm.get("demos") or []
    if not isinstance(demos, list):
        return [*problems, ("FD603", "/demos", f"demos must be a list of examples, found {_kind(demos)}")]
    known = {f["name"] for f in fields}
    if module == "chain_of_thought":
        known.add(REASONING_FIELD)  # a demo may show its reasoning
    for i, demo in enumerate(demos):
        if not isinstance(demo, Mapping):
            problems.append(("FD603", f"/demos/{i}",
                             f"a demo must be a mapping of field values, found {_kind(demo)}"))
            continue
        missing = [f["name"] for f in fields if f["name"] not in demo]
        if missing:
            problems.append(("FD603", f"/demos/{i}", f"demo {i + 1} gives no value for {_names(missing)}; "
                             "a demo gives every field of the signature"))
        for key in demo:
            if key not in known:
                problems.append(("FD603", f"/demos/{i}/{_esc(key)}", f"demo {i + 1} has '{key}', which is "
                                 "not a field of the signature" + _did_you_mean(str(key), sorted(known))))
        for f in fields:
            if f["name"] in demo and f["name"] not in untyped:
                try:
                    coerce_value(f, demo[f["name"]])
                except ValueError as exc:
                    problems.append(("FD603", f"/demos/{i}/{_esc(f['name'])}",
                                     f"demo {i + 1}, field '{f['name']}' ({describe_type(f)}): {exc}"))
        for key, value in demo.items():
            template = next((m for text in _texts(value) if (m := TEMPLATE_START.search(text))), None)
            if template is not None:
                found, at = template.string, template.start()
                end = found.find("}", at)
                shown = found[at:end + 1] if 0 <= end - at < 60 else found[at:at + 20] + "…"
                problems.append(("FD201", f"/demos/{i}/{_esc(key)}", f"demo {i + 1}, field '{key}', contains "
                                 f"{json.dumps(shown, ensure_ascii=False)}, but demos are sent to the model as "
                                 "written, not filled in like a 'with:' template; write '$${' for a literal '${'"))
    return problems


#: a ``${`` that starts a template (``$${`` is a literal ``${``, as in every template of the language)
TEMPLATE_START = re.compile(r"(?<!\$)\$\{")


def unescape_demos(demos: list[Any]) -> list[Any]:
    """The demos as the model is sent them: ``$${`` (a literal ``${`` in the spec) written ``${`` in every text."""
    def unescape(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("$${", "${")
        if isinstance(value, Mapping):
            return {k: unescape(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [unescape(v) for v in value]
        return value

    return [unescape(d) for d in demos]


def leaves(value: Any) -> Iterator[Any]:
    """The scalars in a JSON-like value: itself, or those of its items (mappings' values, lists' items)."""
    if isinstance(value, Mapping):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def _texts(value: Any) -> Iterator[str]:
    """The texts in a value: itself, or those of its items."""
    return (leaf for leaf in leaves(value) if isinstance(leaf, str))


def describe_type(field: Mapping[str, Any]) -> str:
    """A field's type as a person reads it: ``int``, ``list[str]``, ``one of formal, friendly``."""
    if field.get("enum") is not None:
        return "one of " + ", ".join(_show(e) for e in field["enum"])
    return str(field.get("type") or "str")


# --- the string form ----------------------------------------------------------------------------


def _top_level(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, str]]:
    """Characters outside quotes and brackets, with their offsets."""
    depth, quote, i, stop = 0, "", start, len(text) if end is None else end
    while i < stop:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth <= 0:
            yield i, ch
        i += 1


def _parse_side(text: str, start: int, end: int, side: str,
                errors: list[SignatureError]) -> list[tuple[dict[str, Any], int]]:
    if not text[start:end].strip():
        where = "before" if side == "inputs" else "after"
        raise SignatureError(f"found no {side} {where} '->'; expected at least one field name", start)
    cuts = [i for i, ch in _top_level(text, start, end) if ch == ","]
    fields: list[tuple[dict[str, Any], int]] = []
    seen: set[str] = set()
    for a, b in zip([start, *[c + 1 for c in cuts]], [*cuts, end], strict=True):
        chunk = text[a:b]
        off = a + len(chunk) - len(chunk.lstrip())
        if not chunk.strip():
            raise SignatureError(f"found an empty field among the {side} (two commas, or a comma at the "
                                 "end); expected a field name", off)
        colon = next((i for i, ch in _top_level(text, a, b) if ch == ":"), None)
        name = text[a:colon if colon is not None else b].strip()
        problem = _name_problem(name, side)
        if problem:
            raise SignatureError(problem, off)
        if name in seen:
            raise SignatureError(f"found field '{name}' twice among the {side}; expected each field once", off)
        seen.add(name)
        field: dict[str, Any] = {"name": name, "type": "str", "desc": None, "enum": None}
        if colon is not None:
            type_text = text[colon + 1:b]
            type_off = colon + 1 + len(type_text) - len(type_text.lstrip())
            try:
                field["type"], field["enum"] = _parse_type(type_text.strip(), name, type_off)
            except SignatureError as exc:  # about this field's type alone: the others are read on
                exc.field = name
                errors.append(exc)
        fields.append((field, off))
    return fields


def _parse_type(text: str, name: str, offset: int | None, path: str = "") -> tuple[str, list[Any] | None]:
    compact = re.sub(r"\s+", "", text)
    if compact in TYPES:
        return compact, None
    m = re.fullmatch(r"Literal\s*\[(.*)\]", text, re.S)
    if m and not m.group(1).strip():
        raise SignatureError(f"found no values in Literal[] of field '{name}'; expected at least one",
                             offset, path=path)
    if m:
        values = []
        inner_start = text.index("[") + 1
        cuts = [i for i, ch in _top_level(m.group(1)) if ch == ","]
        for a, b in zip([0, *[c + 1 for c in cuts]], [*cuts, len(m.group(1))], strict=True):
            chunk = m.group(1)[a:b]
            piece = chunk.strip()
            try:
                value = ast.literal_eval(piece) if piece else None
            except (ValueError, SyntaxError):
                # a bare word: Literal[formal, friendly]
                value = piece if re.fullmatch(r"[A-Za-z_][\w-]*", piece) else None
            where = None if offset is None else offset + inner_start + a + len(chunk) - len(chunk.lstrip())
            if not isinstance(value, str | int | float | bool):
                raise SignatureError(f"found {piece or 'nothing'!r}, not a valid Literal value of field "
                                     f"'{name}'; expected quoted strings, numbers, True or False",
                                     where, path=path)
            problem = _not_json(value)
            if problem:
                raise SignatureError(f"found {piece!r}, not a valid Literal value of field '{name}': {problem}; "
                                     "expected quoted strings, finite numbers, True or False", where, path=path)
            # an escape (\x1b, \033, \N{ESCAPE}) writes what the file itself may not hold (FD110)
            bad = control_character(value) if isinstance(value, str) else None
            if bad:
                raise SignatureError(f"found {piece!r}, not a valid Literal value of field '{name}': {bad} "
                                     "(written here as an escape); expected text without control characters",
                                     where, path=path, code="FD110")
            values.append(value)
        return _enum_type(values, name, offset, path), _check_enum(values, name, offset, path)
    if not text:
        raise SignatureError(f"found no type after ':' for field '{name}'; expected one of "
                             f"{', '.join(TYPES)}", offset, path=path, code="FD602")
    raise SignatureError(
        f"found unknown type '{text}' for field '{name}'; expected one of {', '.join(TYPES)} or Literal[...]"
        + _type_hint(text), offset, path=path, code="FD602",
    )


_IDENT = re.compile(r"[A-Za-z_]\w*")
_GENERIC = re.compile(r"([A-Za-z_]\w*)\[(.*)\]", re.S)
_LIST_ITEMS = ("str", "int", "float")
# spellings close to a type name (cutoff 0.75: 'strng' -> str, 'lsit' -> list, but not 'set' -> str)
_SPELLINGS = {**{t: t for t in ("str", "int", "float", "bool", "dict", "list")},
              **{k.lower(): v for k, v in _TYPE_HINTS.items() if _IDENT.fullmatch(k)}}


def _type_hint(text: str) -> str:
    """What to tell about an unknown type: a close spelling of a type, or what is supported instead.

    Only a near-miss of a type *name* is suggested (``lsit[str]`` -> ``list[str]``, ``integer`` -> ``int``);
    a well-formed type that flowdsl does not have (``list[bool]``, ``dict[str, int]``) gets a note on what
    it has instead, never the nearest string of :data:`TYPES`.
    """
    compact = re.sub(r"\s+", "", text)
    hint = _TYPE_HINTS.get(compact) or _TYPE_HINTS.get(compact.lower())
    if hint is None and len(compact) > 2 and compact[0] == compact[-1] and compact[0] in "'\"":
        hint = _spelled(compact[1:-1])  # a quoted type name: 'str'
    elif hint is None and _IDENT.fullmatch(compact):
        hint = _spelled(compact)
    elif hint is None and (m := _GENERIC.fullmatch(compact)) and _paired(m.group(2)):
        outer, inner = _spelled(m.group(1), ("list", "dict", "literal", "array", "optional")), m.group(2)
        if outer in ("list", "array"):
            item = _spelled(inner) if _IDENT.fullmatch(inner) else None
            if item not in _LIST_ITEMS:
                return " (a list field holds str, int or float items: list[str], list[int] or list[float])"
            hint = f"list[{item}]"
        elif outer == "dict":
            return (" (did you mean 'dict'? a dict field holds any JSON object; the types of its keys and values "
                    "are not declared)")
        elif outer == "literal":
            hint = "Literal" + text[text.index("["):]
        elif outer == "optional" and _IDENT.fullmatch(inner) and _spelled(inner) in TYPES:
            return f" (did you mean '{_spelled(inner)}'? a field is never optional: null is not a value)"
        else:
            return " (a type with parameters is one of list[str], list[int], list[float] or Literal[...])"
    elif hint is None and not _paired(compact):
        return " (its brackets do not pair up)"
    elif hint is None:
        hint = next(iter(difflib.get_close_matches(compact, TYPES, n=1, cutoff=0.75)), None)
    return f" (did you mean '{hint}'?)" if hint else ""


def _spelled(word: str, names: tuple[str, ...] | None = None) -> str | None:
    """The type ``word`` is a close spelling of (``Strng`` -> ``str``), among ``names`` when given."""
    options = {n: n for n in names} if names is not None else _SPELLINGS
    close = difflib.get_close_matches(word.lower(), list(options), n=1, cutoff=0.75)
    return options[close[0]] if close else None


def _paired(text: str) -> bool:
    """Whether the brackets of ``text`` (outside quotes) pair up."""
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[]":
            depth += 1 if ch == "[" else -1
            if depth < 0:
                return False
    return depth == 0


# --- the mapping form ---------------------------------------------------------------------------


def _field_from_spec(name: str, spec: Any, path: str) -> dict[str, Any]:
    field: dict[str, Any] = {"name": name, "type": "str", "desc": None, "enum": None}
    if spec is None:
        return field
    if isinstance(spec, str):
        field["type"], field["enum"] = _parse_type(spec.strip(), name, None, path)
        return field
    if not isinstance(spec, Mapping):
        raise SignatureError(f"field '{name}' must be given a type string or a mapping with type, desc, "
                             f"enum; found {_kind(spec)}", path=path)
    for key in spec:
        if key not in _FIELD_KEYS:
            raise SignatureError(f"unknown key '{key}' in field '{name}'; expected type, desc or enum"
                                 + _did_you_mean(str(key), _FIELD_KEYS), path=f"{path}/{_esc(key)}")
    desc = spec.get("desc")
    if desc is not None and not isinstance(desc, str):
        raise SignatureError(f"the desc of field '{name}' must be text, found {_kind(desc)}",
                             path=f"{path}/desc")
    field["desc"] = desc
    ftype, enum = spec.get("type"), spec.get("enum")
    if ftype is not None:
        if not isinstance(ftype, str):
            raise SignatureError(f"the type of field '{name}' must be a type name, found {_kind(ftype)}",
                                 path=f"{path}/type", code="FD602")
        field["type"], field["enum"] = _parse_type(ftype.strip(), name, None, f"{path}/type")
    if enum is not None:
        if field["enum"] is not None:
            raise SignatureError(f"field '{name}' gives its values twice (a Literal type and enum); keep one",
                                 path=f"{path}/enum")
        if not isinstance(enum, list) or not enum:
            raise SignatureError(f"the enum of field '{name}' must be a non-empty list of values, "
                                 f"found {_kind(enum)}", path=f"{path}/enum")
        if ftype is None:
            field["type"] = _enum_type(enum, name, None, f"{path}/enum")
        elif field["type"] not in _ENUM_TYPES:
            raise SignatureError(f"field '{name}' of type {field['type']} cannot have an enum; "
                                 f"expected one of the types {', '.join(_ENUM_TYPES)}", path=f"{path}/enum")
        for i, value in enumerate(enum):
            if not _is_scalar(value) or not _fits(field["type"], value):
                raise SignatureError(f"enum value {_show(value)} of field '{name}' is not {_a(field['type'])}",
                                     path=f"{path}/enum/{i}")
        field["enum"] = _check_enum(list(enum), name, None, f"{path}/enum")
    return field


# --- values -------------------------------------------------------------------------------------


def _coerce(ftype: str, value: Any) -> Any:
    if value is None:
        raise ValueError("no value (null)")
    if ftype == "str":
        if isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if ftype in ("int", "float", "bool"):
        return _scalar(ftype, value)
    if ftype.startswith("list["):
        if isinstance(value, str):
            value = _parse_json(value, "a JSON list")
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a JSON list, found {_show(value)}")
        item = ftype[5:-1]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(item, v))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        return out
    if ftype == "dict":
        if isinstance(value, str):
            value = _parse_json(value, "a JSON object")
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"expected a JSON object, found {_show(value)}")
        try:
            return json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            raise ValueError(f"expected a JSON object, found {_show(value)}") from None
    raise ValueError(f"unknown type {ftype}")


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOL_TEXT = {"true": True, "yes": True, "false": False, "no": False}


def _scalar(ftype: str, value: Any) -> Any:
    text = _unquote(value.strip()) if isinstance(value, str) else None
    if ftype == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[text.lower()]
        raise ValueError(f"expected true, false, yes or no, found {_show(value)}")
    if isinstance(value, bool):
        raise ValueError(f"expected {'an integer' if ftype == 'int' else 'a number'}, found {_show(value)}")
    number: int | float | None = value if isinstance(value, int | float) else None
    if text is not None:
        if _INT_TEXT.fullmatch(text):
            if len(text.lstrip("+-")) > _int_digits():
                raise ValueError(f"expected an integer of at most {_int_digits()} digits (the most Python writes "
                                 f"as text), found {_show(value)}")
            number = int(text)
        elif _NUMBER_TEXT.fullmatch(text):
            if ftype == "int":  # "3.0", "1e3": exactly, without a detour through a float
                exact = decimal.Decimal(text)
                if exact != exact.to_integral_value():
                    raise ValueError(f"expected an integer, found {_show(value)}")
                limit = _int_digits()
                if exact.adjusted() + 1 > limit:
                    raise ValueError(f"expected an integer of at most {limit} digits (the most Python writes as "
                                     f"text), found {_show(value)}")
                return int(exact)
            number = float(text)
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected {'an integer' if ftype == 'int' else 'a number'}, found {_show(value)}")
    if ftype == "float":
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"expected an integer, found {_show(value)}")
        return int(number)
    return number


def _int_digits() -> int:
    """The most digits an integer value may have: what Python converts to text (and JSON holds), 4,300 by
    default; never unbounded (``PYTHONINTMAXSTRDIGITS=0``: then 4,300), as reading ``1e50000000`` would hang."""
    return sys.get_int_max_str_digits() or 4300


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"expected {what}, found {_show(text)}") from None


# --- helpers ------------------------------------------------------------------------------------


def _name_problem(name: Any, side: str = "") -> str | None:
    if not isinstance(name, str):
        return f"a field name must be text, found {_kind(name)}"
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        shown = name if name else "nothing"
        return (f"found '{shown}', which is not a valid field name; expected a letter followed by letters, "
                f"digits or '_' "
                f"(at most {_MAX_NAME} characters)")
    if name in _RESERVED or name.startswith("model_"):
        return f"found '{name}', a name reserved by DSPy signatures; expected another field name"
    if name == "completed" or (name == "logprobs" and side != "inputs"):
        return f"found '{name}', a name reserved by DSPy's adapters ({_ADAPTER_NAMES[name]}); expected another " \
            "field name"
    if side == "inputs" and name in _PREDICT_ARGS:
        return (f"found the input field '{name}', a keyword argument DSPy's Predict takes for itself "
                f"({', '.join(sorted(_PREDICT_ARGS))}), so its value would not reach the model as an input; "
                "expected another name for the input")
    return None


def _enum_type(values: list[Any], name: str, offset: int | None, path: str) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, str) for v in values):
        return "str"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "float"
    raise SignatureError(f"found values of field '{name}' that mix types ({', '.join(_show(v) for v in values)}); "
                         "expected all text, all numbers or all booleans", offset, path=path)


def _check_enum(values: list[Any], name: str, offset: int | None, path: str) -> list[Any]:
    if not values:
        raise SignatureError(f"found no allowed values for field '{name}'; expected at least one", offset,
                             path=path)
    for i, v in enumerate(values):
        if any(_same(v, w) for w in values[:i]):
            raise SignatureError(f"found value {_show(v)} of field '{name}' twice; expected each value once", offset,
                                 path=path)
    return values


def _not_json(value: Any) -> str | None:
    """Why a Literal value read by ``ast.literal_eval`` cannot be a value of the plan's JSON, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "it is beyond the range of a number (about ±1.8e308) and would be read as an infinite number"
    if isinstance(value, str):
        lone = next((ch for ch in value if "\ud800" <= ch <= "\udfff"), None)
        if lone is not None:
            return f"it holds the lone surrogate U+{ord(lone):04X}, which is not a character JSON text can carry"
    return None


def _fits(ftype: str, value: Any) -> bool:
    try:
        return _same(_scalar(ftype, value), value) if ftype != "str" else isinstance(value, str)
    except ValueError:
        return False


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _unquote(text: str) -> str:
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _show(value: Any, limit: int = 80) -> str:
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _a(type_name: str) -> str:
    """A type name with its article: ``an int``, ``a float``."""
    return ("an " if type_name[:1] in "aeiou" else "a ") + type_name


def _names(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _esc(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")
