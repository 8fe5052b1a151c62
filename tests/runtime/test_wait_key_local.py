"""Keyed waits on the local runtime: a for_each over an order's parcels whose body waits for signal ``delivered``
keyed by each parcel's tracking number — signals sent in another order than the items, one before its wait started,
one for a key no wait takes, a key two items share, what is refused before anything reaches the run, what the run
says, parking with keyed waits and going on with them, and the record replayed.

A test waits for the run to wait through its events (``on_event``), never by sleeping.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowdsl import compile_text
from flowdsl.kernel import replay
from flowdsl.runtime.local import RECORDED_INPUTS, LocalRun, SignalOutcome, run_flow
from flowdsl.runtime.local_waits import KEY_LIMIT, check_signals, keyed_signals
from flowdsl.runtime.parking import go_on_commands, parked_text, signal_option
from flowdsl.runtime.rebuild import result_from_record
from flowdsl.runtime.record import read_record
from flowdsl.runtime.resume import resume_flow
from tests.runtime.conformance import HEADER

#: a (undone by undo.a), then per parcel of the order the wait for signal 'delivered' keyed by its tracking number
#: (its payload stored as `delivery`), then b; and the unkeyed wait for signal 'paid' when asked
PARCELS = ("steps:\n  - conf.a: {{compensate: undo.a}}\n{paid}  - for_each: parcels\n"
           "    items: \"${{ order.parcels }}\"\n    as: parcel\n    steps:\n      - wait: delivered\n"
           "        key: \"${{ $parcel.tracking }}\"\n        output: delivery\n{extra}  - conf.b\n")
#: the order: three parcels, one tracked by an integer
ORDER = {"order": {"parcels": [{"tracking": "1Z9"}, {"tracking": "2AB"}, {"tracking": 42}]}}


def plan(extra: str = "", paid: bool = False) -> dict[str, Any]:
    """The flow ``ship``: :data:`PARCELS`, with ``extra`` options of its wait (indented as they are), and the wait
    for 'paid' first when ``paid``."""
    return compile_text(HEADER.format(name="ship") + PARCELS.format(
        extra=extra, paid="  - wait: paid\n" if paid else ""))


def waiting(count: int) -> tuple[asyncio.Event, Any]:
    """An event set once ``count`` keyed waits have started, and the ``on_event`` hook that sets it."""
    started = asyncio.Event()
    seen: list[str] = []

    def hook(event: dict[str, Any]) -> None:
        if event["type"] == "step_started" and event.get("key") is not None:
            seen.append(event["step"])
            if len(seen) == count:
                started.set()

    return started, hook


def answers(events: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None]]:
    """The kernel's answers to signals: (type, key, the wait that took it or will)."""
    return [(e["type"], e.get("key"), e.get("step") or e.get("wait")) for e in events
            if e["type"].startswith("signal_")]


# --- signals by key ----------------------------------------------------------------------------------------------


def test_signals_in_another_order_than_the_items_reach_the_wait_of_their_key() -> None:
    async def main() -> tuple[Any, list[SignalOutcome]]:
        started, hook = waiting(2)  # (the third one, 42, takes the signal kept for it as it starts)
        run = LocalRun(plan(), ORDER, record=False, on_event=hook, signals=[("delivered", {"n": 42}, 42)])
        task = asyncio.ensure_future(run.run())
        await started.wait()
        assert {k: e["key"] for k, e in run.state["waits"].items()} == {"parcels[0]/delivered": "1Z9",
                                                                       "parcels[1]/delivered": "2AB"}
        second, first = run.signal("delivered", {"n": 2}, key="2AB"), run.signal("delivered", {"n": 1}, key="1Z9")
        return await task, [await second, await first]

    result, (second, first) = asyncio.run(main())
    assert (second.outcome, second.key, second.wait) == ("received", "2AB", "parcels[1]/delivered")
    assert (first.outcome, first.key, first.wait) == ("received", "1Z9", "parcels[0]/delivered")
    assert second.to_json() == {"run_id": result.run_id, "signal": "delivered", "key": "2AB", "outcome": "received",
                                "wait": "parcels[1]/delivered", "reason": None, "at": second.at}
    assert result.status == "completed"
    assert result.context["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {"n": 2}}, {"delivery": {"n": 42}}]
    assert answers(result.events) == [("signal_buffered", "42", "delivered"),
                                      ("signal_received", "42", "parcels[2]/delivered"),
                                      ("signal_received", "2AB", "parcels[1]/delivered"),
                                      ("signal_received", "1Z9", "parcels[0]/delivered")]
    taken = next(e for e in result.events if e["type"] == "signal_received" and e["key"] == "42")
    assert taken["buffered"] is True
    steps = result.to_json()["steps"]
    assert [steps[f"parcels[{i}]/delivered"]["key"] for i in range(3)] == ["1Z9", "2AB", "42"]
    assert steps["parcels[0]/delivered"]["signal"] == "delivered"


def test_outcomes_are_matched_by_key_and_a_signal_for_a_key_no_wait_takes_is_kept() -> None:
    async def main() -> tuple[Any, list[SignalOutcome]]:
        run = LocalRun(plan(), ORDER, record=False)
        sent = [run.signal("delivered", {"n": 9}, key="9XX"), run.signal("delivered", {"n": 2}, key="2AB"),
                run.signal("delivered", None, key="1Z9"), run.signal("delivered", {"n": 42}, key="42"),
                run.signal("delivered", {"again": True}, key="9XX")]
        result = await run.run()
        return result, [await s for s in sent]

    result, (unknown, second, first, third, again) = asyncio.run(main())
    assert [(o.outcome, o.key) for o in (unknown, second, first, third)] == [
        ("buffered", "9XX"), ("buffered", "2AB"), ("buffered", "1Z9"), ("buffered", "42")]
    assert unknown.wait == "delivered"  # (the wait that will take it: its plan key)
    assert (again.outcome, again.key) == ("rejected", "9XX")
    assert again.reason == ("signal 'delivered' key '9XX' was already received: it is kept until the wait with that "
                            "key starts")
    # the run ends once every wait it reached had its signal: the one no wait took stays kept
    assert result.status == "completed"
    assert result.context["parcels"] == [{"delivery": {}}, {"delivery": {"n": 2}}, {"delivery": {"n": 42}}]
    assert result.state["kept"]["delivered"] == {"9XX": {"payload": {"n": 9}, "at": unknown.at}}


def test_a_key_two_items_share_fails_the_second_wait_and_the_run_is_compensated() -> None:
    order = {"order": {"parcels": [{"tracking": "1Z9"}, {"tracking": "1Z9"}]}}
    result = asyncio.run(run_flow(plan(), order, record=False, signals=[("delivered", {}, "1Z9")]))
    assert result.status == "compensated" and result.compensated == ["a"]
    row = result.steps["parcels[1]/delivered"]
    assert row["status"] == "failed" and row["error"] == {
        "type": "WaitKeyTaken",
        "message": "key '1Z9' of signal 'delivered' is taken by wait 'parcels[0]/delivered'"}
    assert result.steps["parcels[0]/delivered"]["status"] == "succeeded"


def test_a_wait_in_a_for_each_is_said_with_its_key_unless_its_signal_is_on_its_way() -> None:
    async def main() -> tuple[Any, list[str]]:
        notices: list[str] = []
        started, hook = waiting(2)
        run = LocalRun(plan(), ORDER, record=False, on_event=hook, on_notice=notices.append,
                       signals=[("delivered", None, "2AB")])
        task = asyncio.ensure_future(run.run())
        await started.wait()
        run.signal("delivered", key="1Z9")
        run.signal("delivered", key=42)
        return await task, notices

    result, notices = asyncio.run(main())
    assert result.status == "completed"
    said = [n for n in notices if n.startswith("the run waits for signal 'delivered'")]
    assert len(said) == 2, notices  # (not for 2AB: sent with the run; 42 started with 1Z9, before either was sent)
    assert said[0] == ("the run waits for signal 'delivered' key '1Z9' (wait 'parcels[0]/delivered', with no "
                       "deadline: it waits as long as it takes); a local run takes a signal from Python "
                       "(LocalRun.signal('delivered', payload, key='1Z9')) or, when it starts, from `flowdsl run "
                       "--signal delivered:1Z9=JSON`")
    assert "key '42'" in said[1] and "--signal delivered:42=JSON" in said[1]


def test_the_instances_of_a_keyed_wait_are_said_ten_at_most() -> None:
    async def main() -> list[str]:
        notices: list[str] = []
        started, hook = waiting(12)
        order = {"order": {"parcels": [{"tracking": f"T{i}"} for i in range(12)]}}
        run = LocalRun(plan(), order, record=False, on_event=hook, on_notice=notices.append)
        task = asyncio.ensure_future(run.run())
        await started.wait()
        run.cancel()
        await task
        return notices

    notices = asyncio.run(main())
    assert len([n for n in notices if n.startswith("the run waits for signal 'delivered' key 'T")]) == 10
    assert [n for n in notices if n.startswith("more instances")] == [
        "more instances of wait 'delivered' wait for their signal, each with its key: they are not said one by one"]


# --- checked before anything reaches the run ---------------------------------------------------------------------


def test_a_keyed_signal_needs_a_key_and_an_unkeyed_one_takes_none() -> None:
    keyed = plan(paid=True)
    assert keyed_signals(keyed) == {"delivered"}
    run = LocalRun(keyed, ORDER, record=False)
    with pytest.raises(ValueError, match=r"^wait 'delivered' tells its instances apart by key: signal 'delivered' "
                                         r"needs a key \(the value of its 'key:' for the instance it is for\)$"):
        run.signal("delivered", {})
    with pytest.raises(ValueError, match=r"^wait 'paid' takes signal 'paid' without a key \(it has no 'key:'\): "
                                         r"send it with none$"):
        run.signal("paid", key="1Z9")
    with pytest.raises(ValueError, match="signal 'delivered' needs a key"):
        LocalRun(keyed, ORDER, record=False, signals={"delivered": {}})  # (a mapping holds no key)
    with pytest.raises(ValueError, match="takes signal 'paid' without a key"):
        LocalRun(keyed, ORDER, record=False, signals=[("paid", None, "K")])
    assert not run._held_signals  # nothing was sent


@pytest.mark.parametrize(("key", "error", "message"), [
    (True, TypeError, r"the key of signal 'delivered' must be a string \(or a whole number, taken as its decimal "
                      r"text\); got bool"),
    (4.2, TypeError, "must be a string .*; got float"),
    ("\ud800x", ValueError, "^the key of signal 'delivered' holds a lone surrogate"),
    (["1Z9"], TypeError, "; got list"),
    ("", ValueError, "^the key of signal 'delivered' is empty: a key is a non-empty string$"),
    ("x" * (KEY_LIMIT + 1), ValueError, f"^the key of signal 'delivered' has {KEY_LIMIT + 1} characters: a key has "
                                        f"at most {KEY_LIMIT}$"),
    (10 ** 300, ValueError, f"an integer of more than {KEY_LIMIT} digits"),
])
def test_a_key_is_a_non_empty_string_or_an_integer(key: Any, error: type[Exception], message: str) -> None:
    run = LocalRun(plan(), ORDER, record=False)
    with pytest.raises(error, match=message):
        run.signal("delivered", key=key)
    with pytest.raises(error, match=message):
        check_signals(plan(), [("delivered", None, key)])


def test_keys_as_signals_takes_them_and_one_given_twice_is_refused() -> None:
    keyed = plan()
    assert check_signals(keyed, [("delivered", {"n": 1}, "1Z9"), ("delivered", None, 42), ["delivered", {}, "x" * 200]]
                         ) == [("delivered", {"n": 1}, "1Z9"), ("delivered", None, "42"), ("delivered", {}, "x" * 200)]
    with pytest.raises(ValueError, match=r"^signal 'delivered' key '42' is given twice: a signal goes to one wait"):
        check_signals(keyed, [("delivered", None, "42"), ("delivered", {}, 42)])
    with pytest.raises(TypeError, match=r"a \(name, payload, key\) triple; got tuple of 4 items"):
        check_signals(keyed, [("delivered", None, "1Z9", "more")])


# --- parking, going on, the record -------------------------------------------------------------------------------


def test_a_run_parked_with_keyed_waits_goes_on_with_signals_by_key(tmp_path: Path) -> None:
    notices: list[str] = []
    result = asyncio.run(run_flow(plan(extra="        timeout: 1h\n"), ORDER, run_id="r1", runs_dir=tmp_path,
                                  park=True, on_notice=notices.append, signals=[("delivered", {"n": 2}, "2AB")]))
    assert result.status == "running" and result.exit_code == 5
    waits = result.parked["waits"]
    assert [(w["wait"], w["signal"], w["key"]) for w in waits] == [("parcels[0]/delivered", "delivered", "1Z9"),
                                                                   ("parcels[2]/delivered", "delivered", "42")]
    assert all(w["due_at"] == result.steps[w["wait"]]["started_at"] + 3_600_000 for w in waits)
    line = list(read_record(tmp_path / "r1.jsonl")[1])[-1]
    assert line["type"] == "runtime_parked" and line["waits"] == waits
    assert len(notices) == 1 and notices[0].startswith(
        "run r1 is parked: it waits for signal 'delivered' key '1Z9' (wait 'parcels[0]/delivered') (until ")
    resume = f"flowdsl resume r1 --runs-dir {tmp_path}"
    assert f"`{resume} --signal delivered:1Z9=JSON` or `{resume} --signal delivered:42=JSON`" in notices[0]
    header, read = read_record(tmp_path / "r1.jsonl")
    assert result_from_record(header, read, tmp_path / "r1.jsonl").parked == result.parked

    again = asyncio.run(resume_flow("r1", runs_dir=tmp_path, park=True, signals=[("delivered", {"n": 42}, 42)]))
    assert again.status == "running" and [(w["wait"], w["key"]) for w in again.parked["waits"]] == [
        ("parcels[0]/delivered", "1Z9")]
    ended = asyncio.run(resume_flow("r1", runs_dir=tmp_path, signals=[("delivered", {"n": 1}, "1Z9"),
                                                                      ("delivered", {"late": True}, "2AB")]))
    assert ended.status == "completed" and ended.parked is None
    assert ended.context["parcels"] == [{"delivery": {"n": 1}}, {"delivery": {"n": 2}}, {"delivery": {"n": 42}}]
    late = [e for e in ended.events if e["type"] == "signal_rejected"]
    assert [(e["key"], e["reason"]) for e in late] == [
        ("2AB", "wait 'parcels[1]/delivered' has already received signal 'delivered'")]

    # the record replays: the signals it holds carry their keys, and the kernel makes the same decisions of them
    header, read = read_record(tmp_path / "r1.jsonl")
    sent = [(e["name"], e.get("key")) for e in read if e["type"] == "signal"]
    assert sent == [("delivered", "2AB"), ("delivered", "42"), ("delivered", "1Z9"), ("delivered", "2AB")]
    shown = result_from_record(header, read, tmp_path / "r1.jsonl")
    assert shown.status == "completed" and shown.context == ended.context
    assert shown.to_json()["steps"] == ended.to_json()["steps"]
    state, _, emitted = replay(header["plan"], [e for e in read if e["type"] in RECORDED_INPUTS])  # type: ignore
    assert state["status"] == "completed" and state["waits"] == {}
    assert answers(emitted) == answers(ended.events) == [
        ("signal_buffered", "2AB", "delivered"), ("signal_received", "2AB", "parcels[1]/delivered"),
        ("signal_received", "42", "parcels[2]/delivered"), ("signal_received", "1Z9", "parcels[0]/delivered"),
        ("signal_rejected", "2AB", None)]


def test_the_parked_text_and_commands_say_each_key() -> None:
    parked = {"waits": [{"wait": "parcels[0]/delivered", "signal": "delivered", "key": "1Z9", "due_at": None},
                        {"wait": "parcels[1]/delivered", "signal": "delivered", "key": "a b", "due_at": None},
                        {"wait": "parcels[2]/delivered", "signal": "delivered", "key": "x=y", "due_at": None},
                        {"wait": "paid", "signal": "paid", "due_at": None}], "due_at": None}
    assert signal_option("delivered", "a b") == "--signal 'delivered:a b'=JSON"
    assert signal_option("delivered", "x=y") is None and signal_option("paid") == "--signal paid=JSON"
    assert go_on_commands(parked, "flowdsl resume r1") == [
        "flowdsl resume r1 --signal delivered:1Z9=JSON", "flowdsl resume r1 --signal 'delivered:a b'=JSON",
        "flowdsl resume r1 --signal paid=JSON"]
    text = parked_text(parked, "flowdsl resume r1")
    assert text.startswith("waits for signal 'delivered' key '1Z9' (wait 'parcels[0]/delivered') (no deadline), "
                           "and signal 'delivered' key 'a b' (wait 'parcels[1]/delivered') (no deadline), and ")
    assert ("resume_flow(..., signals=[(NAME, payload, KEY)]) from Python, for a key a command line cannot give (one "
            "holding '=') or show safely (one holding a control character)") in text
    many = {"waits": [{"wait": f"parcels[{i}]/delivered", "signal": "delivered", "key": f"T{i}", "due_at": None}
                      for i in range(25)], "due_at": None}
    text = parked_text(many, "flowdsl resume r1")
    assert "key 'T9'" in text and "key 'T10'" not in text
    assert "and 15 more waits (`--format json` lists them all)" in text
