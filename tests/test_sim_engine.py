"""The sim engine on a manual clock: scheduled times, coalesced timers, order, determinism, stop strings, abort,
queueing."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from model_worker.engine import DuplicateRequestError, Request, SamplingParams
from model_worker.sim_engine import VOCAB, SimConfig, SimEngine


class ManualHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Runs callbacks in (time, scheduling order) when told to advance; time moves only here."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._heap: list[tuple[float, int, ManualHandle, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.callbacks_run = 0  # numbers each callback: which outputs came out of the same one

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> ManualHandle:
        handle = ManualHandle()
        heapq.heappush(self._heap, (when, next(self._seq), handle, callback, args))
        return handle

    def pending(self) -> int:
        return sum(1 for entry in self._heap if not entry[2].cancelled)

    def advance(self, until: float = float("inf")) -> None:
        while self._heap and self._heap[0][0] <= until:
            when, _, handle, callback, args = heapq.heappop(self._heap)
            if not handle.cancelled:
                self.now = max(self.now, when)
                self.callbacks_run += 1
                callback(*args)
        if until != float("inf"):
            self.now = max(self.now, until)


class RecordingSink:
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.events: list[tuple[Any, ...]] = []
        self.load_changes = 0
        self.steps: list[float] = []
        self.callback_of_tokens: list[int] = []  # the clock callback each tokens event came from, in order
        self.on_tokens: Callable[[int], object] | None = None  # called with the request id after each tokens event

    def tokens(self, request_id: int, text: str, n_tokens: int) -> None:
        self.events.append(("tokens", request_id, text, n_tokens, round(self.clock.now, 9)))
        self.callback_of_tokens.append(self.clock.callbacks_run)
        if self.on_tokens is not None:
            self.on_tokens(request_id)

    def finish(
        self,
        request_id: int,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        error_code: int = 0,
        error_message: str = "",
    ) -> None:
        self.events.append(
            (
                "finish",
                request_id,
                reason,
                prompt_tokens,
                completion_tokens,
                error_code,
                error_message,
                round(self.clock.now, 9),
            )
        )

    def load_changed(self) -> None:
        self.load_changes += 1

    def engine_step(self, seconds: float) -> None:
        self.steps.append(round(seconds, 9))

    def tokens_of(self, request_id: int) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "tokens" and e[1] == request_id]

    def text_of(self, request_id: int) -> str:
        return "".join(e[2] for e in self.tokens_of(request_id))

    def finish_of(self, request_id: int) -> tuple[Any, ...]:
        (f,) = [e for e in self.events if e[0] == "finish" and e[1] == request_id]
        return f


def make(clock: ManualClock | None = None, **args: Any) -> tuple[SimEngine, RecordingSink, ManualClock]:
    clock = clock or ManualClock()
    sink = RecordingSink(clock)
    return SimEngine(args, sink, clock), sink, clock


def req(rid: int, prompt: str = "hello there world", max_tokens: int = 5, **params: Any) -> Request:
    return Request(rid, prompt, None, SamplingParams(max_tokens=max_tokens, **params))


async def test_start_reports_info() -> None:
    engine, _, _ = make(max_model_len=128)
    assert await engine.start() == {"engine": "sim", "model": "sim", "max_model_len": 128}


def test_tokens_at_absolute_times_then_length_finish() -> None:
    engine, sink, clock = make(ManualClock(10.0), prefill_ms=100, token_delay_ms=20)
    engine.submit(req(1, prompt="one two three", max_tokens=4))
    clock.advance()
    times = [e[4] for e in sink.tokens_of(1)]
    assert times == [10.12, 10.14, 10.16, 10.18]
    assert all(e[3] == 1 and e[2].startswith(" ") and e[2][1:] in {w[1:] for w in VOCAB} for e in sink.tokens_of(1))
    assert sink.finish_of(1) == ("finish", 1, "length", 3, 4, 0, "", 10.18)
    assert engine.stats().running == 0


def test_late_callbacks_do_not_drift() -> None:
    # a callback that runs late (clock jumped) must not push later tokens back
    engine, sink, clock = make(token_delay_ms=10)
    engine.submit(req(1, max_tokens=5))
    clock.advance(0.035)  # tokens 1..3 ran, "late" at most by the jump
    clock.advance()
    assert [e[4] for e in sink.tokens_of(1)] == [0.01, 0.02, 0.03, 0.04, 0.05]


def test_one_token_in_64_reports_the_step_with_its_lateness() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    engine.submit(req(1, max_tokens=128))
    clock.advance()  # on time
    assert sink.steps == [0.01, 0.01]  # tokens 64 and 128
    engine.submit(req(2, max_tokens=64))
    clock.now += 1.0  # every token of request 2 runs 1 s after it was started: the 64th is 0.36 s late
    clock.advance()
    assert sink.steps == [0.01, 0.01, 0.37]


def test_streams_interleave_by_time() -> None:
    engine, sink, clock = make(token_delay_ms=30)
    engine.submit(req(1, max_tokens=3))
    clock.advance(0.01)
    engine.submit(req(2, max_tokens=3))
    clock.advance()
    order = [(e[1], e[4]) for e in sink.events if e[0] == "tokens"]
    assert order == [(1, 0.03), (2, 0.04), (1, 0.06), (2, 0.07), (1, 0.09), (2, 0.1)]


def test_text_is_deterministic_per_seed_and_prompt() -> None:
    def text(engine_seed: int, prompt: str, seed: int | None = None) -> str:
        engine, sink, clock = make(seed=engine_seed)
        engine.submit(req(7, prompt=prompt, max_tokens=20, seed=seed))
        clock.advance()
        return sink.text_of(7)

    a = text(0, "what is machine learning")
    assert a == text(0, "what is machine learning")
    assert a != text(0, "what is deep learning")
    assert a != text(1, "what is machine learning")
    # a request seed decides the text whatever the prompt
    assert text(0, "a", seed=42) == text(0, "b", seed=42) != text(0, "a", seed=43)
    assert len(a.split()) == 20


def test_chat_messages_count_as_prompt() -> None:
    engine, sink, clock = make()
    engine.submit(Request(1, "", (("system", "be brief"), ("user", "what is it")), SamplingParams(max_tokens=2)))
    clock.advance()
    assert sink.finish_of(1)[3] == 5


def test_stop_string_cuts_text_and_finishes_with_stop() -> None:
    engine, sink, clock = make(seed=3)
    engine.submit(req(1, max_tokens=30, seed=5))
    clock.advance()
    full = sink.text_of(1)
    words = full.split(" ")[1:]
    # a stop string that spans the boundary between tokens 6 and 7
    stop = words[5][-2:] + " " + words[6][:2]
    cut = full[: full.index(stop)]

    engine, sink, clock = make(seed=3)
    engine.submit(req(1, max_tokens=30, seed=5, stop=("never-there", stop)))
    clock.advance()
    assert sink.text_of(1) == cut
    assert all(stop not in e[2] for e in sink.tokens_of(1))
    finish = sink.finish_of(1)
    assert finish[2] == "stop"
    assert finish[4] == 7  # the token completing the stop string was generated
    assert sum(e[3] for e in sink.tokens_of(1)) <= 7
    assert clock.pending() == 0


def test_stop_strings_that_never_match_hold_back_nothing_at_the_end() -> None:
    engine, sink, clock = make()
    engine.submit(req(1, max_tokens=6, seed=1))
    clock.advance()
    plain = sink.text_of(1)
    engine, sink, clock = make()
    engine.submit(req(1, max_tokens=6, seed=1, stop=("zzzzzzzz",)))
    clock.advance()
    assert sink.text_of(1) == plain
    assert sum(e[3] for e in sink.tokens_of(1)) == 6
    assert sink.finish_of(1)[2:5] == ("length", 3, 6)


def test_ignore_eos_and_default_max_tokens() -> None:
    engine, sink, clock = make(default_max_tokens=9)
    engine.submit(req(1, max_tokens=0))
    engine.submit(req(2, max_tokens=3, ignore_eos=True))
    clock.advance()
    assert len(sink.tokens_of(1)) == 9 and sink.finish_of(1)[2:5] == ("length", 3, 9)
    assert len(sink.tokens_of(2)) == 3 and sink.finish_of(2)[2:5] == ("length", 3, 3)


def test_prompt_longer_than_context_is_a_400() -> None:
    engine, sink, clock = make(max_model_len=4)
    engine.submit(req(1, prompt="one two three four five"))
    finish = sink.finish_of(1)
    assert finish[2:6] == ("error", 5, 0, 400)
    assert "maximum context length of 4" in finish[6]
    assert engine.stats().running == 0 and clock.pending() == 0


def test_generation_stops_at_context_length() -> None:
    engine, sink, clock = make(max_model_len=5)
    engine.submit(req(1, prompt="one two three", max_tokens=10))
    clock.advance()
    assert sink.finish_of(1)[2:5] == ("length", 3, 2)


def test_abort_running_removes_it_at_once() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    engine.submit(req(1, max_tokens=10))
    engine.submit(req(2, max_tokens=3))
    clock.advance(0.025)
    assert engine.stats().running == 2
    engine.abort(1)
    assert engine.stats().running == 1
    assert sink.finish_of(1)[2:5] == ("abort", 3, 2)
    clock.advance()
    assert len(sink.tokens_of(1)) == 2  # nothing after the abort
    assert sink.finish_of(2)[2] == "length"
    engine.abort(1)  # unknown by now: ignored
    engine.abort(99)
    assert len([e for e in sink.events if e[0] == "finish"]) == 2


def test_queue_beyond_capacity_is_fifo_and_starts_when_a_slot_frees() -> None:
    engine, sink, clock = make(token_delay_ms=10, batch_capacity=2)
    engine.submit(req(1, max_tokens=2))
    engine.submit(req(2, max_tokens=4))
    engine.submit(req(3, max_tokens=1))
    engine.submit(req(4, max_tokens=1))
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_usage) == (2, 2, 1.0)
    clock.advance(0.02)  # request 1 finished at 0.02; request 3 takes its slot then
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_usage) == (2, 1, 1.0)
    clock.advance()
    assert sink.tokens_of(3)[0][4] == 0.03
    assert sink.tokens_of(4)[0][4] == 0.04  # after 3 finished at 0.03
    # 4 and the last token of 2 are both due at 0.04; 2 was scheduled first (before 3's end admitted 4)
    assert [e[1] for e in sink.events if e[0] == "finish"] == [1, 3, 2, 4]
    assert engine.stats().running == 0 and engine.stats().kv_usage == 0.0


def test_abort_waiting_request() -> None:
    engine, sink, clock = make(batch_capacity=1)
    engine.submit(req(1, max_tokens=2))
    engine.submit(req(2, max_tokens=2))
    engine.abort(2)
    assert sink.finish_of(2)[2:5] == ("abort", 3, 0)
    assert engine.stats().waiting == 0
    clock.advance()
    assert sink.tokens_of(2) == []


def test_duplicate_id_is_refused_without_side_effects() -> None:
    engine, sink, clock = make()
    engine.submit(req(1, max_tokens=2))
    with pytest.raises(DuplicateRequestError):
        engine.submit(req(1, max_tokens=9))
    clock.advance()
    assert len(sink.tokens_of(1)) == 2


async def test_shutdown_aborts_everything() -> None:
    engine, sink, clock = make(batch_capacity=1)
    engine.submit(req(1))
    engine.submit(req(2))
    await engine.shutdown()
    assert {sink.finish_of(i)[2] for i in (1, 2)} == {"abort"}
    assert clock.pending() == 0
    assert engine.stats().running == engine.stats().waiting == 0


def test_load_changes_are_reported() -> None:
    engine, sink, clock = make()
    engine.submit(req(1, max_tokens=1))
    assert sink.load_changes >= 1
    before = sink.load_changes
    clock.advance()
    assert sink.load_changes > before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"bogus": 1}, "unknown sim engine args"),
        ({"batch_capacity": 0}, "batch_capacity must be >= 1"),
        ({"token_delay_ms": "fast"}, "token_delay_ms must be int/float"),
        ({"seed": True}, "seed must be int"),
        ({"coalesce_ms": -1}, "coalesce_ms must be >= 0"),
    ],
)
def test_bad_engine_args(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig.from_args(args)


def test_tokens_due_in_the_same_millisecond_come_from_one_callback() -> None:
    engine, sink, clock = make(token_delay_ms=20)
    for rid in range(100):  # started 8 us apart within (0, 1 ms): every round of tokens is due within one millisecond
        clock.advance(0.0001 + rid * 0.000008)
        engine.submit(req(rid, max_tokens=4))
    assert clock.pending() == 1
    clock.advance()
    rounds = itertools.groupby(
        zip(sink.callback_of_tokens, (e for e in sink.events if e[0] == "tokens"), strict=True), key=lambda x: x[0]
    )
    batches = [[event for _, event in group] for _, group in rounds]
    assert [len(batch) for batch in batches] == [100] * 4
    for k, batch in enumerate(batches, start=1):
        assert [e[1] for e in batch] == list(range(100))  # in the order they were scheduled
        assert {e[4] for e in batch} == {round(0.001 + k * 0.02, 9)}  # the end of the millisecond they are due in
    assert {sink.finish_of(rid)[2:5] for rid in range(100)} == {("length", 3, 4)}
    assert clock.pending() == 0


@pytest.mark.parametrize("coalesce_ms", [1, 5])
def test_no_token_early_and_none_a_window_late(coalesce_ms: float) -> None:
    engine, sink, clock = make(prefill_ms=3.3, token_delay_ms=7.7, coalesce_ms=coalesce_ms)
    draw = random.Random(9)
    starts = {}
    for rid in range(60):
        clock.advance(clock.now + draw.uniform(0, 0.004))
        starts[rid] = clock.now
        engine.submit(req(rid, max_tokens=draw.randint(1, 12)))
    clock.advance()
    assert sink.finish_of(0)  # every stream finished
    for rid, start in starts.items():
        times = [e[4] for e in sink.tokens_of(rid)]
        assert len(times) == sink.finish_of(rid)[4]
        for k, at in enumerate(times, start=1):
            due = start + 0.0033 + k * 0.0077
            assert due - 1e-9 <= at < due + coalesce_ms / 1000
    # the coalescing: far fewer callbacks than tokens
    assert len(set(sink.callback_of_tokens)) < len(sink.callback_of_tokens) / 2


def test_coalesce_0_emits_every_token_at_its_own_time() -> None:
    engine, sink, clock = make(prefill_ms=3.3, token_delay_ms=7.7, coalesce_ms=0)
    engine.submit(req(1, max_tokens=3))
    clock.advance(0.0004)
    engine.submit(req(2, max_tokens=3))
    clock.advance()
    assert [e[4] for e in sink.tokens_of(1)] == [round(0.0033 + k * 0.0077, 9) for k in (1, 2, 3)]
    assert [e[4] for e in sink.tokens_of(2)] == [round(0.0004 + 0.0033 + k * 0.0077, 9) for k in (1, 2, 3)]
    assert len(set(sink.callback_of_tokens)) == 6


def test_abort_in_a_shared_slot_keeps_the_others_and_the_last_one_cancels_its_timer() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    for rid in (1, 2, 3):
        engine.submit(req(rid, max_tokens=3))
    assert clock.pending() == 1
    engine.abort(2)
    clock.advance()
    assert len(sink.tokens_of(1)) == len(sink.tokens_of(3)) == 3 and sink.tokens_of(2) == []
    engine.submit(req(4, max_tokens=3))
    engine.submit(req(5, max_tokens=3))
    engine.abort(4)
    engine.abort(5)
    assert clock.pending() == 0


def test_abort_by_an_output_of_the_same_slot_skips_the_aborted_stream() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    for rid in (1, 2, 3):
        engine.submit(req(rid, max_tokens=3))
    sink.on_tokens = lambda rid: engine.abort(2) if rid == 1 else None
    clock.advance()
    assert sink.tokens_of(2) == [] and sink.finish_of(2)[2:5] == ("abort", 3, 0)
    assert len(sink.tokens_of(1)) == len(sink.tokens_of(3)) == 3
    assert clock.pending() == 0


def test_zero_token_delay_emits_one_token_per_callback() -> None:
    # a stream must not run to its end inside one callback: each next token waits for the next loop turn
    engine, sink, clock = make(token_delay_ms=0)
    engine.submit(req(1, max_tokens=3))
    clock.advance()
    assert len(set(sink.callback_of_tokens)) == 3 and sink.finish_of(1)[2] == "length"


def test_a_due_time_a_float_hair_past_its_millisecond_is_emitted_at_that_millisecond() -> None:
    # 1.0 + 0.1 + 3 * 0.02 is 1.1600000000000001: a whole window late were it taken literally
    engine, sink, clock = make(ManualClock(1.0), prefill_ms=100, token_delay_ms=20)
    engine.submit(req(1, max_tokens=7))
    clock.advance()
    assert [e[4] for e in sink.tokens_of(1)] == [1.12, 1.14, 1.16, 1.18, 1.2, 1.22, 1.24]


def test_a_slots_finishes_come_after_all_its_tokens() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    engine.submit(req(1, max_tokens=1))
    engine.submit(req(2, max_tokens=2))
    engine.submit(req(3, max_tokens=30, stop=(" ",)))  # every word starts with one: its first token stops it
    engine.submit(req(4, max_tokens=1))
    clock.advance(0.01)
    assert [e[:2] for e in sink.events] == [
        ("tokens", 1),
        ("tokens", 2),
        ("tokens", 4),
        ("finish", 1),
        ("finish", 3),
        ("finish", 4),
    ]
    assert sink.finish_of(3)[2:5] == ("stop", 3, 1)
    clock.advance()
    assert sink.finish_of(2)[2:5] == ("length", 3, 2)


def test_a_stream_aborted_after_its_last_token_ends_once() -> None:
    engine, sink, clock = make(token_delay_ms=10)
    engine.submit(req(1, max_tokens=1))
    engine.submit(req(2, max_tokens=1))
    sink.on_tokens = lambda rid: engine.abort(1) if rid == 2 else None  # between 1's last token and its end
    clock.advance()
    assert sink.finish_of(1)[2:5] == ("abort", 3, 1)
    assert sink.finish_of(2)[2:5] == ("length", 3, 1)
    assert engine.stats().running == 0
