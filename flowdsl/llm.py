"""LLM steps: calling a language model through DSPy for an ``llm:`` step.

Stage: llm steps — runtime-side, imported lazily by runtimes; imports
flowdsl.expr-free stdlib (and ``flowdsl.llm_signature``) at import time, and
dspy lazily, inside the functions that need it (importing it costs ~1.5 s).
Nothing global is set at import, and nothing global is set by a call: each
step's LM, adapter and recorder are bound with ``dspy.context`` for that call
only, so concurrent steps (asyncio tasks or threads) never see each other's
model, and ``dspy.configure`` (which refuses other threads) is never used.

The runtime resolves the step's LM with :func:`resolve_lm`, takes the step's
inputs from the context (or its ``with:``), and awaits :func:`run_llm_step`
with the plan node's ``llm`` block. The result's ``outputs`` are checked and
converted to the signature's types; a malformed answer raises
:class:`OutputInvalid`, a missing LM :class:`LLMNotConfigured` — both step
failures whose class names retry filters match. See docs/llm.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import json
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowdsl.llm_signature import (
    MODULES,
    REASONING_FIELD,
    TYPES,
    SignatureError,
    check_llm_block,
    coerce_value,
    describe_type,
    leaves,
    normalize_fields,
    normalize_signature,
    parse_signature,
    unescape_demos,
)

__all__ = [
    "LLM_ENV",
    "MODULES",
    "ON_REDIS_WORKER",
    "TYPES",
    "InputInvalid",
    "LLMNotConfigured",
    "LlmResult",
    "OutputInvalid",
    "SignatureError",
    "check_fallback_result",
    "check_llm_block",
    "coerce_value",
    "normalize_fields",
    "normalize_signature",
    "not_configured_why",
    "parse_signature",
    "resolve_lm",
    "run_llm_step",
    "step_inputs",
]

#: the environment variable naming the LM used when nothing else does
LLM_ENV = "FLOWDSL_LM"
REDACTED = "***"

#: True where LLM steps run in a Redis worker (``RedisWorker.serve`` sets it): the model of a step that names
#: none is then the worker's ``--lm`` or its FLOWDSL_LM, which the LLMNotConfigured message says
ON_REDIS_WORKER: contextvars.ContextVar[bool] = contextvars.ContextVar("flowdsl_llm_on_redis_worker", default=False)
_HOW_TO_CONFIGURE = (
    "name one with 'lm:' in the step's llm block, 'defaults: {llm: {lm: ...}}' in the spec, "
    f"'--lm MODEL' on the command line, or the {LLM_ENV} environment variable "
    f"(e.g. {LLM_ENV}=openai/gpt-4o-mini); API keys are read from the environment (e.g. OPENAI_API_KEY)"
)
_HOW_TO_CONFIGURE_ON_WORKER = (
    "name one with 'lm:' in the step's llm block, 'defaults: {llm: {lm: ...}}' in the spec, or give the Redis "
    f"worker one: 'flowdsl worker --lm MODEL', or {LLM_ENV} in the worker's environment "
    f"(e.g. {LLM_ENV}=openai/gpt-4o-mini); the --lm and {LLM_ENV} of 'flowdsl run --backend redis' are not used, "
    "and API keys are read from the worker's environment (e.g. OPENAI_API_KEY)"
)
_HEADER = re.compile(r"^\s*\[\[ ## (\w+) ## \]\]\s*(.*)$")
# what the LLMNotConfigured messages say, by case (not_configured_why tells them apart)
_NO_MODEL = " has no language model configured: "
_INVALID = " is invalid: "
_NO_DSPY = " needs DSPy, which is not installed"


class LLMNotConfigured(Exception):
    """No usable language model for an LLM step (none named, its API key missing, or DSPy not installed)."""


class OutputInvalid(Exception):
    """The model's answer does not fit the step's signature (a field missing, a value of the wrong type).

    ``field`` names the first offending output field when one is known;
    ``prompt`` and ``raw`` are what was sent and received (redacted).
    """

    def __init__(self, message: str, *, field: str | None = None, prompt: list[dict[str, Any]] | None = None,
                 raw: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field
        self.prompt = prompt or []
        self.raw = raw


class InputInvalid(Exception):
    """An input field of the step has no value, or a value that does not fit its declared type."""


@dataclass(frozen=True)
class LlmResult:
    """What one LLM step call produced.

    ``outputs`` holds every output field of the signature, converted to its
    type (JSON-serializable). ``prompt`` is the list of chat messages
    (``{"role", "content"}``) of the model call whose answer was used, and
    ``raw`` its reply text; in both, the values of the inputs named in
    ``redact`` are replaced by ``***``, and a lone surrogate is written as its
    escape (``\\udc80``), so they can be recorded. ``reasoning`` is the ChainOfThought
    rationale (None for ``predict``); ``model`` the LM's model name.
    """

    outputs: dict[str, Any]
    prompt: list[dict[str, Any]] = field(default_factory=list)
    raw: str = ""
    reasoning: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON data, for event logs."""
        return {"outputs": self.outputs, "prompt": self.prompt, "raw": self.raw,
                "reasoning": self.reasoning, "model": self.model}


def resolve_lm(step_lm: str | None, default_lm: str | None, cli_lm: str | None,
               env: Mapping[str, str]) -> str | None:
    """The model string an LLM step uses, or None when none is configured.

    Precedence, first set wins: the step's ``llm.lm`` > the CLI's ``--lm`` >
    the spec's ``defaults.llm.lm`` > the environment's ``FLOWDSL_LM``. Empty or
    blank values count as unset.
    """
    for value in (step_lm, cli_lm, default_lm, env.get(LLM_ENV)):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


async def run_llm_step(
    llm: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    lm: object | str | None,
    step_key: str = "",
    redact: Iterable[str] = (),
    adapter: object | None = None,
) -> LlmResult:
    """Run one LLM step: build its DSPy program, call the model once, check the answer.

    ``llm`` is the plan node's ``llm`` block (``signature`` may also be given
    in either source form). ``inputs`` maps input field names to values;
    other keys are ignored. ``lm`` is the LM resolved by :func:`resolve_lm`
    (a model string, made into ``dspy.LM(model, cache=False)`` with keys from
    the environment) or a ``dspy.BaseLM`` instance; when None, the block's own
    ``lm`` is used. ``adapter`` overrides DSPy's adapter for this call (default:
    the one in ``dspy.settings``, else a ``ChatAdapter`` without its JSON-mode second call). ``redact`` names input
    fields (runtimes pass the block's ``redact``) whose values are sent as they
    are but masked (``***``) in the prompt, reply, reasoning and error messages
    returned or raised.

    Raises :class:`LLMNotConfigured`, :class:`InputInvalid`,
    :class:`OutputInvalid`; provider failures (``LMRateLimitError``,
    ``LMTimeoutError``, ...) propagate unchanged.
    """
    where = _where(step_key)
    signature = normalize_signature(llm["signature"])
    module_name = llm.get("module") or "predict"
    # (demos are checked with the spec, FD603 and FD201, not here)
    problems = [m for _, pointer, m in check_llm_block({**llm, "signature": signature})
                if not pointer.startswith("/demos")]
    if problems:
        raise ValueError(f"{where}: {problems[0]}")
    model = lm if lm is not None else llm.get("lm")
    if model is None or (isinstance(model, str) and not model.strip()):
        how = _HOW_TO_CONFIGURE_ON_WORKER if ON_REDIS_WORKER.get() else _HOW_TO_CONFIGURE
        raise LLMNotConfigured(f"{where}{_NO_MODEL}{how}")
    redact = tuple(redact)
    values = _prepare_inputs(signature, inputs, where, redact)
    secrets = _secrets(values, inputs, redact)
    dspy = await _import_dspy(where)
    if isinstance(model, str):
        model = model.strip()
        problem = await _model_problem(model)
        if problem is not None:
            raise LLMNotConfigured(f"{where}: the model string {model!r}{_INVALID}{problem}; write it as "
                                   "'provider/model', e.g. 'openai/gpt-4o-mini' or 'anthropic/claude-sonnet-4-6'")
    lm_obj = _make_lm(dspy, model, where)
    program = _build_program(dspy, signature, llm.get("instructions"), module_name, llm.get("demos") or [])
    recorder = _recorder_class(dspy)()
    callbacks = [*(dspy.settings.get("callbacks") or []), recorder]
    # History off: the recorder keeps what the event log needs, and DSPy's in-memory
    # history would otherwise grow with every call of a long-running worker.
    overrides: dict[str, Any] = {"lm": lm_obj, "callbacks": callbacks, "disable_history": True}
    if adapter is None and dspy.settings.get("adapter") is None:
        adapter = _default_adapter(dspy)
    if adapter is not None:
        overrides["adapter"] = adapter
    from dspy.utils.exceptions import AdapterParseError, LMNotConfiguredError

    fields = signature["outputs"]
    if module_name == "chain_of_thought":
        fields = [{"name": REASONING_FIELD, "type": "str", "desc": None, "enum": None}, *fields]
    parsed: Mapping[str, Any] | None = None
    try:
        with dspy.context(**overrides):
            prediction = await program.acall(**values)
        parsed = prediction.toDict()
    except AdapterParseError as exc:
        # DSPy's parser (pydantic, lax) refused the answer; flowdsl's rules (docs/llm.md) decide: an answer
        # that fits them is used (``Literal[True, False]`` answered "yes"), any other is OutputInvalid.
        reply = recorder.raw or str(exc.lm_response or "")
    except LMNotConfiguredError as exc:
        reason = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, secrets)
        raise LLMNotConfigured(f"{where}: the LM {_model_name(lm_obj)!r} cannot be used: {reason} "
                               "(flowdsl passes no keys itself: set the provider's API key in the "
                               "environment of the process that runs the step)") from None
    else:
        reply = recorder.raw
    prompt = _redact_prompt(recorder.prompt, secrets)
    raw = _recorded(reply, secrets)
    texts = _sections(reply)
    if texts is None and parsed is not None:
        # a reply flowdsl cannot split into fields (another adapter's format): check what DSPy read from it
        texts = {k: v for k, v in parsed.items() if k in {f["name"] for f in fields}}
    answer, problem, bad = _read_answer(fields, texts, reply)
    if answer is None:
        problem = _shown_problem(fields, texts, reply, problem, bad, secrets)
        raise OutputInvalid(_redact(f"{where}: {problem}", secrets), field=bad, prompt=prompt, raw=raw)
    reasoning = answer.pop(REASONING_FIELD, None) if module_name == "chain_of_thought" else None
    return LlmResult(outputs=answer, prompt=prompt, raw=raw,
                     reasoning=_recorded(str(reasoning), secrets) if reasoning is not None else None,
                     model=_model_name(lm_obj))


def not_configured_why(message: str) -> str:
    """What an ``LLMNotConfigured`` message says went wrong, in a few words: ``no LM configured``, ``the model
    string is invalid``, ``DSPy is not installed``, or ``the LM cannot be used`` (its API key is missing, ...)."""
    if _NO_MODEL in message or not message:
        return "no LM configured"
    if ": the model string " in message and _INVALID in message:
        return "the model string is invalid"
    if _NO_DSPY in message:
        return "DSPy is not installed"
    return "the LM cannot be used"


def step_inputs(llm: Mapping[str, Any], inputs: Mapping[str, Any], *, step_key: str = "",
                redact: Iterable[str] = ()) -> dict[str, Any]:
    """The values of an LLM step's input fields, checked and converted as the model gets them.

    ``inputs`` is the step's input (its ``with:``, or its context); the result
    holds exactly the signature's input fields, each converted to its type. The
    runtime hands the same values to the step's fallback worker. Raises
    :class:`InputInvalid` (a field with no value, null, or a value that does not
    fit its type); the value of a field named in ``redact`` is never shown.
    """
    return _prepare_inputs(normalize_signature(llm["signature"]), inputs, _where(step_key), tuple(redact))


async def prepare_models(models: Iterable[str]) -> None:
    """Import DSPy and check each model string (offline, each once per process), as a step's first call would,
    and import LiteLLM when DSPy will send a call through it; never raises (DSPy missing or broken, a model
    string that is invalid: the step's attempt says so)."""
    try:
        await _import_dspy("LLM step")
        for model in models:
            if model.strip() and await _model_problem(model.strip()) is None and _via_litellm(model.strip()):
                await asyncio.to_thread(_import_litellm)
    except Exception:  # (whatever it is, the step's own call meets it again and fails its attempt with it)
        return


def _via_litellm(model: str) -> bool:
    """Whether DSPy sends a call of ``model`` through LiteLLM, as it decides when called (offline): a string its
    native router cannot route, or one whose provider has a ``<PROVIDER>_API_BASE``/``_BASE_URL`` set."""
    from dspy.clients.backend_selection import select_backend

    return not select_backend(_lm_for(model)).native


def _import_litellm() -> None:
    # the call imports LiteLLM this way (and sets DSPy's defaults on it once)
    from dspy.clients._litellm import get_litellm

    get_litellm(feature="dspy.LM")


def redact_text(text: str, inputs: Mapping[str, Any], redact: Iterable[str],
                llm: Mapping[str, Any] | None = None) -> str:
    """``text`` with the values of the inputs named in ``redact`` masked (``***``), as the messages and records
    of a step's call are: for a runtime masking what it records of a failure it did not build (a provider's
    error message, a traceback). With the step's ``llm`` block, the values as converted for the model (``"9.50"``
    sent as ``9.5``) are masked too."""
    redact = tuple(redact)
    values: Mapping[str, Any] = {}
    if llm is not None:
        with contextlib.suppress(Exception):  # (inputs that do not fit: only their raw forms were sent anywhere)
            values = _prepare_inputs(normalize_signature(llm["signature"]), inputs, "", redact)
    secrets = _secrets(values, inputs, redact)
    return _redact(text, secrets) if secrets else text


def check_fallback_result(llm: Mapping[str, Any], result: Any, *, worker: str, step_key: str = "",
                          inputs: Mapping[str, Any] | None = None, redact: Iterable[str] = ()) -> dict[str, Any]:
    """A fallback worker's result checked against the step's output fields, as a model answer is.

    Returns the outputs converted to their types. Raises :class:`OutputInvalid`
    naming the first offending field when the result is not a mapping, misses an
    output field, has a key that is not one, or has a value that does not fit its
    type or enum. ``inputs`` and ``redact`` mask redacted input values in the message.
    """
    where = f"the fallback worker '{worker}' of {_where(step_key)}"
    outputs = normalize_signature(llm["signature"])["outputs"]
    secrets = _secrets({}, inputs or {}, redact)
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        raise OutputInvalid(f"{where} returned {type(result).__name__}, expected a mapping of the output "
                            f"fields ({_expected(outputs)})")
    answer, problem, bad = _read_answer(outputs, dict(result), None)
    if answer is None:
        problem = _shown_problem(outputs, dict(result), None, problem, bad, secrets)
        raise OutputInvalid(_redact(f"{where}: {problem}", secrets), field=bad)
    return answer


# --- building the DSPy program ------------------------------------------------------------------


async def _import_dspy(where: str) -> Any:
    loaded = sys.modules.get("dspy")
    if loaded is not None and not getattr(getattr(loaded, "__spec__", None), "_initializing", False):
        return loaded
    try:  # the first import takes ~1.5 s: keep the event loop (heartbeats, leases) running meanwhile
        return await asyncio.to_thread(importlib.import_module, "dspy")
    except ImportError as exc:
        raise LLMNotConfigured(f"{where}{_NO_DSPY} ({exc}); "
                               "install it with: pip install 'flowdsl[llm]'") from None


_LITELLM_QUIET = threading.Lock()


async def _model_problem(model: str) -> str | None:
    """Why ``model`` names no model DSPy can route to (None when it does), found offline without calling it."""
    declared = _declared_providers()
    cached = _model_problems.get(model)
    if cached is not None and cached[0] == declared:
        found = cached[1]
    else:  # (a provider registered since may route it now)
        found = await asyncio.to_thread(_check_model, model)
        if len(_model_problems) < 256 or model in _model_problems:
            _model_problems[model] = (declared, found)
    return found if isinstance(found, str) else None


#: model string -> (the providers declared when it was checked, its problem or None)
_model_problems: dict[str, tuple[tuple[Any, ...], str | None]] = {}


def _declared_providers() -> tuple[Any, ...]:
    """The providers declared to DSPy in this process (``dspy.lm15.register_provider``), as a new ``dspy.LM``
    binds them; DSPy is imported already wherever this is called."""
    try:
        from dspy.lm15 import registered_providers

        return tuple(registered_providers())
    except Exception:  # (DSPy's internals moved: only its built-in providers are known)
        return ()


def _check_model(model: str) -> str | None:
    # DSPy 3.4 routes a model string natively (lm15) when it can — a built-in provider or one declared with
    # dspy.lm15.register_provider —, else through LiteLLM: the model string is valid when either can tell its
    # provider. Both resolutions are offline and cheap; LiteLLM is imported only when lm15 cannot route the
    # string (the call would import it then anyway).
    try:
        from dspy.clients.engines.lm15_engine import LM15Engine
        from dspy.lm15 import RouterConfig

        declared = tuple(p.definition for p in _declared_providers())
        LM15Engine(RouterConfig(env={}, providers=declared), model_type="chat").resolve(model)
        return None
    except Exception:  # not routed natively (or DSPy's internals moved): LiteLLM's resolution decides
        pass
    try:
        import litellm
    except ImportError:
        return None  # no LiteLLM: leave the verdict to dspy.LM
    with _LITELLM_QUIET:
        # get_llm_provider prints a banner to stdout when it fails unless this flag is set; it is restored at
        # once (the flag only silences LiteLLM's debug hints)
        quiet = litellm.suppress_debug_info
        litellm.suppress_debug_info = True
        try:
            litellm.get_llm_provider(model)
        except Exception:
            return "neither DSPy nor LiteLLM can tell which provider serves it"
        finally:
            litellm.suppress_debug_info = quiet
    return None


@functools.cache
def _default_adapter(dspy: Any) -> Any:
    # DSPy's own default ChatAdapter calls the model a second time, in JSON mode, when its parser refuses an
    # answer; flowdsl's rules decide what an answer means (an answer they accept would be thrown away, and the
    # call paid twice), so the default here has that fallback off
    return dspy.ChatAdapter(use_json_adapter_fallback=False)


def _lm_for(model: str) -> Any:
    import dspy

    # A dspy.LM binds the providers declared when it is made: one made before a registration would not see it.
    declared = _declared_providers()
    cached = _lms.get(model)
    if cached is not None and cached[0] == declared:
        return cached[1]
    # No response cache: a retried step must ask the model again, not replay the answer that failed.
    lm = dspy.LM(model, cache=False)
    if len(_lms) < 64 or model in _lms:
        _lms[model] = (declared, lm)
    return lm


_lms: dict[str, tuple[tuple[Any, ...], Any]] = {}


def _make_lm(dspy: Any, model: object, where: str) -> Any:
    if isinstance(model, str):
        try:
            return _lm_for(model)
        except (ValueError, TypeError, dspy.LMError) as exc:
            raise LLMNotConfigured(f"{where}: the LM '{model}' cannot be used: {exc}") from None
    if isinstance(model, dspy.BaseLM) or getattr(model, "supports_decision_requests", False) is True:
        return model
    raise LLMNotConfigured(f"{where}: the LM must be a model string or a dspy.BaseLM, found "
                           f"{type(model).__name__}")


def _annotation(f: Mapping[str, Any]) -> Any:
    from typing import Literal

    if f.get("enum") is not None:
        return Literal.__getitem__(tuple(f["enum"]))
    return {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list[str],
            "list[int]": list[int], "list[float]": list[float], "dict": dict[str, Any]}[f["type"]]


def _build_program(dspy: Any, signature: Mapping[str, Any], instructions: str | None, module: str,
                   demos: list[Mapping[str, Any]]) -> Any:
    fields: dict[str, tuple[Any, Any]] = {}
    for side, make in (("inputs", dspy.InputField), ("outputs", dspy.OutputField)):
        for f in signature[side]:
            fields[f["name"]] = (_annotation(f), make(desc=f["desc"]) if f.get("desc") else make())
    sig = dspy.Signature(fields, instructions or None)
    program = dspy.ChainOfThought(sig) if module == "chain_of_thought" else dspy.Predict(sig)
    examples = [dspy.Example(**dict(d)) for d in unescape_demos(demos)]
    for predictor in program.predictors():
        predictor.demos = list(examples)
    return program


def _prepare_inputs(signature: Mapping[str, Any], inputs: Mapping[str, Any], where: str,
                    redact: tuple[str, ...] = ()) -> dict[str, Any]:
    values: dict[str, Any] = {}
    secrets = _secrets({}, inputs, redact)
    for f in signature["inputs"]:
        name = f["name"]
        if name not in inputs:
            have = ", ".join(sorted(map(str, inputs))) or "nothing"
            raise InputInvalid(_redact(f"{where}: the input field '{name}' has no value (the step was given: "
                                       f"{have}); put it in the context or map it with 'with:'", secrets))
        value = inputs[name]
        if value is None:
            raise InputInvalid(f"{where}: input field '{name}' ({describe_type(f)}): no value (null) — the "
                               "context's value, or the value the step's 'with:' maps to it, is null")
        try:
            values[name] = coerce_value(f, value)
        except ValueError as exc:
            if name in redact:  # never echo a secret, even one the mask would not catch
                raise InputInvalid(f"{where}: input field '{name}' ({describe_type(f)}): the value does not fit "
                                   f"(a {_kind(value)}; not shown: '{name}' is redacted)") from None
            raise InputInvalid(_redact(f"{where}: input field '{name}' ({describe_type(f)}): {exc}",
                                       secrets)) from None
    return values


def _kind(value: Any) -> str:
    return {str: "text", bool: "boolean", int: "number", float: "number", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)


def _where(step_key: str) -> str:
    return f"LLM step '{step_key}'" if step_key else "LLM step"


@functools.cache
def _recorder_class(dspy: Any) -> type:
    class _Recorder(dspy.utils.callback.BaseCallback):
        """Keeps the messages and the reply of the LM calls made in this step's context."""

        def __init__(self) -> None:
            self.prompt: list[dict[str, Any]] = []
            self.raw = ""

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            messages = inputs.get("messages")
            if messages is None and isinstance(inputs.get("prompt"), str):
                messages = [{"role": "user", "content": inputs["prompt"]}]
            self.prompt = [{"role": str(m.get("role", "")), "content": _jsonable(m.get("content"))}
                           for m in messages or [] if isinstance(m, Mapping)]
            self.raw = ""

        def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
            first = outputs[0] if isinstance(outputs, list) and outputs else outputs
            if isinstance(first, Mapping):
                first = first.get("text")
            self.raw = first if isinstance(first, str) else ("" if first is None else str(first))

    return _Recorder


# --- checking answers, recording ------------------------------------------------------------------


def _sections(raw: str) -> dict[str, str] | None:
    """The field texts of a reply: ChatAdapter ``[[ ## name ## ]]`` sections, else a JSON object."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in raw.splitlines():
        m = _HEADER.match(line)
        if m:
            current = sections.setdefault(m.group(1), []) if m.group(1) not in sections else None
            if current is not None and m.group(2):
                current.append(m.group(2))
        elif current is not None:
            current.append(line)
    if sections:
        return {k: "\n".join(v).strip() for k, v in sections.items()}
    try:
        data = json.loads(raw.strip().removeprefix("```json").removesuffix("```"))
    except (ValueError, RecursionError):
        return None
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else None


def _read_answer(fields: Sequence[Mapping[str, Any]], texts: Mapping[str, Any] | None,
                 reply: str | None) -> tuple[dict[str, Any] | None, str, str | None]:
    """Check an answer's field values (texts of a reply, or a fallback's result) against ``fields``.

    Returns ``(values converted to their types, "", None)`` when every field is
    there, fits its type and nothing else is, else ``(None, message, first bad
    field)``. ``reply`` is the model's reply text (None for a fallback's result).
    """
    expected = _expected(fields)
    what = "the answer" if reply is not None else "the result"
    if reply is not None and not reply.strip():
        return None, f"the model's answer is empty (expected {expected})", None
    if texts is None:
        return None, (f"the model's answer is not in the expected format; it has none of the output fields "
                      f"(expected {expected})"), None
    names = [f["name"] for f in fields]
    problems: list[str] = []
    bad: str | None = None
    missing = [n for n in names if n not in texts]
    if missing:
        problems.append(f"{what} has no " + ", ".join(f"'{n}'" for n in missing)
                        + (" field" if len(missing) == 1 else " fields"))
        bad = missing[0]
    # "completed" ends a ChatAdapter reply; any other field is not one the step has
    extra = [str(k) for k in texts if k not in names and not (reply is not None and k == "completed")]
    if extra:
        problems.append(f"{what} has " + ", ".join(f"'{k}'" + _did_you_mean(k, names) for k in extra)
                        + ", which " + ("is not an output field" if len(extra) == 1 else "are not output fields"))
    values: dict[str, Any] = {}
    for f in fields:
        if f["name"] in texts:
            try:
                values[f["name"]] = coerce_value(f, texts[f["name"]])
            except ValueError as exc:
                problems.append(f"output field '{f['name']}' ({describe_type(f)}): {exc}")
                bad = bad or f["name"]
    if not problems:
        return values, "", None
    malformed = "the model's answer is malformed" if reply is not None else "the result does not fit the outputs"
    return None, f"{malformed}: {'; '.join(problems)} (expected {expected})", bad


def _shown_problem(fields: Sequence[Mapping[str, Any]], texts: Mapping[str, Any] | None, reply: str | None,
                   problem: str, bad: str | None, secrets: list[str]) -> str:
    """The message of an answer's ``problem``, as shown: built from the answer with the secrets masked first.

    A message quotes the offending values escaped and cut short, forms the mask cannot find afterwards (a
    secret the model echoed, with a quote, a newline, or too long to be shown whole), so with secrets the answer
    is read again masked, for its message only; when that reading finds nothing wrong with the same field (the
    mask changed the verdict), the message names the field and its type without its value."""
    if not secrets or texts is None:
        return problem
    _, masked, masked_bad = _read_answer(fields, _recorded(dict(texts), secrets),
                                         None if reply is None else _redact(reply, secrets))
    if masked and masked_bad == bad:
        return masked
    types = {f["name"]: describe_type(f) for f in fields}
    said = "the model's answer is malformed" if reply is not None else "the result does not fit the outputs"
    field_said = f"output field '{bad}' ({types[bad]})" if bad in types else "a field"
    return (f"{said}: {field_said} does not fit (its value is not shown: it holds a redacted input's value; "
            f"expected {_expected(fields)})")


def _did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _expected(fields: Iterable[Mapping[str, Any]]) -> str:
    return "; ".join(f"{f['name']}: {describe_type(f)}" for f in fields)


def _secrets(values: Mapping[str, Any], inputs: Mapping[str, Any], redact: Iterable[str]) -> list[str]:
    """Every text form the redacted inputs may take in a prompt, longest first."""
    forms: set[str] = set()
    for name in set(redact):
        for value in (values.get(name), inputs.get(name)):
            if value is None:
                continue
            if isinstance(value, str):
                forms.update(_escaped(value))
                continue
            forms.add(str(value))
            for kw in ({}, {"ensure_ascii": False}, {"ensure_ascii": False, "sort_keys": True}):
                with contextlib.suppress(TypeError, ValueError):
                    forms.add(json.dumps(value, **kw))  # type: ignore[arg-type]
            forms.update(form for leaf in _leaves(value) if len(leaf) >= 4 for form in _escaped(leaf))
    return sorted((s for s in forms if s.strip()), key=len, reverse=True)


def _escaped(text: str) -> set[str]:
    """``text`` and the forms it takes inside a JSON string (a provider's error may quote the request as JSON):
    escaped quotes, backslashes and control characters, and non-ASCII letters as ``\\u`` escapes."""
    return {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}


def _leaves(value: Any) -> Iterable[str]:
    """The scalars of a value as text (a non-string as its JSON); None left out."""
    return (leaf if isinstance(leaf, str) else json.dumps(leaf) for leaf in leaves(value) if leaf is not None)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def _redact_prompt(prompt: list[dict[str, Any]], secrets: list[str]) -> list[dict[str, Any]]:
    return [{**m, "content": _recorded(m.get("content"), secrets)} for m in prompt]


def _recorded(value: Any, secrets: list[str]) -> Any:
    """``value`` (plain JSON: a text, or lists and objects of texts) as it is recorded of a call: the secrets
    masked, and every text writable as UTF-8 — a lone surrogate (a provider's ``\\udc80`` JSON escape in a
    reply) written as its escape."""
    if isinstance(value, str):
        text = _redact(value, secrets)
        return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_recorded(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _recorded(v, secrets) for k, v in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _model_name(lm: Any) -> str | None:
    model = getattr(lm, "model", None)
    return model if isinstance(model, str) else None
