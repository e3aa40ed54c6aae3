"""The benchmark's client: tokenbus-loadgen (proxy_cpp/loadgen/), run as a child process and read line by line.

It runs the stages on one thread, at a fraction of the Python client's CPU and without an event loop's lag in
what it measures. Its stdout is one JSON object per line (start, stage, request, progress, end), defined in
proxy_cpp/loadgen/reporter.hpp; logs go to its stderr (start, first connect failure, stop), shown after the
run. Exit codes: 0 the run completed, 1 it could not start (the host does not resolve), 2 bad usage. If this
process dies, the loadgen dies too at its next write (SIGPIPE), at most 250 ms later.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node_agent.binaries import bin_dir
from tools.bench.cpu import CpuMeter
from tools.bench.load import BenchConfig, format_stages
from tools.bench.records import Live, RequestResult, Run, Sample

LOADGEN = "tokenbus-loadgen"
MAX_OUTPUT_LINE = 1 << 20  # the longest line read from the loadgen (a progress line holds ~25 lag samples)
STDERR_TAIL = 20


class LoadgenError(RuntimeError):
    """The loadgen could not run: a bad URL, or it exited without its end line."""


def loadgen_path() -> Path:
    """Where the binary is: next to tokenbus-proxy and tokenbus-replica."""
    return bin_dir() / LOADGEN


def loadgen_argv(binary: Path, cfg: BenchConfig, grace_s: float) -> list[str]:
    """The command line for `cfg` (always with --timing); ValueError for a URL the loadgen cannot serve."""
    parts = urlsplit(cfg.url)
    try:
        port = parts.port or 80
    except ValueError as e:  # a port that is not a number in 0..65535
        raise ValueError(f"--url {cfg.url!r}: {e}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url {cfg.url!r}: --client cpp wants http://HOST[:PORT]")
    if parts.path.strip("/") or parts.query:
        raise ValueError(f"--url {cfg.url!r}: --client cpp takes no path or query, only http://HOST[:PORT]")
    argv = [str(binary), "--host", parts.hostname, "--port", str(port)]
    (stage, *more) = cfg.stages
    if stage.rate is not None and not more:
        argv += ["--rate", repr(stage.rate), "--duration-s", repr(stage.duration_s)]
    elif all(s.rate is None for s in cfg.stages):
        argv += ["--stages", format_stages(cfg.stages)]
    else:
        raise ValueError("the loadgen runs closed-loop stages, or one open-loop stage")
    argv += ["--grace-s", repr(grace_s), "--max-in-flight", str(cfg.max_in_flight)]
    argv += ["--endpoint", cfg.endpoint, "--model", cfg.model, "--seed", str(cfg.seed), "--timing"]
    if cfg.max_tokens.kind == "fixed":
        argv += ["--max-tokens", str(int(cfg.max_tokens.params[0]))]
    else:
        argv += ["--max-tokens-dist", str(cfg.max_tokens)]
    if cfg.prompt_len is None:
        argv += ["--prompt", cfg.prompt]
    else:
        argv += ["--prompt-len-dist", str(cfg.prompt_len)]
    return argv


def _us(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def request_result(line: dict[str, Any]) -> RequestResult:
    hops = line.get("hops_us")
    return RequestResult(
        ok=line["ok"],
        e2e_s=line["e2e_us"] / 1e6,
        ttft_s=_us(line["ttft_us"]),
        tokens=line["tokens"],
        error=line["error"],
        start_s=line["start_s"],
        stage=line["stage"],
        chunks=line["chunks"],
        itl_sum_s=line["itl_sum_us"] / 1e6,
        itl_max_s=line["itl_max_us"] / 1e6,
        hops_s=None if hops is None else {hop: _us(us) for hop, us in hops.items()},
        proxy_ttft_s=_us(line.get("proxy_ttft_us")),
    )


def _read_line(line: dict[str, Any], run: Run, live: Live, cpu: CpuMeter | None) -> dict[str, Any] | None:
    """Takes one output line into `run` and `live`; the end line is returned."""
    kind = line["event"]
    if kind == "request":
        result = request_result(line)
        run.results.append(result)
    elif kind == "progress":
        run.samples.append(
            Sample(
                line["elapsed_s"], line["stage"], line["requests"], line["failures"], line["tokens"], line["in_flight"]
            )
        )
        live.requests, live.failures, live.tokens = line["requests"], line["failures"], line["tokens"]
        live.in_flight = line["in_flight"]
        run.lags_s.extend(us / 1e6 for us in line["lag_us"])
    elif kind == "stage":
        run.stage_starts_s.append(line["start_s"])
        live.stage, live.stage_started_at = line["index"], time.perf_counter()
    elif kind == "start":
        live.started_at = time.perf_counter()
        if cpu is not None:
            cpu.start()
    elif kind == "end":
        if cpu is not None:
            cpu.stop()
        return line
    return None


async def run_loadgen(binary: Path, cfg: BenchConfig, grace_s: float, live: Live, cpu: CpuMeter | None = None) -> Run:
    """Runs the loadgen to its end and returns what it measured; `live` follows it as it goes, `cpu` is
    sampled at its start and end lines. LoadgenError when it fails (its stderr's tail in the message)."""
    argv = loadgen_argv(binary, cfg, grace_s)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=MAX_OUTPUT_LINE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read(), name="loadgen-stderr")  # a few lifecycle lines
    run = Run(client_processes=2)  # this process and the loadgen
    end: dict[str, Any] | None = None
    try:
        async for raw in proc.stdout:
            end = _read_line(json.loads(raw), run, live, cpu) or end
        code = await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled, or its output was not what we read: do not leave it running
            proc.kill()
            await proc.wait()
    run.log = (await stderr).decode(errors="replace")
    if code != 0 or end is None:
        tail = "\n".join(run.log.splitlines()[-STDERR_TAIL:])
        raise LoadgenError(f"{LOADGEN} exited with code {code}:\n{tail}")
    run.duration_s, run.client_cpu_s = end["duration_s"], end["cpu_s"]
    return run
