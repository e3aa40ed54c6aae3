"""The shared-memory ring records (schemas/README.md section 3), declared once.

Every record is a MessagePack array whose first element is its kind. This module states each kind's fields in wire
order, builds each record (the `*_record` functions: plain lists, the cheapest thing to msgpack-pack) and reads each
one back, checking its shape and field types (`decode_request`, `decode_response`; a bad record is a RecordError
naming the request when it has a usable id). The C++ replica mirrors it in proxy_cpp/replica/ring_records.hpp; the
golden vectors (golden/ring_*.msgpack, written by golden/make_golden.py) are decoded and re-encoded byte-identically
by both. Integers are packed in their smallest MessagePack form and every float as a float64, by both encoders.

Request ring (replica -> worker):
- SUBMIT `[1, id, prompt, messages | nil, params]`: `messages` a list of `[role, content]`; `params` a map with the
  keys of SubmitParams in that order (a missing key takes its default from request_limits.json).
- CANCEL `[2, id]`.

Response ring (worker -> replica):
- TOKENS `[1, id, text, n_tokens, produced_ns, id, text, n_tokens, produced_ns, ...]`: one or more groups, the tokens
  of one worker event-loop iteration for every request that had some; `produced_ns` is the wall-clock ns at which the
  engine produced the request's first token, in its first group, and 0 in its later ones.
- FINISH `[2, id, finish_reason, prompt_tokens, completion_tokens, error_code, error_message]`.
- STATS `[3, running, waiting, kv_usage]`.
- READY `[4, {"engine": str, "model": str, "max_model_len": int}]`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from schemas import request_limits

# request ring kinds
SUBMIT = 1
CANCEL = 2
# response ring kinds
TOKENS = 1
FINISH = 2
STATS = 3
READY = 4

FINISH_REASONS = ("stop", "length", "abort", "error")
TOKENS_GROUP_FIELDS = 4  # id, text, n_tokens, produced_ns


class RecordError(ValueError):
    """A record that is not valid; `request_id` is set when the record named a usable one."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class SubmitParams(NamedTuple):
    """SUBMIT's params map: its keys in wire order. Ranges are request_limits.json's, checked by the worker."""

    max_tokens: int = 0  # 0: the engine's default
    temperature: float = request_limits.RANGES["temperature"].default
    top_p: float = request_limits.RANGES["top_p"].default
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = request_limits.RANGES["presence_penalty"].default
    frequency_penalty: float = request_limits.RANGES["frequency_penalty"].default
    ignore_eos: bool = False


class Submit(NamedTuple):
    id: int
    prompt: str
    messages: tuple[tuple[str, str], ...] | None
    params: SubmitParams


class Cancel(NamedTuple):
    id: int


class TokensGroup(NamedTuple):
    id: int
    text: str
    n_tokens: int
    produced_ns: int


class Finish(NamedTuple):
    id: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error_code: int = 0
    error_message: str = ""


class Stats(NamedTuple):
    running: int
    waiting: int
    kv_usage: float


class Ready(NamedTuple):
    engine: str
    model: str
    max_model_len: int


# --- building records ----------------------------------------------------------------------------------------------
def submit_record(submit: Submit) -> list[Any]:
    messages = None if submit.messages is None else [list(m) for m in submit.messages]
    params = submit.params._asdict()
    params["stop"] = list(submit.params.stop)
    for name in request_limits.RANGES:
        params[name] = float(params[name])
    return [SUBMIT, submit.id, submit.prompt, messages, params]


def cancel_record(request_id: int) -> list[Any]:
    return [CANCEL, request_id]


def tokens_record(groups: Iterable[TokensGroup]) -> list[Any]:
    """One TOKENS record of these groups. (The worker appends the same four fields to its batch inline.)"""
    record: list[Any] = [TOKENS]
    for group in groups:
        record += group
    return record


def finish_record(finish: Finish) -> list[Any]:
    return [FINISH, *finish]


def stats_record(stats: Stats) -> list[Any]:
    return [STATS, stats.running, stats.waiting, float(stats.kv_usage)]


def ready_record(ready: Ready) -> list[Any]:
    return [READY, ready._asdict()]


# --- reading records -----------------------------------------------------------------------------------------------
def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def request_id_of(record: Any) -> int | None:
    """The id a record names, if it has a usable one (to answer a bad SUBMIT with an error FINISH)."""
    if isinstance(record, list) and len(record) >= 2 and _is_uint(record[1]):
        return record[1]
    return None


def _number(params: dict[str, Any], key: str, default: float, request_id: int) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"param {key} must be a number, got {type(value).__name__}", request_id)
    return float(value)


def _params(raw: Any, request_id: int) -> SubmitParams:
    if not isinstance(raw, dict):
        raise RecordError("params must be a map", request_id)
    defaults = SubmitParams()
    max_tokens = raw.get("max_tokens")
    if max_tokens is None:
        max_tokens = 0
    if not _is_uint(max_tokens):
        raise RecordError(f"max_tokens must be an int >= 0, got {max_tokens!r}", request_id)
    seed = raw.get("seed")
    if seed is not None and not _is_uint(seed):
        raise RecordError(f"seed must be an int >= 0 or nil, got {seed!r}", request_id)
    stop = raw.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RecordError("stop must be a list of strings", request_id)
    ignore_eos = raw.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RecordError("ignore_eos must be a bool", request_id)
    return SubmitParams(
        max_tokens=max_tokens,
        temperature=_number(raw, "temperature", defaults.temperature, request_id),
        top_p=_number(raw, "top_p", defaults.top_p, request_id),
        seed=seed,
        stop=tuple(stop),
        presence_penalty=_number(raw, "presence_penalty", defaults.presence_penalty, request_id),
        frequency_penalty=_number(raw, "frequency_penalty", defaults.frequency_penalty, request_id),
        ignore_eos=ignore_eos,
    )


def _messages(raw: Any, request_id: int) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RecordError("messages must be a list of [role, content] pairs or nil", request_id)
    out = []
    for m in raw:
        if not (isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], str)):
            raise RecordError("each message must be [role, content] strings", request_id)
        out.append((m[0], m[1]))
    return tuple(out)


def decode_request(record: Any) -> Submit | Cancel:
    """A request-ring record, its shape and field types checked (not its limits: model_worker/records.py)."""
    kind = record[0] if isinstance(record, list) and record else None
    request_id = request_id_of(record)
    if kind == SUBMIT:
        if request_id is None:
            raise RecordError("SUBMIT needs an unsigned int id")
        if len(record) != 5:
            raise RecordError(f"SUBMIT has 5 fields, got {len(record)}", request_id)
        _, _, prompt, messages, params = record
        if not isinstance(prompt, str):
            raise RecordError("prompt must be a string", request_id)
        return Submit(request_id, prompt, _messages(messages, request_id), _params(params, request_id))
    if kind == CANCEL:
        if request_id is None or len(record) != 2:
            raise RecordError("CANCEL must be [2, id]")
        return Cancel(request_id)
    raise RecordError(f"unknown record kind {kind!r}", request_id)


def decode_response(record: Any) -> list[TokensGroup] | Finish | Stats | Ready:
    """A response-ring record, its shape and field types checked; TOKENS as its list of groups."""
    kind = record[0] if isinstance(record, list) and record else None
    fields = record[1:] if kind is not None else []
    if kind == TOKENS:
        if not fields or len(fields) % TOKENS_GROUP_FIELDS:
            raise RecordError("TOKENS must be [1, id, text, n_tokens, produced_ns, ...] (groups of four)")
        groups = [TokensGroup(*fields[i : i + TOKENS_GROUP_FIELDS]) for i in range(0, len(fields), 4)]
        if not all(
            _is_uint(g.id) and isinstance(g.text, str) and _is_uint(g.n_tokens) and _is_uint(g.produced_ns)
            for g in groups
        ):
            raise RecordError("a TOKENS group must be id, text, n_tokens, produced_ns")
        return groups
    if kind == FINISH:
        finish = Finish(*fields) if len(fields) == 6 else None
        if finish is None or finish.finish_reason not in FINISH_REASONS or not isinstance(finish.error_message, str):
            raise RecordError("FINISH must be [2, id, reason, prompt_tokens, completion_tokens, error_code, message]")
        return finish
    if kind == STATS:
        if len(fields) != 3 or not isinstance(fields[2], float):
            raise RecordError("STATS must be [3, running, waiting, kv_usage]")
        return Stats(*fields)
    if kind == READY:
        if len(fields) != 1 or not isinstance(fields[0], dict) or not set(Ready._fields) <= set(fields[0]):
            raise RecordError("READY must be [4, {engine, model, max_model_len}]")
        return Ready(*(fields[0][name] for name in Ready._fields))
    raise RecordError(f"unknown record kind {kind!r}")
