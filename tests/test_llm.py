"""LLM steps: signature parsing and normalization, value checks, and the DSPy step engine.

Offline: answers come from ``dspy.utils.DummyLM`` or from a deterministic custom
engine passed to ``dspy.LM(model, engine=..., async_engine=...)``; DSPy's cache
is disabled so every call reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from flowdsl.llm import (
    LLM_ENV,
    InputInvalid,
    LLMNotConfigured,
    LlmResult,
    OutputInvalid,
    SignatureError,
    check_llm_block,
    coerce_value,
    normalize_fields,
    normalize_signature,
    parse_signature,
    resolve_lm,
    run_llm_step,
)

ROOT = Path(__file__).resolve().parents[1]


def F(name: str, type_: str = "str", desc: str | None = None, enum: list[Any] | None = None) -> dict[str, Any]:
    return {"name": name, "type": type_, "desc": desc, "enum": enum}


# --- parse_signature -----------------------------------------------------------------------------


def test_parse_signature_typed_and_untyped_fields_in_order() -> None:
    sig = parse_signature("customer_name, order_details: str, total_amount: float -> greeting, next_steps: list[str]")
    assert sig == {
        "inputs": [F("customer_name"), F("order_details"), F("total_amount", "float")],
        "outputs": [F("greeting"), F("next_steps", "list[str]")],
    }


def test_parse_signature_every_type_and_literal_enums() -> None:
    sig = parse_signature(
        "a:int,b : bool, c: list[ int ], d: list[float], e: dict -> "
        "tone: Literal['formal', \"friendly\"], level: Literal[1, 2, 3], bare: Literal[yes, no], x: list[str]"
    )
    assert [(f["name"], f["type"]) for f in sig["inputs"]] == [
        ("a", "int"), ("b", "bool"), ("c", "list[int]"), ("d", "list[float]"), ("e", "dict"),
    ]
    assert sig["outputs"][0] == F("tone", "str", enum=["formal", "friendly"])
    assert sig["outputs"][1] == F("level", "int", enum=[1, 2, 3])
    assert sig["outputs"][2] == F("bare", "str", enum=["yes", "no"])
    assert json.loads(json.dumps(sig)) == sig  # plain JSON, ready for the plan


@pytest.mark.parametrize(
    ("text", "offset", "code", "says"),
    [
        ("question, context", 17, "FD601", "found no '->'"),
        ("question -> ", 11, "FD601", "found no outputs after '->'"),
        ("  -> answer", 0, "FD601", "found no inputs before '->'"),
        ("a -> b -> c", 7, "FD601", "second '->'"),
        ("1st -> answer", 0, "FD601", "'1st', which is not a valid field name"),
        ("order-id -> answer", 0, "FD601", "'order-id', which is not a valid field name"),
        ("_private -> answer", 0, "FD601", "'_private', which is not a valid field name"),
        ("model_name -> answer", 0, "FD601", "reserved by DSPy"),
        ("a, , b -> c", 3, "FD601", "empty field among the inputs"),
        ("a -> b,", 7, "FD601", "empty field among the outputs"),
        ("a -> b: lst[str]", 8, "FD602", "found unknown type 'lst[str]' for field 'b'"),
        ("a -> b: string", 8, "FD602", "did you mean 'str'?"),
        ("a -> b: List[str]", 8, "FD602", "did you mean 'list[str]'?"),
        ("a -> b:", 7, "FD602", "found no type after ':'"),
        ("a, b, a -> c", 6, "FD601", "found field 'a' twice among the inputs"),
        ("a -> b, b", 8, "FD601", "found field 'b' twice among the outputs"),
        ("a, b -> b", 8, "FD601", "found 'b' both among the inputs and the outputs"),
        ("a -> b: Literal[]", 8, "FD601", "found no values in Literal[]"),
        ("a -> b: Literal['x', 1]", 8, "FD601", "mix types"),
        ("a -> b: Literal['x', 'x']", 8, "FD601", "found value \"x\" of field 'b' twice"),
    ],
)
def test_parse_signature_malformed(text: str, offset: int, code: str, says: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_signature(text)
    err = info.value
    assert says in err.message, err.message
    assert (err.offset, err.code) == (offset, code), err.message
    assert "found" in err.message and "expected" in err.message, err.message


def test_parse_signature_does_not_split_inside_brackets_or_quotes() -> None:
    sig = parse_signature("q -> pick: Literal['a, b', 'c -> d']")
    assert sig["outputs"] == [F("pick", enum=["a, b", "c -> d"])]


# --- normalize_fields / normalize_signature -----------------------------------------------------


def test_normalize_fields_keeps_order_and_fills_defaults() -> None:
    sig = normalize_fields({
        "inputs": {"customer_name": "str", "order_details": {"type": "str", "desc": "the items, one per line"},
                   "notes": None},
        "outputs": {"greeting": "str", "tone": {"enum": ["formal", "friendly"]},
                    "next_steps": {"type": "list[str]", "desc": "two or three short sentences"},
                    "score": {"enum": [1, 2.5]}, "flag": {"type": "bool"}, "pick": "Literal['x', 'y']"},
    })
    assert sig == {
        "inputs": [F("customer_name"), F("order_details", desc="the items, one per line"), F("notes")],
        "outputs": [F("greeting"), F("tone", enum=["formal", "friendly"]),
                    F("next_steps", "list[str]", desc="two or three short sentences"),
                    F("score", "float", enum=[1, 2.5]), F("flag", "bool"), F("pick", enum=["x", "y"])],
    }
    assert normalize_signature(sig) == sig
    assert normalize_signature("a -> b") == parse_signature("a -> b")


@pytest.mark.parametrize(
    ("mapping", "path", "says"),
    [
        ({"inputs": {"a": "str"}}, "/outputs", "found nothing"),
        ({"inputs": {}, "outputs": {"b": "str"}}, "/inputs", "found an empty mapping"),
        ({"inputs": ["a"], "outputs": {"b": "str"}}, "/inputs", "found a list"),
        ({"inputs": {"a": "str"}, "outputs": {"b": "str"}, "output": {}}, "/output", "did you mean 'outputs'?"),
        ({"inputs": {"a": "str"}, "outputs": {"b": "strng"}}, "/outputs/b", "unknown type 'strng'"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"typ": "int"}}}, "/outputs/b/typ", "did you mean 'type'?"),
        ({"inputs": {"a": "str"}, "outputs": {"a": "str"}}, "/outputs/a", "both among the inputs and the outputs"),
        ({"inputs": {"a b": "str"}, "outputs": {"c": "str"}}, "/inputs/a b", "not a valid field name"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"enum": []}}}, "/outputs/b/enum", "non-empty list"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"enum": ["x", 1]}}}, "/outputs/b/enum", "mix types"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"type": "int", "enum": [1, "x"]}}}, "/outputs/b/enum/1",
         "is not an int"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"type": "list[str]", "enum": ["x"]}}}, "/outputs/b/enum",
         "cannot have an enum"),
        ({"inputs": {"a": "str"}, "outputs": {"b": {"desc": 3}}}, "/outputs/b/desc", "must be text"),
        ({"inputs": {"a": "str"}, "outputs": {"b": 7}}, "/outputs/b", "type string or a mapping"),
    ],
)
def test_normalize_fields_malformed(mapping: dict[str, Any], path: str, says: str) -> None:
    with pytest.raises(SignatureError) as info:
        normalize_fields(mapping)
    assert info.value.path == path and says in info.value.message, (info.value.path, info.value.message)
    assert info.value.offset is None


# --- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (F("n", "int"), "42", 42), (F("n", "int"), " -7 ", -7), (F("n", "int"), 3.0, 3),
        (F("x", "float"), "2.5", 2.5), (F("x", "float"), 2, 2.0), (F("x", "float"), "1e3", 1000.0),
        (F("b", "bool"), "True", True), (F("b", "bool"), "no", False), (F("b", "bool"), False, False),
        (F("l", "list[str]"), '["a", "b"]', ["a", "b"]), (F("l", "list[int]"), '[1, "2"]', [1, 2]),
        (F("l", "list[float]"), [1, "2.5"], [1.0, 2.5]), (F("d", "dict"), '{"k": [1]}', {"k": [1]}),
        (F("s"), "  keep me  ", "  keep me  "), (F("s"), {"b": 1, "a": 2}, '{"a": 2, "b": 1}'),
        (F("t", enum=["formal", "friendly"]), " 'friendly' ", "friendly"), (F("l", "int", enum=[1, 2]), "2", 2),
    ],
)
def test_coerce_value_converts(field: dict[str, Any], value: Any, expected: Any) -> None:
    got = coerce_value(field, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        (F("n", "int"), "three", "expected an integer"), (F("n", "int"), "2.5", "expected an integer"),
        (F("n", "int"), True, "expected an integer"), (F("x", "float"), "nan", "expected a number"),
        (F("b", "bool"), "maybe", "expected true, false, yes or no"),
        (F("l", "list[str]"), "a, b", "expected a JSON list"),
        (F("l", "list[int]"), [1, "x"], "item 1: expected an integer"),
        (F("d", "dict"), "[1]", "expected a JSON object"),
        (F("t", enum=["formal", "friendly"]), "angry", '"angry" is not one of: "formal", "friendly"'),
        (F("s"), None, "no value (null)"),
    ],
)
def test_coerce_value_rejects(field: dict[str, Any], value: Any, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        coerce_value(field, value)


def test_check_llm_block_reports_module_reasoning_and_demo_problems() -> None:
    sig = parse_signature("q, n: int -> reasoning, answer: Literal['yes', 'no']")
    problems = check_llm_block({"signature": sig, "module": "chain_of_thought", "demos": [
        {"q": "a", "n": 1, "reasoning": "r", "answer": "yes"},
        {"q": "b", "n": "many", "answer": "maybe", "extra": 1},
        {"q": "c"},
    ]})
    assert problems[0][:2] == ("FD601", "/signature") and "rename the output field 'reasoning'" in problems[0][2]
    pointers = [p[1] for p in problems[1:]]
    assert pointers == ["/demos/1", "/demos/1/extra", "/demos/1/n", "/demos/1/answer", "/demos/2"]
    assert all(p[0] == "FD603" for p in problems[1:])
    assert "demo 2, field 'n' (int): expected an integer" in problems[3][2]
    bad_module = check_llm_block({"signature": parse_signature("q -> a"), "module": "chain_of_thougt"})
    assert bad_module == [("FD201", "/module", "unknown module 'chain_of_thougt'; expected one of: predict, "
                           "chain_of_thought (did you mean 'chain_of_thought'?)")]
    assert check_llm_block({"signature": parse_signature("q -> a"), "module": "predict",
                            "demos": [{"q": "x", "a": "y"}]}) == []


# --- LM resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "default", "cli", "env", "expected"),
    [
        ("openai/step", "openai/default", "openai/cli", {LLM_ENV: "openai/env"}, "openai/step"),
        (None, "openai/default", "openai/cli", {LLM_ENV: "openai/env"}, "openai/cli"),
        (None, "openai/default", None, {LLM_ENV: "openai/env"}, "openai/default"),
        (None, None, None, {LLM_ENV: " openai/env "}, "openai/env"),
        ("  ", "", None, {LLM_ENV: ""}, None),
        (None, None, None, {}, None),
    ],
)
def test_resolve_lm_precedence(step: str | None, default: str | None, cli: str | None, env: dict[str, str],
                               expected: str | None) -> None:
    assert resolve_lm(step, default, cli, env) == expected


def test_importing_flowdsl_llm_does_not_import_dspy() -> None:
    code = (
        "import sys, flowdsl.llm, flowdsl.llm_signature\n"
        "flowdsl.llm.parse_signature('a, b: int -> c: list[str]')\n"
        "flowdsl.llm.normalize_fields({'inputs': {'a': 'str'}, 'outputs': {'b': {'enum': ['x']}}})\n"
        "flowdsl.llm.resolve_lm(None, None, None, {})\n"
        "print(sorted(m for m in sys.modules if m == 'dspy' or m.startswith(('dspy.', 'litellm'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_first_dspy_import_does_not_block_the_event_loop() -> None:
    """The first step imports dspy (~1.5 s) in a thread: other tasks (heartbeats, leases) keep running."""
    pytest.importorskip("dspy")
    code = (
        "import asyncio, os, sys\n"
        "from flowdsl.llm import LLMNotConfigured, parse_signature, run_llm_step\n"
        "async def main():\n"
        "    ticks = 0\n"
        "    async def ticker():\n"
        "        nonlocal ticks\n"
        "        while True:\n"
        "            await asyncio.sleep(0.01)\n"
        "            ticks += 1\n"
        "    task = asyncio.create_task(ticker())\n"
        "    llm = {'signature': parse_signature('q -> a'), 'module': 'predict', 'demos': []}\n"
        "    try:\n"
        "        await run_llm_step(llm, {'q': '?'}, lm='openai/gpt-4o-mini')\n"
        "    except LLMNotConfigured as exc:\n"
        "        print('LLMNotConfigured', 'OPENAI_API_KEY' in str(exc))\n"
        "    task.cancel()\n"
        "    print('dspy' in sys.modules, ticks)\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first == "LLMNotConfigured True", out.stdout + out.stderr
    loaded, ticks = second.split()
    assert loaded == "True" and int(ticks) >= 10, out.stdout


# --- the step engine -------------------------------------------------------------------------------


def dummy(dspy: Any, adapter: Any, *answers: dict[str, Any]) -> Any:
    return dspy.utils.DummyLM(list(answers), adapter=adapter)


def block(signature: str, **extra: Any) -> dict[str, Any]:
    return {"signature": parse_signature(signature), "instructions": None, "module": "predict", "lm": None,
            "demos": [], **extra}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class SectionEngine:
    """A deterministic model: answers every output field from the inputs it is shown.

    Each output field of the request's last user turn is answered with
    ``"<tag>:<value of the first input>"``; ``delay`` makes the async
    engine yield to the event loop first, so concurrent steps interleave.
    """

    def __init__(self, tag: str, delay: float = 0.0):
        self.tag, self.delay, self.requests = tag, delay, []

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        self.requests.append(request)
        last = request.messages[-1].text or ""
        values = dict(re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n|$)", last, re.S))
        wanted = re.findall(r"`\[\[ ## (\w+) ## \]\]`", last)
        first = next(iter(values.values()), "")
        text = "\n\n".join(f"[[ ## {name} ## ]]\n{self.tag}:{first}" for name in wanted if name != "completed")
        return Response(id=None, model=self.tag, message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class AsyncSectionEngine:
    def __init__(self, sync: SectionEngine):
        self.sync = sync

    async def complete(self, request: Any) -> Any:
        await asyncio.sleep(self.sync.delay)
        return self.sync.complete(request)


def section_lm(dspy: Any, tag: str, delay: float = 0.0) -> Any:
    engine = SectionEngine(tag, delay)
    return dspy.LM(f"custom/{tag}", engine=engine, async_engine=AsyncSectionEngine(engine), cache=False)


def test_typed_outputs_are_converted(dspy: Any, adapter: Any) -> None:
    llm = block("customer_name, total_amount: float -> greeting, items: int, price: float, paid: bool, "
                "next_steps: list[str], tone: Literal['formal', 'friendly'], extra: dict")
    lm = dummy(dspy, adapter, {"greeting": "Hi Ann!", "items": "3", "price": "9.5", "paid": "true",
                               "next_steps": ["We ship tomorrow", "Track it online"], "tone": "friendly",
                               "extra": {"gift": False}})
    result = run(run_llm_step(llm, {"customer_name": "Ann", "total_amount": 9.5, "unrelated": 1}, lm=lm,
                              step_key="confirm", adapter=adapter))
    assert isinstance(result, LlmResult)
    assert result.outputs == {"greeting": "Hi Ann!", "items": 3, "price": 9.5, "paid": True,
                              "next_steps": ["We ship tomorrow", "Track it online"], "tone": "friendly",
                              "extra": {"gift": False}}
    assert [type(result.outputs[k]) for k in ("items", "price", "paid")] == [int, float, bool]
    assert "[[ ## tone ## ]]\nfriendly" in result.raw
    assert [m["role"] for m in result.prompt] == ["system", "user"]
    assert "Ann" in result.prompt[-1]["content"] and "unrelated" not in json.dumps(result.prompt)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    assert result.model == "dummy" and result.reasoning is None


def test_default_adapter_is_used_when_none_is_given(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"answer": "42"})
    result = run(run_llm_step(block("question -> answer: int"), {"question": "6*7?"}, lm=lm))
    assert result.outputs == {"answer": 42}


def test_missing_output_field_is_output_invalid(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"greeting": "Hi"})
    with pytest.raises(OutputInvalid) as info:
        run(run_llm_step(block("name -> greeting, next_steps: list[str]"), {"name": "Ann"}, lm=lm,
                         step_key="confirm", adapter=adapter))
    err = info.value
    assert type(err).__name__ == "OutputInvalid"
    assert str(err).startswith("LLM step 'confirm': the model's answer is malformed: the answer has no "
                               "'next_steps' field")
    assert "expected greeting: str; next_steps: list[str]" in str(err)
    assert err.field == "next_steps" and "[[ ## greeting ## ]]\nHi" in err.raw and err.prompt


def test_wrong_enum_value_is_output_invalid(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"tone": "angry"})
    with pytest.raises(OutputInvalid, match=re.escape(
            "output field 'tone' (one of \"formal\", \"friendly\"): \"angry\" is not one of: \"formal\", "
            "\"friendly\"")) as info:
        run(run_llm_step(block("text -> tone: Literal['formal', 'friendly']"), {"text": "hey"}, lm=lm,
                         adapter=adapter))
    assert info.value.field == "tone"


def test_value_of_the_wrong_type_is_output_invalid(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"count": "a few", "ok": "yes"})
    with pytest.raises(OutputInvalid, match=re.escape("output field 'count' (int): expected an integer, found "
                                                      '"a few"')):
        run(run_llm_step(block("text -> count: int, ok: bool"), {"text": "x"}, lm=lm, adapter=adapter))


def test_unparseable_answer_is_output_invalid(dspy: Any) -> None:
    class Mumble:
        def complete(self, request: Any) -> Any:
            from dspy.lm15 import Message, Response, TextPart, Usage

            return Response(id=None, model="m", message=Message.assistant([TextPart("I'd rather not say.")]),
                            finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))

    class AsyncMumble:
        async def complete(self, request: Any) -> Any:
            return Mumble().complete(request)

    lm = dspy.LM("custom/mumble", engine=Mumble(), async_engine=AsyncMumble(), cache=False)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    with pytest.raises(OutputInvalid, match="not in the expected format; it has none of the output fields") as info:
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm=lm, adapter=adapter))
    assert info.value.raw == "I'd rather not say."


def test_no_lm_is_llm_not_configured(dspy: Any) -> None:
    with pytest.raises(LLMNotConfigured) as info:
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm=None, step_key="summarize"))
    message = str(info.value)
    assert type(info.value).__name__ == "LLMNotConfigured"
    assert message.startswith("LLM step 'summarize' has no language model configured")
    for how in ("'lm:'", "defaults: {llm: {lm: ...}}", "--lm MODEL", "FLOWDSL_LM"):
        assert how in message


def test_model_string_without_api_key_is_llm_not_configured(dspy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMNotConfigured, match=r"the LM 'openai/gpt-4o-mini' cannot be used: .*OPENAI_API_KEY"):
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm="openai/gpt-4o-mini", step_key="s"))
    # the block's own lm is used when the runtime passes none
    with pytest.raises(LLMNotConfigured, match="OPENAI_API_KEY"):
        run(run_llm_step(block("q -> a", lm="openai/gpt-4o-mini"), {"q": "?"}, lm=None))
    with pytest.raises(LLMNotConfigured, match="the LM 'openai/' cannot be used"):
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm="openai/"))


def test_inputs_are_checked(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"a": "x"})
    with pytest.raises(InputInvalid, match="the input field 'n' has no value \\(the step was given: q\\)"):
        run(run_llm_step(block("q, n: int -> a"), {"q": "?"}, lm=lm, step_key="s"))
    with pytest.raises(InputInvalid, match=re.escape("input field 'n' (int): expected an integer, found \"lots\"")):
        run(run_llm_step(block("q, n: int -> a"), {"q": "?", "n": "lots"}, lm=lm, step_key="s"))


def test_chain_of_thought_records_reasoning(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"reasoning": "Two mugs at 4.75 each.", "total": "9.5"})
    llm = block("items: list[str] -> total: float", module="chain_of_thought")
    result = run(run_llm_step(llm, {"items": ["mug", "mug"]}, lm=lm, adapter=adapter))
    assert result.outputs == {"total": 9.5}
    assert result.reasoning == "Two mugs at 4.75 each."
    assert "`reasoning`" in result.prompt[0]["content"]
    with pytest.raises(OutputInvalid, match="the answer has no 'reasoning' field"):
        run(run_llm_step(llm, {"items": ["mug"]}, lm=dummy(dspy, adapter, {"total": "1"}), adapter=adapter))


def test_instructions_descriptions_and_demos_reach_the_model(dspy: Any, adapter: Any) -> None:
    lm = section_lm(dspy, "m")
    llm = {
        "signature": normalize_fields({"inputs": {"customer_name": {"type": "str", "desc": "who ordered"}},
                                       "outputs": {"greeting": {"type": "str", "desc": "one short line"}}}),
        "instructions": "Write a friendly order confirmation.",
        "module": "predict",
        "lm": None,
        "demos": [{"customer_name": "Bob", "greeting": "Hello Bob, thanks!"}],
    }
    result = run(run_llm_step(llm, {"customer_name": "Ann"}, lm=lm, adapter=adapter))
    assert result.outputs == {"greeting": "m:Ann"}
    system = result.prompt[0]["content"]
    assert "Write a friendly order confirmation." in system
    assert "who ordered" in system and "one short line" in system
    turns = [(m["role"], m["content"]) for m in result.prompt[1:]]
    assert [r for r, _ in turns] == ["user", "assistant", "user"]
    assert "Bob" in turns[0][1] and "Hello Bob, thanks!" in turns[1][1] and "Ann" in turns[2][1]
    # the recorded prompt is what the engine was sent
    sent = lm.engine.requests[-1]
    assert sent.system == system and sent.messages[-1].text == turns[-1][1]


def test_concurrent_steps_use_their_own_lm(dspy: Any, adapter: Any) -> None:
    slow, fast = section_lm(dspy, "slow", delay=0.05), section_lm(dspy, "fast", delay=0.0)
    llm = block("name -> greeting")

    async def main() -> list[LlmResult]:
        calls = []
        for i in range(6):
            lm, tag = (slow, "slow") if i % 2 == 0 else (fast, "fast")
            calls.append(run_llm_step(llm, {"name": f"{tag}-{i}"}, lm=lm, step_key=f"s{i}", adapter=adapter))
        return await asyncio.gather(*calls)

    results = run(main())
    for i, result in enumerate(results):
        tag = "slow" if i % 2 == 0 else "fast"
        assert result.outputs == {"greeting": f"{tag}:{tag}-{i}"}
        assert result.model == f"custom/{tag}"
        assert f"{tag}-{i}" in result.prompt[-1]["content"] and result.raw.endswith(f"{tag}:{tag}-{i}")
    assert len(slow.engine.requests) == len(fast.engine.requests) == 3
    assert dspy.settings.lm is None  # nothing was configured globally


def test_runs_in_another_thread_after_dspy_configure(dspy: Any, adapter: Any) -> None:
    """dspy.configure binds the settings to the first thread that calls it; steps run from any thread."""
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            with pytest.raises(RuntimeError, match="can only be changed by the thread"):
                dspy.configure(lm=section_lm(dspy, "nope"))  # what run_llm_step must not rely on
            box["result"] = asyncio.run(run_llm_step(block("q -> a"), {"q": "hi"}, lm=section_lm(dspy, "t"),
                                                     adapter=adapter))
        except BaseException as exc:
            box["error"] = exc

    ambient = section_lm(dspy, "ambient")
    dspy.configure(lm=ambient)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    finally:
        dspy.configure(lm=None)
    assert "error" not in box, box.get("error")
    assert box["result"].outputs == {"a": "t:hi"}
    assert ambient.engine.requests == []  # the step's own LM answered, not the configured one


def test_redacted_inputs_are_masked_in_the_record(dspy: Any, adapter: Any) -> None:
    lm = section_lm(dspy, "echo")
    llm = block("card_number, account: dict, customer -> note")
    inputs = {"card_number": "4111-1111-1111-1111", "account": {"iban": "DE89370400440532013000"},
              "customer": "Ann"}
    result = run(run_llm_step(llm, inputs, lm=lm, redact=["card_number", "account"], adapter=adapter))
    recorded = json.dumps(result.prompt) + result.raw
    assert "4111-1111-1111-1111" not in recorded and "DE89370400440532013000" not in recorded
    assert "[[ ## card_number ## ]]\n***" in result.prompt[-1]["content"]
    assert "[[ ## account ## ]]\n***" in result.prompt[-1]["content"]
    assert "Ann" in result.prompt[-1]["content"]
    assert result.raw == "[[ ## note ## ]]\necho:***"
    # the model itself was sent the real values; only the record is masked
    assert "4111-1111-1111-1111" in lm.engine.requests[-1].messages[-1].text
    assert result.outputs == {"note": "echo:4111-1111-1111-1111"}


def test_redaction_applies_to_failures_too(dspy: Any, adapter: Any) -> None:
    lm = dummy(dspy, adapter, {"count": "s3cr3t-token"})
    with pytest.raises(OutputInvalid) as info:
        run(run_llm_step(block("token -> count: int"), {"token": "s3cr3t-token"}, lm=lm, redact=["token"],
                         adapter=adapter))
    err = info.value
    assert "s3cr3t-token" not in str(err) + err.raw + json.dumps(err.prompt)
    assert 'expected an integer, found "***"' in str(err)


def test_lm_and_block_mistakes_are_reported(dspy: Any) -> None:
    with pytest.raises(LLMNotConfigured, match=r"the LM must be a model string or a dspy\.BaseLM, found object"):
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm=object(), step_key="s"))
    with pytest.raises(ValueError, match="LLM step 's': chain_of_thought adds its own 'reasoning' output"):
        run(run_llm_step(block("q -> reasoning", module="chain_of_thought"), {"q": "?"}, lm=object(),
                         step_key="s"))


# --- audit fixes: strict answers, null and redacted inputs, model strings, diagnostics ----------------


class RawEngine:
    """A model that replies with the given raw texts in turn (the last one from then on)."""

    def __init__(self, *replies: str):
        self.replies, self.calls = list(replies), 0

    def complete(self, request: Any) -> Any:
        from dspy.lm15 import Message, Response, TextPart, Usage

        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        return Response(id=None, model="raw", message=Message.assistant([TextPart(reply)]), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class AsyncRawEngine:
    def __init__(self, sync: RawEngine):
        self.sync = sync

    async def complete(self, request: Any) -> Any:
        return self.sync.complete(request)


def raw_lm(dspy: Any, *replies: str) -> Any:
    engine = RawEngine(*replies)
    return dspy.LM("custom/raw", engine=engine, async_engine=AsyncRawEngine(engine), cache=False)


def answer(field: str, text: str) -> str:
    return f"[[ ## {field} ## ]]\n{text}\n\n[[ ## completed ## ]]"


@pytest.mark.parametrize(
    ("type_", "text", "says"),
    [
        ("int", "true", 'expected an integer, found "true"'),
        ("int", "0x10", 'expected an integer, found "0x10"'),
        ("int", "1_000", 'expected an integer, found "1_000"'),
        ("int", "2.5", 'expected an integer, found "2.5"'),
        ("float", "inf", 'expected a number, found "inf"'),
        ("bool", "on", 'expected true, false, yes or no, found "on"'),
        ("bool", "off", 'expected true, false, yes or no, found "off"'),
        ("bool", "0", 'expected true, false, yes or no, found "0"'),
        ("bool", "1", 'expected true, false, yes or no, found "1"'),
        ("bool", "t", 'expected true, false, yes or no, found "t"'),
        ("bool", "y", 'expected true, false, yes or no, found "y"'),
        ("list[int]", "1, 2", 'expected a JSON list, found "1, 2"'),
        ("list[str]", "a, b", 'expected a JSON list, found "a, b"'),
        ("list[int]", "[1, 'x']", "expected a JSON list"),
        ("dict", "{'k': 1}", "expected a JSON object"),
        ("Literal['formal', 'friendly']", "Formal", '"Formal" is not one of: "formal", "friendly"'),
    ],
)
def test_model_answers_are_read_strictly_by_the_documented_rules(dspy: Any, adapter: Any, type_: str, text: str,
                                                                 says: str) -> None:
    lm = raw_lm(dspy, answer("x", text))
    with pytest.raises(OutputInvalid) as info:
        run(run_llm_step(block(f"q -> x: {type_}"), {"q": "?"}, lm=lm, adapter=adapter, step_key="s"))
    assert says in str(info.value) and info.value.field == "x", str(info.value)


@pytest.mark.parametrize(
    ("type_", "text", "value"),
    [
        ("int", "42", 42), ("int", " 3.0 ", 3), ("int", "1e3", 1000), ("int", '"7"', 7), ("float", "9.5", 9.5),
        ("bool", "Yes", True), ("bool", "FALSE", False), ("bool", "no", False),
        ("list[int]", "[1, 2]", [1, 2]), ("list[str]", '["a", "b"]', ["a", "b"]), ("dict", '{"k": [1]}', {"k": [1]}),
        # an enum is read by its type's rule, then must be one of the values: bool reads "yes" as true
        ("Literal[True, False]", "yes", True), ("Literal[True, False]", "False", False),
        ("Literal[1, 2]", "2.0", 2), ("Literal['formal', 'friendly']", " 'friendly' ", "friendly"),
    ],
)
def test_model_answers_that_fit_the_rules_are_accepted(dspy: Any, adapter: Any, type_: str, text: str,
                                                        value: Any) -> None:
    result = run(run_llm_step(block(f"q -> x: {type_}"), {"q": "?"}, lm=raw_lm(dspy, answer("x", text)),
                              adapter=adapter))
    assert result.outputs == {"x": value} and type(result.outputs["x"]) is type(value)


def test_a_model_answer_with_a_field_that_is_not_an_output_is_output_invalid(dspy: Any, adapter: Any) -> None:
    reply = "[[ ## tone ## ]]\nformal\n\n[[ ## tones ## ]]\nfriendly\n\n[[ ## completed ## ]]"
    with pytest.raises(OutputInvalid, match=re.escape("the answer has 'tones' (did you mean 'tone'?), which is "
                                                      "not an output field")):
        run(run_llm_step(block("q -> tone"), {"q": "?"}, lm=raw_lm(dspy, reply), adapter=adapter))


def test_json_adapter_answers_follow_the_same_rules(dspy: Any) -> None:
    adapter = dspy.JSONAdapter()
    ok = run(run_llm_step(block("q -> n: int, flag: bool"), {"q": "?"},
                          lm=raw_lm(dspy, '{"n": "42", "flag": "yes"}'), adapter=adapter))
    assert ok.outputs == {"n": 42, "flag": True}
    with pytest.raises(OutputInvalid, match="output field 'flag' \\(bool\\): expected true, false, yes or no, found 1"):
        run(run_llm_step(block("q -> n: int, flag: bool"), {"q": "?"}, lm=raw_lm(dspy, '{"n": 1, "flag": 1}'),
                         adapter=adapter))


def test_a_null_input_is_input_invalid(dspy: Any, adapter: Any) -> None:
    lm = raw_lm(dspy, answer("b", "x"))
    for sig in ("a: int -> b", "a -> b"):
        with pytest.raises(InputInvalid, match=re.escape("input field 'a' (")) as info:
            run(run_llm_step(block(sig), {"a": None}, lm=lm, adapter=adapter, step_key="s"))
        assert "no value (null)" in str(info.value)
    assert lm.engine.calls == 0  # the model was never asked


def test_a_bad_value_of_a_redacted_input_is_not_shown(dspy: Any, adapter: Any) -> None:
    lm = raw_lm(dspy, answer("verdict", "ok"))
    with pytest.raises(InputInvalid) as info:
        run(run_llm_step(block("pin: int, holder -> verdict"), {"pin": "secret-pin-9876", "holder": "Ann"}, lm=lm,
                         adapter=adapter, redact=["pin"], step_key="s"))
    message = str(info.value)
    assert "secret-pin-9876" not in message
    assert message == "LLM step 's': input field 'pin' (int): the value does not fit (a text; not shown: 'pin' " \
                      "is redacted)"
    # the mask also covers a redacted value that appears in another field's message
    with pytest.raises(InputInvalid) as info:
        run(run_llm_step(block("pin, n: int -> verdict"), {"pin": "secret-pin-9876", "n": "secret-pin-9876"}, lm=lm,
                         adapter=adapter, redact=["pin"], step_key="s"))
    assert "secret-pin-9876" not in str(info.value) and 'found "***"' in str(info.value)


@pytest.mark.parametrize("model", ["gpt4", "foo/bar"])
def test_an_invalid_model_string_is_llm_not_configured(dspy: Any, model: str) -> None:
    with pytest.raises(LLMNotConfigured, match=re.escape(f"LLM step 's': the model string '{model}' is invalid: "
                                                         "neither DSPy nor LiteLLM can tell which provider serves "
                                                         "it; write it as 'provider/model'")):
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm=model, step_key="s"))


def test_a_known_model_without_a_provider_prefix_is_not_refused_as_invalid(
        dspy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(LLMNotConfigured, match=r"the LM 'gpt-4o-mini' cannot be used: .*OPENAI_API_KEY"):
        run(run_llm_step(block("q -> a"), {"q": "?"}, lm="gpt-4o-mini", step_key="s"))


def test_type_hints_match_typing_spellings_and_grammar_is_right() -> None:
    with pytest.raises(SignatureError, match=re.escape("(did you mean 'dict'?)")):
        parse_signature("a -> b: dict[str, Any]")
    with pytest.raises(SignatureError, match=re.escape("(did you mean 'dict'?)")):
        parse_signature("a -> b: Dict[str,Any]")
    with pytest.raises(SignatureError, match=re.escape("(did you mean 'str'?)")):
        parse_signature("a -> b: String")
    with pytest.raises(SignatureError, match=r"is not an int\Z"):
        normalize_fields({"inputs": {"a": "str"}, "outputs": {"b": {"type": "int", "enum": [1, "x"]}}})


def test_signature_errors_say_where_in_the_signature(tmp_path: Path) -> None:
    from flowdsl.api import validate

    path = tmp_path / "fold.yaml"
    path.write_text("flowdsl: 1\nname: t\nsteps:\n  - s:\n      llm:\n        signature: >-\n"
                    "          question, context ->\n          answer: strng\n", encoding="utf-8")
    (d,) = validate(path, check_workers=False)
    assert (d.code, d.line) == ("FD602", 6)
    assert d.message.startswith("in the signature: found unknown type 'strng' for field 'answer'")
    assert d.message.endswith("(did you mean 'str'?) (at character 30 of the signature: \"strng\")")
    with pytest.raises(SignatureError) as err:
        parse_signature("question => answer")
    assert err.value.describe().endswith("(at the end of the signature)")


def test_fd601_uses_the_module_from_defaults(tmp_path: Path) -> None:
    from flowdsl.api import SpecError, compile_text

    spec = ("flowdsl: 1\nname: t\ndefaults: {llm: {module: chain_of_thought}}\nsteps:\n"
            "  - s:\n      llm: {signature: 'a -> reasoning'}\n")
    with pytest.raises(SpecError) as info:
        compile_text(spec)
    (d,) = info.value.diagnostics
    assert d.code == "FD601" and "chain_of_thought adds its own 'reasoning' output" in d.message
    assert "defaults: {llm: {module: ...}}" in d.message
    # a demo may show its reasoning when the module comes from the defaults, and predict steps keep theirs
    plan = compile_text("flowdsl: 1\nname: t\ndefaults: {llm: {module: chain_of_thought}}\nsteps:\n"
                        "  - s:\n      llm: {signature: 'a -> b', demos: [{a: x, b: y, reasoning: z}]}\n"
                        "  - p:\n      llm: {signature: 'a -> reasoning', module: predict}\n")
    modules = [plan["nodes"][key]["llm"]["module"] for key in ("s", "p")]
    assert modules == ["chain_of_thought", "predict"]


def test_fd604_with_keys_must_be_the_signature_inputs() -> None:
    from flowdsl.api import SpecError, compile_text

    head = "flowdsl: 1\nname: t\nsteps:\n  - g:\n      llm: {signature: 'customer_name, total: float -> greeting'}\n"
    with pytest.raises(SpecError) as info:
        compile_text(head + "      with: {customer_nmae: '${ input.n }', total: '${ input.t }'}\n")
    got = sorted((d.code, d.path, d.message) for d in info.value.diagnostics)
    assert got == [
        ("FD604", "/steps/0/g/with", "'with' gives no value for the input field 'customer_name'; with a 'with' "
         "mapping the model gets only its keys, so map every input field: customer_name, total"),
        ("FD604", "/steps/0/g/with/customer_nmae", "'with' gives 'customer_nmae', which is not an input field of "
         "the signature (did you mean 'customer_name'?); the input fields are: customer_name, total"),
    ]
    with pytest.raises(SpecError) as info:
        compile_text(head + "      with: {customer_name: '${ input.n }', total: '${ input.t }', extra: 1}\n")
    assert [d.path for d in info.value.diagnostics] == ["/steps/0/g/with/extra"]
    compile_text(head + "      with: {customer_name: '${ input.n }', total: '${ input.t }'}\n")  # exact keys
