"""LLM steps: fixes of the third audit — providers declared to DSPy, LiteLLM warmed before the run when DSPy will
call through it, names DSPy's adapters reserve, control characters of a reply in ``show``, templates in demos, what
the fallback line says of an unusable model, the Redis worker's model, and a blank ``--lm``.

Offline: the models are test engines, a local OpenAI-compatible server on 127.0.0.1 (the declared provider's
address), or none at all; ``LITELLM_LOCAL_MODEL_COST_MAP`` spares LiteLLM's cost-map download.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flowdsl.api import SpecError, compile_text
from flowdsl.llm import ON_REDIS_WORKER, LLMNotConfigured, run_llm_step
from flowdsl.llm_signature import SignatureError, normalize_fields, normalize_signature, parse_signature
from flowdsl.runtime.summary import fallback_reason, fallback_text
from flowdsl.runtime.timeline import _llm_text
from tests.test_llm_runtime import cli, fallback_run, go, model, of, recording, summary_text

pytestmark = pytest.mark.llm
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_model_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWDSL_LM", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_BASE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


# --- F1: a provider declared with dspy.lm15.register_provider ------------------------------------------


class _Gateway(BaseHTTPRequestHandler):
    """An OpenAI-compatible ``/chat/completions`` answering every request with ``reply``."""

    reply = "[[ ## greeting ## ]]\nHi from the gateway\n\n[[ ## completed ## ]]"
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "model": body.get("model"),
                                "auth": self.headers.get("Authorization")})
        answer = json.dumps({
            "id": "c1", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.reply}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    _Gateway.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_string_of_a_provider_declared_to_dspy_is_valid_and_used(
        dspy: Any, gateway: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dspy.lm15 import AccessPolicy, OpenAIChatCompat, ProviderDefinition, register_provider, unregister_provider

    steps = """
steps:
  - greet:
      llm: {signature: "name -> greeting", lm: fdgw/some-model}
      fallback: canned
"""
    workers = {"canned": recording([], lambda d: {"greeting": "canned"})}
    # not declared (yet): no router knows 'fdgw', and the fallback says the string is invalid
    r = go(steps, {"name": "Ann"}, workers)
    assert r.context["greeting"] == "canned"
    (started,) = of(r, "fallback_started", "greet")
    assert "the model string 'fdgw/some-model' is invalid" in started["error"]["message"]
    register_provider(ProviderDefinition.chat(AccessPolicy(provider="fdgw", env_keys=("FDGW_API_KEY",),
                                                           base_url=gateway), compat=OpenAIChatCompat()))
    try:
        # declared, as DSPy routes it: no longer "invalid" (the verdict above is not kept), but its key is missing
        block = {"signature": parse_signature("name -> greeting"), "module": "predict", "demos": []}
        monkeypatch.delenv("FDGW_API_KEY", raising=False)
        with pytest.raises(LLMNotConfigured, match=r"the LM 'fdgw/some-model' cannot be used: .*FDGW_API_KEY"):
            asyncio.run(run_llm_step(block, {"name": "Ann"}, lm="fdgw/some-model", step_key="greet"))
        monkeypatch.setenv("FDGW_API_KEY", "sk-test")
        r = go(steps, {"name": "Ann"}, workers)
        assert (r.status, r.context["greeting"]) == ("completed", "Hi from the gateway"), r.error
        assert of(r, "fallback_started", "greet") == []
        assert [(s["model"], s["auth"]) for s in _Gateway.seen] == [("some-model", "Bearer sk-test")]
        (done,) = of(r, "step_succeeded", "greet")
        assert done["meta"]["llm"]["model"] == "fdgw/some-model"
    finally:
        unregister_provider("fdgw")
    # forgotten again: the string is invalid again, not served from what was checked while it was declared
    r = go(steps, {"name": "Ann"}, workers)
    assert r.context["greeting"] == "canned" and len(_Gateway.seen) == 1


# --- F2: LiteLLM imported before the run when DSPy will call through it ----------------------------------


def test_warming_imports_litellm_when_a_base_url_sends_the_call_through_it(dspy: Any) -> None:
    """``OPENAI_API_BASE`` makes DSPy send ``openai/...`` through LiteLLM (a ~3 s import): the run's warm-up
    imports it, so that the first attempt's ``timeout`` does not include it; without it LiteLLM is not needed."""
    code = (
        "import asyncio, os, sys\n"
        "from flowdsl import compile_text\n"
        "from flowdsl.runtime.execute import warm_llm\n"
        "plan = compile_text('flowdsl: 1\\nname: t\\nsteps:\\n  - a:\\n      llm: {signature: \"q -> a\"}\\n')\n"
        "asyncio.run(warm_llm(plan, lm='openai/gpt-4o-mini'))\n"
        "print('dspy' in sys.modules, 'litellm' in sys.modules)\n"
        "os.environ['OPENAI_API_BASE'] = 'http://127.0.0.1:9/v1'\n"
        "asyncio.run(warm_llm(plan, lm='openai/gpt-4o-mini'))\n"
        "print('litellm' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FLOWDSL_"))}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    assert out.stdout.split() == ["True", "False", "True"], out.stdout + out.stderr


# --- F3: names DSPy's adapters reserve --------------------------------------------------------------------


@pytest.mark.parametrize("signature", ["a -> completed", "completed -> b", "a -> b, logprobs"])
def test_names_dspys_adapters_reserve_are_fd601(signature: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(signature)
    assert info.value.code == "FD601"
    assert "a name reserved by DSPy's adapters" in info.value.message
    name = "logprobs" if "logprobs" in signature else "completed"
    side = "inputs" if signature.startswith("completed") else "outputs"
    other = "inputs" if side == "outputs" else "outputs"
    with pytest.raises(SignatureError) as info:
        normalize_fields({side: {name: "str"}, other: {"x": "str"}})
    assert (info.value.code, info.value.path) == ("FD601", f"/{side}/{name}")
    # a plan built by hand is refused before DSPy would read the field from its end marker
    with pytest.raises(SignatureError, match="not a normalized field"):
        normalize_signature({side: [{"name": name, "type": "str", "desc": None, "enum": None}],
                             other: [{"name": "x", "type": "str", "desc": None, "enum": None}]})


def test_completed_is_reported_at_the_signature_and_an_input_may_be_named_logprobs() -> None:
    with pytest.raises(SpecError) as info:
        compile_text('flowdsl: 1\nname: t\nsteps:\n  - s:\n      llm: {signature: "a -> completed"}\n')
    (d,) = info.value.diagnostics
    assert (d.code, d.line, d.column) == ("FD601", 5, 24)
    assert "found 'completed', a name reserved by DSPy's adapters (the marker '[[ ## completed ## ]]'" in d.message
    assert parse_signature("logprobs -> b")["inputs"][0]["name"] == "logprobs"


# --- F4: control characters of a reply ---------------------------------------------------------------------


REPLY = "\x1b[2J\x1b[31mRED\x1b]0;pwned\x07 [[ ## n ## ]]\nx\x1b[0m \x9b2J"


def test_the_llm_line_escapes_the_control_characters_of_a_reply() -> None:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=300, highlight=False).print(_llm_text({"model": "m\x1b[1m", "prompt": [], "raw": REPLY}))
    assert out.getvalue() == ("llm: model m\\u001b[1m, 0 message(s) sent, reply: \\u001b[2J\\u001b[31mRED"
                              "\\u001b]0;pwned\\u0007 [[ ## n ## ]] x\\u001b[0m \\u009b2J\n")


def test_show_prints_no_control_character_of_a_reply(dspy: Any, adapter: Any, tmp_path: Path) -> None:
    lm, _ = model(dspy, "ansi", lambda i, o, n: REPLY)
    r = go('steps:\n  - greet:\n      llm: {signature: "name -> n: int"}\n', {"name": "Ann"}, lm=lm,
           adapter=adapter, record=True, runs_dir=tmp_path, run_id="ansi1")
    assert r.error["type"] == "OutputInvalid" and "\x1b" in r.llm_calls["greet"][0]["raw"]  # recorded as received
    shown = cli("show", "ansi1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0, shown.output
    out = shown.stdout + shown.stderr
    assert "reply: \\u001b[2J\\u001b[31mRED\\u001b]0;pwned\\u0007" in out
    assert not any(ch in out for ch in "\x1b\x07\x9b")


# --- F6: templates in demos ----------------------------------------------------------------------------


DEMO_STEP = """flowdsl: 1
name: t
steps:
  - s:
      llm:
        signature: "a, b: list[str] -> c"
        instructions: "Reply about $${ literal } please"
        demos: [{a: "demo $${ x } and $$${ z }", b: [one, "$${ w }"], c: ok}%s]
"""


@pytest.mark.parametrize(("demo", "field", "found"), [
    (', {a: "hi ${ y }", b: [], c: ok}', "a", '"${ y }"'),
    (', {a: hi, b: [one, "${ input.x }"], c: ok}', "b", '"${ input.x }"'),
])
def test_a_template_in_a_demo_is_fd201_as_in_the_instructions(demo: str, field: str, found: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_text(DEMO_STEP % demo)
    (d,) = info.value.diagnostics
    assert (d.code, d.path) == ("FD201", f"/steps/0/s/llm/demos/1/{field}")
    assert d.message == (f"demo 2, field '{field}', contains {found}, but demos are sent to the model as written, "
                         "not filled in like a 'with:' template; write '$${' for a literal '${'")


def test_a_literal_template_in_a_demo_is_sent_unescaped_as_in_the_instructions(dspy: Any, adapter: Any) -> None:
    lm, _ = model(dspy, "demo", lambda i, o, n: {"c": "fine"})
    plan = compile_text(DEMO_STEP % "")
    from flowdsl.runtime.local import run_flow

    r = asyncio.run(run_flow(plan, {"a": "x", "b": []}, lm=lm, adapter=adapter, record=False,
                             import_workers=False))
    assert r.status == "completed", r.error
    prompt = "\n".join(m["content"] for m in r.llm_calls["s"][0]["prompt"])
    assert "Reply about ${ literal } please" in prompt
    assert "[[ ## a ## ]]\ndemo ${ x } and $${ z }\n" in prompt and '[[ ## b ## ]]\n["one", "${ w }"]' in prompt
    assert "$${ x }" not in prompt and "$${ w }" not in prompt


# --- F7: what the fallback line says when a model is named but cannot be used ------------------------------


FALLBACK_STEPS = """
steps:
  - greet:
      llm: {signature: "name -> greeting"}
      fallback: canned
"""


@pytest.mark.parametrize(("lm", "why"), [
    (None, "no LM configured"),
    ("gpt4", "the model string is invalid"),
    ("openai/gpt-4o-mini", "the LM cannot be used"),
])
def test_the_fallback_line_says_why_the_model_was_not_used(dspy: Any, lm: str | None, why: str) -> None:
    r = go(FALLBACK_STEPS, {"name": "Ann"}, {"canned": recording([], lambda d: {"greeting": "Hi"})}, lm=lm)
    assert r.status == "completed"
    (started,) = of(r, "fallback_started", "greet")
    assert started["error"]["type"] == "LLMNotConfigured"
    assert started["reason"] == "no LM configured — using the fallback worker 'canned'"  # the kernel's words
    assert fallback_reason(started) == f"{why} — using the fallback worker 'canned'"
    text = summary_text(r)
    assert f"greet: {why} — used fallback canned" in text
    if lm is not None:
        assert "no LM configured" not in text


def test_the_fallback_line_says_when_dspy_is_not_installed() -> None:
    event = {"type": "fallback_started", "step": "greet", "worker": "canned",
             "reason": "no LM configured — using the fallback worker 'canned'",
             "error": {"type": "LLMNotConfigured", "message": "LLM step 'greet' needs DSPy, which is not installed "
                       "(No module named 'dspy'); install it with: pip install 'flowdsl[llm]'"}}
    assert fallback_text(event, "succeeded")[0] == "greet: DSPy is not installed — used fallback canned"
    other = {**event, "reason": "the LLM call failed for good (OutputInvalid) — using the fallback worker 'canned'",
             "error": {"type": "OutputInvalid", "message": "..."}}
    assert fallback_reason(other) == other["reason"]


def test_the_progress_line_and_show_say_why_the_model_was_not_used(tmp_path: Path) -> None:
    r = cli(*fallback_run(tmp_path), "--run-id", "fb2", "--lm", "gpt4")
    assert r.exit_code == 0, r.output
    assert "⤷ g: the model string is invalid — using the fallback worker 'fallback.g'" in r.stderr
    assert "g: the model string is invalid — used fallback fallback.g" in r.stderr
    shown = cli("show", "fb2", "--runs-dir", str(tmp_path))
    assert "the model string is invalid — using the fallback worker 'fallback.g'" in shown.stdout
    assert "no LM configured" not in shown.stdout + r.stderr


# --- F8: on a Redis worker, the model is the worker's ---------------------------------------------------------


def test_on_a_redis_worker_no_model_says_to_give_the_worker_one() -> None:
    block = {"signature": parse_signature("q -> a"), "module": "predict", "demos": []}

    def message() -> str:
        with pytest.raises(LLMNotConfigured) as info:
            asyncio.run(run_llm_step(block, {"q": "?"}, lm=None, step_key="ask"))
        return str(info.value)

    here = message()
    assert "'--lm MODEL' on the command line, or the FLOWDSL_LM environment variable" in here
    token = ON_REDIS_WORKER.set(True)
    try:
        there = message()
    finally:
        ON_REDIS_WORKER.reset(token)
    assert there.startswith("LLM step 'ask' has no language model configured: name one with 'lm:' in the step's "
                            "llm block, 'defaults: {llm: {lm: ...}}' in the spec, or give the Redis worker one: "
                            "'flowdsl worker --lm MODEL', or FLOWDSL_LM in the worker's environment")
    assert "the --lm and FLOWDSL_LM of 'flowdsl run --backend redis' are not used" in there
    assert "API keys are read from the worker's environment" in there


def test_a_redis_worker_without_a_model_says_its_own_lm_is_missing(tmp_path: Path) -> None:
    """End to end: FLOWDSL_LM in the submitting shell is not the worker's, and the failure says where to give it."""
    from tests.redis.server import RedisServer

    server = RedisServer().start()
    try:
        spec = tmp_path / "ask.yaml"
        spec.write_text("flowdsl: 1\nname: ask\nsteps:\n  - ask:\n      llm: {signature: 'q -> a'}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWDSL_", "OPENAI_"))}
        env.update(PYTHONPATH=str(ROOT), LITELLM_LOCAL_MODEL_COST_MAP="True")
        base = [sys.executable, "-c", "from flowdsl.cli import main; main()"]
        where = ["--redis-url", server.url, "--prefix", "llmaudit"]
        submitted = subprocess.run([*base, "run", str(spec), "--set", "q=hi", "--backend", "redis", "--detach",
                                    *where], cwd=ROOT, env={**env, "FLOWDSL_LM": "openai/gpt-4o-mini"},
                                   capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip()
        worked = subprocess.run([*base, "worker", "--burst", *where], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert worked.returncode == 0, worked.stderr
        status = subprocess.run([*base, "status", run_id, "--format", "json", *where], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        result = json.loads(status.stdout)
        assert (result["status"], result["error"]["type"]) == ("failed", "LLMNotConfigured"), result
        assert "give the Redis worker one: 'flowdsl worker --lm MODEL', or FLOWDSL_LM in the worker's " \
               "environment" in result["error"]["message"]
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()


# --- F9: a blank --lm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "worker"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_lm_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
                                    blank: str) -> None:
    import flowdsl.runtime.redis.commands as commands

    monkeypatch.setattr(commands, "worker_command", lambda **kwargs: 0)  # (never a real worker, whatever happens)
    spec = tmp_path / "ask.yaml"
    spec.write_text("flowdsl: 1\nname: ask\nsteps:\n  - ask:\n      llm: {signature: 'q -> a'}\n")
    args = ["run", str(spec), "--set", "q=hi", "--no-record"] if command == "run" else \
        ["worker", "--redis-url", "unix:///nonexistent/redis.sock"]
    result = cli(*args, "--lm", blank)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--lm'" in result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert "the model string \"" in said and "\" is blank; give 'provider/model'" in said
