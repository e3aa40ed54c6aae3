"""`tokenbus bench`: stage and distribution specs, percentile and per-stage math, SSE parsing, whole runs of
both clients (the Python fallback, and the C++ tokenbus-loadgen) against a real aiohttp SSE server, the
Pushgateway push, and runs against a real sim cluster: stages, open-loop rate, the TTFT's hops."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tools.bench.load import BenchConfig, LengthDist, Stage, format_stages, parse_dist, parse_stages
from tools.bench.loadgen import loadgen_argv, loadgen_path, run_loadgen
from tools.bench.python_client import (
    DONE,
    RequestTimer,
    openai_stream,
    parse_sse_line,
    plain_stream,
    run_python,
)
from tools.bench.records import HOPS, STAMPS, Live, RequestResult, Run, hops_from_stamps
from tools.bench.report import percentile, result, stage_bounds, summarize

needs_loadgen = pytest.mark.skipif(not loadgen_path().exists(), reason="tokenbus-loadgen not built (make build)")
# each CLI test runs with both clients; the C++ one only once built
CLIENTS = ["python", pytest.param("cpp", marks=needs_loadgen)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- specs ------------------------------------------------------------------------------------------------


def test_parse_stages() -> None:
    assert parse_stages("64:20s,256:1.5s, 8:2m,4:3") == (
        Stage(20.0, concurrency=64),
        Stage(1.5, concurrency=256),
        Stage(120.0, concurrency=8),
        Stage(3.0, concurrency=4),
    )
    assert format_stages(parse_stages("64:20s,256:1.5s")) == "64:20.0s,256:1.5s"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("64", "'64' is not CONCURRENCY:SECONDS"),
        ("64:20s,x:1s", "'x:1s' is not"),
        ("64:20h", "'64:20h' is not"),
        ("0:1s", "'0:1s': concurrency must be from 1"),
        ("8:0s", "'8:0s': the duration must be more than 0"),
        ("64:20s,", "'' is not"),
    ],
)
def test_parse_stages_names_the_bad_part(spec: str, problem: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=problem):
        parse_stages(spec)


@pytest.mark.parametrize(
    ("spec", "lo", "hi"),
    [("fixed:7", 7, 7), ("uniform:3:9", 3, 9), ("normal:2:50", 1, 400), ("lognormal:16:0.5", 1, 1000)],
)
def test_length_dists_draw_in_range_and_repeat_with_the_seed(spec: str, lo: int, hi: int) -> None:
    dist = parse_dist(spec)
    assert str(dist) == spec
    draws = [dist.draw(random.Random(3)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    many = [dist.draw(rng) for rng in [random.Random(1)] for _ in range(2000)]
    assert all(lo <= v <= hi for v in many)
    if spec.startswith("normal"):
        assert min(many) == 1  # clamped, not negative
    if spec.startswith("lognormal"):
        assert 14 <= percentile(many, 0.5) <= 18  # the median is the median


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("poisson:3", "wants fixed:N, uniform:A:B"),
        ("fixed", "wants fixed:N"),
        ("fixed:0", "N an integer >= 1"),
        ("fixed:2.5", "N an integer >= 1"),
        ("uniform:9:3", "1 <= A <= B"),
        ("normal:10:x", "wants normal:MEAN:SD"),
        ("lognormal:0:1", "MEDIAN > 0"),
        ("normal:nan:1", "wants normal:MEAN:SD"),
    ],
)
def test_parse_dist_refuses(spec: str, problem: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=problem):
        parse_dist(spec)


# --- math --------------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 5.0
    assert percentile(values, 0.95) == pytest.approx(4.8)
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def _stamps(*gaps_ns: int) -> dict[str, int]:
    """Stamps `gaps_ns` apart, from an arbitrary wall-clock start."""
    t = 1_700_000_000_000_000_000
    out = {}
    for name, gap in zip(STAMPS, (0, *gaps_ns), strict=True):
        t += gap
        out[f"{name}_ns"] = t
    return out


def test_hops_add_up_to_the_proxy_ttft() -> None:
    stamps = _stamps(1000, 2000, 3000, 4_000_000, 5000, 6000)
    hops = hops_from_stamps(stamps)
    assert list(hops) == list(HOPS)
    assert hops["engine"] == pytest.approx(0.004) and hops["queue_and_route"] == pytest.approx(1e-6)
    total = (stamps["proxy_sent_ns"] - stamps["proxy_received_ns"]) / 1e9
    assert sum(v for v in hops.values() if v is not None) == pytest.approx(total)
    stamps["engine_produced_ns"] = 0  # a worker that does not stamp: the two hops around it are unknown
    hops = hops_from_stamps(stamps)
    assert hops["engine"] is None and hops["ring_to_replica"] is None
    assert hops["replica_to_ring"] == pytest.approx(3e-6) and hops["replica_to_client"] == pytest.approx(6e-6)


def test_summary_counts_failures_and_uses_successes_for_latency() -> None:
    results = [
        RequestResult(True, e2e_s=0.1 * i, ttft_s=0.01 * i, tokens=10, chunks=5, itl_sum_s=0.04 * i)
        for i in range(1, 11)
    ]
    results.append(RequestResult(False, e2e_s=9.0, ttft_s=5.0, tokens=3, error="HTTP 500"))
    s = summarize(results, duration_s=2.0, concurrency=4)
    assert s["concurrency"] == 4 and s["rate"] is None and s["duration_s"] == 2.0
    assert s["requests"] == 11 and s["failures"] == 1
    assert s["tokens_per_s"] == 50.0  # 100 tokens of successful requests / 2 s
    assert s["requests_per_s"] == 5.0
    assert s["e2e_ms"]["p50"] == pytest.approx(550.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(991.0)
    assert s["ttft_ms"]["p95"] == pytest.approx(95.5)
    assert s["itl_ms"]["p50"] == pytest.approx(55.0)  # each request's mean gap: 0.04 i s over 4 gaps
    assert s["hops_ms"] == {} and s["proxy_ttft_ms"] == {"p50": None, "p95": None}


def test_summary_of_hops() -> None:
    results = [
        RequestResult(True, 1.0, 0.1, hops_s=hops_from_stamps(_stamps(*[i * 1_000_000] * 6)), proxy_ttft_s=0.006 * i)
        for i in range(1, 5)
    ]
    results.append(RequestResult(True, 1.0, 0.1))  # no timing comment: not in the hops
    s = summarize(results, 1.0)
    assert list(s["hops_ms"]) == list(HOPS)
    assert s["hops_ms"]["engine"] == {"p50": 2.5, "p95": 3.85}
    assert s["proxy_ttft_ms"] == {"p50": 15.0, "p95": pytest.approx(23.1)}


def test_result_splits_requests_by_the_stage_they_started_in() -> None:
    cfg = BenchConfig("http://h", "demo", parse_stages("4:1s,8:2s,2:1s"))
    run = Run(
        results=[
            RequestResult(True, 0.5, 0.1, tokens=10, start_s=0.2, stage=0),
            RequestResult(True, 0.5, 0.1, tokens=10, start_s=0.9, stage=0),  # ends in stage 1: counts in 0
            RequestResult(False, 0.1, error="HTTP 503", start_s=1.5, stage=1),
            RequestResult(True, 0.5, 0.1, tokens=30, start_s=3.2, stage=2),
        ],
        stage_starts_s=[0.0, 1.0, 3.0],
        duration_s=4.5,
    )
    assert stage_bounds(run) == [(0.0, 1.0), (1.0, 3.0), (3.0, 4.5)]
    res = result(cfg, run, "python")
    assert [(s["index"], s["concurrency"], s["requests"], s["failures"]) for s in res["stages"]] == [
        (0, 4, 2, 0),
        (1, 8, 1, 1),
        (2, 2, 1, 0),
    ]
    assert [s["tokens_per_s"] for s in res["stages"]] == [20.0, 0.0, 20.0]  # the last stage: to the run's end
    assert res["overall"]["requests"] == 4 and res["overall"]["concurrency"] is None  # no one concurrency
    assert res["errors"] == {"HTTP 503": 1}
    assert res["config"]["stages"][1] == {"concurrency": 8, "rate": None, "duration_s": 2.0}
    json.dumps(res)


def test_result_of_nothing() -> None:
    cfg = BenchConfig("http://h", "demo", (Stage(1.0, concurrency=1),))
    res = result(cfg, Run(stage_starts_s=[0.0], duration_s=1.0), "cpp")
    assert res["overall"]["requests"] == 0 and res["overall"]["concurrency"] == 1
    assert res["stages"][0]["ttft_ms"] == {"p50": None, "p95": None, "p99": None}
    json.dumps(res)  # still one valid JSON line


def test_parse_sse_line() -> None:
    assert parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_sse_line(b'data:{"a":2}\r\n') == {"a": 2}
    assert parse_sse_line(b"data: [DONE]\n") is DONE
    assert parse_sse_line(b": keep-alive\n") is None
    assert parse_sse_line(b"\n") is None
    assert parse_sse_line(b"event: message\n") is None
    with pytest.raises(ValueError):
        parse_sse_line(b"data: {not json\n")


# --- a tiny real SSE server --------------------------------------------------------------------------------


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeProxy:
    """Streams like the proxy, timing comment included; the prompt picks the behaviour."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.timing_headers: list[str | None] = []
        self.plain_queries: list[dict[str, str]] = []
        self.unstall = asyncio.Event()  # set at teardown: ends the handlers of "stall" requests

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.payloads.append(body)
        self.timing_headers.append(request.headers.get("X-Tokenbus-Timing"))
        mode = body["messages"][0]["content"]
        if mode == "http-500":
            return web.json_response({"error": {"message": "engine failed"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": hello\n\n")
        await resp.write(_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        n = body["max_tokens"]
        for i in range(n):
            event = _event({"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]})
            if mode == "split":  # an event cut across network reads
                await resp.write(event[:9])
                event = event[9:]
            if mode == "huge-line":
                event = b"data: " + b"x" * (2 << 20)
            await resp.write(event)
            if i == 0 and request.headers.get("X-Tokenbus-Timing") == "1":
                stamps = _stamps(1000, 2000, 3000, 4000, 5000, 6000)
                await resp.write(b": tokenbus-timing " + json.dumps(stamps).encode() + b"\n\n")
            if mode == "error-event":
                await resp.write(_event({"error": {"message": "replica lost"}}))
                return resp
            if mode == "incomplete":
                return resp
            if mode == "stall":  # a server that stops answering mid-stream
                await self.unstall.wait()
                return resp
            await asyncio.sleep(0.001)  # tokens apart in time, as an engine makes them
        await resp.write(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
        if mode != "no-usage":
            usage = {"prompt_tokens": 2, "completion_tokens": n + 100, "total_tokens": n + 102}
            await resp.write(_event({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def plain(self, request: web.Request) -> web.StreamResponse:
        prompt = await request.text()
        self.plain_queries.append(dict(request.query))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for word in (" alpha", " beta", " gamma"):
            await resp.write(word.encode())
        await resp.write(f" ({len(prompt.split())})".encode())
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, FakeProxy]]:
    fake = FakeProxy()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_post("/v1/chat/{model}", fake.plain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", fake
    fake.unstall.set()
    await runner.cleanup()


async def _openai(url: str, prompt: str, max_tokens: int = 4) -> RequestResult:
    async with aiohttp.ClientSession() as session:
        timer = RequestTimer(time.perf_counter(), 0, Live())
        return await openai_stream(session, url, "demo", prompt, max_tokens, timer)


async def test_openai_stream_ok_uses_usage_tokens_and_reads_the_timing(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    r = await _openai(url, "ok")
    assert r.ok and r.error == ""
    assert r.tokens == 104  # from usage, not the 4 chunks
    assert r.chunks == 4 and 0 < r.itl_max_s <= r.itl_sum_s < r.e2e_s
    assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s
    assert r.hops_s is not None and r.hops_s["engine"] == pytest.approx(4e-6)
    assert r.proxy_ttft_s == pytest.approx(21e-6)
    sent = fake.payloads[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and sent["max_tokens"] == 4 and sent["model"] == "demo"
    assert fake.timing_headers == ["1"]


async def test_openai_stream_joins_lines_split_across_reads(server: tuple[str, FakeProxy]) -> None:
    r = await _openai(server[0], "split", max_tokens=5)
    assert r.ok and r.tokens == 105


async def test_openai_stream_refuses_an_endless_line(server: tuple[str, FakeProxy]) -> None:
    r = await _openai(server[0], "huge-line", max_tokens=1)
    assert not r.ok and "longer than" in r.error


async def test_openai_stream_counts_chunks_without_usage(server: tuple[str, FakeProxy]) -> None:
    r = await _openai(server[0], "no-usage", max_tokens=6)
    assert r.ok and r.tokens == 6


@pytest.mark.parametrize(
    ("mode", "error"),
    [("http-500", "HTTP 500: "), ("error-event", "error event: "), ("incomplete", "incomplete stream")],
)
async def test_openai_stream_failures(server: tuple[str, FakeProxy], mode: str, error: str) -> None:
    r = await _openai(server[0], mode)
    assert not r.ok
    assert r.error.startswith(error)


async def test_openai_stream_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = await _openai(f"http://127.0.0.1:{port}", "ok")
    assert not r.ok and "ClientConnectorError" in r.error


async def test_plain_stream(server: tuple[str, FakeProxy]) -> None:
    live = Live()
    async with aiohttp.ClientSession() as session:
        r = await plain_stream(session, server[0], "demo", "what is it", 5, RequestTimer(0.0, 2, live))
    assert r.ok and r.tokens == 4 and r.ttft_s is not None and r.stage == 2
    assert live.tokens >= 1
    assert server[1].plain_queries == [{"max_tokens": "5"}]


async def test_python_client_runs_the_stages_one_after_the_other(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    cfg = BenchConfig(url, "demo", parse_stages("3:0.3s,1:0.3s,2:0.3s"), max_tokens=parse_dist("fixed:2"), prompt="ok")
    live = Live()
    run = await run_python(cfg, 5.0, live)
    assert len(run.stage_starts_s) == 3
    assert run.stage_starts_s[1] == pytest.approx(0.3, abs=0.1) and run.stage_starts_s[2] == pytest.approx(0.6, abs=0.1)
    assert all(r.ok and r.tokens == 102 for r in run.results)
    assert len(fake.payloads) == len(run.results) == live.requests
    for index, (start, end) in enumerate(stage_bounds(run)):
        mine = [r for r in run.results if r.stage == index]
        assert len(mine) >= cfg.stages[index].concurrency  # every client of the stage started a request
        assert all(start <= r.start_s < end for r in mine)
    # in flight never above the stage's clients, once a smaller stage's leftovers have finished
    assert max(s.in_flight for s in run.samples) <= 3 and run.samples[-1].in_flight == 0
    assert run.duration_s >= 0.9 and run.lags_s


async def test_python_client_open_loop_rate_and_drawn_lengths(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    stages = (Stage(1.0, rate=40.0),)
    cfg = BenchConfig(url, "demo", stages, max_tokens=parse_dist("uniform:1:6"), prompt_len=parse_dist("fixed:5"))
    run = await run_python(cfg, 5.0, Live())
    assert 20 <= len(run.results) <= 70  # Poisson: 40 expected, the band is > 4 standard deviations wide
    assert all(r.ok for r in run.results)
    assert {p["max_tokens"] for p in fake.payloads} <= set(range(1, 7)) and len(
        {p["max_tokens"] for p in fake.payloads}
    ) > 1
    assert all(len(p["messages"][0]["content"].split()) == 5 for p in fake.payloads)
    starts = sorted(r.start_s for r in run.results)
    assert starts[-1] < 1.0 + 0.2  # no arrival after the stage


async def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools", "bench", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_stages_json_and_plot(server: tuple[str, FakeProxy], tmp_path: Path, client: str) -> None:
    plot, out_json = tmp_path / "timeline.png", tmp_path / "result.json"
    args = ("--client", client, "--url", server[0], "--stages", "2:0.5s,3:0.5s", "--max-tokens", "3")
    code, out, err = await _run_cli(*args, "--prompt", "ok", "--plot", str(plot), "--json", str(out_json))
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert len(out.strip().splitlines()) == 1  # the tables go to stderr, stdout stays one JSON line
    assert json.loads(out_json.read_text()) == res
    assert [(s["index"], s["concurrency"]) for s in res["stages"]] == [(0, 2), (1, 3)]
    overall = res["overall"]
    assert overall["failures"] == 0 and overall["requests"] == len(server[1].payloads)
    assert sum(s["requests"] for s in res["stages"]) == overall["requests"]
    assert res["config"]["client"] == client and res["client_loop_lag_ms"]["p50"] is not None
    assert overall["ttft_ms"]["p50"] is not None and overall["itl_ms"]["p95"] is not None
    assert overall["tokens_per_s"] > 0
    assert set(overall["hops_ms"]) == set(HOPS)  # the fake answers the timing header
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000
    assert "stage 0: 2 streams" in err and "stage 1: 3 streams" in err and "TTFT hop engine" in err


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_exit_code_on_failures(server: tuple[str, FakeProxy], client: str) -> None:
    code, out, err = await _run_cli(
        "--client", client, "--url", server[0], "--concurrency", "1", "--duration", "0.1", "--prompt", "error-event"
    )
    assert code == 1
    overall = json.loads(out.strip().splitlines()[-1])["overall"]
    assert overall["failures"] == overall["requests"] >= 1
    assert "replica lost" in err


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_plain_endpoint(server: tuple[str, FakeProxy], client: str) -> None:
    code, out, err = await _run_cli(
        "--client", client, "--url", server[0], "--endpoint", "plain", "-c", "2", "-d", "0.1", "--max-tokens", "7"
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["overall"]["requests"] >= 2
    assert all(q == {"max_tokens": "7"} for q in server[1].plain_queries)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--stages", "64:20s,x"), "argument --stages: 'x' is not CONCURRENCY:SECONDS"),
        (("--stages", "4:1s", "-c", "3"), "not allowed with argument --stages"),
        (("--rate", "3", "-c", "3"), "not allowed with argument --rate"),
        (("--stages", "4:1s", "-d", "3"), "--stages gives each stage its duration"),
        (("--max-tokens-dist", "uniform:5:2"), "argument --max-tokens-dist: 'uniform:5:2': wants 1 <= A <= B"),
        (("--prompt-len-dist", "fixed:2", "--prompt", "hi"), "not allowed with argument --prompt-len-dist"),
    ],
)
async def test_bench_cli_usage_errors(args: tuple[str, ...], error: str) -> None:
    code, out, err = await _run_cli("--client", "python", *args)
    assert code == 2 and out == ""
    assert error in " ".join(err.split())


# --- the Pushgateway, through the CLI ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _get_text(url: str, deadline_s: float) -> str:
    """GET `url` until it answers 200 (the process may still be starting)."""
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return await resp.text()
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


@pytest.fixture
def pushgateway() -> Any:
    """Debian's prometheus-pushgateway on a free port (make deps installs it), without the persistence file
    Debian's build defaults to (/var/lib/prometheus/pushgateway.data, shared by every run)."""
    port = _free_port()
    proc = subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_pushes_per_stage_results_promtool_accepts(
    server: tuple[str, FakeProxy], pushgateway: str, client: str
) -> None:
    await _get_text(f"{pushgateway}/-/ready", 20.0)
    args = ("--client", client, "--url", server[0], "--model", "m1", "--stages", "1:0.3s,2:0.3s")
    code, out, err = await _run_cli(*args, "--max-tokens", "3", "--prompt", "ok", "--pushgateway", pushgateway)
    assert code == 0, err
    res = json.loads(out)
    text = await _get_text(f"{pushgateway}/metrics", 5.0)
    ours = [line for line in text.splitlines() if "tokenbus_bench_" in line]
    samples = [line for line in ours if not line.startswith("#")]
    assert all('job="tokenbus_bench"' in line and 'model="m1"' in line for line in samples), samples
    assert not any("quantile=" in line for line in ours)

    def value(name: str, **labels: str) -> float:
        for line in samples:
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name}{labels} not pushed:\n" + "\n".join(samples))

    for stage in res["stages"]:
        i = str(stage["index"])
        assert value("tokenbus_bench_requests", stage=i) == stage["requests"]
        assert value("tokenbus_bench_stage_concurrency", stage=i) == stage["concurrency"]
        assert value("tokenbus_bench_ttft_p95_seconds", stage=i) == pytest.approx(stage["ttft_ms"]["p95"] / 1000)
        engine_p50 = value("tokenbus_bench_ttft_hop_p50_seconds", stage=i, hop="engine")
        assert engine_p50 == pytest.approx(stage["hops_ms"]["engine"]["p50"] / 1000)
    assert value("tokenbus_bench_last_run_timestamp_seconds") == pytest.approx(time.time(), abs=120)
    # promtool's lint of what the gateway serves for us (names, units, types, help)
    exposition = "\n".join(ours) + "\n"
    check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


# --- the C++ client, tokenbus-loadgen ----------------------------------------------------------------------


def _loadgen_cfg(url: str, prompt: str = "ok", max_tokens: int = 4, **kw: Any) -> BenchConfig:
    stages = (Stage(0.05, concurrency=1),)
    return BenchConfig(url, "demo", stages, max_tokens=LengthDist("fixed", (max_tokens,)), prompt=prompt, **kw)


def test_loadgen_argv() -> None:
    cfg = replace(_loadgen_cfg("http://localhost:8011/", "--port 1"), endpoint="plain", stages=parse_stages("3:1s"))
    assert loadgen_argv(Path("/b/lg"), cfg, 2.5) == [
        "/b/lg",
        *("--host", "localhost", "--port", "8011", "--stages", "3:1.0s", "--grace-s", "2.5"),
        *("--max-in-flight", "10000", "--endpoint", "plain", "--model", "demo", "--seed", "0", "--timing"),
        *("--max-tokens", "4", "--prompt", "--port 1"),
    ]
    assert loadgen_argv(Path("lg"), _loadgen_cfg("http://[::1]"), 1.0)[1:5] == ["--host", "::1", "--port", "80"]
    drawn = replace(
        _loadgen_cfg("http://h:1"),
        stages=(Stage(2.0, rate=12.5),),
        max_tokens=parse_dist("lognormal:16:0.5"),
        prompt_len=parse_dist("uniform:10:200"),
        seed=7,
    )
    argv = loadgen_argv(Path("lg"), drawn, 1.0)
    assert argv[5:9] == ["--rate", "12.5", "--duration-s", "2.0"]
    assert argv[-4:] == ["--max-tokens-dist", "lognormal:16:0.5", "--prompt-len-dist", "uniform:10:200"]
    assert "--seed" in argv and argv[argv.index("--seed") + 1] == "7"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://h:1", "wants http://HOST"),
        ("h:1", "wants http://HOST"),
        ("http://h:1/proxy", "no path"),
        ("http://h:99999", "out of range"),
        ("http://h:x", "--url 'http://h:x'"),
    ],
)
def test_loadgen_argv_refuses_urls_it_cannot_serve(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        loadgen_argv(Path("lg"), _loadgen_cfg(url), 1.0)


async def _loadgen(cfg: BenchConfig, grace_s: float = 5.0) -> Run:
    return await asyncio.wait_for(run_loadgen(loadgen_path(), cfg, grace_s, Live()), 60)


async def _python(cfg: BenchConfig) -> RequestResult:
    async with aiohttp.ClientSession() as session:
        timer = RequestTimer(time.perf_counter(), 0, Live())
        return await openai_stream(session, cfg.url, "demo", cfg.prompt, int(cfg.max_tokens.params[0]), timer)


@needs_loadgen
@pytest.mark.parametrize(("mode", "max_tokens", "tokens"), [("ok", 4, 104), ("split", 5, 105), ("no-usage", 6, 6)])
async def test_loadgen_measures_like_the_python_client(
    server: tuple[str, FakeProxy], mode: str, max_tokens: int, tokens: int
) -> None:
    url, fake = server
    cfg = _loadgen_cfg(url, mode, max_tokens)
    run = await _loadgen(cfg)
    assert run.results and all(r.ok and r.tokens == tokens for r in run.results), run.results
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s for r in run.results)
    assert all(r.chunks == max_tokens and 0 < r.itl_sum_s < r.e2e_s for r in run.results)
    assert len(fake.payloads) == len(run.results) and run.duration_s >= 0.05
    python = await _python(cfg)
    assert all(p == fake.payloads[-1] for p in fake.payloads)  # the same request body as the Python client's
    assert all(r.hops_s == python.hops_s and r.proxy_ttft_s == python.proxy_ttft_s for r in run.results)


@needs_loadgen
@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("http-500", 'HTTP 500: {"error": {"message": "engine failed"}}'),
        ("error-event", 'error event: {"message":"replica lost"}'),
        ("incomplete", "incomplete stream (no [DONE])"),
        ("huge-line", "an SSE line longer than 1048576 bytes"),
    ],
)
async def test_loadgen_failures(server: tuple[str, FakeProxy], mode: str, error: str) -> None:
    run = await _loadgen(_loadgen_cfg(server[0], mode))
    assert run.results and all(not r.ok and r.error == error for r in run.results), run.results
    assert len(server[1].payloads) == len(run.results)  # a failed connection is replaced, not reused mid-message


@needs_loadgen
async def test_loadgen_cuts_a_stalled_stream_at_the_hard_deadline(server: tuple[str, FakeProxy]) -> None:
    start = time.monotonic()
    run = await _loadgen(_loadgen_cfg(server[0], "stall"), grace_s=0.3)
    assert [(r.ok, r.tokens, r.error) for r in run.results] == [(False, 1, "hard deadline")]
    assert run.results[0].ttft_s is not None
    assert time.monotonic() - start < 10.0


@needs_loadgen
async def test_loadgen_refused_connections_are_failures_not_a_hang() -> None:
    code, out, err = await _run_cli(
        "--client", "cpp", "--url", f"http://127.0.0.1:{_free_port()}", "-c", "2", "-d", "0.3"
    )
    assert code == 1
    overall = json.loads(out.strip().splitlines()[-1])["overall"]
    assert overall["requests"] == overall["failures"] >= 2
    assert "connect: Connection refused" in err


@needs_loadgen
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--url", "http://127.0.0.1:notaport"), "--url 'http://127.0.0.1:notaport'"),
        (("--url", "http://127.0.0.1:1/v1"), "no path"),
    ],
)
async def test_bench_cli_cpp_usage_errors(args: tuple[str, ...], error: str) -> None:
    code, out, err = await _run_cli("--client", "cpp", "-d", "0.1", *args)
    assert code == 2 and out == ""
    assert error in err
