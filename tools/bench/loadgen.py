"""`tokenbus bench --client cpp`: runs tokenbus-loadgen (proxy_cpp/loadgen/) and reads its results.

The C++ client runs the same closed loop as the Python clients (tools.bench.run), on one thread, at a fraction of
their CPU and without their event loop's lag in the TTFT it measures. It writes one JSON object per line on
stdout (proxy_cpp/loadgen/reporter.hpp is the source of truth):

    {"event": "start", "concurrency": C}
        once, just before the first request starts: the CPU meters start here
    {"event": "request", "ok": B, "ttft_us": N | null, "e2e_us": N, "tokens": N, "error": "..."}
        one per finished request (ttft_us null: no content token arrived)
    {"event": "progress", "elapsed_s": F, "requests": N, "failures": N, "tokens": N, "lag_us": [N, ...]}
        every 250 ms, after the request lines of that interval: running totals, and the lateness of each of
        the loadgen's 10 ms lag-probe ticks since the last progress line
    {"event": "end", "duration_s": F, "requests": N, "failures": N, "cpu_s": F}
        once, last: first request start to last request end, and the loadgen's user+system CPU seconds

Logs go to its stderr (start, first connect failure, stop), shown after the run. Exit codes: 0 the run
completed, 1 it could not start (the host does not resolve), 2 bad usage. If this process dies, the loadgen
dies too at its next write (SIGPIPE), at most 250 ms later.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from node_agent.binaries import bin_dir
from tools.bench.cpu import CpuMeter
from tools.bench.python_client import RequestResult, TokenCounter

if TYPE_CHECKING:
    from tools.bench.run import BenchConfig

LOADGEN = "tokenbus-loadgen"
MAX_OUTPUT_LINE = 1 << 20  # the longest line read from the loadgen (a progress line holds ~25 lag samples)
STDERR_TAIL = 20


class LoadgenError(RuntimeError):
    """The loadgen could not run: a bad URL, or it exited without its end line."""


@dataclass(frozen=True)
class LoadgenRun:
    results: list[RequestResult]
    duration_s: float
    cpu_s: float  # the loadgen process's CPU seconds
    log: str  # its stderr


def loadgen_path() -> Path:
    """Where the binary is: next to tokenbus-proxy and tokenbus-replica."""
    return bin_dir() / LOADGEN


def loadgen_argv(binary: Path, cfg: BenchConfig, grace_s: float) -> list[str]:
    """The command line for `cfg`; ValueError for a URL the loadgen cannot serve (https, a path prefix)."""
    parts = urlsplit(cfg.url)
    try:
        port = parts.port or 80
    except ValueError as e:  # a port that is not a number in 0..65535
        raise ValueError(f"--url {cfg.url!r}: {e}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url {cfg.url!r}: --client cpp wants http://HOST[:PORT]")
    if parts.path.strip("/") or parts.query:
        raise ValueError(f"--url {cfg.url!r}: --client cpp takes no path or query, only http://HOST[:PORT]")
    return [
        str(binary),
        "--host",
        parts.hostname,
        "--port",
        str(port),
        "--concurrency",
        str(cfg.concurrency),
        "--duration-s",
        repr(cfg.duration_s),
        "--grace-s",
        repr(grace_s),
        "--endpoint",
        cfg.endpoint,
        "--model",
        cfg.model,
        "--max-tokens",
        str(cfg.max_tokens),
        "--prompt",
        cfg.prompt,
    ]


def request_result(line: dict[str, Any]) -> RequestResult:
    ttft_us = line["ttft_us"]
    return RequestResult(
        ok=line["ok"],
        e2e_s=line["e2e_us"] / 1e6,
        ttft_s=None if ttft_us is None else ttft_us / 1e6,
        tokens=line["tokens"],
        error=line["error"],
    )


async def run_loadgen(
    binary: Path,
    cfg: BenchConfig,
    grace_s: float,
    counter: TokenCounter,
    on_result: Callable[[RequestResult], None] | None = None,
    cpu: CpuMeter | None = None,
    lags: list[float] | None = None,
) -> LoadgenRun:
    """Runs the loadgen to its end; its requests, as tools.bench.run.run_bench would return them.

    `counter` follows its token count (the live tok/s readout), `on_result` sees each request, `cpu` is sampled
    at its start and end lines, `lags` gets its loop-lag samples in seconds.
    """
    argv = loadgen_argv(binary, cfg, grace_s)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=MAX_OUTPUT_LINE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read(), name="loadgen-stderr")  # a few lifecycle lines
    results: list[RequestResult] = []
    end: dict[str, Any] | None = None
    try:
        async for raw in proc.stdout:
            line = json.loads(raw)
            kind = line["event"]
            if kind == "request":
                result = request_result(line)
                results.append(result)
                if on_result is not None:
                    on_result(result)
            elif kind == "progress":
                counter.chunks = line["tokens"]
                if lags is not None:
                    lags.extend(us / 1e6 for us in line["lag_us"])
            elif kind == "start" and cpu is not None:
                cpu.start()
            elif kind == "end":
                if cpu is not None:
                    cpu.stop()
                end = line
        code = await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled, or its output was not what we read: do not leave it running
            proc.kill()
            await proc.wait()
    log = (await stderr).decode(errors="replace")
    if code != 0 or end is None:
        tail = "\n".join(log.splitlines()[-STDERR_TAIL:])
        raise LoadgenError(f"{LOADGEN} exited with code {code}:\n{tail}")
    return LoadgenRun(results, end["duration_s"], end["cpu_s"], log)
