"""The ring records of schemas/ring.py: golden vectors round-trip byte-identically; SUBMIT limits (request_limits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from model_worker import records
from schemas import request_limits, ring
from schemas.golden.make_golden import RING_GOLDEN

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "schemas" / "golden"


def ring_vectors() -> dict[str, tuple[str, str]]:
    """golden/README's ring records: name -> (ring, kind)."""
    lines = (GOLDEN_DIR / "README").read_text().splitlines()[1:]
    named = (line.split("\t") for line in lines)
    return {name.removesuffix(".msgpack"): tuple(kind.split()[1:]) for name, kind in named if kind.startswith("ring ")}


def reencode(decoded: Any) -> list[Any]:
    if isinstance(decoded, list):
        return ring.tokens_record(decoded)
    encoders = {
        ring.Submit: ring.submit_record,
        ring.Cancel: lambda cancel: ring.cancel_record(cancel.id),
        ring.Finish: ring.finish_record,
        ring.Stats: ring.stats_record,
        ring.Ready: ring.ready_record,
    }
    return encoders[type(decoded)](decoded)


def test_every_record_kind_has_a_golden_vector() -> None:
    assert set(ring_vectors().values()) == {
        ("request", "SUBMIT"),
        ("request", "CANCEL"),
        ("response", "TOKENS"),
        ("response", "FINISH"),
        ("response", "STATS"),
        ("response", "READY"),
    }
    assert set(ring_vectors()) == set(RING_GOLDEN)


@pytest.mark.parametrize("name", sorted(RING_GOLDEN))
def test_golden_ring_record_round_trips_byte_identically(name: str) -> None:
    payload = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    which, kind = ring_vectors()[name]
    record = msgpack.unpackb(payload)
    decoded = (ring.decode_request if which == "request" else ring.decode_response)(record)
    assert record[0] == getattr(ring, kind)
    assert msgpack.packb(reencode(decoded)) == payload
    # the committed file is what the current code would write: the contract has not drifted
    assert msgpack.packb(RING_GOLDEN[name][2]) == payload


def test_golden_multi_group_tokens_record() -> None:
    groups = ring.decode_response(msgpack.unpackb((GOLDEN_DIR / "ring_tokens_multi.msgpack").read_bytes()))
    assert isinstance(groups, list) and [g.id for g in groups] == [42, 7, 1 << 40, 42]
    assert [g.produced_ns for g in groups] == [0, 1764500000200000000, 0, 0]


@pytest.mark.parametrize(
    "record",
    [
        [1],
        [1, 7, "a", 1],  # the old per-request shape: groups are four fields
        [1, 7, "a", 1, 0, 8, "b", 1],
        [1, 7, 3, 1, 0],
        [1, -1, "a", 1, 0],
        [2, 7, "done", 1, 1, 0, ""],
        [3, 1, 2, 1],  # kv_usage is a float64
        [4, {"engine": "sim"}],
        [9, 1],
    ],
)
def test_malformed_response_records_are_refused(record: list[Any]) -> None:
    with pytest.raises(ring.RecordError):
        ring.decode_response(record)


def submit(**params: Any) -> list[Any]:
    return [1, 5, "hi", None, {"max_tokens": 4, **params}]


def test_missing_sampling_params_take_the_defaults_of_request_limits_json() -> None:
    params = records.decode_submit([1, 5, "hi", None, {}]).params
    assert (params.temperature, params.top_p) == (
        request_limits.RANGES["temperature"].default,
        request_limits.RANGES["top_p"].default,
    )
    assert (params.presence_penalty, params.frequency_penalty, params.max_tokens) == (0.0, 0.0, 0)


def _inside_and_outside() -> list[tuple[str, float, float]]:
    cases = []
    for name, bounds in request_limits.RANGES.items():
        low_inside = bounds.low + 1e-6 if bounds.low_exclusive else bounds.low
        low_outside = bounds.low if bounds.low_exclusive else bounds.low - 1e-6
        cases += [(name, low_inside, low_outside), (name, bounds.high, bounds.high + 1e-6)]
    return cases


@pytest.mark.parametrize(("name", "inside", "outside"), _inside_and_outside())
def test_each_sampling_range_takes_its_bounds_and_refuses_beyond(name: str, inside: float, outside: float) -> None:
    assert getattr(records.decode_submit(submit(**{name: inside})).params, name) == inside
    with pytest.raises(records.RecordError, match=name) as refused:
        records.decode_submit(submit(**{name: outside}))
    assert refused.value.request_id == 5


def test_top_p_zero_is_refused() -> None:
    assert request_limits.RANGES["top_p"].low_exclusive
    with pytest.raises(records.RecordError, match="top_p"):
        records.decode_submit(submit(top_p=0.0))


def test_message_count_limit() -> None:
    at_limit = [["user", "x"]] * request_limits.MAX_MESSAGES
    assert len(records.decode_submit([1, 5, "", at_limit, {}]).messages or ()) == request_limits.MAX_MESSAGES
    with pytest.raises(records.RecordError, match="messages"):
        records.decode_submit([1, 5, "", [*at_limit, ["user", "x"]], {}])


def test_stop_string_count_and_length_limits() -> None:
    longest = "s" * request_limits.MAX_STOP_CHARS
    most = [longest] * request_limits.MAX_STOP_STRINGS
    assert records.decode_submit(submit(stop=most)).params.stop == tuple(most)
    for refused in ([*most, "s"], [longest + "s"], [""]):
        with pytest.raises(records.RecordError, match="stop"):
            records.decode_submit(submit(stop=refused))
