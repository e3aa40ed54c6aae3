"""`tokenbus bench`: streaming load against a proxy in stages (closed loop) or at a rate (open loop, Poisson
arrivals); percentiles per stage and overall, the TTFT's hops, a timeline plot, a Pushgateway push."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop
from rich.console import Console

from tools.arg_types import non_negative_int, positive_float, positive_int
from tools.bench.cpu import CpuMeter, parse_pids
from tools.bench.load import DIST_HELP, BenchConfig, Stage, parse_dist, parse_stages
from tools.bench.loadgen import LoadgenError, loadgen_path, run_loadgen
from tools.bench.plot import plot_timeline
from tools.bench.progress import with_progress
from tools.bench.push import push_result
from tools.bench.python_client import run_python
from tools.bench.records import Live, Run
from tools.bench.report import cpu_table, result, result_tables

HARD_DEADLINE_EXTRA_S = 30.0  # requests still open this long after the last stage are cut and count as failures
DEFAULT_DURATION_S = 10.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="streaming load against a proxy, in stages or at a rate; latency per stage, TTFT by hop",
        description="Closed loop (--concurrency, or --stages one after the other) or open loop (--rate). "
        "Prints a table per stage and overall, and the result as one JSON line on stdout.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the proxy's base URL")
    p.add_argument("--model", default="demo", help="deployment name")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", "-c", type=positive_int, help="concurrent streaming clients (default 16)")
    load.add_argument(
        "--stages",
        type=parse_stages,
        metavar="C:DURs,...",
        help="closed-loop stages one after the other, e.g. 64:20s,256:30s,64:20s (replaces -c and -d)",
    )
    load.add_argument("--rate", type=positive_float, help="open loop: Poisson arrivals at this many requests/s")
    p.add_argument(
        "--duration", "-d", type=positive_float, help=f"seconds of -c or --rate (default {DEFAULT_DURATION_S:g})"
    )
    p.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=10_000,
        help="--rate: arrivals while this many requests are open fail at once (error 'over max-in-flight')",
    )
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per request")
    tokens.add_argument("--max-tokens-dist", type=parse_dist, metavar="SPEC", help=f"tokens per request: {DIST_HELP}")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="What is machine learning?")
    prompt.add_argument(
        "--prompt-len-dist", type=parse_dist, metavar="SPEC", help=f"prompts of drawn words: {DIST_HELP}"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="of every draw: lengths, prompt words, arrivals")
    p.add_argument("--endpoint", choices=("chat", "plain"), default="chat", help="OpenAI SSE or plain text")
    p.add_argument(
        "--client",
        choices=("cpp", "python"),
        help=f"cpp: the C++ {loadgen_path().name} from the binaries' directory (the default when it is built); "
        "python: the aiohttp fallback in this process",
    )
    p.add_argument("--json", metavar="FILE.json", help="write the result here (config, stages, overall)")
    p.add_argument("--plot", metavar="FILE.png", help="write the run's timeline here, stage borders marked")
    p.add_argument("--pushgateway", metavar="URL", help="push the per-stage results to this Prometheus Pushgateway")
    p.add_argument(
        "--cpu-pids",
        metavar="auto|PID,...",
        help="report the CPU cores these processes used during the run (auto: this user's tokenbus processes)",
    )
    p.set_defaults(func=main)


def config_of(opts: argparse.Namespace) -> BenchConfig:
    """The run's config; ValueError for flags that do not go together."""
    if opts.stages is not None and opts.duration is not None:
        raise ValueError("--stages gives each stage its duration: drop --duration")
    duration_s = opts.duration or DEFAULT_DURATION_S
    if opts.stages is not None:
        stages = opts.stages
    elif opts.rate is not None:
        stages = (Stage(duration_s, rate=opts.rate),)
    else:
        stages = (Stage(duration_s, concurrency=opts.concurrency or 16),)
    return BenchConfig(
        url=opts.url,
        model=opts.model,
        stages=stages,
        max_tokens=opts.max_tokens_dist or parse_dist(f"fixed:{opts.max_tokens}"),
        endpoint=opts.endpoint,
        prompt=opts.prompt,
        prompt_len=opts.prompt_len_dist,
        seed=opts.seed,
        max_in_flight=opts.max_in_flight,
    )


def run_load(cfg: BenchConfig, client: str, console: Console, cpu: CpuMeter | None) -> Run:
    """The run by `client`, under the live display. LoadgenError/ValueError when the loadgen cannot run it."""
    live = Live()
    if client == "cpp":
        work = run_loadgen(loadgen_path(), cfg, HARD_DEADLINE_EXTRA_S, live, cpu)
    else:
        work = run_python(cfg, HARD_DEADLINE_EXTRA_S, live, cpu)
    return uvloop.run(with_progress(cfg, live, console, work))


def main(opts: argparse.Namespace) -> int:
    console = Console(stderr=True)  # stdout carries only the JSON line, for scripts
    try:
        cfg = config_of(opts)
        cpu = CpuMeter(parse_pids(opts.cpu_pids, urlsplit(opts.url).port)) if opts.cpu_pids else None
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    client = opts.client or ("cpp" if loadgen_path().exists() else "python")
    if client == "cpp" and not loadgen_path().exists():
        console.print(f"[red]{loadgen_path()} is missing: run `make build` (or use --client python)[/red]")
        return 2
    if opts.client is None and client == "python":
        console.print(f"[yellow]{loadgen_path()} is not built: the Python client measures instead[/yellow]")
    client_cpu_start = time.process_time()
    try:
        run = run_load(cfg, client, console, cpu)
    except (LoadgenError, ValueError) as e:
        console.print(str(e), style="red", highlight=False, markup=False)
        return 2
    if run.log:
        console.print(run.log.rstrip(), style="dim", highlight=False, markup=False)
    res = result(cfg, run, client)
    for table in result_tables(cfg, res):
        console.print(table)
    if cpu is not None:
        res["cpu_cores"] = cpu.summary(run.duration_s)
        # the bench client itself, for comparison: it shares the machine, but is not part of the total
        client_cpu_s = time.process_time() - client_cpu_start + run.client_cpu_s
        res["cpu_cores"]["client"] = round(client_cpu_s / run.duration_s, 3)
        res["cpu_cores"]["client_processes"] = run.client_processes
        console.print(cpu_table(res["cpu_cores"]))
    for error, count in res["errors"].items():
        console.print(f"{count} x {error}", style="red", highlight=False, markup=False)
    status = 1 if res["overall"]["failures"] else 0
    if opts.json:
        Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")
        console.print(f"result written to {opts.json}")
    if opts.plot:
        plot_timeline(cfg, run, opts.plot)
        console.print(f"timeline written to {opts.plot}")
    if opts.pushgateway:
        try:
            push_result(res, opts.pushgateway)
            console.print(f"results pushed to {opts.pushgateway} (job tokenbus_bench)")
        except OSError as e:
            console.print(f"[red]push to {opts.pushgateway} failed: {e}[/red]")
            status = 1
    print(json.dumps(res), flush=True)
    return status
