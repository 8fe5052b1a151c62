"""LLM steps through the local runtime: typed outputs feeding later steps, retry, fallback and
compensation of malformed answers, no model at all, per-step models side by side, the e-commerce
saga with a test model, and what the events, the record and the summary say about each call.

Offline: the models are ``dspy.LM(..., engine=..., async_engine=...)`` with a deterministic custom
engine (below) that reads the fields of the prompt and answers from them. DSPy's cache is off, so
every attempt reaches the engine; ``LITELLM_LOCAL_MODEL_COST_MAP`` spares the cost-map download.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from examples.ecommerce_order import services as svc
from flowdsl import compile_spec, compile_text
from flowdsl.cli import app
from flowdsl.render import render
from flowdsl.render.runstate import derive_states
from flowdsl.runtime.local import run_flow
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import read_record
from flowdsl.runtime.report import RunResult
from flowdsl.runtime.summary import print_summary
from flowdsl.workers import StepContext, WorkerRegistry

pytestmark = pytest.mark.llm
ROOT = Path(__file__).resolve().parents[1]
ECOM = ROOT / "examples" / "ecommerce_order"
CARD = "4111222233334444"

#: ``reply(inputs, outputs, n)``: the answer to the n-th call (from 1) — output field texts, or a raw reply
Reply = Callable[[dict[str, str], list[str], int], "dict[str, Any] | str"]


@pytest.fixture(autouse=True)
def _no_model_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWDSL_LM", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(name, raising=False)


class Engine:
    """A deterministic model: parses the ChatAdapter prompt and answers with ``reply``."""

    def __init__(self, name: str, reply: Reply, delay: float = 0.0):
        self.name, self.reply, self.delay = name, reply, delay
        self.seen: list[tuple[dict[str, str], list[str]]] = []  # (inputs, outputs asked for) of each call

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        text = request.messages[-1].text or ""
        body, _, tail = text.partition("\n\nRespond with")
        parts = re.split(r"\[\[ ## (\w+) ## \]\]\n", body)
        inputs = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
        outputs = [n for n in re.findall(r"`\[\[ ## (\w+) ## \]\]`", tail) if n != "completed"]
        self.seen.append((inputs, outputs))
        answer = self.reply(inputs, outputs, len(self.seen))
        if not isinstance(answer, str):
            answer = "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in answer.items()) + "[[ ## completed ## ]]"
        return Response(id=None, model=self.name, message=Message.assistant([TextPart(answer)]),
                        finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class AsyncEngine:
    def __init__(self, sync: Engine):
        self.sync = sync

    async def complete(self, request: Any) -> Any:
        await asyncio.sleep(self.sync.delay)  # lets concurrent steps interleave
        return self.sync.complete(request)


def model(dspy: Any, name: str, reply: Reply, delay: float = 0.0) -> tuple[Any, Engine]:
    engine = Engine(name, reply, delay)
    return dspy.LM(f"custom/{name}", engine=engine, async_engine=AsyncEngine(engine), cache=False), engine


def recording(calls: list[dict[str, Any]], result: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
    async def work(data: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append(data)
        return result(data) if result is not None else {}

    return work


def go(steps: str, run_input: dict[str, Any], workers: dict[str, Any] | None = None, **options: Any) -> RunResult:
    plan = compile_text("flowdsl: 1\nname: t\n" + steps)
    registry = WorkerRegistry()
    for name, fn in (workers or {}).items():
        registry.register(name, fn)
    options.setdefault("record", False)
    return asyncio.run(run_flow(plan, run_input, registry=registry, import_workers=False, **options))


def of(result: RunResult, type_: str, step: str) -> list[dict[str, Any]]:
    return [e for e in result.events if e["type"] == type_ and e["step"] == step]


def summary_text(result: RunResult) -> str:
    from rich.console import Console

    out = io.StringIO()
    print_summary(result, Console(file=out, width=250, highlight=False, soft_wrap=True))
    return out.getvalue()


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# --- outputs -------------------------------------------------------------------------------------


def test_typed_outputs_are_converted_and_feed_a_later_step_through_with(dspy: Any, adapter: Any) -> None:
    lm, engine = model(dspy, "triage", lambda i, o, n: {
        "category": "billing", "urgency": "3", "score": "0.75", "urgent": "yes", "tags": '["refund", "card"]'})
    routed: list[dict[str, Any]] = []
    r = go("""
steps:
  - triage:
      llm:
        signature:
          inputs: {ticket: str}
          outputs:
            category: {enum: [billing, bug, other]}
            urgency: {type: int, desc: 1 (low) to 3 (high)}
            score: float
            urgent: bool
            tags: list[str]
        instructions: Triage the support ticket.
  - route:
      with: {team: "${ category }", level: "${ urgency + 1 }", score: "${ score }", urgent: "${ urgent }",
             first_tag: "${ tags[0] }"}
""", {"ticket": "I was charged twice"}, {"route": recording(routed)}, lm=lm, adapter=adapter)
    assert r.status == "completed", r.error
    assert routed == [{"team": "billing", "level": 4, "score": 0.75, "urgent": True, "first_tag": "refund"}]
    assert {k: r.context[k] for k in ("category", "urgency", "score", "urgent", "tags")} == {
        "category": "billing", "urgency": 3, "score": 0.75, "urgent": True, "tags": ["refund", "card"]}
    assert engine.seen == [({"ticket": "I was charged twice"}, ["category", "urgency", "score", "urgent", "tags"])]
    (done,) = of(r, "step_succeeded", "triage")
    call = done["meta"]["llm"]
    assert call["model"] == "custom/triage" and call["reasoning"] is None
    assert "[[ ## urgency ## ]]\n3" in call["raw"]
    assert "Triage the support ticket." in call["prompt"][0]["content"]
    assert "I was charged twice" in call["prompt"][-1]["content"]
    assert [c["outcome"] for c in r.llm_calls["triage"]] == ["step_succeeded"]
    assert json.loads(json.dumps(r.to_json()))["events"] == json.loads(json.dumps(r.events))


# --- malformed answers: retry, fallback, compensation ------------------------------------------------


def test_a_malformed_answer_is_retried_and_the_next_answer_is_used(dspy: Any, adapter: Any) -> None:
    def reply(inputs: dict[str, str], outputs: list[str], n: int) -> dict[str, Any]:
        return {"summary": "two words"} if n == 1 else {"summary": "two words", "words": "2"}

    lm, engine = model(dspy, "flaky", reply)
    r = go("""
steps:
  - summarize:
      llm: {signature: "text -> summary, words: int"}
      retry: {attempts: 3, "on": [OutputInvalid], initial: 1ms}
""", {"text": "a long text"}, lm=lm, adapter=adapter)
    assert (r.status, r.context["words"], r.steps["summarize"]["attempts"]) == ("completed", 2, 2)
    assert len(engine.seen) == 2  # asked again, not served from a cache
    (retrying,) = of(r, "step_retrying", "summarize")
    assert retrying["error"]["type"] == "OutputInvalid"
    assert "the answer has no 'words' field" in retrying["error"]["message"]
    assert retrying["meta"]["llm"]["field"] == "words"
    assert "[[ ## summary ## ]]\ntwo words" in retrying["meta"]["llm"]["raw"]
    assert [(c["attempt"], c["outcome"]) for c in r.llm_calls["summarize"]] == [(1, "step_retrying"),
                                                                                (2, "step_succeeded")]


def test_a_malformed_answer_falls_back_when_retries_are_spent(dspy: Any, adapter: Any) -> None:
    lm, engine = model(dspy, "mumble", lambda i, o, n: "I would rather not say.")
    fallen: list[dict[str, Any]] = []
    r = go("""
steps:
  - summarize:
      llm: {signature: "text -> summary, words: int"}
      retry: {attempts: 2, initial: 1ms}
      fallback: first_words
""", {"text": "a long text"}, {"first_words": recording(fallen, lambda d: {"summary": d["text"][:6], "words": 2})},
        lm=lm, adapter=adapter)
    assert (r.status, r.context["summary"], r.context["words"]) == ("completed", "a long", 2)
    assert len(engine.seen) == 2 and fallen == [{"text": "a long text"}]  # the fallback gets the step's input
    (started,) = of(r, "fallback_started", "summarize")
    assert started["reason"] == "the LLM call failed for good (OutputInvalid) — using the fallback worker 'first_words'"
    assert started["meta"]["llm"]["raw"] == "I would rather not say."
    assert "not in the expected format" in started["error"]["message"]
    assert "summarize: the LLM call failed for good (OutputInvalid) — used fallback first_words" in summary_text(r)


def test_an_llm_step_failing_for_good_compensates_the_steps_before_it(dspy: Any, adapter: Any) -> None:
    lm, _ = model(dspy, "wrong", lambda i, o, n: {"message": "ok", "priority": "soon"})
    released: list[dict[str, Any]] = []
    r = go("""
steps:
  - reserve: {compensate: release}
  - confirm:
      llm: {signature: "order -> message, priority: int"}
      retry: {attempts: 2, initial: 1ms}
""", {"order": "o-1"}, {"reserve": recording([], lambda d: {"reservation": "R-1"}), "release": recording(released)},
        lm=lm, adapter=adapter)
    assert (r.status, r.failed_step, r.error["type"], r.compensated) == ("compensated", "confirm", "OutputInvalid",
                                                                          ["reserve"])
    assert "output field 'priority' (int)" in r.error["message"]
    assert released == [{"order": "o-1", "reservation": "R-1"}]
    (failed,) = of(r, "step_failed", "confirm")
    assert failed["attempt"] == 2 and "[[ ## priority ## ]]\nsoon" in failed["meta"]["llm"]["raw"]


# --- no model --------------------------------------------------------------------------------------


def test_without_a_model_the_fallback_runs_and_the_events_and_summary_say_so() -> None:
    greeted: list[dict[str, Any]] = []
    r = go("""
steps:
  - greet:
      llm: {signature: "name -> greeting"}
      fallback: template
""", {"name": "Ann"}, {"template": recording(greeted, lambda d: {"greeting": f"Hello {d['name']}"})})
    assert (r.status, r.context["greeting"]) == ("completed", "Hello Ann")
    (started,) = of(r, "fallback_started", "greet")
    assert started["reason"] == "no LM configured — using the fallback worker 'template'"
    assert started["error"]["type"] == "LLMNotConfigured" and "FLOWDSL_LM" in started["error"]["message"]
    assert "meta" not in started and r.llm_calls == {}  # no model was asked
    text = summary_text(r)
    assert "greet: no LM configured — used fallback template" in text
    assert "succeeded (fallback)" in text and "--lm MODEL" in text  # and how to configure one


def fallback_run(tmp_path: Path) -> list[str]:
    """``run`` arguments of a flow whose LLM step ``g`` has the fallback ``fallback.g`` (greeting "Hello Ann")."""
    spec = tmp_path / "fb.yaml"
    spec.write_text("flowdsl: 1\nname: fb\nworkers: [tests.runtime.workers]\n"
                    "steps:\n  - g:\n      llm: {signature: 'name, script: dict -> greeting'}\n"
                    "      fallback: fallback.g\n")
    script = json.dumps({"g/fallback": {"result": {"greeting": "Hello Ann"}}})
    return ["run", str(spec), "--set", "name=Ann", "--set", f"script={script}", "--runs-dir", str(tmp_path)]


def test_the_cli_says_plainly_that_the_fallback_ran(tmp_path: Path) -> None:
    r = cli(*fallback_run(tmp_path), "--run-id", "fb1")
    assert r.exit_code == 0, r.output
    assert "⤷ g: no LM configured — using the fallback worker 'fallback.g'" in r.stderr  # the progress line
    assert "g: no LM configured — used fallback fallback.g" in r.stderr  # the summary
    shown = cli("show", "fb1", "--runs-dir", str(tmp_path))
    assert "no LM configured — using the fallback worker 'fallback.g'" in shown.stdout


NO_FALLBACK = "flowdsl: 1\nname: ask\n{defaults}steps:\n  - ask:\n      llm: {{signature: 'q -> a'{lm}}}\n"


@pytest.mark.parametrize(("defaults", "step_lm", "args", "env", "says"), [
    (None, None, [], None, "LLM step 'ask' has no language model configured"),
    (None, None, ["--lm", "openai/from-cli"], None, "the LM 'openai/from-cli' cannot be used"),
    (None, None, [], "anthropic/from-env", "the LM 'anthropic/from-env' cannot be used"),
    ("openai/from-defaults", None, [], "anthropic/from-env", "the LM 'openai/from-defaults' cannot be used"),
    ("openai/from-defaults", None, ["--lm", "openai/from-cli"], None, "the LM 'openai/from-cli' cannot be used"),
    ("openai/from-defaults", "openai/from-step", ["--lm", "openai/from-cli"], "anthropic/from-env",
     "the LM 'openai/from-step' cannot be used"),
])
def test_without_a_fallback_a_missing_model_fails_the_run_saying_how_to_configure_one(
        dspy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defaults: str | None, step_lm: str | None,
        args: list[str], env: str | None, says: str) -> None:
    spec = tmp_path / "ask.yaml"
    spec.write_text(NO_FALLBACK.format(defaults=f"defaults: {{llm: {{lm: {defaults}}}}}\n" if defaults else "",
                                       lm=f", lm: {step_lm}" if step_lm else ""))
    if env:
        monkeypatch.setenv("FLOWDSL_LM", env)
    r = cli("run", str(spec), "--set", "q=hi", "--no-record", *args)
    assert r.exit_code == 1, r.output
    assert "failed at ask — LLMNotConfigured" in r.stderr and says in r.stderr
    if args or env or defaults:  # a model was named, but its API key is not in the environment
        assert "_API_KEY" in r.stderr
    else:
        assert all(how in r.stderr for how in ("'lm:'", "defaults: {llm: {lm: ...}}", "--lm MODEL", "FLOWDSL_LM"))
    out = cli("run", str(spec), "--set", "q=hi", "--no-record", "--format", "json", *args)
    result = json.loads(out.stdout)
    assert (out.exit_code, result["status"], result["error"]["type"]) == (1, "failed", "LLMNotConfigured")
    assert result["steps"]["ask"]["attempts"] == 1  # never retried: it would fail the same way


# --- models side by side ------------------------------------------------------------------------------


def test_per_step_models_in_parallel_branches_do_not_interfere(dspy: Any, adapter: Any) -> None:
    en, en_engine = model(dspy, "en", lambda i, o, n: {o[0]: f"Hello {i['name']}"}, delay=0.2)
    fr, fr_engine = model(dspy, "fr", lambda i, o, n: {o[0]: f"Bonjour {i['name']}"}, delay=0.0)
    default, default_engine = model(dspy, "default", lambda i, o, n: {o[0]: "wrong model"})
    r = go("""
steps:
  - parallel: greetings
    branches:
      - greet_en:
          llm: {signature: "name -> greeting", lm: openai/gpt-4o-mini}
          with: {name: "${ en_name }"}
      - greet_fr:
          llm: {signature: "name -> salutation", lm: anthropic/claude-sonnet-4-6}
          with: {name: "${ fr_name }"}
      - greet_any:
          llm: {signature: "name -> hi"}
          with: {name: "${ en_name }"}
""", {"en_name": "Ann", "fr_name": "Zoé"}, lm=default, adapter=adapter,
        lms={"openai/gpt-4o-mini": en, "anthropic/claude-sonnet-4-6": fr})
    assert r.status == "completed", r.error
    assert (r.context["greeting"], r.context["salutation"], r.context["hi"]) == ("Hello Ann", "Bonjour Zoé",
                                                                                "wrong model")
    assert en_engine.seen == [({"name": "Ann"}, ["greeting"])]
    assert fr_engine.seen == [({"name": "Zoé"}, ["salutation"])]
    assert default_engine.seen == [({"name": "Ann"}, ["hi"])]  # the runtime's model, for the step naming none
    order = [(e["type"], e["step"]) for e in r.events if e["type"] in ("step_scheduled", "step_succeeded")]
    assert order.index(("step_succeeded", "greet_fr")) < order.index(("step_succeeded", "greet_en"))
    assert order.index(("step_scheduled", "greet_en")) < order.index(("step_succeeded", "greet_fr"))  # overlapped
    models = {e["step"]: e["meta"]["llm"]["model"] for e in r.events if e["type"] == "step_succeeded" and "meta" in e}
    assert models == {"greet_en": "custom/en", "greet_fr": "custom/fr", "greet_any": "custom/default"}


# --- the e-commerce saga -------------------------------------------------------------------------------


def test_the_ecommerce_saga_confirms_with_the_test_model_and_notifies_with_its_words(dspy: Any, adapter: Any
                                                                                      ) -> None:
    def confirm(inputs: dict[str, str], outputs: list[str], n: int) -> dict[str, Any]:
        return {"greeting": f"Dear {inputs['customer_name']}, your order is in!",
                "order_summary": f"{inputs['order_details'].count('x')} line(s), {inputs['total_amount']} in total",
                "next_steps": "We pack it today and email you the tracking number."}

    lm, engine = model(dspy, "shop", confirm)
    result = compile_spec(str(ECOM / "flow.yaml"), check_workers=True)
    assert result.plan is not None, result.diagnostics
    plan = result.plan
    svc.STATE.reset()
    try:
        run_input = json.loads((ECOM / "inputs" / "success.json").read_text())
        r = asyncio.run(run_flow(plan, run_input, lm=lm, adapter=adapter, record=False))
        assert r.status == "completed", r.error
        assert not of(r, "fallback_started", "generate_confirmation")  # the model answered: no template
        confirmation = r.context["confirmation"]
        assert confirmation["greeting"] == "Dear Ada Lovelace, your order is in!"
        assert confirmation["order_summary"].endswith("1099.97 in total")
        ((inputs, outputs),) = engine.seen
        assert outputs == ["greeting", "order_summary", "next_steps"] and "Laptop Pro 15" in inputs["order_details"]
        (note,) = svc.STATE.outbox.sent.values()  # notify_customer sent the model's words
        assert note.body.startswith("Dear Ada Lovelace, your order is in!\n\n")
        assert "We pack it today" in note.body and "Tracking number: " in note.body
        assert svc.STATE.invariant_violations() == []
    finally:
        svc.STATE.reset()
    (done,) = of(r, "step_succeeded", "generate_confirmation")
    assert done["meta"]["llm"]["model"] == "custom/shop"
    assert "Write a short, warm order confirmation" in done["meta"]["llm"]["prompt"][0]["content"]
    # the plan and the diagrams show the LLM step, drawn with its run state
    assert plan["nodes"]["generate_confirmation"]["kind"] == "llm"
    drawn = render(plan, "mermaid", run_states=derive_states(plan, r.events))
    assert 'l_generate__confirmation{{"<b>✦ LLM generate_confirmation</b>' in drawn  # drawn as an LLM step
    assert re.search(r"class [\w,]*\bl_generate__confirmation\b[\w,]* st_succeeded", drawn)


# --- what is recorded ------------------------------------------------------------------------------------


def test_prompt_and_reply_are_in_the_events_and_the_record_with_redacted_inputs_masked(
        dspy: Any, adapter: Any, tmp_path: Path) -> None:
    lm, engine = model(dspy, "echo", lambda i, o, n: {"verdict": "ok", "note": f"card {i['card']} of {i['holder']}"})
    r = go("""
steps:
  - check:
      llm:
        signature: "card, holder -> verdict: Literal['ok', 'suspicious'], note"
        redact: [card]
""", {"card": CARD, "holder": "Ann"}, lm=lm, adapter=adapter, record=True, runs_dir=tmp_path, run_id="red1")
    assert r.status == "completed", r.error
    assert engine.seen[0][0]["card"] == CARD  # the model is sent the real value ...
    (done,) = of(r, "step_succeeded", "check")
    call = done["meta"]["llm"]
    assert CARD not in json.dumps(call)  # ... but what is recorded of the call masks it
    assert "[[ ## card ## ]]\n***" in call["prompt"][-1]["content"] and "Ann" in call["prompt"][-1]["content"]
    assert "card *** of Ann" in call["raw"]
    header, lines = read_record(tmp_path / "red1.jsonl")
    with_meta = [e for e in lines if "meta" in e]
    assert [e["type"] for e in with_meta] == ["task_succeeded", "step_succeeded"]  # the answer, and its event
    assert all(CARD not in json.dumps(e["meta"]) for e in with_meta)
    again = result_from_record(header, lines)
    assert again.llm_calls == r.llm_calls and again.llm_calls["check"][0]["raw"] == call["raw"]
    shown = cli("show", "red1", "--runs-dir", str(tmp_path))
    assert shown.exit_code == 0
    assert "llm: model custom/echo, 2 message(s) sent, reply: [[ ## verdict ## ]] ok [[ ## note ## ]] card *** of Ann" \
        in shown.stdout


# --- audit fixes: the fallback's input and result, redacted input errors, invalid model strings -------


def test_a_fallback_result_is_checked_against_the_signature_like_a_model_answer(dspy: Any, adapter: Any) -> None:
    lm, _ = model(dspy, "garbage", lambda i, o, n: "no idea")
    steps = """
steps:
  - greet:
      llm: {signature: "name -> tone: Literal['formal','friendly'], n: int"}
      fallback: canned
"""
    bad = {"canned": recording([], lambda d: {"tone": "rude", "n": "not a number", "junk": 1})}
    r = go(steps, {"name": "Ann"}, bad, lm=lm, adapter=adapter)
    assert (r.status, r.failed_step, r.error["type"]) == ("failed", "greet", "OutputInvalid")
    message = r.error["message"]
    assert message.startswith("the fallback worker 'canned' of LLM step 'greet': the result does not fit the outputs")
    for says in ("the result has 'junk', which is not an output field",
                 "output field 'tone' (one of \"formal\", \"friendly\"): \"rude\" is not one of",
                 "output field 'n' (int): expected an integer, found \"not a number\""):
        assert says in message, message
    assert "tone" not in r.context and "junk" not in r.context  # nothing of it reached the context
    # a result that fits is converted as an answer is: "3" is the integer 3, ' formal ' the listed value
    good = {"canned": recording([], lambda d: {"tone": " formal ", "n": "3"})}
    r = go(steps, {"name": "Ann"}, good, lm=lm, adapter=adapter)
    assert (r.status, r.context["tone"], r.context["n"]) == ("completed", "formal", 3)
    # without a model too, and a result that misses a field
    r = go(steps, {"name": "Ann"}, {"canned": recording([], lambda d: {"tone": "formal"})})
    assert r.status == "failed" and "the result has no 'n' field" in r.error["message"]


def test_the_fallback_gets_the_checked_inputs_the_model_would_get(dspy: Any, adapter: Any) -> None:
    seen: list[dict[str, Any]] = []
    lm, engine = model(dspy, "garbage", lambda i, o, n: "no idea")
    workers = {"canned": recording(seen, lambda d: {"line": "ok"})}
    r = go("""
steps:
  - bill:
      llm: {signature: "total: float, items: list[str] -> line"}
      with: {total: "${ amount }", items: "${ things }"}
      fallback: canned
""", {"amount": "9.5", "things": ["mug"], "secret_stuff": "not for the model"}, workers, lm=lm, adapter=adapter)
    assert r.status == "completed", r.error
    assert engine.seen[0][0]["total"] == "9.5"  # the model got the float 9.5 ...
    assert seen == [{"total": 9.5, "items": ["mug"]}]  # ... and so does the fallback, converted, nothing else
    seen.clear()
    r = go("""
steps:
  - bill:
      llm: {signature: "total: float -> line"}
      fallback: canned
""", {"total": 4, "other": "context the model never sees"}, workers)  # no with:, no model
    assert r.status == "completed" and seen == [{"total": 4.0}]


def test_a_fallback_with_inputs_that_do_not_fit_fails_with_input_invalid() -> None:
    called: list[dict[str, Any]] = []
    r = go("""
steps:
  - bill:
      llm: {signature: "total: float -> line"}
      fallback: canned
""", {"total": "lots"}, {"canned": recording(called, lambda d: {"line": "ok"})})
    assert (r.status, r.error["type"]) == ("failed", "InputInvalid") and called == []
    assert "input field 'total' (float): expected a number, found \"lots\"" in r.error["message"]


def test_a_bad_value_of_a_redacted_input_is_masked_everywhere_in_the_record(tmp_path: Path) -> None:
    secret = "secret-pin-9876"
    r = go("""
steps:
  - check:
      llm:
        signature: "pin: int, holder -> verdict"
        redact: [pin]
      with: {pin: "${ card.pin }", holder: "${ card.holder }"}
""", {"card": {"pin": secret, "holder": "Ann"}}, lm="openai/gpt-4o-mini", record=True, runs_dir=tmp_path,
        run_id="pin1")
    assert (r.status, r.error["type"]) == ("failed", "InputInvalid")
    assert secret not in r.error["message"] and "'pin' is redacted" in r.error["message"]
    _, lines = read_record(tmp_path / "pin1.jsonl")
    types = {e["type"] for e in lines}
    assert {"task_failed", "step_failed", "run_finished"} <= types
    # the run input (the "start" line) is the only place that holds it, as docs/llm.md says
    assert [e["type"] for e in lines if secret in json.dumps(e)] == ["start"]


def test_an_invalid_model_string_is_not_retried_and_goes_to_the_fallback() -> None:
    r = go("""
steps:
  - greet:
      llm: {signature: "name -> greeting"}
      retry: {attempts: 3, initial: 1ms}
      fallback: canned
""", {"name": "Ann"}, {"canned": recording([], lambda d: {"greeting": "Hi"})}, lm="gpt4")
    assert (r.status, r.context["greeting"]) == ("completed", "Hi")
    assert of(r, "step_retrying", "greet") == []
    (started,) = of(r, "fallback_started", "greet")
    assert started["error"]["type"] == "LLMNotConfigured"
    assert "the model string 'gpt4' is invalid" in started["error"]["message"]


# --- second audit: one call per attempt, masks that hold, replies that are not text, no pointless retry ----


def test_without_an_adapter_an_answer_flowdsls_rules_accept_is_used_and_the_model_asked_once(dspy: Any) -> None:
    """DSPy's default ChatAdapter would ask again in JSON mode (its parser refuses ``yes`` for a bool and
    ``3.0`` for an int) and that second reply would replace the first; flowdsl's default asks once."""
    lm, engine = model(dspy, "lax", lambda i, o, n: {"ok": "yes", "n": "3.0"} if n == 1 else "I cannot do JSON")
    r = go("""
steps:
  - ask:
      llm: {signature: "question -> ok: Literal[True, False], n: int"}
""", {"question": "q"}, lm=lm)
    assert (r.status, r.context["ok"], r.context["n"]) == ("completed", True, 3), r.error
    assert len(engine.seen) == 1
    assert r.llm_calls["ask"][0]["raw"].startswith("[[ ## ok ## ]]\nyes")


@pytest.mark.parametrize("secret", ["sk-live-" + "ABCDEFGHIJ" * 10, 'pa"ss\\word-1234', "line1\nline2-secret"],
                         ids=["too-long-to-show", "quoted", "two-lines"])
def test_a_redacted_value_the_model_echoes_into_a_bad_output_is_masked_in_the_message(
        dspy: Any, adapter: Any, secret: str) -> None:
    lm, _ = model(dspy, "echo", lambda i, o, n: {"verdict": "ok", "score": secret})
    r = go("""
steps:
  - check:
      llm:
        signature: "token, holder -> verdict: Literal['ok', 'suspicious'], score: int"
        redact: [token]
""", {"token": secret, "holder": "Ann"}, lm=lm, adapter=adapter)
    assert (r.status, r.error["type"]) == ("failed", "OutputInvalid")
    assert "output field 'score' (int): expected an integer, found \"***\"" in r.error["message"]
    recorded = json.dumps([e for e in r.events if e["type"] != "run_started"], ensure_ascii=False)
    for fragment in (secret[:12], json.dumps(secret)[1:13], secret[-12:]):
        assert fragment not in recorded and fragment not in json.dumps(recorded), fragment


def test_a_fallback_result_holding_a_redacted_value_is_masked_in_the_message() -> None:
    secret = "pa\"ss-" + "Z" * 90
    r = go("""
steps:
  - check:
      llm: {signature: "token -> score: int", redact: [token]}
      fallback: canned
""", {"token": secret}, {"canned": recording([], lambda d: {"score": d["token"]})})
    assert (r.status, r.error["type"]) == ("failed", "OutputInvalid")
    assert "found \"***\"" in r.error["message"] and "ZZZZ" not in json.dumps(r.error)


def test_a_provider_error_quoting_a_redacted_input_is_masked_in_what_is_recorded(
        dspy: Any, adapter: Any, tmp_path: Path) -> None:
    from dspy.lm15 import InvalidRequestError

    def refuse(i: dict[str, str], o: list[str], n: int) -> str:
        raise InvalidRequestError(f"flagged by content filter: '...card {i['card']} holder {i['holder']}...'")

    lm, _ = model(dspy, "filter", refuse)
    r = go("""
steps:
  - check:
      llm: {signature: "card, holder -> verdict", redact: [card]}
""", {"card": CARD, "holder": "Ann"}, lm=lm, adapter=adapter, record=True, runs_dir=tmp_path, run_id="flt1")
    assert r.status == "failed" and "content filter" in r.error["message"]
    assert "card *** holder Ann" in r.error["message"]
    _, lines = read_record(tmp_path / "flt1.jsonl")
    assert [e["type"] for e in lines if CARD in json.dumps(e)] == ["start"]  # the run input alone holds it


def test_a_reply_with_a_lone_surrogate_is_recorded_readably_and_json_output_works(
        dspy: Any, adapter: Any, tmp_path: Path) -> None:
    replies = ["[[ ## answr ## ]]\nbad \udc80 text\n\n[[ ## completed ## ]]",
               "[[ ## answer ## ]]\nbad \udc80 text\n\n[[ ## completed ## ]]"]
    lm, _ = model(dspy, "broken", lambda i, o, n: replies[n - 1])
    r = go("""
steps:
  - ask:
      llm: {signature: "question -> answer"}
      retry: {attempts: 2, initial: 1ms}
""", {"question": "q"}, lm=lm, adapter=adapter, record=True, runs_dir=tmp_path, run_id="sur1")
    assert (r.status, r.error["type"]) == ("failed", "OutputInvalid")
    assert "not valid UTF-8 (byte 0x80" in r.error["message"]  # the second answer's value is not text
    json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8")
    assert r.llm_calls["ask"][0]["raw"] == "[[ ## answr ## ]]\nbad \\udc80 text\n\n[[ ## completed ## ]]"
    shown = cli("show", "sur1", "--runs-dir", str(tmp_path), "--format", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["status"] == "failed"


def test_an_llm_steps_input_invalid_is_not_retried_at_run_time() -> None:
    called: list[dict[str, Any]] = []
    r = go("""
steps:
  - bill:
      llm: {signature: "total: int -> line"}
      retry: {attempts: 3, initial: 200ms}
      fallback: canned
""", {"total": "abc"}, {"canned": recording(called, lambda d: {"line": "ok"})}, lm="openai/gpt-4o-mini")
    assert (r.status, r.error["type"]) == ("failed", "InputInvalid") and called == []
    assert r.steps["bill"]["attempts"] == 2 and of(r, "step_retrying", "bill") == []
    assert r.wall_ms is not None and r.wall_ms < 200  # no backoff was waited


def test_a_slow_first_model_check_is_done_before_the_run_not_inside_a_steps_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process imports DSPy (and LiteLLM, for a string only it can route) on a step's first call:
    seconds that a `timeout: 1s` attempt would be charged for (StepTimeout instead of the model string's
    problem). The runtime checks the run's model strings before the run's clock starts."""
    import time

    import flowdsl.llm as llm

    def slow_check(model_string: str) -> str:
        time.sleep(0.6)
        return "neither DSPy nor LiteLLM can tell which provider serves it"

    monkeypatch.setattr(llm, "_check_model", slow_check)
    monkeypatch.setattr(llm, "_model_problems", {})
    notices: list[str] = []
    r = go("""
steps:
  - ask:
      llm: {signature: "question -> answer"}
      timeout: 300ms
""", {"question": "q"}, lm="gpt4-slowcheck", on_notice=notices.append)
    assert (r.status, r.error["type"]) == ("failed", "LLMNotConfigured"), r.error
    assert "the model string 'gpt4-slowcheck' is invalid" in r.error["message"]


def test_a_broken_dspy_install_fails_the_attempt_not_the_run_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import flowdsl.llm as llm

    async def broken(where: str) -> Any:
        raise RuntimeError("broken dspy install")

    monkeypatch.setattr(llm, "_import_dspy", broken)
    r = go("""
steps:
  - greet:
      llm: {signature: "name -> greeting"}
      fallback: canned
""", {"name": "Ann"}, {"canned": recording([], lambda d: {"greeting": "Hi"})}, lm="openai/gpt-4o-mini")
    assert (r.status, r.context["greeting"]) == ("completed", "Hi")
    (started,) = of(r, "fallback_started", "greet")
    assert started["error"]["type"] == "RuntimeError"


def test_a_provider_error_quoting_the_request_as_json_is_masked_too(dspy: Any, adapter: Any) -> None:
    from dspy.lm15 import InvalidRequestError

    secret = 'Zoë "Ann" Müller'

    def refuse(i: dict[str, str], o: list[str], n: int) -> str:
        raise InvalidRequestError("invalid request: " + json.dumps({"name": i["name"], "amount": i["amount"]}))

    lm, _ = model(dspy, "filter", refuse)
    r = go("""
steps:
  - check:
      llm: {signature: "name, amount: float -> verdict", redact: [name, amount]}
""", {"name": secret, "amount": "9.50"}, lm=lm, adapter=adapter)
    assert r.status == "failed", r.error
    recorded = json.dumps([e for e in r.events if e["type"] != "run_started"], ensure_ascii=False)
    for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], "9.5"):
        assert form not in r.error["message"] and form not in recorded, form
