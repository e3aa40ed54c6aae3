"""A local cluster on loopback, started on free ports: a head, agents and proxies as real processes.

Used by the end-to-end and fault tests, `tools.chaos` and `tools.bench_vs_vllm`. Processes are started with
tools.procs (the same code `tokenbus up` uses), stopped by PID, and can be signalled and restarted one by one as
`tokenbus up` would restart them. A proxy listens on port 0 and reports its port with its `LISTENING host:port`
line; a restarted proxy listens on the port it had.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bus.admin import AdminClient
from bus.curve import load_client
from node_agent.agent import SHUTDOWN_GRACE_S as AGENT_SHUTDOWN_GRACE_S
from node_agent.binaries import bin_dir
from tools.procs import STOP_MARGIN_S, Child, Children, Supervisor

STARTUP_DEADLINE_S = 60.0
# the agent's log line for each process of a replica it spawns (node_agent/replica_process.py)
REPLICA_STARTED_RE = re.compile(r"replica (\S+): (replica|worker) started, pid (\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binaries() -> Path:
    directory = Path(bin_dir())
    for name in ("tokenbus-proxy", "tokenbus-replica"):
        if not (directory / name).exists():
            raise RuntimeError(f"{directory / name} is missing: run `make build` first")
    return directory


class LocalCluster:
    """Owns the processes it starts; `stop()` ends them all, newest first, and whatever replica they left.

    Children are named "head", "agent", "agent-2", ... (node ids "e2e", "e2e-2", ...) and "proxy", "proxy-2", ...
    Each agent keeps its replica records in `<state_dir>/agents/<node id>`, so a restarted agent finds its replicas.
    """

    def __init__(
        self,
        state_dir: Path,
        cpu_slots: int = 4,
        heartbeat_s: float = 0.5,
        agents: int = 1,
        proxies: int = 1,
        agent_args: tuple[str, ...] = (),
        api_keys: Path | None = None,
        keys: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.router = f"tcp://127.0.0.1:{free_port()}"
        self.pub = f"tcp://127.0.0.1:{free_port()}"
        self._children = Children()
        self._cpu_slots = cpu_slots
        self._agent_args = agent_args  # more flags for every agent (a fake GPU inventory: "--gpus", "4")
        self._heartbeat_s = heartbeat_s
        self._agents = [("agent", "e2e")] + [(f"agent-{i}", f"e2e-{i}") for i in range(2, agents + 1)]
        self._proxies = ["proxy"] + [f"proxy-{i}" for i in range(2, proxies + 1)]
        self._api_keys = api_keys  # every proxy's --api-keys file
        self._keys = keys  # CURVE: the key directory of the head, every agent and proxy, and admin()
        self.proxy_urls: dict[str, str] = {}
        self._db = state_dir / "head.db"

    @property
    def proxy_url(self) -> str:
        return self.proxy_urls["proxy"]

    @property
    def agent_names(self) -> list[str]:
        return [name for name, _ in self._agents]

    def start(self) -> None:
        bins = require_binaries()
        logs = self.state_dir / "logs"
        env = {**os.environ, "TOKENBUS_BIN_DIR": str(bins), "PYTHONUNBUFFERED": "1"}
        tokenbus = [sys.executable, "-m", "tools"]
        hb = str(self._heartbeat_s)
        head_cmd = [*tokenbus, "head", "--router", self.router, "--pub", self.pub, "--heartbeat", hb]
        head_cmd += ["--db", str(self._db), *self._key_args("head")]
        self._children.start("head", head_cmd, logs / "head.log", env)
        for name, node_id in self._agents:
            agent_cmd = [*tokenbus, "agent", "--head", self.router, "--node-id", node_id, "--heartbeat", hb]
            agent_cmd += ["--state-dir", str(self.state_dir / "agents" / node_id)]
            agent_cmd += ["--cpu-slots", str(self._cpu_slots), *self._agent_args, *self._key_args("agent")]
            # the agent's own stop of its replicas is not cut short (tools/up.py does the same)
            self._children.start(name, agent_cmd, logs / f"{name}.log", env, AGENT_SHUTDOWN_GRACE_S + STOP_MARGIN_S)
        for name in self._proxies:
            proxy_cmd = [str(bins / "tokenbus-proxy"), "--bind", "127.0.0.1:0"]
            proxy_cmd += ["--head-router", self.router, "--head-pub", self.pub, *self._key_args("proxy")]
            if self._api_keys is not None:
                proxy_cmd += ["--api-keys", str(self._api_keys)]
            self._children.start(name, proxy_cmd, logs / f"{name}.log", env)
        for name in self._proxies:
            self.proxy_urls[name] = f"http://{self._listening_address(self._children.get(name), 0)}"

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
                raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{child.name} printed no LISTENING line:\n{child.log_tail()}")

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

    def supervisor(self, report: Any) -> Supervisor:
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

    def stop(self) -> None:
        self._children.stop_all()

    # --- the head's admin API ------------------------------------------------------------------------------------

    async def admin(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        client = AdminClient(self.router, keys=load_client(self._keys, "cli") if self._keys is not None else None)
        try:
            return await client.request(op, args or {}, timeout=5.0)
        finally:
            client.close()

    async def deploy(self, spec: dict[str, Any], timeout: float = STARTUP_DEADLINE_S) -> list[str]:
        """Deploys `spec` and waits for all its replicas to be READY; their gRPC addresses."""
        await self.admin("deploy", spec)
        return await self.wait_ready(spec["name"], spec.get("replicas", 1), timeout)

    async def ready_replicas(self, deployment: str) -> list[dict[str, Any]]:
        """The head's view of the deployment's READY replicas."""
        status = await self.admin("status")
        dep = next((d for d in status["deployments"] if d["name"] == deployment), None)
        return [r for r in (dep or {}).get("replicas_list", []) if r["state"] == "READY"]

    async def wait_ready(self, deployment: str, replicas: int, timeout: float = STARTUP_DEADLINE_S) -> list[str]:
        """Polls until `replicas` replicas of `deployment` are READY and every proxy is ready; their gRPC addresses."""
        deadline = time.monotonic() + timeout
        last = ""
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    ready = [r["addr"] for r in await self.ready_replicas(deployment)]
                    proxies_ready = True
                    for url in self.proxy_urls.values():
                        async with session.get(f"{url}/readyz") as resp:
                            proxies_ready = proxies_ready and resp.status == 200
                    if len(ready) == replicas and proxies_ready:
                        return ready
                    last = f"{len(ready)} READY, proxies ready: {proxies_ready}"
                except (TimeoutError, aiohttp.ClientError) as e:  # a head or proxy (re)starting
                    last = repr(e)
                await asyncio.sleep(0.1)
        raise AssertionError(f"{deployment}: {replicas} READY replicas not reached ({last})\n{self.logs()}")
