"""almanac.ics.requests: the ICS sync request wire format, without Airflow or Redis."""

from __future__ import annotations

import json
import logging

import pytest

from almanac.errors import PermanentError
from almanac.ics.requests import (
    DEAD_LETTER_STREAM,
    MAX_PAYLOAD_CHARS,
    PARSER,
    STREAM_KEY,
    InvalidRequestError,
    parse_request,
    push_sync_request,
    requested_calendar_ids,
)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"calendar_id": "42"}, 42),
    ({"calendar_id": " 42 "}, 42),
    ({"calendar_id": "42", "requested_by": "backend"}, 42),  # other fields are ignored
    ({"payload": '{"calendar_id": 42}'}, 42),
    ({"payload": '{"calendar_id": "42"}'}, 42),
    ({"payload": '{"calendar_id": 1.0}'}, 1),  # JSON Schema's "integer": the lock key is ...:1
    ({"payload": '{"calendar_id": 9223372036854775807}'}, 2**63 - 1),
])
def test_valid_request_parses_to_an_int_calendar_id(fields, expected):
    parsed = parse_request(fields)
    assert parsed == {"calendar_id": expected}
    assert type(parsed["calendar_id"]) is int


@pytest.mark.parametrize(("fields", "reason"), [
    ({"calendar_id": "abc"}, "calendar_id"),
    ({"calendar_id": "-3"}, "calendar_id"),
    ({"calendar_id": "0"}, "calendar_id"),
    ({"calendar_id": "4.2"}, "calendar_id"),
    ({"calendar_id": "1.0"}, "calendar_id"),  # a field is a decimal integer, nothing else
    ({"calendar_id": "١٢"}, "calendar_id"),  # Arabic-Indic digits are decimal, not ASCII
    ({"calendar_id": "9" * 5000}, "calendar_id"),
    ({"calendar_id": "9223372036854775808"}, "calendar_id"),  # 2**63: not a bigint
    ({"payload": '{"calendar_id": 1.5}'}, "calendar_id"),
    ({"payload": '{"calendar_id": true}'}, "calendar_id"),
    ({"payload": '{"calendar_id": null}'}, "calendar_id"),
    ({"payload": '{"calendar_id": [1]}'}, "calendar_id"),
    ({"payload": '{"calendar_id": 1e400}'}, "calendar_id"),  # inf
    ({"payload": '{"calendar_id": NaN}'}, "calendar_id"),
    ({"payload": "{not json"}, "not JSON"),
    ({"payload": '{"calendar": 42}'}, "no calendar_id"),
    ({"payload": "[42]"}, "not a JSON object"),
    ({"payload": "[" * 100_000}, "too long"),
    ({"payload": '{"calendar_id": ' + "9" * 5000 + "}"}, "too long"),
    ({"other": "x"}, "no calendar_id or payload"),
    ({}, "no calendar_id or payload"),
])
def test_invalid_request_raises_with_a_reason(fields, reason):
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(fields)
    assert reason in caught.value.reason
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PermanentError)
    assert len(str(caught.value)) < 200  # fit for a log line and a dead-letter entry


def test_deeply_nested_payload_within_the_size_limit_is_refused_not_raised():
    # 1,020 levels in 1,020 characters: past Python 3.11's recursion limit (RecursionError
    # in the C scanner); later Pythons may get to the end and find it unclosed.
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"payload": "[" * 1020})
    assert caught.value.reason in ("payload is nested too deeply",) or "not JSON" in caught.value.reason


def test_huge_integer_in_a_payload_within_the_size_limit_is_refused_not_raised():
    """Python refuses int('9' * 4301) with ValueError; under the limit the id is out of range."""
    digits = MAX_PAYLOAD_CHARS - len('{"calendar_id": }')
    with pytest.raises(InvalidRequestError, match="calendar_id"):
        parse_request({"payload": json.dumps({"calendar_id": int("9" * digits)})})


def test_names_fit_together():
    assert STREAM_KEY == "almanac:ics_sync:requests"
    assert DEAD_LETTER_STREAM == "almanac:ics_sync:requests:dead"
    assert PARSER == "almanac.ics.requests.parse_request"


class _Client:
    """The one call push_sync_request makes on a redis-py client."""

    def __init__(self):
        self.added = []

    def xadd(self, stream, fields):
        self.added.append((stream, fields))
        return b"1-0"


def test_push_sync_request_writes_the_decimal_id_and_returns_the_entry_id():
    client = _Client()
    assert push_sync_request(client, 42) == "1-0"
    assert client.added == [(STREAM_KEY, {"calendar_id": "42"})]


@pytest.mark.parametrize("bad", ["42", 0, -1, True, 4.2, 1.0, 2**63, None])
def test_push_sync_request_refuses_anything_but_a_positive_int(bad):
    client = _Client()
    with pytest.raises(InvalidRequestError):
        push_sync_request(client, bad)
    assert client.added == []


def _event(calendar_id, request_id="1-0"):
    return {"from_trigger": True, "payload": {"calendar_id": calendar_id, "request_id": request_id}}


def test_requested_calendar_ids_are_sorted_unique_ints():
    extras = [_event(7), _event(3), _event(7), _event(1.0), _event("12")]
    assert requested_calendar_ids(extras) == [1, 3, 7, 12]
    assert all(type(i) is int for i in requested_calendar_ids(extras))


def test_requested_calendar_ids_skip_and_log_malformed_events(caplog):
    extras = [
        _event(5),
        _event(True, "2-0"),
        _event("1.5", "3-0"),
        _event(int("9" * 4000), "4-0"),
        _event(None, "5-0"),
        {"from_trigger": True, "payload": {"request_id": "6-0"}},
        {"from_trigger": True, "payload": "calendar 9"},
        {},
        None,
        "garbage",
    ]
    with caplog.at_level(logging.WARNING, logger="almanac.ics.requests"):
        assert requested_calendar_ids(extras) == [5]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(extras) - 1
    assert all(len(m) < 300 for m in messages)
    assert any("2-0" in m for m in messages)


def test_requested_calendar_ids_of_nothing_is_empty():
    assert requested_calendar_ids([]) == []
