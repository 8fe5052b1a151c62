"""FD313 and the exception classes a process checking a spec cannot see: those of a library that a worker imports
only when it runs (``import httpx`` inside the function), or that an LLM step's client raises. Their names cannot
be told from a typo by their absence, so only a name that reads as a misspelling of a known one is reported
(docs/diagnostics.md, FD313).
"""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from flowdsl.api import CompileResult, compile_spec
from flowdsl.checks_retry import Misspellings, misspelt

#: names of classes of real libraries (httpx, openai, litellm, dspy, requests, urllib3, botocore) a worker may import
#: lazily, several of them one or two letters from a name Python or flowdsl's own imports define
LIBRARY_CLASSES = ["ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "RateLimitError", "APIConnectionError",
                   "APITimeoutError", "InternalServerError", "ContextWindowExceededError", "AdapterParseError",
                   "Timeout", "LMTimeoutError", "NoPermissionError", "ReaderError", "SSLError", "OCIError",
                   "LoadError", "herror", "HTTPStatusError", "ClientError", "ServiceUnavailableError"]


@pytest.fixture
def lazy_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh worker module whose worker imports, only when it runs, a client module defining LIBRARY_CLASSES."""
    from flowdsl.workers import registry

    monkeypatch.setattr(registry, "_workers", {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    tag = uuid.uuid4().hex[:8]
    name, client = f"crawl_workers_{tag}", f"http_client_{tag}"
    for module in (name, client):
        monkeypatch.delitem(sys.modules, module, raising=False)
    (tmp_path / f"{client}.py").write_text(
        "".join(f"class {c}(Exception):\n    pass\n\n\n" for c in LIBRARY_CLASSES), encoding="utf-8")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""\
        from flowdsl.workers import worker


        class PageGone(Exception):
            pass


        @worker("fetch_page")
        def fetch_page(data, ctx):
            import {client}  # imported when the step runs: the check does not see its classes

            raise {client}.ConnectTimeout("slow")
        """), encoding="utf-8")
    return name


def compiled(tmp_path: Path, text: str) -> CompileResult:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return compile_spec(str(path), check_workers=True, search_path=str(tmp_path))


def test_classes_of_a_library_imported_when_the_worker_runs_are_not_reported(tmp_path: Path,
                                                                            lazy_workers: str) -> None:
    names = ", ".join(LIBRARY_CLASSES)
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: crawl
        workers: [{lazy_workers}]
        defaults:
          retry: {{attempts: 3, "on": [{names}]}}
        steps:
          - fetch_page:
              retry: {{not_on: [{names}, PageGone]}}
        """)
    assert result.plan is not None
    assert [d.format() for d in result.diagnostics] == []


def test_a_misspelling_of_a_known_name_is_still_reported(tmp_path: Path, lazy_workers: str) -> None:
    result = compiled(tmp_path, f"""\
        flowdsl: 1
        name: crawl
        workers: [{lazy_workers}]
        steps:
          - fetch_page:
              retry: {{"on": [PageGnoe, ConnectionEror, TimeOutError, StepTimout], not_on: [FailWehn, IOError]}}
        """)
    found = [(d.code, d.message.split("'")[3], d.message.split("did you mean '")[1].split("'")[0])
             for d in result.diagnostics]
    assert found == [("FD313", "PageGnoe", "PageGone"), ("FD313", "ConnectionEror", "ConnectionError"),
                     ("FD313", "TimeOutError", "TimeoutError"), ("FD313", "StepTimout", "StepTimeout"),
                     ("FD313", "FailWehn", "FailWhen"), ("FD313", "IOError", "OSError")]


@pytest.mark.parametrize(("name", "known", "limit", "distance"), [
    ("CardDeclnied", "CardDeclined", 2, 1),  # two letters swapped
    ("GatewayTimout", "GatewayTimeout", 2, 1),  # one left out
    ("GatewayTimeoutt", "GatewayTimeout", 2, 1),  # one too many, at the end
    ("PaymentErorr", "PaymentError", 2, 1),
    ("PaymentErrrr", "PaymentError", 2, 1),
    ("PaymnetEror", "PaymentError", 2, 2),
    ("KeyEror", "KeyError", 1, 1),
    ("ab", "ba", 1, 1),
    ("LMTimeoutError", "TimeoutError", 2, None),  # another class: a start added
    ("herror", "error", 1, None),
    ("SSLError", "OSError", 1, None),  # two letters off in a short name
    ("ReaderError", "ReadError", 1, None),
    ("PaymXYZError", "PaymentError", 2, None),  # three
])
def test_misspelt(name: str, known: str, limit: int, distance: int | None) -> None:
    assert misspelt(name, known, limit) == distance


def test_many_unknown_names_are_looked_at_in_bounded_time() -> None:
    near = Misspellings([f"Error{i}Kind{i * 7919 % 10007}" for i in range(5_000)] + ["CardDeclined"])
    start = time.perf_counter()
    answers = [near.meant(f"Error{i}Knid{i}") for i in range(20_000)]
    assert time.perf_counter() - start < 10
    assert near.meant("CardDeclnied") in ("CardDeclined", None)  # (past the budget only aliases are looked up)
    assert near.meant("x" * 1_000_000) is None
    assert any(a is not None for a in answers[:10])
