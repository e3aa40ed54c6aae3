"""The model worker as a real process over real shared-memory rings, driven from the replica's ends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_harness import metric_samples
from test_sim_engine import ManualClock, RecordingSink

from model_worker.engine import Request, SamplingParams
from model_worker.ring import RingFds, RingReceiver, RingSender, create_ring_fds
from model_worker.sim_engine import SimEngine

TOKENS, FINISH, STATS, READY = 1, 2, 3, 4
DEADLINE_S = 20.0


def _fds_arg(fds: RingFds) -> str:
    return f"{fds.mem},{fds.data},{fds.space}"


@dataclass
class Rings:
    req: RingFds
    resp: RingFds

    def close(self) -> None:
        for fd in (*self.req, *self.resp):
            os.close(fd)


def spawn_worker(
    rings: Rings, log_path: Path, engine_args: dict[str, Any], rid: str = "r1", engine: str = "sim"
) -> subprocess.Popen:
    """A real `python -m model_worker` on the worker's ends of the rings, in its own process group."""
    cmd = [sys.executable, "-m", "model_worker", "--replica-id", rid, "--engine", engine]
    cmd += ["--engine-args", json.dumps(engine_args), "--req-ring", _fds_arg(rings.req)]
    cmd += ["--resp-ring", _fds_arg(rings.resp)]
    with log_path.open("wb") as log:  # its output as its agent gives it: one file (the METRICS line is in it)
        return subprocess.Popen(cmd, pass_fds=(*rings.req, *rings.resp), stdout=log, stderr=log, start_new_session=True)


def per_request(record: list[Any]) -> list[list[Any]]:
    """A record as the tests read it: a batched TOKENS record `[1, id, text, n, produced_ns, ...]` becomes one
    `[1, id, text, n]` per group, with `produced_ns` as a fifth field on a request's first group (the one stamped);
    any other record is itself."""
    if not (isinstance(record, list) and record and record[0] == TOKENS):
        return [record]
    assert len(record) > 1 and (len(record) - 1) % 4 == 0, record
    groups = [record[i : i + 4] for i in range(1, len(record), 4)]
    return [[TOKENS, rid, text, n, stamp] if stamp else [TOKENS, rid, text, n] for rid, text, n, stamp in groups]


class Replica:
    """The replica's ends of the rings: it produces requests and consumes responses."""

    def __init__(self, rings: Rings) -> None:
        self.sender = RingSender(rings.req)
        self.receiver = RingReceiver(rings.resp)
        self.raw: list[Any] = []  # the records as they came through the ring
        self.records: list[list[Any]] = []  # the same, TOKENS split per request (per_request)

    async def until(self, done: Callable[[list[list[Any]]], bool], deadline_s: float = DEADLINE_S) -> list[list[Any]]:
        """Read responses until `done(all records so far)`; fails at the deadline."""

        async def read() -> None:
            while not done(self.records):
                for record in await self.receiver.next_batch():
                    self.raw.append(record)
                    self.records.extend(per_request(record))

        await asyncio.wait_for(read(), deadline_s)
        return self.records

    def of(self, request_id: int) -> list[list[Any]]:
        return [r for r in self.records if r[0] in (TOKENS, FINISH) and r[1] == request_id]

    def finished(self, request_id: int) -> Callable[[list[list[Any]]], bool]:
        return lambda recs: any(r[0] == FINISH and r[1] == request_id for r in recs)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def submit(rid: int, prompt: str, max_tokens: int, **params: Any) -> list[Any]:
    return [1, rid, prompt, None, {"max_tokens": max_tokens, "stop": [], "ignore_eos": True, **params}]


@dataclass
class Running:
    proc: subprocess.Popen
    replica: Replica
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    async def exit_code(self) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), DEADLINE_S)


@pytest.fixture
async def worker(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    engine_args = getattr(request, "param", {"token_delay_ms": 1, "seed": 11})
    rings = Rings(create_ring_fds(1 << 16), create_ring_fds(1 << 16))
    replica = Replica(rings)
    log_path = tmp_path / "worker.log"
    proc = spawn_worker(rings, log_path, engine_args)
    try:
        yield Running(proc, replica, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        replica.close()
        rings.close()


async def test_ready_first_then_tokens_in_order_and_finish(worker: Running) -> None:
    replica = worker.replica
    first = await replica.until(lambda recs: len(recs) >= 1)
    assert first[0] == [READY, {"engine": "sim", "model": "sim", "max_model_len": 4096}]
    before_ns = time.time_ns()
    replica.sender.send(submit(5, "what is machine learning", 6))
    await replica.until(replica.finished(5))
    after_ns = time.time_ns()
    records = replica.of(5)
    assert [r[0] for r in records] == [TOKENS] * 6 + [FINISH]
    assert all(r[3] == 1 for r in records[:-1])
    # the first TOKENS record carries when the engine produced it (wall clock, ns); the later ones do not
    assert len(records[0]) == 5 and before_ns < records[0][4] < after_ns
    assert all(len(r) == 4 for r in records[1:-1])
    assert records[-1] == [FINISH, 5, "length", 4, 6, 0, ""]
    # the same text the engine produces in-process: deterministic across processes
    clock = ManualClock()
    sink = RecordingSink(clock)
    engine = SimEngine({"seed": 11}, sink, clock)
    engine.submit(Request(5, "what is machine learning", None, SamplingParams(max_tokens=6)))
    clock.advance()
    assert "".join(r[2] for r in records[:-1]) == sink.text_of(5)
    assert [STATS, 0, 0, 0.0] in replica.records  # the first load report
    assert "worker r1 ready: engine sim" in worker.log()


async def test_many_streams_each_complete_and_ordered(worker: Running) -> None:
    replica = worker.replica
    for i in range(1, 41):
        replica.sender.send(submit(i, f"prompt number {i}", 8))
    await replica.until(lambda recs: sum(r[0] == FINISH for r in recs) == 40)
    for i in range(1, 41):
        kinds = [r[0] for r in replica.of(i)]
        assert kinds == [TOKENS] * 8 + [FINISH], i
        assert [len(r) for r in replica.of(i)[:-1]] == [5] + [4] * 7, i  # each request's first token is stamped


async def test_a_burst_of_streams_travels_in_fewer_records_than_tokens(worker: Running) -> None:
    replica = worker.replica
    await replica.until(lambda recs: len(recs) >= 1)  # READY: the engine runs before the burst comes
    for i in range(1, 41):
        replica.sender.send(submit(i, f"prompt number {i}", 8))
    await replica.until(lambda recs: sum(r[0] == FINISH for r in recs) == 40)
    tokens = [r for r in replica.raw if r[0] == TOKENS]
    groups = sum((len(r) - 1) // 4 for r in tokens)
    assert groups == 40 * 8  # every token in a group of its own: one per request and engine step
    # the engine steps all 40 together: each step's tokens share a record (a loaded machine batches more, never less)
    assert len(tokens) <= groups // 4
    assert any(len({r[i] for i in range(1, len(r), 4)}) > 1 for r in tokens)  # one record, many requests
    for i in range(1, 41):  # a request's tokens, in order, before its FINISH
        records = replica.of(i)
        assert [r[0] for r in records] == [TOKENS] * 8 + [FINISH], i


async def test_a_finish_follows_the_tokens_of_its_request_batched_before_it(worker: Running) -> None:
    replica = worker.replica
    for i in (1, 2, 3):
        replica.sender.send(submit(i, f"short {i}", 1 + i))
    await replica.until(lambda recs: sum(r[0] == FINISH for r in recs) == 3)
    for i in (1, 2, 3):
        finish = next(n for n, r in enumerate(replica.raw) if r[0] == FINISH and r[1] == i)
        last_tokens = max(n for n, r in enumerate(replica.raw) if r[0] == TOKENS and i in r[1::4])
        assert last_tokens < finish, i


async def test_an_idle_worker_still_sends_stats_every_second(worker: Running) -> None:
    replica = worker.replica
    await replica.until(lambda recs: any(r[0] == STATS for r in recs))
    first = len(replica.records)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # nothing changes, yet the load is re-sent: 3 more STATS within the deadline, about STATS_MAX_GAP_S apart
    await replica.until(lambda recs: len(recs) >= first + 3)
    assert all(r[:3] == [STATS, 0, 0] for r in replica.records[first:])
    assert loop.time() - started > 1.5  # not a flood: 3 records take about 3 s


@pytest.mark.parametrize("worker", [{"token_delay_ms": 5}], indirect=True)
async def test_cancel_answers_finish_abort_and_stats_follow_load(worker: Running) -> None:
    replica = worker.replica
    replica.sender.send(submit(9, "long one", 100000))
    await replica.until(lambda recs: any(r[:3] == [STATS, 1, 0] for r in recs))
    await replica.until(lambda recs: any(r[0] == TOKENS and r[1] == 9 for r in recs))
    replica.sender.send([2, 9])
    await replica.until(replica.finished(9))
    finish = replica.of(9)[-1]
    assert finish[:3] == [FINISH, 9, "abort"] and finish[4] == len(replica.of(9)) - 1
    await replica.until(lambda recs: recs[-1][:3] == [STATS, 0, 0])
    replica.sender.send([2, 9])  # cancelling a finished request is harmless
    replica.sender.send(submit(10, "after", 2))
    await replica.until(replica.finished(10))
    assert [r[0] for r in replica.of(9)].count(FINISH) == 1


async def test_bad_records_are_answered_or_logged_and_nothing_else_breaks(worker: Running) -> None:
    replica = worker.replica
    replica.sender.send([1, 1, "prompt", None, {"max_tokens": "many"}])
    replica.sender.send([1, 2, 42, None, {}])
    replica.sender.send([7, 3])
    replica.sender.send("not a record")
    replica.sender.send([2])
    replica.sender.send(submit(4, " ".join(["w"] * 5000), 3))  # longer than max_model_len 4096
    replica.sender.send(submit(5, "fine", 3))
    await replica.until(lambda recs: all(any(r[0] == FINISH and r[1] == i for r in recs) for i in (1, 2, 4, 5)))
    assert replica.of(1)[-1][2:6] == ["error", 0, 0, 400] and "max_tokens" in replica.of(1)[-1][6]
    assert replica.of(2)[-1][5] == 400 and "prompt must be a string" in replica.of(2)[-1][6]
    assert replica.of(4)[-1][2:6] == ["error", 5000, 0, 400] and "maximum context length" in replica.of(4)[-1][6]
    assert replica.of(5)[-1][2] == "length"
    log = worker.log()
    assert "unknown record kind 7" in log and "CANCEL must be [2, id]" in log


async def scrape(log: Callable[[], str]) -> dict[str, float]:
    """The worker's /metrics, at the address of its METRICS line, as {"name{labels}": value}."""
    match = await wait_for_line(log, re.compile(r"^METRICS (\S+:\d+)$", re.M))
    async with aiohttp.ClientSession() as session, session.get(f"http://{match.group(1)}/metrics") as resp:
        return metric_samples(await resp.text())


async def wait_for_line(log: Callable[[], str], pattern: re.Pattern[str]) -> re.Match[str]:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while (match := pattern.search(log())) is None:
        assert asyncio.get_running_loop().time() < deadline, f"no {pattern.pattern} in:\n{log()}"
        await asyncio.sleep(0.05)
    return match


async def test_metrics_count_tokens_requests_and_first_tokens(worker: Running) -> None:
    replica = worker.replica
    for i in (1, 2, 3):
        replica.sender.send(submit(i, f"prompt {i}", 5))
    replica.sender.send(submit(4, "a long one", 100000))
    await replica.until(lambda recs: all(any(r[0] == FINISH and r[1] == i for r in recs) for i in (1, 2, 3)))
    replica.sender.send([2, 4])
    await replica.until(replica.finished(4))
    await replica.until(lambda recs: recs[-1][:3] == [STATS, 0, 0])  # the load after the last finish
    tokens = sum(r[3] for r in replica.records if r[0] == TOKENS)
    m = await scrape(worker.log)
    assert m["tokenbus_worker_generated_tokens_total"] == tokens >= 15
    assert m['tokenbus_worker_requests_finished_total{"reason": "length"}'] == 3
    assert m['tokenbus_worker_requests_finished_total{"reason": "abort"}'] == 1
    assert m["tokenbus_worker_time_to_first_token_seconds_count"] == 4
    assert m["tokenbus_worker_running_requests"] == 0 and m["tokenbus_worker_waiting_requests"] == 0
    assert m["tokenbus_worker_kv_usage_ratio"] == 0.0


@pytest.mark.parametrize("worker", [{"token_delay_ms": 5}], indirect=True)
async def test_sigterm_aborts_open_requests_and_exits_0(worker: Running) -> None:
    replica = worker.replica
    replica.sender.send(submit(1, "a long request", 100000))
    await replica.until(lambda recs: any(r[0] == TOKENS for r in recs))
    worker.proc.send_signal(signal.SIGTERM)
    await replica.until(replica.finished(1))
    assert replica.of(1)[-1][2] == "abort"
    assert await worker.exit_code() == 0
    assert "worker r1 stopped (signal)" in worker.log()


async def test_exits_0_when_the_replica_is_gone(tmp_path: Path) -> None:
    rings = Rings(create_ring_fds(1 << 16), create_ring_fds(1 << 16))
    # the request ring's producer is another process, which then dies
    fake_replica = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from model_worker.ring import RingSender, parse_ring_fds\n"
            "s = RingSender(parse_ring_fds(sys.argv[1]))\n"
            "print('attached', flush=True)\n"
            "time.sleep(300)\n",
            _fds_arg(rings.req),
        ],
        pass_fds=tuple(rings.req),
        stdout=subprocess.PIPE,
    )
    receiver = RingReceiver(rings.resp)
    try:
        assert fake_replica.stdout is not None
        assert (await asyncio.to_thread(fake_replica.stdout.readline)) == b"attached\n"
        proc = spawn_worker(rings, tmp_path / "w.log", {})
        batch = await asyncio.wait_for(receiver.next_batch(), DEADLINE_S)
        assert batch[0][0] == READY
        fake_replica.kill()
        fake_replica.wait()
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), DEADLINE_S) == 0
        assert "worker r1 stopped (replica gone)" in (tmp_path / "w.log").read_text()
    finally:
        for p in (fake_replica, locals().get("proc")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        receiver.close()
        rings.close()


@pytest.mark.parametrize("worker", [{"batch_capacity": 0}], indirect=True)
async def test_bad_engine_args_exit_2_with_a_clear_line(worker: Running) -> None:
    assert await worker.exit_code() == 2
    assert "worker r1 bad engine configuration: sim engine arg batch_capacity must be >= 1" in worker.log()
