"""A local cluster on loopback: a head, agents and proxies as real processes; the one launcher of `tokenbus up`,
the end-to-end and fault tests, `tools.chaos` and `tools bench --vs-vllm`.

Processes are started with tools.procs, stopped by PID, and can be signalled and restarted one by one as `tokenbus
up` restarts them (`supervisor`). Ports are free ones unless given; a proxy given port 0 reports its port with its
`LISTENING host:port` line, and a restarted proxy listens on the port it had. Here, once: the binary check, the
free-port helpers and the ready-wait (the head's READY replicas and every proxy's /readyz).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bus.admin import AdminClient, AdminTimeout
from bus.curve import ClientKeys, CurveKeyError, load_client, load_server
from node_agent.agent import SHUTDOWN_GRACE_S as AGENT_SHUTDOWN_GRACE_S
from node_agent.binaries import bin_dir
from tools.procs import STOP_MARGIN_S, STOP_TIMEOUT_S, Child, Children, StopReport, Supervisor

BINARIES = ("tokenbus-proxy", "tokenbus-replica")
STARTUP_DEADLINE_S = 60.0
POLL_INTERVAL_S = 0.1
ADMIN_TIMEOUT_S = 5.0
# the agent's log line for each process of a replica it spawns (node_agent/replica_process.py)
REPLICA_STARTED_RE = re.compile(r"replica (\S+): (replica|worker) started, pid (\d+)")


class StartupError(RuntimeError):
    """The cluster cannot come up (a child exited, a deadline passed, a key or binary is missing): the message says
    why, with the logs' last lines where a child is to blame."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # as a listener binds: a previous run's connections in TIME_WAIT do not make the port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_or_free(preferred: int) -> int:
    """`preferred` when nothing listens there (the well-known port, for a user's commands), else a free port."""
    return preferred if port_free(preferred) else free_port()


def missing_binaries(directory: Path) -> list[str]:
    return [name for name in BINARIES if not (directory / name).exists()]


def require_binaries() -> Path:
    """The directory of the C++ binaries; StartupError naming the missing ones."""
    directory = bin_dir()
    if missing := missing_binaries(directory):
        raise StartupError(f"{', '.join(missing)} missing in {directory}: run `make build` or set TOKENBUS_BIN_DIR")
    return directory


def check_keys(directory: Path) -> ClientKeys:
    """Every CURVE key the cluster hands out, read before anything starts; the CLI's (the admin calls use it)."""
    try:
        load_server(directory)
        for name in ("agent", "proxy"):
            load_client(directory, name)
        return load_client(directory, "cli")
    except CurveKeyError as e:
        raise StartupError(f"--keys {directory}: {e}") from None


def child_died(child: Child) -> StartupError:
    return StartupError(
        f"{child.name} (pid {child.pid}) exited with code {child.proc.returncode}; "
        f"last lines of {child.log_path}:\n{child.log_tail()}"
    )


class LocalCluster:
    """Owns the processes it starts; `stop()` ends them all, newest first, and whatever replica they left.

    Children are named "head", "agent", "agent-2", ... (node ids `node_id`, `node_id`-2, ...) and "proxy",
    "proxy-2", ..., their logs `<state_dir>/logs/<name>.log`. Each agent keeps its replica records in
    `<state_dir>/agents/<node id>`, so a restarted agent finds its replicas. `heartbeat_s` None leaves the head's
    and agents' default; `router_port`/`pub_port`/`proxy_port` 0 are free ports (`proxy_port` is the first
    proxy's, the others take free ones); `drain_grace_s` is every proxy's --drain-grace, which its stop waits for.
    """

    def __init__(
        self,
        state_dir: Path,
        cpu_slots: int = 4,
        heartbeat_s: float | None = 0.5,
        agents: int = 1,
        proxies: int = 1,
        agent_args: tuple[str, ...] = (),
        api_keys: Path | None = None,
        keys: Path | None = None,
        node_id: str = "e2e",
        router_port: int = 0,
        pub_port: int = 0,
        proxy_port: int = 0,
        drain_grace_s: float | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.router = f"tcp://127.0.0.1:{router_port or free_port()}"
        self.pub = f"tcp://127.0.0.1:{pub_port or free_port()}"
        self._children = Children()
        self._cpu_slots = cpu_slots
        self._agent_args = agent_args  # more flags for every agent (a fake GPU inventory: "--gpus", "4")
        self._heartbeat_s = heartbeat_s
        self._agents = [("agent", node_id)] + [(f"agent-{i}", f"{node_id}-{i}") for i in range(2, agents + 1)]
        self._proxies = ["proxy"] + [f"proxy-{i}" for i in range(2, proxies + 1)]
        self._proxy_port = proxy_port
        self._drain_grace_s = drain_grace_s
        self._api_keys = api_keys  # every proxy's --api-keys file
        self._keys = keys  # CURVE: the key directory of the head, every agent and proxy, and admin()
        self._cli_keys = check_keys(keys) if keys is not None else None
        self.proxy_urls: dict[str, str] = {}
        self._db = state_dir / "head.db"
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    @property
    def proxy_url(self) -> str:
        return self.proxy_urls["proxy"]

    @property
    def agent_names(self) -> list[str]:
        return [name for name, _ in self._agents]

    @property
    def children(self) -> Children:
        return self._children

    def start(self) -> None:
        """Starts the head, the agents and the proxies, and waits for every proxy's LISTENING line."""
        bins = require_binaries()
        self._env["TOKENBUS_BIN_DIR"] = str(bins)
        tokenbus = [sys.executable, "-m", "tools"]
        hb = ["--heartbeat", str(self._heartbeat_s)] if self._heartbeat_s is not None else []
        head_cmd = [*tokenbus, "head", "--router", self.router, "--pub", self.pub, *hb]
        self.add_child("head", [*head_cmd, "--db", str(self._db), *self._key_args("head")])
        for name, node_id in self._agents:
            agent_cmd = [*tokenbus, "agent", "--head", self.router, "--node-id", node_id, *hb]
            agent_cmd += ["--state-dir", str(self.state_dir / "agents" / node_id)]
            agent_cmd += ["--cpu-slots", str(self._cpu_slots), *self._agent_args, *self._key_args("agent")]
            # the agent's own stop of its replicas (SIGTERM, so that vLLM frees its shared memory) is not cut short
            self.add_child(name, agent_cmd, AGENT_SHUTDOWN_GRACE_S + STOP_MARGIN_S)
        proxy_stop_s = STOP_TIMEOUT_S if self._drain_grace_s is None else self._drain_grace_s + STOP_MARGIN_S
        for i, name in enumerate(self._proxies):
            port = self._proxy_port if i == 0 else 0
            proxy_cmd = [str(bins / "tokenbus-proxy"), "--bind", f"127.0.0.1:{port}"]
            proxy_cmd += ["--head-router", self.router, "--head-pub", self.pub, *self._key_args("proxy")]
            if self._drain_grace_s is not None:
                proxy_cmd += ["--drain-grace", str(self._drain_grace_s)]
            if self._api_keys is not None:
                proxy_cmd += ["--api-keys", str(self._api_keys)]
            self.add_child(name, proxy_cmd, proxy_stop_s)
        for name in self._proxies:
            self.proxy_urls[name] = f"http://{self._listening_address(self._children.get(name), 0)}"

    def add_child(self, name: str, cmd: Sequence[str], stop_timeout_s: float = STOP_TIMEOUT_S) -> Child:
        """Starts a process of this cluster (logged to `<state_dir>/logs/<name>.log`, restarted by `supervisor`,
        stopped by `stop`)."""
        return self._children.start(name, cmd, self.state_dir / "logs" / f"{name}.log", self._env, stop_timeout_s)

    def _key_args(self, name: str) -> list[str]:
        if self._keys is None:
            return []
        return ["--keys", str(self._keys)] + (["--key-name", name] if name != "head" else [])

    def _listening_address(self, child: Child, log_offset: int) -> str:
        """The address in the first LISTENING line the child wrote after `log_offset` bytes of its log."""
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            with child.log_path.open("rb") as f:
                f.seek(log_offset)
                for line in f.read().decode(errors="replace").splitlines():
                    if line.startswith("LISTENING "):
                        return line.split()[1]
            if child.proc.poll() is not None:
                raise child_died(child)
            time.sleep(0.05)
        raise StartupError(f"{child.name} printed no LISTENING line:\n{child.log_tail()}")

    # --- the processes, by PID -----------------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        return self._children.get(name).pid

    def signal(self, name: str, sig: signal.Signals) -> int:
        """Sends `sig` to the named child; its pid. What it started is noted first, so a stop still finds it."""
        self._children.note_descendants()
        child = self._children.get(name)
        child.proc.send_signal(sig)
        return child.pid

    def wait(self, name: str, timeout: float) -> int:
        """Waits for the named child to exit (it was signalled) and reaps it; its exit code."""
        return self._children.get(name).proc.wait(timeout)

    def kill(self, name: str) -> int:
        """SIGKILLs the named child and reaps it; its pid."""
        pid = self.signal(name, signal.SIGKILL)
        self._children.get(name).proc.wait(STARTUP_DEADLINE_S)
        return pid

    def restart(self, name: str, fresh_db: bool = False) -> int:
        """Starts the named (exited) child again as `tokenbus up` would; a proxy on the port it had, a head on a new
        empty database when `fresh_db`. Its new pid."""
        child = self._children.get(name)
        cmd = self._restart_cmd(child)
        if fresh_db:
            self._db = self._db.with_name(f"head-{time.monotonic_ns()}.db")
            cmd[cmd.index("--db") + 1] = str(self._db)
        offset = child.log_path.stat().st_size
        new = self._children.restart(child, cmd)
        if name in self.proxy_urls:
            self._listening_address(new, offset)
        return new.pid

    def _restart_cmd(self, child: Child) -> list[str]:
        cmd = list(child.cmd)
        if child.name in self.proxy_urls:  # the port it was given, so its clients find it again
            cmd[cmd.index("--bind") + 1] = self.proxy_urls[child.name].removeprefix("http://")
        return cmd

    def supervisor(self, report: Callable[[str], None]) -> Supervisor:
        """A supervisor restarting this cluster's dead children as `tokenbus up` does (`report` gets each line)."""
        return Supervisor(self._children, report, self._restart_cmd)

    def replica_processes(self) -> dict[str, dict[str, int]]:
        """replica id -> {"replica": pid, "worker": pid}, for every replica any agent of this cluster spawned."""
        found: dict[str, dict[str, int]] = {}
        for name in self.agent_names:
            log = (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
            for rid, proc, pid in REPLICA_STARTED_RE.findall(log):
                found.setdefault(rid, {})[proc] = int(pid)
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.log_tail(40)}" for c in self._children)

    def stop(self) -> list[StopReport]:
        return self._children.stop_all()

    # --- the head's admin API ------------------------------------------------------------------------------------

    async def admin(self, op: str, args: dict[str, Any] | None = None, timeout: float = ADMIN_TIMEOUT_S) -> Any:
        client = AdminClient(self.router, keys=self._cli_keys)
        try:
            return await client.request(op, args or {}, timeout=timeout)
        finally:
            client.close()

    async def deploy(
        self, spec: dict[str, Any], timeout: float = STARTUP_DEADLINE_S, progress: Callable[[str], None] | None = None
    ) -> list[str]:
        """Deploys `spec` (asking again while the head is still starting) and waits for all its replicas to be READY
        and every proxy ready; their gRPC addresses. AdminError when the head refuses the spec."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            try:
                await self.admin("deploy", spec, timeout=min(ADMIN_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
                break
            except AdminTimeout:  # a deploy asked twice changes nothing the second time
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"could not deploy {spec['name']}: no answer from the head at {self.router}"
                    ) from None
        return await self.wait_ready(spec["name"], spec.get("replicas", 1), deadline - time.monotonic(), progress)

    async def ready_replicas(self, deployment: str) -> list[dict[str, Any]]:
        """The head's view of the deployment's READY replicas."""
        status = await self.admin("status")
        dep = next((d for d in status["deployments"] if d["name"] == deployment), None)
        return [r for r in (dep or {}).get("replicas_list", []) if r["state"] == "READY"]

    async def wait_ready(
        self,
        deployment: str,
        replicas: int,
        timeout: float = STARTUP_DEADLINE_S,
        progress: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Polls until `replicas` replicas of `deployment` are READY and every proxy is ready (its /readyz); their
        gRPC addresses. `progress` gets what was last seen at each poll; StartupError when a child exits or the
        deadline passes."""
        deadline = time.monotonic() + timeout
        last = "not polled yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)) as session:
            while time.monotonic() < deadline:
                self._check_children()
                try:
                    ready = [r["addr"] for r in await self.ready_replicas(deployment)]
                    proxies_ready = True
                    for url in self.proxy_urls.values():
                        async with session.get(f"{url}/readyz") as resp:
                            proxies_ready = proxies_ready and resp.status == 200
                    if len(ready) == replicas and proxies_ready:
                        return ready
                    last = f"{len(ready)}/{replicas} READY, proxies ready: {proxies_ready}"
                except (TimeoutError, aiohttp.ClientError) as e:  # a head or proxy (re)starting
                    last = f"{type(e).__name__}: {e}"
                if progress is not None:
                    progress(last)
                await asyncio.sleep(POLL_INTERVAL_S)
        raise StartupError(f"{deployment}: {replicas} READY replicas not reached ({last})\n{self.logs()}")

    def _check_children(self) -> None:
        if (dead := self._children.first_exited()) is not None:
            raise child_died(dead)
