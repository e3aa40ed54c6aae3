"""The fallback client (`--client python`, or when tokenbus-loadgen is not built): aiohttp streams on this
process's event loop, the same stages, arrivals and records as the loadgen, at several times its CPU and with
its loop's lag in the latencies it measures at high concurrency.

Parsing is kept minimal on purpose (the client shares the machine with the system under test): lines are
split by hand, and `json.loads` runs only on `data:` lines and the timing comment.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp

from tools.bench.cpu import CpuMeter
from tools.bench.load import BenchConfig, LengthDist
from tools.bench.records import Live, RequestResult, Run, hops_from_stamps, proxy_ttft_s

DONE = object()  # the `data: [DONE]` sentinel
MAX_ERROR_BODY = 200
MAX_LINE = 1 << 20  # longest SSE line accepted from the server
TIMING_COMMENT = b": tokenbus-timing "
TIMING_HEADER = {"X-Tokenbus-Timing": "1"}
SAMPLE_INTERVAL_S = 0.25  # running totals sampled this often (as the loadgen's progress lines)
FAILURE_BACKOFF_S = 0.05  # a closed-loop client pauses this long after a failure
LAG_PROBE_INTERVAL_S = 0.01  # how often the client measures its own event loop's lag
# The words drawn prompts are made of (--prompt-len-dist): common ASCII words, one sim token each.
PROMPT_WORDS = ("the", "model", "serves", "tokens", "from", "many", "replicas", "behind", "one", "stream")


def parse_sse_line(line: bytes) -> Any:
    """A `data:` line's JSON object, DONE for `[DONE]`, None for anything else (comments, blank lines, event:)."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return DONE
    return json.loads(payload)


async def sse_lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines, split from whatever arrived: one wake-up per network read, not one per line."""
    pending = b""
    async for data in content.iter_any():
        pending += data
        if b"\n" not in data:
            if len(pending) > MAX_LINE:
                raise ValueError(f"an SSE line longer than {MAX_LINE} bytes")
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line


def chunk_content(event: dict[str, Any]) -> str:
    """The new text of a chat or completions stream chunk ("" for a usage-only chunk)."""
    choices = event.get("choices")
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:
        return delta.get("content") or ""
    return choice.get("text") or ""


async def _error_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.content.read(MAX_ERROR_BODY)
    return f"HTTP {resp.status}: {body.decode(errors='replace').strip()}"


class RequestTimer:
    """Times one request from its creation: first chunk, the gaps between chunks, the proxy's timing."""

    def __init__(self, run_start: float, stage: int, live: Live) -> None:
        self.start = time.perf_counter()
        self._run_start = run_start
        self._stage = stage
        self._live = live
        self._first: float | None = None
        self._last = 0.0
        self._chunks = 0
        self._itl_sum = 0.0
        self._itl_max = 0.0
        self._stamps: dict[str, int] | None = None

    def chunk(self) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        else:
            gap = now - self._last
            self._itl_sum += gap
            self._itl_max = max(self._itl_max, gap)
        self._last = now
        self._chunks += 1
        self._live.tokens += 1

    def timing(self, line: bytes) -> None:
        """The proxy's `: tokenbus-timing {...}` comment line."""
        self._stamps = json.loads(line[len(TIMING_COMMENT) :])

    def result(self, ok: bool, tokens: int = -1, error: str = "") -> RequestResult:
        """`tokens` -1: the chunks counted."""
        stamps = self._stamps
        return RequestResult(
            ok=ok,
            e2e_s=time.perf_counter() - self.start,
            ttft_s=None if self._first is None else self._first - self.start,
            tokens=self._chunks if tokens < 0 else tokens,
            error=error,
            start_s=self.start - self._run_start,
            stage=self._stage,
            chunks=self._chunks,
            itl_sum_s=self._itl_sum,
            itl_max_s=self._itl_max,
            hops_s=None if stamps is None else hops_from_stamps(stamps),
            proxy_ttft_s=None if stamps is None else proxy_ttft_s(stamps),
        )


async def openai_stream(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, timer: RequestTimer
) -> RequestResult:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    usage_tokens: int | None = None
    try:
        async with session.post(f"{url}/v1/chat/completions", json=payload, headers=TIMING_HEADER) as resp:
            if resp.status != 200:
                return timer.result(False, 0, await _error_of(resp))
            async for line in sse_lines(resp.content):
                if line.startswith(TIMING_COMMENT):
                    timer.timing(line)
                    continue
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    return timer.result(True, -1 if usage_tokens is None else usage_tokens)
                if "error" in event:
                    return timer.result(False, error=f"error event: {event['error']}")
                if chunk_content(event):
                    timer.chunk()
                usage = event.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
        return timer.result(False, error="incomplete stream (no [DONE])")
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a data line that is not JSON
        return timer.result(False, error=f"{type(e).__name__}: {e}")


async def plain_stream(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, timer: RequestTimer
) -> RequestResult:
    """POST /v1/chat/{model}?max_tokens=N with a text/plain prompt. Tokens are the words of the text (one per sim
    token), chunks the network reads. A stream cut before its last chunk surfaces as a ClientPayloadError.
    """
    parts: list[bytes] = []
    try:
        async with session.post(
            f"{url}/v1/chat/{model}",
            params={"max_tokens": str(max_tokens)},
            data=prompt.encode(),
            headers={"Content-Type": "text/plain"},
        ) as resp:
            if resp.status != 200:
                return timer.result(False, 0, await _error_of(resp))
            async for data in resp.content.iter_any():
                if data:
                    parts.append(data)
                    timer.chunk()
        text = b"".join(parts).decode(errors="replace")
        return timer.result(True, len(text.split()))
    except aiohttp.ClientError as e:
        return timer.result(False, 0, f"{type(e).__name__}: {e}")


async def probe_loop_lag(lags: list[float]) -> None:
    """Appends how late each 10 ms sleep of this event loop woke up: the wait any ready stream saw too."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_INTERVAL_S
        await asyncio.sleep(LAG_PROBE_INTERVAL_S)
        lags.append(loop.time() - due)


class _Load:
    """One run's state: the stage now applying, the closed-loop clients, the open-loop requests."""

    def __init__(self, cfg: BenchConfig, session: aiohttp.ClientSession, live: Live, run: Run) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.session = session
        self.live = live
        self.run = run
        self.start = time.perf_counter()
        self.target = 0  # closed-loop clients wanted now: client k runs while k < target
        self.clients: dict[int, asyncio.Task[None]] = {}
        self.requests: set[asyncio.Task[Any]] = set()
        # independent draws, so that the arrivals do not change the lengths of a seed
        self.lengths_rng = random.Random(cfg.seed)
        self.prompt_rng = random.Random(cfg.seed + 1)

    def _prompt(self, words: LengthDist) -> str:
        return " ".join(self.prompt_rng.choice(PROMPT_WORDS) for _ in range(words.draw(self.prompt_rng)))

    def _stream(self, timer: RequestTimer) -> Coroutine[Any, Any, RequestResult]:
        cfg = self.cfg
        prompt = cfg.prompt if cfg.prompt_len is None else self._prompt(cfg.prompt_len)
        max_tokens = cfg.max_tokens.draw(self.lengths_rng)
        stream = plain_stream if cfg.endpoint == "plain" else openai_stream
        return stream(self.session, self.url, cfg.model, prompt, max_tokens, timer)

    def _record(self, result: RequestResult) -> None:
        self.run.results.append(result)
        self.live.requests += 1
        self.live.failures += not result.ok

    async def one_request(self) -> RequestResult:
        timer = RequestTimer(self.start, self.live.stage, self.live)
        if self.live.in_flight >= self.cfg.max_in_flight:
            result = timer.result(False, 0, "over max-in-flight")
            self._record(result)
            return result
        self.live.in_flight += 1
        try:
            result = await self._stream(timer)
        except asyncio.CancelledError:
            self._record(timer.result(False, error="hard deadline"))
            raise
        finally:
            self.live.in_flight -= 1
        self._record(result)
        return result

    async def client(self, k: int) -> None:
        while k < self.target:
            if not (await self.one_request()).ok:  # a refusing server would otherwise be hammered in a tight loop
                await asyncio.sleep(FAILURE_BACKOFF_S)

    def _sleep_until(self, at: float) -> Coroutine[Any, Any, None]:
        return asyncio.sleep(max(0.0, at - time.perf_counter()))

    async def stages(self) -> None:
        """Applies the stages back to back, each to its planned end (no drift from late wake-ups)."""
        end = self.start
        arrivals = random.Random(self.cfg.seed + 2)
        for index, stage in enumerate(self.cfg.stages):
            now = time.perf_counter()
            self.live.stage, self.live.stage_started_at = index, now
            self.run.stage_starts_s.append(now - self.start)
            end += stage.duration_s
            self.target = stage.concurrency or 0
            for k in range(self.target):
                running = self.clients.get(k)
                if running is None or running.done():  # one still finishing from a smaller stage goes on
                    self.clients[k] = asyncio.create_task(self.client(k), name=f"bench-client-{k}")
            if stage.rate is None:
                await self._sleep_until(end)
                continue
            next_at = now
            while (next_at := next_at + arrivals.expovariate(stage.rate)) < end:
                await self._sleep_until(next_at)
                task = asyncio.create_task(self.one_request())
                self.requests.add(task)
                task.add_done_callback(self.requests.discard)
            await self._sleep_until(end)
        self.target = 0

    async def sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            self.run.samples.append(self.live.sample(time.perf_counter() - self.start))


async def run_python(cfg: BenchConfig, grace_s: float, live: Live, cpu: CpuMeter | None = None) -> Run:
    """Runs `cfg`'s stages; requests still open `grace_s` after the last stage are cut (failed: "hard deadline").

    `cpu` is sampled at the run's start and end, so its figures cover the measured duration exactly.
    """
    run = Run()
    lag_probe = asyncio.create_task(probe_loop_lag(run.lags_s), name="bench-lag-probe")
    # the most streams open at once: the largest stage, or what the arrivals may open
    limit = max(s.concurrency or cfg.max_in_flight for s in cfg.stages) + 8
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            if cpu is not None:
                cpu.start()
            load = _Load(cfg, session, live, run)
            live.started_at = load.start
            sampler = asyncio.create_task(load.sample(), name="bench-sampler")
            await load.stages()
            pending = [*load.clients.values(), *load.requests]
            _, late = await asyncio.wait(pending, timeout=grace_s) if pending else (set(), set())
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            run.duration_s = time.perf_counter() - load.start
            if cpu is not None:
                cpu.stop()
            sampler.cancel()
            run.samples.append(live.sample(run.duration_s))
    finally:
        lag_probe.cancel()
    return run
