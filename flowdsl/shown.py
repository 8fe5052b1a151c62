"""Text that is not flowdsl's own, made safe to show: on one line, unable to drive a terminal, displayed in the
order it is read.

Stage: shared by every stage that shows a user's text (the diagnostics of the front end, the runtime's summaries
and input errors, the diagrams' captions, the CLI). Imports only the stdlib: ``flowdsl.stdio`` loads it at the
process's start.
"""

from __future__ import annotations

import re

#: what text that is not flowdsl's own never shows as it is: control characters (C0, DEL, C1 — ESC and CSI start
#: terminal escape sequences, CR and line feeds start a line of their own, forging one), Unicode's line and
#: paragraph separators, and the bidirectional formatting characters and marks (they display text in another order
#: than it is read: "Trojan Source")
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT.get(char) or f"\\u{ord(char):04x}"


def visible(text: object) -> str:
    """``text`` on one line and inert: each character of :data:`UNSAFE` written as a JSON string writes it (``\\n``,
    ``\\t``, ESC as ``\\u001b``, U+202E as ``\\u202e``), every other character as it is.

    For any text flowdsl shows and did not write itself — a value quoted in a diagnostic, a worker's error message,
    a key of the run input, a name read from a record: so shown, it can neither send the terminal escape sequences
    nor begin a line of its own that would pass for flowdsl's (``all good: completed``). The escapes are those of
    ``--format json`` and of the run record, where the same text can be looked for. Rich markup is not escaped here
    (``rich.markup.escape`` after this)."""
    said = str(text)
    if said.isprintable() or UNSAFE.search(said) is None:
        return said
    return UNSAFE.sub(_escaped, said)
