"""Ring records (schemas/README.md section 3): kinds, and validation of what arrives on the request ring.

Outgoing records are built inline by the worker as plain lists (`[TOKENS, id, text, n]`), the cheapest
thing to msgpack-pack on the per-token path.
"""

from __future__ import annotations

from typing import Any

from model_worker.engine import Request, SamplingParams

# request ring (replica -> worker)
SUBMIT = 1
CANCEL = 2
# response ring (worker -> replica)
TOKENS = 1
FINISH = 2
STATS = 3
READY = 4

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_MESSAGES = 1024


class RecordError(ValueError):
    """A request-ring record that is not valid; `request_id` is set when the record named one."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _num(params: dict[str, Any], key: str, default: float, request_id: int) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"param {key} must be a number, got {type(value).__name__}", request_id)
    return float(value)


def _params(raw: Any, request_id: int) -> SamplingParams:
    if not isinstance(raw, dict):
        raise RecordError("params must be a map", request_id)
    max_tokens = raw.get("max_tokens", 0)
    if max_tokens is None:
        max_tokens = 0
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise RecordError(f"max_tokens must be an int >= 0, got {max_tokens!r}", request_id)
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecordError(f"seed must be an int or nil, got {seed!r}", request_id)
    stop = raw.get("stop") or []
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop)
    ):
        raise RecordError(
            f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LEN} chars",
            request_id,
        )
    ignore_eos = raw.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RecordError("ignore_eos must be a bool", request_id)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_num(raw, "temperature", 1.0, request_id),
        top_p=_num(raw, "top_p", 1.0, request_id),
        seed=seed,
        stop=tuple(stop),
        presence_penalty=_num(raw, "presence_penalty", 0.0, request_id),
        frequency_penalty=_num(raw, "frequency_penalty", 0.0, request_id),
        ignore_eos=ignore_eos,
    )


def _messages(raw: Any, request_id: int) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_MESSAGES:
        raise RecordError(f"messages must be a list of at most {MAX_MESSAGES} [role, content] pairs", request_id)
    out = []
    for m in raw:
        if not (isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str)):
            raise RecordError("each message must be [role, content] strings", request_id)
        out.append((m[0], m[1]))
    return tuple(out)


def request_id_of(record: Any) -> int | None:
    """The id a record names, if it has a usable one (to answer a bad SUBMIT with an error FINISH)."""
    if isinstance(record, list) and len(record) >= 2 and type(record[1]) is int and record[1] >= 0:
        return record[1]
    return None


def decode_submit(record: list[Any]) -> Request:
    """A SUBMIT record `[1, id, prompt, messages, params]` as a Request."""
    request_id = request_id_of(record)
    if request_id is None:
        raise RecordError("SUBMIT needs an unsigned int id")
    if len(record) != 5:
        raise RecordError(f"SUBMIT has 5 fields, got {len(record)}", request_id)
    _, _, prompt, messages, params = record
    if not isinstance(prompt, str):
        raise RecordError("prompt must be a string", request_id)
    return Request(request_id, prompt, _messages(messages, request_id), _params(params, request_id))


def decode_cancel(record: list[Any]) -> int:
    """The request id of a CANCEL record `[2, id]`."""
    request_id = request_id_of(record)
    if request_id is None or len(record) != 2:
        raise RecordError("CANCEL must be [2, id]")
    return request_id
