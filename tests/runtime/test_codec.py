"""JSON bytes of the runtimes: every JSON value round-trips, wide integers included; what is not JSON is refused."""

from __future__ import annotations

import pytest

from flowdsl.runtime.codec import dumps, loads
from flowdsl.runtime.record import encode_line


def test_json_values_round_trip_including_integers_beyond_64_bits() -> None:
    value = {"b": [1, 2.5, None, True, "é", "12345678901234567890"], "a": {"wide": 2**70 + 1, "neg": -(2**65) - 3},
             "edge": [2**63 - 1, -(2**63), 2**64 - 1, 2**64, 1e300, -0.0]}
    for sort_keys in (False, True):
        back = loads(dumps(value, sort_keys=sort_keys))
        assert back == value
        assert [type(v) for v in back["edge"]] == [int, int, int, int, float, float]
        assert type(back["a"]["wide"]) is int
    assert loads(dumps(value).decode()) == value
    assert dumps({"b": 1, "a": 2**70}, sort_keys=True) == b' {"a":1180591620717411303424,"b":1}'


def test_what_is_not_json_is_refused_unless_a_default_says_how() -> None:
    with pytest.raises(TypeError):
        dumps({"when": object()})
    assert loads(dumps({"n": frozenset()}, default=list)) == {"n": []}


def test_record_lines_are_compact_keep_key_order_and_end_with_a_newline() -> None:
    assert encode_line({"z": 1, "a": {"y": 2, "b": 3}}) == b'{"z":1,"a":{"y":2,"b":3}}\n'
