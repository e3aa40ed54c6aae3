"""tokenbus against the cost of one nginx hop, in one run: `python -m tools.bench_reference`.

For each scenario (streams, token interval) three systems are measured one after the other by the same client
(the bench's: the C++ loadgen when it is built), closed loop, `--max-tokens` tokens per request:
- direct: two reference servers (tools/bench/reference_server.py) on the sim's schedule, reached on the port they
  share (SO_REUSEPORT: the kernel spreads the connections over the two);
- nginx: Debian's nginx (tools/bench/nginx.py: least_conn, keep-alive upstreams, no buffering) over the same two;
- tokenbus: a local cluster (head, agent, proxy) with 2 `sim` replicas on the same schedule.
Before each measurement the tool waits for a quiet machine (the share of all cores busy, from /proc/stat, below
`--quiet-busy` over 2 s; after `--quiet-deadline` it measures anyway, with a warning), and it measures the CPU of
every process group from /proc/PID/stat over the client's run, in % of one core, with the client's and what
other processes used meanwhile (a shared machine shows there). The table shows the direct run's latencies and,
for nginx and tokenbus, their overhead over it; `--json` writes the same numbers, CPU per token and tokenbus's
first-token hops too. Every process is started and stopped here, by PID; each wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from rich.console import Console
from rich.table import Table

from tools.arg_types import positive_float, positive_int
from tools.bench import nginx
from tools.bench.cpu import TICKS_PER_S, CpuMeter, Proc, descendants, machine_ticks
from tools.bench.load import BenchConfig, LengthDist, Stage
from tools.bench.loadgen import loadgen_path, run_loadgen
from tools.bench.progress import with_progress
from tools.bench.python_client import run_python
from tools.bench.records import Live
from tools.bench.report import QUANTILES, result
from tools.bench.run import HARD_DEADLINE_EXTRA_S
from tools.local_cluster import LocalCluster, free_port
from tools.procs import Children

MODEL = "demo"
SYSTEMS = ("direct", "nginx", "tokenbus")
REPLICAS = 2  # tokenbus's sim replicas, as many as reference servers
DEFAULT_SCENARIOS = "256:20,1000:80"
QUIET_WINDOW_S = 2.0
TABLE_WIDTH = 200
READY_DEADLINE_S = 60.0
CLUSTER_READY_DEADLINE_S = 120.0
# CPU groups, in table order; the client is shown apart (it is not part of any system)
GROUPS = ("servers", "nginx", "proxy", "replica", "worker", "head", "agent")


@dataclass(frozen=True, slots=True)
class Scenario:
    streams: int
    token_delay_ms: float

    def describe(self) -> str:
        return f"{self.streams} streams / {self.token_delay_ms:g} ms"


def parse_scenarios(spec: str) -> tuple[Scenario, ...]:
    """argparse type of `--scenarios STREAMS:MS,...`, e.g. 256:20,1000:80."""
    scenarios = []
    for part in spec.split(","):
        streams, _, delay = part.strip().partition(":")
        try:
            scenario = Scenario(int(streams), float(delay))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not STREAMS:TOKEN_MS (e.g. 256:20)") from None
        if scenario.streams < 1 or not scenario.token_delay_ms > 0:
            raise argparse.ArgumentTypeError(f"{part!r}: wants streams >= 1 and a token interval > 0 ms")
        scenarios.append(scenario)
    return tuple(scenarios)


async def wait_http_ok(url: str, deadline: float, children: Children) -> None:
    """Polls `url` until it answers 200; RuntimeError when a child exits first (its log's tail) or at `deadline`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while time.monotonic() < deadline:
            if (dead := children.first_exited()) is not None:
                raise RuntimeError(f"{dead.name} exited ({dead.proc.returncode}):\n{dead.log_tail()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready in time")


def add_quiet_args(p: argparse.ArgumentParser) -> None:
    """--quiet-busy and --quiet-deadline, which wait_quiet reads."""
    p.add_argument(
        "--quiet-busy", type=positive_float, default=0.2, help="a quiet machine: less than this share of all cores busy"
    )
    p.add_argument(
        "--quiet-deadline", type=float, default=60.0, help="seconds to wait for a quiet machine (0: one look)"
    )


async def wait_quiet(what: str, opts: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Waits until the machine's busy share over QUIET_WINDOW_S is below --quiet-busy, or --quiet-deadline; what it
    saw, for the result."""
    started = time.monotonic()
    with console.status(f"{what}: waiting for a quiet machine") as status:
        while True:
            busy0, total0 = machine_ticks()
            await asyncio.sleep(QUIET_WINDOW_S)  # the window the share is measured over
            busy1, total1 = machine_ticks()
            busy = (busy1 - busy0) / max(1, total1 - total0)
            waited = time.monotonic() - started
            quiet = busy < opts.quiet_busy
            if quiet or waited >= opts.quiet_deadline:
                break
            status.update(f"{what}: waiting for a quiet machine ({busy:.0%} of all cores busy, {waited:.0f} s)")
    if not quiet:
        console.print(
            f"[yellow]{what}: the machine is still {busy:.0%} busy after {waited:.0f} s: measuring anyway[/yellow]"
        )
    else:
        console.print(f"{what}: waited {waited:.0f} s for a quiet machine ({busy:.0%} of all cores busy)")
    return {"waited_s": round(waited, 1), "busy": round(busy, 3), "quiet": quiet}


async def measure(
    what: str, url: str, scenario: Scenario, procs: list[Proc], opts: argparse.Namespace, console: Console
) -> dict[str, Any]:
    """One closed-loop run against `url` after a quiet wait; its latencies, errors, tokens and CPU by group."""
    quiet = await wait_quiet(what, opts, console)
    stage = Stage(opts.duration, concurrency=scenario.streams)
    cfg = BenchConfig(url, MODEL, (stage,), max_tokens=LengthDist("fixed", (opts.max_tokens,)))
    cpu = CpuMeter(procs)
    live = Live()
    if loadgen_path().exists():
        client, work = "cpp", run_loadgen(loadgen_path(), cfg, HARD_DEADLINE_EXTRA_S, live, cpu)
    else:
        client, work = "python", run_python(cfg, HARD_DEADLINE_EXTRA_S, live, cpu)
    console.print(f"{what}: {stage.describe()} for {opts.duration:g} s")
    (busy0, _), wall0, own0 = machine_ticks(), time.monotonic(), time.process_time()
    run = await with_progress(cfg, live, console, work)
    (busy1, _), wall, own = machine_ticks(), time.monotonic() - wall0, time.process_time() - own0
    res = result(cfg, run, client)
    cores = cpu.summary(run.duration_s)
    if cores["exited"]:
        console.print(f"[yellow]{what}: processes {cores['exited']} exited during the run[/yellow]")
    tokens = [r.tokens for r in run.results if r.ok]
    system_s, client_s = cores["total"] * run.duration_s, run.client_cpu_s + own
    overall = res["overall"]

    def per_token_us(cores_used: float) -> float | None:
        return round(cores_used * 1e6 / overall["tokens_per_s"], 1) if overall["tokens_per_s"] else None

    return {
        "client": client,
        "quiet": quiet,
        "requests": overall["requests"],
        "errors": overall["failures"],
        "error_kinds": res["errors"],
        "tokens_per_s": overall["tokens_per_s"],
        "tokens_per_request": {"min": min(tokens, default=0), "max": max(tokens, default=0)},
        "ttft_ms": overall["ttft_ms"],
        "e2e_ms": overall["e2e_ms"],
        # tokenbus's first token, hop by hop, from the proxy's stamps (the references send none)
        "hops_ms": overall["hops_ms"],
        "proxy_ttft_ms": overall["proxy_ttft_ms"],
        "cpu_pct": {k: round(v * 100, 1) for k, v in cores["by_kind"].items()},
        "cpu_total_pct": round(cores["total"] * 100, 1),
        "processes": cores["processes"],
        # CPU per token received by the client, by group and in all: a figure other load disturbs less than tails
        "cpu_us_per_token": {k: per_token_us(v) for k, v in {**cores["by_kind"], "total": cores["total"]}.items()},
        # the loadgen and this process, which reads its output
        "client_cpu_pct": round(client_s / wall * 100, 1),
        # whatever else ran meanwhile (a shared machine): all cores' busy time but the system's and the client's
        "others_cpu_pct": round(((busy1 - busy0) / TICKS_PER_S - system_s - client_s) / wall * 100, 1),
    }


async def _start_servers(children: Children, logs: Path, scenario: Scenario, opts: argparse.Namespace) -> list[int]:
    """Two reference servers on free ports, both also on one shared port; [own, own, shared] once they answer."""
    ports, shared = [free_port(), free_port()], free_port()
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "tools.bench.reference_server", "--port", str(port), "--shared-port", str(shared)]
        cmd += ["--token-delay-ms", repr(scenario.token_delay_ms), "--prefill-ms", repr(opts.prefill_ms)]
        children.start(f"server-{i + 1}", cmd, logs / f"server-{i + 1}.log")
    for port in ports:
        await wait_http_ok(f"http://127.0.0.1:{port}/healthz", time.monotonic() + READY_DEADLINE_S, children)
    return [*ports, shared]


async def bench_references(
    scenario: Scenario, opts: argparse.Namespace, work: Path, console: Console
) -> dict[str, dict[str, Any]]:
    """The direct and nginx runs, over the same two servers."""
    children = Children()
    try:
        with console.status("starting the reference servers"):
            *own, shared = await _start_servers(children, work / "logs", scenario, opts)
        servers = [Proc(c.pid, "servers") for c in children]
        direct = await measure("direct", f"http://127.0.0.1:{shared}", scenario, servers, opts, console)
        port = free_port()
        nginx_dir = work / "nginx"
        nginx_dir.mkdir(parents=True, exist_ok=True)
        master = children.start(
            "nginx", nginx.command(nginx_dir, port, own, scenario.streams), work / "logs" / "nginx.log"
        )
        with console.status("starting nginx"):
            await wait_http_ok(f"http://127.0.0.1:{port}/healthz", time.monotonic() + READY_DEADLINE_S, children)
        procs = servers + [Proc(pid, "nginx") for pid in (master.pid, *descendants(master.pid))]
        behind = await measure("nginx", f"http://127.0.0.1:{port}", scenario, procs, opts, console)
        return {"direct": direct, "nginx": behind}
    finally:
        children.stop_all()


async def bench_tokenbus(
    scenario: Scenario, opts: argparse.Namespace, work: Path, console: Console
) -> dict[str, dict[str, Any]]:
    """tokenbus with 2 sim replicas on the servers' schedule, each with room for every stream."""
    cluster = LocalCluster(work, heartbeat_s=None, node_id="bench")
    try:
        with console.status("tokenbus: starting the head, agent and proxy"):
            cluster.start()
        args = {"token_delay_ms": scenario.token_delay_ms, "prefill_ms": opts.prefill_ms}
        args["batch_capacity"] = scenario.streams  # a replica never queues: the servers do not either
        spec = {"name": MODEL, "engine": "sim", "engine_args": args, "replicas": REPLICAS, "gpus_per_replica": 0}
        spec["max_concurrency"] = scenario.streams
        with console.status(f"tokenbus: waiting for {REPLICAS} sim replicas"):
            await cluster.deploy(spec, timeout=CLUSTER_READY_DEADLINE_S)
        procs = [Proc(cluster.pid(name), kind) for name, kind in (("head", "head"), ("agent", "agent"))]
        procs.append(Proc(cluster.pid("proxy"), "proxy"))
        for pids in cluster.replica_processes().values():
            procs += [Proc(pid, kind) for kind, pid in pids.items()]
        return {"tokenbus": await measure("tokenbus", cluster.proxy_url, scenario, procs, opts, console)}
    finally:
        cluster.stop()


def add_overheads(run: dict[str, dict[str, Any]]) -> None:
    """nginx's and tokenbus's TTFT and e2e percentiles minus the direct run's, in ms (None where one is missing)."""
    base = run["direct"]
    for system in SYSTEMS[1:]:
        over: dict[str, dict[str, float | None]] = {}
        for metric in ("ttft_ms", "e2e_ms"):
            over[metric] = {}
            for q, _ in QUANTILES:
                a, b = run[system][metric][q], base[metric][q]
                over[metric][q] = None if a is None or b is None else round(a - b, 3)
        run[system]["overhead_ms"] = over


async def compare(opts: argparse.Namespace, console: Console) -> dict[str, Any]:
    scenarios: list[dict[str, Any]] = [
        {"streams": s.streams, "token_delay_ms": s.token_delay_ms, "runs": []} for s in opts.scenarios
    ]
    with tempfile.TemporaryDirectory(prefix="tokenbus-bench-reference-") as tmp:
        for index in range(opts.runs):
            for scenario, out in zip(opts.scenarios, scenarios, strict=True):
                console.rule(f"run {index + 1}/{opts.runs}: {scenario.describe()}")
                work = Path(tmp) / f"run{index + 1}-{scenario.streams}-{scenario.token_delay_ms:g}"
                run = await bench_references(scenario, opts, work / "references", console)
                run |= await bench_tokenbus(scenario, opts, work / "tokenbus", console)
                add_overheads(run)
                out["runs"].append(run)
    config = {"duration_s": opts.duration, "max_tokens": opts.max_tokens, "prefill_ms": opts.prefill_ms}
    config |= {"runs": opts.runs, "quiet_busy": opts.quiet_busy, "quiet_deadline_s": opts.quiet_deadline}
    return {"config": config, "scenarios": scenarios}


def _triple(q: dict[str, float | None], sign: bool) -> str:
    return " / ".join("-" if (v := q[n]) is None else (f"{v:+.1f}" if sign else f"{v:.1f}") for n, _ in QUANTILES)


def _cpu(s: dict[str, Any]) -> str:
    return ", ".join(f"{g} {s['cpu_pct'][g]:.0f}" for g in GROUPS if g in s["cpu_pct"])


def table(res: dict[str, Any]) -> Table:
    cfg = res["config"]
    t = Table(
        title=f"tokenbus vs one nginx hop: {cfg['max_tokens']} tokens per request, {cfg['duration_s']:g} s per "
        "system; direct: absolute ms, nginx and tokenbus: ms over direct; CPU in % of one core",
        title_justify="left",
    )
    for col, justify in (("scenario", "left"), ("run", "right"), ("system", "left")):
        t.add_column(col, justify=justify)
    for col in ("TTFT p50/p95/p99", "e2e p50/p95/p99", "errors", "tokens/s", "CPU by group", "CPU", "client", "others"):
        t.add_column(col, justify="left" if col == "CPU by group" else "right")
    for sc in res["scenarios"]:
        name = f"{sc['streams']} / {sc['token_delay_ms']:g} ms"
        for index, run in enumerate(sc["runs"]):
            for system in SYSTEMS:
                s = run[system]
                lat = s if system == "direct" else s["overhead_ms"]
                errors = f"[red]{s['errors']}[/red]" if s["errors"] else "0"
                t.add_row(
                    name, str(index + 1), system,
                    _triple(lat["ttft_ms"], system != "direct"),
                    _triple(lat["e2e_ms"], system != "direct"),
                    errors, f"{s['tokens_per_s']:.0f}", _cpu(s), f"{s['cpu_total_pct']:.0f}%",
                    f"{s['client_cpu_pct']:.0f}%", f"{s['others_cpu_pct']:.0f}%",
                )  # fmt: skip
                name = ""
            t.add_section()
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_reference", description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenarios",
        type=parse_scenarios,
        default=parse_scenarios(DEFAULT_SCENARIOS),
        metavar="STREAMS:MS,...",
        help=f"closed-loop streams and the token interval of each scenario (default {DEFAULT_SCENARIOS})",
    )
    p.add_argument("--duration", "-d", type=positive_float, default=20.0, help="seconds each system is measured")
    p.add_argument("--runs", type=positive_int, default=1, help="repeat every scenario this many times")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens per request")
    p.add_argument("--prefill-ms", type=float, default=0.0, help="before the first token (the sim's prefill_ms)")
    add_quiet_args(p)
    p.add_argument("--json", metavar="FILE.json", help="write the numbers here")
    opts = p.parse_args(argv)
    if not nginx.NGINX.exists():
        print(f"{nginx.NGINX} is missing: `make deps` installs Debian's nginx", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    res = uvloop.run(compare(opts, console))
    # the table is the result: wide enough not to wrap when stdout is a file or a pipe
    Console(width=None if sys.stdout.isatty() else TABLE_WIDTH).print(table(res))
    if opts.json:
        Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")
        console.print(f"numbers written to {opts.json}")
    errors = sum(run[s]["errors"] for sc in res["scenarios"] for run in sc["runs"] for s in SYSTEMS)
    return 1 if errors else 0
