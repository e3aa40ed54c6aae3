"""A local cluster on loopback, started on free ports: head, agent and proxy as real processes.

Used by the end-to-end tests and by `tools.bench_vs_vllm`. Processes are started with tools.procs (the same code
`tokenbus up` uses) and stopped by PID. The proxy listens on port 0 and reports its port with its
`LISTENING host:port` line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bus.admin import AdminClient
from node_agent.binaries import bin_dir
from tools.procs import Child, Children

STARTUP_DEADLINE_S = 60.0


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
    """Owns the processes it starts; `stop()` ends them all, newest first."""

    def __init__(self, state_dir: Path, cpu_slots: int = 4, heartbeat_s: float = 0.5) -> None:
        self.state_dir = state_dir
        self.router = f"tcp://127.0.0.1:{free_port()}"
        self.pub = f"tcp://127.0.0.1:{free_port()}"
        self._children = Children()
        self._cpu_slots = cpu_slots
        self._heartbeat_s = heartbeat_s
        self.proxy_url = ""

    def start(self) -> None:
        bins = require_binaries()
        logs = self.state_dir / "logs"
        env = {**os.environ, "TOKENBUS_BIN_DIR": str(bins), "PYTHONUNBUFFERED": "1"}
        tokenbus = [sys.executable, "-m", "tools"]
        hb = str(self._heartbeat_s)
        head_cmd = [*tokenbus, "head", "--router", self.router, "--pub", self.pub, "--heartbeat", hb]
        self._children.start("head", [*head_cmd, "--db", str(self.state_dir / "head.db")], logs / "head.log", env)
        agent_cmd = [*tokenbus, "agent", "--head", self.router, "--node-id", "e2e", "--heartbeat", hb]
        self._children.start("agent", [*agent_cmd, "--cpu-slots", str(self._cpu_slots)], logs / "agent.log", env)
        proxy_cmd = [str(bins / "tokenbus-proxy"), "--listen", "127.0.0.1:0"]
        proxy_cmd += ["--head-router", self.router, "--head-pub", self.pub]
        proxy = self._children.start("proxy", proxy_cmd, logs / "proxy.log", env)
        self.proxy_url = f"http://{self._listening_address(proxy)}"

    def _listening_address(self, child: Child) -> str:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            for line in child.log_path.read_text(errors="replace").splitlines():
                if line.startswith("LISTENING "):
                    return line.split()[1]
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{child.name} printed no LISTENING line:\n{child.log_tail()}")

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.log_tail(40)}" for c in self._children)

    def stop(self) -> None:
        self._children.stop_all()

    async def admin(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        client = AdminClient(self.router)
        try:
            return await client.request(op, args or {}, timeout=5.0)
        finally:
            client.close()

    async def deploy(self, spec: dict[str, Any], timeout: float = STARTUP_DEADLINE_S) -> list[str]:
        """Deploys `spec` and waits for all its replicas to be READY; their gRPC addresses."""
        await self.admin("deploy", spec)
        return await self.wait_ready(spec["name"], spec.get("replicas", 1), timeout)

    async def wait_ready(self, deployment: str, replicas: int, timeout: float = STARTUP_DEADLINE_S) -> list[str]:
        """Polls until `replicas` replicas of `deployment` are READY and the proxy is ready; their gRPC addresses."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                status = await self.admin("status")
                dep = next((d for d in status["deployments"] if d["name"] == deployment), None)
                ready = [r["addr"] for r in (dep or {}).get("replicas_list", []) if r["state"] == "READY"]
                async with session.get(f"{self.proxy_url}/readyz") as resp:
                    proxy_ready = resp.status == 200
                if len(ready) == replicas and proxy_ready:
                    return ready
                await asyncio.sleep(0.1)
        raise AssertionError(f"{deployment}: {replicas} READY replicas not reached\n{self.logs()}")
