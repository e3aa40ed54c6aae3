"""`tokenbus bench`: closed-loop streaming load, C clients for D seconds, latency percentiles and throughput."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import uvloop
from rich.console import Console
from rich.live import Live
from rich.text import Text

from tools.arg_types import positive_float, positive_int
from tools.bench.cpu import CpuMeter, parse_pids
from tools.bench.loadgen import LoadgenError, loadgen_path, run_loadgen
from tools.bench.python_client import RequestResult, TokenCounter, openai_stream, plain_stream
from tools.bench.report import cpu_table, plot_latencies, push_summary, quantiles_ms, summarize, summary_table

HARD_DEADLINE_EXTRA_S = 30.0  # requests still open this long after the duration are cut and count as failures
PROGRESS_INTERVAL_S = 0.5
FAILURE_BACKOFF_S = 0.05
LAG_PROBE_INTERVAL_S = 0.01  # how often the client measures its own event loop's lag

T = TypeVar("T")


@dataclass(frozen=True)
class BenchConfig:
    url: str
    model: str
    concurrency: int
    duration_s: float
    max_tokens: int = 32
    endpoint: str = "chat"  # chat: OpenAI SSE; plain: /v1/chat/{model}
    prompt: str = "What is machine learning?"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="closed-loop streaming load against a proxy; latency and throughput")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the proxy's base URL")
    p.add_argument("--model", default="demo", help="deployment name")
    p.add_argument("--concurrency", "-c", type=positive_int, default=16, help="concurrent streaming clients")
    p.add_argument("--duration", "-d", type=positive_float, default=10.0, help="seconds to start requests for")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per request")
    p.add_argument("--endpoint", choices=("chat", "plain"), default="chat", help="OpenAI SSE or plain text")
    p.add_argument("--prompt", default="What is machine learning?")
    p.add_argument(
        "--client",
        choices=("cpp", "python"),
        help=f"cpp: the C++ {loadgen_path().name} from the binaries' directory, one thread (the default when "
        "it is built); python: aiohttp clients in this process (and --processes helpers)",
    )
    p.add_argument(
        "--processes",
        "-p",
        type=positive_int,
        default=1,
        help="--client python only: split the clients over this many processes (one Python event loop lags "
        "behind hundreds of streams); --client cpp refuses more than 1 (its one thread carries thousands)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="write TTFT and end-to-end latency histograms here")
    p.add_argument("--pushgateway", metavar="URL", help="push the summary to this Prometheus Pushgateway")
    p.add_argument(
        "--cpu-pids",
        metavar="auto|PID,...",
        help="report the CPU cores these processes used during the run (auto: this user's tokenbus processes)",
    )
    p.set_defaults(func=main)


async def run_bench(
    cfg: BenchConfig,
    counter: TokenCounter,
    on_result: Callable[[RequestResult], None] | None = None,
    cpu: CpuMeter | None = None,
) -> tuple[list[RequestResult], float]:
    """Every request's result and the measured duration (first start to last end, or the hard deadline).

    `cpu` is sampled at the same two moments, so its figures cover the measured duration exactly.
    """
    results: list[RequestResult] = []
    url = cfg.url.rstrip("/")
    if cpu is not None:
        cpu.start()
    start = time.perf_counter()
    stop_starting_at = start + cfg.duration_s
    connector = aiohttp.TCPConnector(limit=cfg.concurrency + 8, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def one_request() -> Coroutine[Any, Any, RequestResult]:
            if cfg.endpoint == "plain":
                return plain_stream(session, url, cfg.model, cfg.prompt, cfg.max_tokens, counter)
            return openai_stream(session, url, cfg.model, cfg.prompt, cfg.max_tokens, counter)

        async def client() -> None:
            while time.perf_counter() < stop_starting_at:
                request_start = time.perf_counter()
                try:
                    result = await one_request()
                except asyncio.CancelledError:
                    results.append(RequestResult(False, time.perf_counter() - request_start, error="hard deadline"))
                    raise
                results.append(result)
                if on_result is not None:
                    on_result(result)
                if not result.ok:  # a refusing server would otherwise be hammered in a tight loop
                    await asyncio.sleep(FAILURE_BACKOFF_S)

        clients = [asyncio.create_task(client(), name=f"bench-client-{i}") for i in range(cfg.concurrency)]
        _, late = await asyncio.wait(clients, timeout=cfg.duration_s + HARD_DEADLINE_EXTRA_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    duration_s = time.perf_counter() - start
    if cpu is not None:
        cpu.stop()
    return results, duration_s


async def probe_loop_lag(lags: list[float]) -> None:
    """Appends how late each 10 ms sleep of this event loop woke up: the wait any ready stream saw too."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_INTERVAL_S
        await asyncio.sleep(LAG_PROBE_INTERVAL_S)
        lags.append(loop.time() - due)


def split_concurrency(concurrency: int, processes: int) -> list[int]:
    """Clients per process, as even as possible, none empty."""
    processes = min(processes, concurrency)
    return [concurrency // processes + (i < concurrency % processes) for i in range(processes)]


@dataclass(frozen=True)
class HelperRun:
    """What a helper process sends back: its requests, its loop lag and the CPU it used."""

    results: list[RequestResult]
    duration_s: float
    lags: list[float]
    cpu_s: float


def _helper_ready() -> None:
    """Run once in each helper before the load starts, so process start-up and imports are not in the window."""


def _helper_process(cfg: BenchConfig) -> HelperRun:
    """A helper process's share of the clients, on its own event loop."""
    cpu_start = time.process_time()
    lags: list[float] = []

    async def run() -> tuple[list[RequestResult], float]:
        probe = asyncio.create_task(probe_loop_lag(lags), name="bench-lag-probe")
        try:
            return await run_bench(cfg, TokenCounter())
        finally:
            probe.cancel()

    results, duration_s = uvloop.run(run())
    return HelperRun(results, duration_s, lags, time.process_time() - cpu_start)


class Progress:
    """What the live line shows: finished and failed requests, and content tokens so far (for tok/s)."""

    def __init__(self) -> None:
        self.counter = TokenCounter()
        self.done = 0
        self.failures = 0

    def on_result(self, result: RequestResult) -> None:
        self.done += 1
        self.failures += not result.ok


async def _with_progress(cfg: BenchConfig, console: Console, progress: Progress, work: Awaitable[T]) -> T:
    """Awaits `work` under a live line of its progress."""

    async def tick(live: Live) -> None:
        start = last_at = time.perf_counter()
        last_chunks = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            now = time.perf_counter()
            chunks = progress.counter.chunks
            rate = (chunks - last_chunks) / (now - last_at)
            last_chunks, last_at = chunks, now
            live.update(
                Text(
                    f"elapsed {now - start:5.1f}/{cfg.duration_s:.0f} s   requests {progress.done}   "
                    f"failures {progress.failures}   {rate:8.0f} tok/s"
                )
            )

    with Live(Text("starting..."), console=console, refresh_per_second=4, transient=True) as live:
        ticker = asyncio.create_task(tick(live), name="bench-progress")
        try:
            return await work
        finally:
            ticker.cancel()


async def _python_clients(
    cfg: BenchConfig, console: Console, cpu: CpuMeter | None, lags: list[float]
) -> tuple[list[RequestResult], float]:
    progress = Progress()
    lag_probe = asyncio.create_task(probe_loop_lag(lags), name="bench-lag-probe")
    try:
        return await _with_progress(cfg, console, progress, run_bench(cfg, progress.counter, progress.on_result, cpu))
    finally:
        lag_probe.cancel()


@dataclass(frozen=True)
class ClientRun:
    results: list[RequestResult]
    duration_s: float
    extra_cpu_s: float  # CPU seconds of the client's processes other than this one (helpers, or the loadgen)
    processes: int  # client processes in all, this one included


def _run_python(
    cfg: BenchConfig, processes: int, console: Console, cpu: CpuMeter | None, lags: list[float]
) -> ClientRun:
    """A run by the Python clients: this process and `processes - 1` helpers."""
    own_share, *helper_shares = split_concurrency(cfg.concurrency, processes)
    helper_cpu_s = 0.0
    # spawn, not fork: a forked child would inherit this process's state (rich Live, loops) mid-use
    with ProcessPoolExecutor(max(1, len(helper_shares)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for ready in [pool.submit(_helper_ready) for _ in helper_shares]:
            ready.result()
        helpers: list[Future[HelperRun]] = [
            pool.submit(_helper_process, replace(cfg, concurrency=n)) for n in helper_shares
        ]
        if helpers:
            console.print(f"{len(helpers) + 1} client processes: {[own_share, *helper_shares]} streams each")
        results, duration_s = uvloop.run(_python_clients(replace(cfg, concurrency=own_share), console, cpu, lags))
        for helper in helpers:
            run = helper.result()
            results += run.results
            duration_s = max(duration_s, run.duration_s)
            lags += run.lags
            helper_cpu_s += run.cpu_s
    return ClientRun(results, duration_s, helper_cpu_s, 1 + len(helper_shares))


def _run_cpp(cfg: BenchConfig, console: Console, cpu: CpuMeter | None, lags: list[float]) -> ClientRun:
    """A run by tokenbus-loadgen, driven from this process (its loop lag into `lags`)."""
    progress = Progress()
    work = run_loadgen(loadgen_path(), cfg, HARD_DEADLINE_EXTRA_S, progress.counter, progress.on_result, cpu, lags)
    run = uvloop.run(_with_progress(cfg, console, progress, work))
    if run.log:
        console.print(run.log.rstrip(), style="dim", highlight=False, markup=False)
    return ClientRun(run.results, run.duration_s, run.cpu_s, 2)


def main(opts: argparse.Namespace) -> int:
    cfg = BenchConfig(
        url=opts.url,
        model=opts.model,
        concurrency=opts.concurrency,
        duration_s=opts.duration,
        max_tokens=opts.max_tokens,
        endpoint=opts.endpoint,
        prompt=opts.prompt,
    )
    console = Console(stderr=True)  # stdout carries only the JSON line, for scripts
    cpu: CpuMeter | None = None
    if opts.cpu_pids:
        try:
            procs = parse_pids(opts.cpu_pids, urlsplit(cfg.url).port)
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            return 2
        if not procs:
            console.print("[yellow]--cpu-pids auto: no tokenbus process of this user found[/yellow]")
        cpu = CpuMeter(procs)
    client = opts.client or ("cpp" if loadgen_path().exists() else "python")
    if client == "cpp" and opts.processes > 1:
        console.print("[red]--processes applies to --client python only (one loadgen carries every stream)[/red]")
        return 2
    if client == "cpp" and not loadgen_path().exists():
        console.print(f"[red]{loadgen_path()} is missing: run `make build` (or use --client python)[/red]")
        return 2
    client_cpu_start = time.process_time()
    lags: list[float] = []  # the client's loop lag: this process's (python) or the loadgen's (cpp)
    if client == "cpp":
        try:
            run = _run_cpp(cfg, console, cpu, lags)
        except (LoadgenError, ValueError) as e:
            console.print(str(e), style="red", highlight=False, markup=False)
            return 2
    else:
        run = _run_python(cfg, opts.processes, console, cpu, lags)
    results, duration_s = run.results, run.duration_s
    summary = summarize(results, cfg.concurrency, duration_s)
    summary["client"] = client
    summary["client_loop_lag_ms"] = quantiles_ms(lags)
    console.print(summary_table(summary))
    if cpu is not None:
        summary["cpu_cores"] = cpu.summary(duration_s)
        # the bench client itself, for comparison: it shares the machine, but is not part of the total
        # (this process, plus its helpers or the loadgen)
        client_cpu_s = time.process_time() - client_cpu_start + run.extra_cpu_s
        summary["cpu_cores"]["client"] = round(client_cpu_s / duration_s, 3)
        summary["cpu_cores"]["client_processes"] = run.processes
        console.print(cpu_table(summary["cpu_cores"]))
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    for error, count in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"[red]{count} x {error}[/red]")
    status = 1 if summary["failures"] else 0
    if opts.plot:
        plot_latencies(results, opts.plot)
        console.print(f"latency plot written to {opts.plot}")
    if opts.pushgateway:
        try:
            push_summary(summary, opts.pushgateway, cfg.model)
            console.print(f"summary pushed to {opts.pushgateway} (job tokenbus_bench)")
        except OSError as e:
            console.print(f"[red]push to {opts.pushgateway} failed: {e}[/red]")
            status = 1
    print(json.dumps(summary), flush=True)
    return status
