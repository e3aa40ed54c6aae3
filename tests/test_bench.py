"""`tokenbus bench`: percentile/summary math, SSE parsing, whole runs of both clients (Python, and the C++
tokenbus-loadgen) against a real aiohttp SSE server, and the loadgen against a real sim cluster."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tools.bench.cpu import CpuMeter
from tools.bench.loadgen import LoadgenRun, loadgen_argv, loadgen_path, run_loadgen
from tools.bench.python_client import DONE, RequestResult, TokenCounter, openai_stream, parse_sse_line, plain_stream
from tools.bench.report import percentile, push_summary, summarize
from tools.bench.run import BenchConfig, run_bench, split_concurrency

needs_loadgen = pytest.mark.skipif(not loadgen_path().exists(), reason="tokenbus-loadgen not built (make build)")
# each CLI test runs with both clients; the C++ one only once built
CLIENTS = ["python", pytest.param("cpp", marks=needs_loadgen)]

# --- math --------------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 5.0
    assert percentile(values, 0.95) == pytest.approx(4.8)
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_summary_counts_failures_and_uses_successes_for_latency() -> None:
    results = [RequestResult(True, e2e_s=0.1 * i, ttft_s=0.01 * i, tokens=10) for i in range(1, 11)]
    results.append(RequestResult(False, e2e_s=9.0, ttft_s=5.0, tokens=3, error="HTTP 500"))
    s = summarize(results, concurrency=4, duration_s=2.0)
    assert s["concurrency"] == 4 and s["duration_s"] == 2.0
    assert s["requests"] == 11 and s["failures"] == 1
    assert s["tokens_per_s"] == 50.0  # 100 tokens of successful requests / 2 s
    assert s["requests_per_s"] == 5.0
    assert s["e2e_ms"]["p50"] == pytest.approx(550.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(991.0)
    assert s["ttft_ms"]["p95"] == pytest.approx(95.5)
    assert set(s) == {
        "concurrency",
        "duration_s",
        "requests",
        "failures",
        "ttft_ms",
        "e2e_ms",
        "tokens_per_s",
        "requests_per_s",
    }


def test_summary_of_nothing() -> None:
    s = summarize([], concurrency=1, duration_s=1.0)
    assert s["requests"] == 0 and s["ttft_ms"] == {"p50": None, "p95": None, "p99": None}
    json.dumps(s)  # still one valid JSON line


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
    """Streams like the proxy; the prompt picks the behaviour."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.plain_queries: list[dict[str, str]] = []
        self.unstall = asyncio.Event()  # set at teardown: ends the handlers of "stall" requests

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.payloads.append(body)
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
            if mode == "error-event":
                await resp.write(_event({"error": {"message": "replica lost"}}))
                return resp
            if mode == "incomplete":
                return resp
            if mode == "stall":  # a server that stops answering mid-stream
                await self.unstall.wait()
                return resp
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
        return await openai_stream(session, url, "demo", prompt, max_tokens, TokenCounter())


async def test_openai_stream_ok_uses_usage_tokens(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    r = await _openai(url, "ok")
    assert r.ok and r.error == ""
    assert r.tokens == 104  # from usage, not the 4 chunks
    assert r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s
    sent = fake.payloads[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and sent["max_tokens"] == 4 and sent["model"] == "demo"


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
    counter = TokenCounter()
    async with aiohttp.ClientSession() as session:
        r = await plain_stream(session, server[0], "demo", "what is it", 5, counter)
    assert r.ok and r.tokens == 4 and r.ttft_s is not None
    assert counter.chunks >= 1
    assert server[1].plain_queries == [{"max_tokens": "5"}]


async def test_run_bench_closed_loop(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    cfg = BenchConfig(url=url, model="demo", concurrency=3, duration_s=0.2, max_tokens=2, prompt="ok")
    counter = TokenCounter()
    results, duration = await run_bench(cfg, counter)
    assert len(results) >= 3  # every client starts at least one request
    assert all(r.ok and r.tokens == 102 for r in results)
    assert counter.chunks == 2 * len(results)
    assert len(fake.payloads) == len(results)
    assert duration >= 0.2


async def _run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools", "bench", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_json_line_and_plot(server: tuple[str, FakeProxy], tmp_path: Path, client: str) -> None:
    plot = tmp_path / "lat.png"
    code, out, err = await _run_cli(
        "--client",
        client,
        "--url",
        server[0],
        "--concurrency",
        "2",
        "--duration",
        "0.3",
        "--max-tokens",
        "3",
        "--prompt",
        "ok",
        "--plot",
        str(plot),
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["concurrency"] == 2 and summary["failures"] == 0 and summary["requests"] >= 2
    assert summary["requests"] == len(server[1].payloads)  # every request the server saw is counted
    assert summary["client"] == client and summary["client_loop_lag_ms"]["p50"] is not None
    assert summary["ttft_ms"]["p50"] is not None and summary["tokens_per_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT" in err  # the table goes to stderr, stdout stays one JSON line
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("concurrency", "processes", "shares"), [(256, 2, [128, 128]), (5, 2, [3, 2]), (2, 4, [1, 1]), (7, 1, [7])]
)
def test_split_concurrency(concurrency: int, processes: int, shares: list[int]) -> None:
    assert split_concurrency(concurrency, processes) == shares


async def test_bench_cli_over_several_processes_merges_their_requests(server: tuple[str, FakeProxy]) -> None:
    url, fake = server
    code, out, err = await _run_cli(
        "--client", "python", "--url", url, "-c", "4", "--processes", "2", "--duration", "0.3", "--max-tokens", "3"
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["concurrency"] == 4 and summary["failures"] == 0
    # every request any process made is in the summary: the fake server saw exactly those
    assert summary["requests"] == len(fake.payloads) >= 4
    assert summary["client_loop_lag_ms"]["p50"] is not None


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_exit_code_on_failures(server: tuple[str, FakeProxy], client: str) -> None:
    code, out, err = await _run_cli(
        "--client", client, "--url", server[0], "--concurrency", "1", "--duration", "0.1", "--prompt", "error-event"
    )
    assert code == 1
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["failures"] == summary["requests"] >= 1
    assert "replica lost" in err


@pytest.mark.parametrize("client", CLIENTS)
async def test_bench_cli_plain_endpoint(server: tuple[str, FakeProxy], client: str) -> None:
    code, out, err = await _run_cli(
        "--client", client, "--url", server[0], "--endpoint", "plain", "-c", "2", "-d", "0.1", "--max-tokens", "7"
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["requests"] >= 2
    assert all(q == {"max_tokens": "7"} for q in server[1].plain_queries)


@pytest.fixture
def pushgateway() -> Any:
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        pytest.skip("prometheus-pushgateway is not installed (Debian package prometheus-pushgateway)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


async def _wait_http_ok(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


async def test_push_summary_to_a_real_pushgateway(pushgateway: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = pushgateway
    await _wait_http_ok(f"{url}/-/ready", 20.0)
    results = [RequestResult(True, e2e_s=0.5, ttft_s=0.05, tokens=32)]
    summary = summarize(results, concurrency=8, duration_s=1.0)
    await asyncio.to_thread(push_summary, summary, url, "demo")
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    lines = [line for line in text.splitlines() if line.startswith("tokenbus_bench_")]
    assert any(line.startswith("tokenbus_bench_tokens_per_s{") and line.endswith(" 32") for line in lines), lines
    assert any('job="tokenbus_bench"' in line and 'model="demo"' in line for line in lines)
    assert any(
        line.startswith("tokenbus_bench_ttft_ms{") and 'quantile="0.5"' in line and line.endswith(" 50")
        for line in lines
    ), lines


# --- the C++ client, tokenbus-loadgen ----------------------------------------------------------------------


def _loadgen_cfg(url: str, prompt: str = "ok", max_tokens: int = 4, **kw: Any) -> BenchConfig:
    return BenchConfig(
        url=url, model="demo", concurrency=1, duration_s=0.05, max_tokens=max_tokens, prompt=prompt, **kw
    )


def test_loadgen_argv() -> None:
    cfg = replace(_loadgen_cfg("http://localhost:8011/", "--port 1"), endpoint="plain", concurrency=3)
    assert loadgen_argv(Path("/b/lg"), cfg, 2.5) == [
        "/b/lg",
        *("--host", "localhost", "--port", "8011", "--concurrency", "3", "--duration-s", "0.05"),
        *("--grace-s", "2.5", "--endpoint", "plain", "--model", "demo", "--max-tokens", "4", "--prompt", "--port 1"),
    ]
    assert loadgen_argv(Path("lg"), _loadgen_cfg("http://[::1]"), 1.0)[1:5] == ["--host", "::1", "--port", "80"]


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


async def _loadgen(cfg: BenchConfig, grace_s: float = 5.0) -> LoadgenRun:
    return await asyncio.wait_for(run_loadgen(loadgen_path(), cfg, grace_s, TokenCounter()), 60)


@needs_loadgen
@pytest.mark.parametrize(("mode", "max_tokens", "tokens"), [("ok", 4, 104), ("split", 5, 105), ("no-usage", 6, 6)])
async def test_loadgen_counts_like_the_python_client(
    server: tuple[str, FakeProxy], mode: str, max_tokens: int, tokens: int
) -> None:
    url, fake = server
    run = await _loadgen(_loadgen_cfg(url, mode, max_tokens))
    assert run.results and all(r.ok and r.tokens == tokens for r in run.results), run.results
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s for r in run.results)
    assert len(fake.payloads) == len(run.results) and run.duration_s >= 0.05
    async with aiohttp.ClientSession() as session:
        await openai_stream(session, url, "demo", mode, max_tokens, TokenCounter())
    assert all(p == fake.payloads[-1] for p in fake.payloads)  # the same request body as the Python client's


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    run_cli = _run_cli("--client", "cpp", "--url", f"http://127.0.0.1:{port}", "-c", "2", "-d", "0.3")
    code, out, err = await asyncio.wait_for(run_cli, 30)
    assert code == 1
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["requests"] == summary["failures"] >= 2
    assert "connect: Connection refused" in err


@needs_loadgen
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--url", "http://127.0.0.1:notaport"), "--url 'http://127.0.0.1:notaport'"),
        (("--url", "http://127.0.0.1:1/v1"), "no path"),
        (("--processes", "2"), "--processes applies to --client python only"),
    ],
)
async def test_bench_cli_cpp_usage_errors(args: tuple[str, ...], error: str) -> None:
    code, out, err = await asyncio.wait_for(_run_cli("--client", "cpp", "-d", "0.1", *args), 30)
    assert code == 2 and out == ""
    assert error in err


# --- the C++ client against a real sim cluster -------------------------------------------------------------

SIM_MAX_TOKENS = 16


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not loadgen_path().exists():
        pytest.skip("tokenbus-loadgen not built (make build)")
    from cluster_harness import deployed_cluster

    spec = {"name": "demo", "engine": "sim", "engine_args": {"token_delay_ms": 2}, "max_concurrency": 128}
    with deployed_cluster(tmp_path_factory.mktemp("bench-cluster"), spec) as (c, _):
        yield c


@pytest.mark.timeout(180)
@pytest.mark.parametrize("endpoint", ["chat", "plain"])
async def test_loadgen_against_a_sim_cluster(sim_cluster: Any, endpoint: str) -> None:
    cfg = BenchConfig(sim_cluster.proxy_url, "demo", concurrency=16, duration_s=1.0, max_tokens=SIM_MAX_TOKENS)
    counter = TokenCounter()
    seen: list[RequestResult] = []
    cpu = CpuMeter([])
    lags: list[float] = []
    run = await asyncio.wait_for(
        run_loadgen(loadgen_path(), replace(cfg, endpoint=endpoint), 30.0, counter, seen.append, cpu, lags), 120
    )
    assert len(run.results) >= 16 and seen == run.results
    errors = {r.error for r in run.results if not r.ok}
    assert not errors, f"{errors}\n{sim_cluster.logs()}"
    assert all(r.tokens == SIM_MAX_TOKENS for r in run.results)
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s for r in run.results)
    # the last progress line's running total: words (plain), or content chunks (chat), which the proxy may
    # coalesce under backpressure (usage still counts every token)
    if endpoint == "plain":
        assert counter.chunks == SIM_MAX_TOKENS * len(run.results)
    else:
        assert 0 < counter.chunks <= SIM_MAX_TOKENS * len(run.results)
    assert max(r.e2e_s - r.ttft_s for r in run.results if r.ttft_s is not None) > 0.01  # tokens timed as they came
    assert 1.0 <= run.duration_s < 30.0 and run.cpu_s > 0 and lags


@pytest.mark.timeout(180)
async def test_bench_cli_cpp_against_a_sim_cluster(sim_cluster: Any) -> None:
    url = sim_cluster.proxy_url
    args = ("--client", "cpp", "--url", url, "-c", "32", "-d", "1", "--max-tokens", str(SIM_MAX_TOKENS))
    code, out, err = await asyncio.wait_for(_run_cli(*args, "--cpu-pids", "auto"), 120)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["client"] == "cpp" and summary["failures"] == 0 and summary["requests"] >= 32
    expected_rate = summary["requests"] * SIM_MAX_TOKENS / summary["duration_s"]
    assert summary["tokens_per_s"] == pytest.approx(expected_rate, rel=0.01)
    assert summary["cpu_cores"]["client"] > 0 and summary["cpu_cores"]["by_kind"]["proxy"] > 0
    assert summary["cpu_cores"]["client_processes"] == 2  # this process and the loadgen
    assert "bench client (not in total)" in err
