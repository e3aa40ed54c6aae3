"""What arrives on the request ring, checked and turned into engine calls.

The records themselves are declared in schemas/ring.py (their kinds are re-exported here for the worker); this module
adds the request limits of schemas/request_limits.json to a SUBMIT's shape check, as the proxy applies them at the
edge, and builds the engine's Request.
"""

from __future__ import annotations

from typing import Any

from model_worker.engine import Request
from schemas import request_limits
from schemas.ring import (
    CANCEL,
    FINISH,
    READY,
    STATS,
    SUBMIT,
    TOKENS,
    Cancel,
    RecordError,
    Submit,
    decode_request,
    request_id_of,
)

__all__ = [
    "CANCEL",
    "FINISH",
    "READY",
    "STATS",
    "SUBMIT",
    "TOKENS",
    "RecordError",
    "decode_cancel",
    "decode_submit",
    "request_id_of",
]


def _check_limits(submit: Submit) -> None:
    rid, params = submit.id, submit.params
    if submit.messages is not None and len(submit.messages) > request_limits.MAX_MESSAGES:
        raise RecordError(f"messages must be at most {request_limits.MAX_MESSAGES}", rid)
    if len(params.stop) > request_limits.MAX_STOP_STRINGS or not all(
        0 < len(s) <= request_limits.MAX_STOP_CHARS for s in params.stop
    ):
        raise RecordError(
            f"stop must be at most {request_limits.MAX_STOP_STRINGS} non-empty strings of at most "
            f"{request_limits.MAX_STOP_CHARS} chars",
            rid,
        )
    for name, bounds in request_limits.RANGES.items():
        value = getattr(params, name)
        if not bounds.contains(value):
            raise RecordError(f"param {name} must be {bounds.describe()}, got {value:g}", rid)


def decode_submit(record: list[Any]) -> Request:
    """A SUBMIT record `[1, id, prompt, messages, params]` as a Request, within the request limits."""
    submit = decode_request(record)
    if not isinstance(submit, Submit):
        raise RecordError(f"not a SUBMIT record: kind {record[0]!r}", request_id_of(record))
    _check_limits(submit)
    return Request(submit.id, submit.prompt, submit.messages, submit.params)


def decode_cancel(record: list[Any]) -> int:
    """The request id of a CANCEL record `[2, id]`; RecordError for any other record."""
    cancel = decode_request(record)
    if not isinstance(cancel, Cancel):
        raise RecordError(f"not a CANCEL record: kind {record[0]!r}", request_id_of(record))
    return cancel.id
