"""The `sim` engine: no model, deterministic text, model-like timing, cheap at hundreds of streams.

A request that gets one of `batch_capacity` places at time `start` is due to produce token i (1-based) at
`start + prefill_ms + i * token_delay_ms`. Times are absolute from `start`, so late callbacks never make the
stream drift. Tokens are emitted by timers on an injected clock (the asyncio loop in the worker, a manual clock in
tests) straight into the sink: no task per request or per token. The timers are coalesced, as a model's engine
steps all its running requests at once: every token due within the same `coalesce_ms` window (1 ms by default,
the resolution of uvloop's clock and timers) is emitted by one timer callback at the window's end, so one loop
wake-up and one timer serve them all; a token is never early and at most a window late (0: a timer per distinct
due time). Within a window, tokens go out in the order they were scheduled, and the streams they ended finish after
all of them. Requests beyond the capacity wait in a FIFO queue and start when a place frees.

Text: token i is one word with a leading space, drawn with `random.Random` seeded from (engine seed, request
seed), or (engine seed, prompt) when the request has no seed, so the same request always reads the same.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from model_worker.engine import DuplicateRequestError, EngineInfo, EngineStats, FinishReason, OutputSink, Request

STEP_SAMPLE_MASK = 63  # one token in 64 reports its step (OutputSink.engine_step): a metric, kept off most tokens
# A due time this close to a window's end (in windows) belongs to that window: the float sum that computes it may
# land a hair past the millisecond it means (0.1 + 0.02 > 0.12), which must not cost a whole window.
WINDOW_ROUNDING = 1e-6

VOCAB: tuple[str, ...] = tuple(
    " " + w
    for w in (
        "the model learns patterns from data and uses them to make predictions about new inputs while "
        "training adjusts weights to reduce error on examples so that a network of layers can represent "
        "language images sound or any signal with attention tokens context memory gradient loss optimizer "
        "batch inference latency throughput stream replica cluster node scale fast small large simple"
    ).split()
)


def token_rng(engine_seed: int, request_seed: int | None, prompt: str) -> random.Random:
    """The word source of one request: its seed when it has one, else its prompt."""
    if request_seed is not None:
        return random.Random(f"s:{engine_seed}:{request_seed}")
    return random.Random(f"p:{engine_seed}:{prompt}")


def sim_words(engine_seed: int, request_seed: int | None, prompt: str, n: int) -> list[str]:
    """The first `n` tokens the sim engine writes for such a request (what end-to-end tests expect)."""
    rng = token_rng(engine_seed, request_seed, prompt)
    return [rng.choice(VOCAB) for _ in range(n)]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of an asyncio event loop the engine uses; tests pass a manual clock instead."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Cancellable: ...


@dataclass(frozen=True, slots=True)
class SimConfig:
    prefill_ms: float = 0.0
    token_delay_ms: float = 20.0
    batch_capacity: int = 256
    seed: int = 0
    max_model_len: int = 4096
    default_max_tokens: int = 64
    coalesce_ms: float = 1.0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> SimConfig:
        """Validate `--engine-args`; a wrong key or value raises ValueError naming it."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown sim engine args {unknown}; known: {sorted(known)}")
        cfg = cls(**args)
        for name, minimum, kinds in (
            ("prefill_ms", 0, (int, float)),
            ("token_delay_ms", 0, (int, float)),
            ("batch_capacity", 1, (int,)),
            ("seed", None, (int,)),
            ("max_model_len", 1, (int,)),
            ("default_max_tokens", 1, (int,)),
            ("coalesce_ms", 0, (int, float)),
        ):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"sim engine arg {name} must be {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
            if minimum is not None and value < minimum:
                raise ValueError(f"sim engine arg {name} must be >= {minimum}, got {value!r}")
        return cfg


@dataclass(slots=True)
class _Stream:
    """One running request; owned by the engine, touched only from its clock's callbacks."""

    request: Request
    prompt_tokens: int
    limit: int  # tokens to generate unless a stop string ends it first
    rng: random.Random
    start: float
    generated: int = 0
    held: str = ""  # text not yet sent: it could be the start of a stop string
    held_tokens: int = 0  # tokens whose text is (partly) in `held`
    slot: float | None = None  # the fire time of the slot that emits its next token, while it has one


@dataclass(slots=True)
class _Slot:
    """One timer and the streams whose next token it emits, in the order they were scheduled."""

    timer: Cancellable
    streams: dict[int, _Stream] = field(default_factory=dict)


class SimEngine:
    def __init__(self, args: dict[str, Any], sink: OutputSink, clock: Clock) -> None:
        self._cfg = SimConfig.from_args(args)
        self._sink = sink
        self._clock = clock
        self._prefill_s = self._cfg.prefill_ms / 1000.0
        self._delay_s = self._cfg.token_delay_ms / 1000.0
        self._window_s = self._cfg.coalesce_ms / 1000.0
        self._slots: dict[float, _Slot] = {}  # fire time -> its slot; one per window that has a token due
        self._running: dict[int, _Stream] = {}
        self._waiting: OrderedDict[int, tuple[Request, int]] = OrderedDict()  # id -> (request, prompt tokens)
        self._emitted = 0  # tokens emitted in all: picks the ones whose step is reported

    @property
    def config(self) -> SimConfig:
        return self._cfg

    async def start(self) -> EngineInfo:
        return {"engine": "sim", "model": "sim", "max_model_len": self._cfg.max_model_len}

    def submit(self, request: Request) -> None:
        if request.id in self._running or request.id in self._waiting:
            raise DuplicateRequestError(f"request id {request.id} is already open")
        prompt_tokens = len(request.prompt_text().split())
        if prompt_tokens > self._cfg.max_model_len:
            self._sink.finish(
                request.id,
                "error",
                prompt_tokens,
                0,
                400,
                f"prompt is {prompt_tokens} tokens, longer than this model's maximum context length "
                f"of {self._cfg.max_model_len} tokens",
            )
            return
        if len(self._running) < self._cfg.batch_capacity:
            self._start(request, prompt_tokens)
        else:
            self._waiting[request.id] = (request, prompt_tokens)
        self._sink.load_changed()

    def abort(self, request_id: int) -> None:
        stream = self._running.get(request_id)
        if stream is not None:
            self._unschedule(stream)
            self._end(stream, "abort")
            return
        queued = self._waiting.pop(request_id, None)
        if queued is not None:
            self._sink.finish(request_id, "abort", queued[1], 0)
            self._sink.load_changed()

    def stats(self) -> EngineStats:
        running = len(self._running)
        return EngineStats(running, len(self._waiting), running / self._cfg.batch_capacity)

    async def shutdown(self) -> None:
        # waiting first, so that ending running streams does not admit them
        for request_id in list(self._waiting):
            self.abort(request_id)
        for request_id in list(self._running):
            self.abort(request_id)

    def _start(self, request: Request, prompt_tokens: int) -> None:
        params = request.params
        max_tokens = params.max_tokens or self._cfg.default_max_tokens
        rng = token_rng(self._cfg.seed, params.seed, request.prompt_text())
        stream = _Stream(
            request=request,
            prompt_tokens=prompt_tokens,
            limit=min(max_tokens, self._cfg.max_model_len - prompt_tokens),
            rng=rng,
            start=self._clock.time(),
        )
        self._running[request.id] = stream
        if stream.limit <= 0:  # the prompt fills the whole context
            self._end(stream, "length")
            return
        self._schedule_next(stream)

    def _due(self, stream: _Stream, token: int) -> float:
        """When token `token` (1-based) of the stream is due: absolute from its start, so lateness never adds up."""
        return stream.start + self._prefill_s + token * self._delay_s

    def _fire_time(self, due: float) -> float:
        """The end of the window `due` falls in: not before it, less than a window after it."""
        if not self._window_s:
            return due
        return math.ceil(due / self._window_s - WINDOW_ROUNDING) * self._window_s

    def _schedule_next(self, stream: _Stream) -> None:
        when = self._fire_time(self._due(stream, stream.generated + 1))
        slot = self._slots.get(when)
        if slot is None:
            slot = self._slots[when] = _Slot(self._clock.call_at(when, self._fire, when))
        slot.streams[stream.request.id] = stream
        stream.slot = when

    def _unschedule(self, stream: _Stream) -> None:
        when, stream.slot = stream.slot, None
        slot = self._slots.get(when) if when is not None else None
        if slot is None or slot.streams.pop(stream.request.id, None) is None:
            return  # no token scheduled, or its slot is firing now (and skips it)
        if not slot.streams:
            slot.timer.cancel()
            del self._slots[when]

    def _fire(self, when: float) -> None:
        """Emits the next token of every stream of the slot, then ends the streams that are done.

        One callback for all the tokens due in the window, and the sink gets them together, as one engine step's
        outputs, with the step's finishes after them (a finish does not cut the batch of tokens in two).
        """
        streams = self._slots.pop(when).streams
        done: list[tuple[_Stream, FinishReason]] = []
        for stream in streams.values():
            if stream.slot == when:  # else an output of this same slot aborted it
                stream.slot = None
                reason = self._emit(stream)
                if reason is not None:
                    done.append((stream, reason))
        for stream, reason in done:
            if self._running.get(stream.request.id) is stream:  # else aborted since its last token
                self._end(stream, reason)

    def _emit(self, stream: _Stream) -> FinishReason | None:
        """Emits the stream's next token and schedules the one after; the reason to end it when that was its last."""
        stream.generated += 1
        self._emitted += 1
        if not self._emitted & STEP_SAMPLE_MASK:  # the sim's step: its token period, plus how late this token is
            self._sink.engine_step(self._delay_s + self._clock.time() - self._due(stream, stream.generated))
        word = stream.rng.choice(VOCAB)
        stops = stream.request.params.stop
        if not stops:
            self._sink.tokens(stream.request.id, word, 1)
        elif self._emit_checking_stops(stream, word, stops):
            return "stop"
        if stream.generated >= stream.limit:
            return "length"
        self._schedule_next(stream)
        return None

    def _emit_checking_stops(self, stream: _Stream, word: str, stops: tuple[str, ...]) -> bool:
        """Send what can no longer be part of a stop string; True when a stop string ends the stream.

        Keeping back the last (longest stop - 1) characters means any stop string that ends in the new word
        starts inside `held`, so it is never partly sent already.
        """
        stream.held += word
        stream.held_tokens += 1
        found = [i for i in (stream.held.find(s) for s in stops) if i >= 0]
        if found:
            text = stream.held[: min(found)]
            if text:
                self._sink.tokens(stream.request.id, text, stream.held_tokens)
            stream.held, stream.held_tokens = "", 0
            return True
        keep = max(map(len, stops)) - 1
        cut = len(stream.held) - keep
        if cut > 0:
            self._sink.tokens(stream.request.id, stream.held[:cut], stream.held_tokens)
            stream.held, stream.held_tokens = stream.held[cut:], 0
        return False

    def _end(self, stream: _Stream, reason: FinishReason) -> None:
        del self._running[stream.request.id]
        if stream.held and reason == "length":
            self._sink.tokens(stream.request.id, stream.held, stream.held_tokens)
        self._sink.finish(stream.request.id, reason, stream.prompt_tokens, stream.generated)
        while self._waiting and len(self._running) < self._cfg.batch_capacity:
            _, (request, prompt_tokens) = self._waiting.popitem(last=False)
            self._start(request, prompt_tokens)
        self._sink.load_changed()
