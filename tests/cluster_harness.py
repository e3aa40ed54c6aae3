"""End-to-end test helpers: the local cluster (tools.local_cluster), `tokenbus up` as a real process, and a
replica's Stats over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from schemas.rpc import pb, pb_grpc
from tools.local_cluster import STARTUP_DEADLINE_S, LocalCluster, free_port

__all__ = ["LocalCluster", "Up", "deployed_cluster", "replica_stats", "shm_entries"]


@contextlib.contextmanager
def deployed_cluster(
    state_dir: Path, spec: dict[str, Any], timeout: float = STARTUP_DEADLINE_S, **cluster_args: Any
) -> Iterator[tuple[LocalCluster, list[str]]]:
    """A started local cluster with `spec` deployed and READY, and its replicas' gRPC addresses; stopped after."""
    c = LocalCluster(state_dir, **cluster_args)
    try:
        c.start()
        yield c, asyncio.run(c.deploy(spec, timeout))
    finally:
        c.stop()


async def replica_stats(address: str) -> Any:
    """The replica's Stats over real gRPC."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.ReplicaStub(channel).Stats(pb.StatsRequest(), timeout=5.0)


def metric_samples(text: str) -> dict[str, float]:
    """{"name" or "name{labels as sorted JSON}": value} of every sample in a /metrics text."""
    return {
        f"{s.name}{json.dumps(s.labels, sort_keys=True) if s.labels else ''}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


UP_READY_S = 60.0


class Up:
    """`tokenbus up --engine sim` (and `args`) as a real process on a free port; its output lines collected by a
    thread."""

    def __init__(self, state: Path, *args: str) -> None:
        self.port = free_port()
        self.state = state
        cmd = [sys.executable, "-m", "tools", "up", "--engine", "sim", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            [*cmd, "--state-dir", str(state), "--ready-timeout", str(UP_READY_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "300"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, deadline_s: float = UP_READY_S) -> str:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            found = next((line for line in list(self.lines) if text in line), None)
            if found is not None:
                return found
            if "failed" in "".join(self.lines) or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed by up:\n{''.join(self.lines)}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router(self) -> str:
        """The head's ROUTER endpoint, from the ready line."""
        return self.wait_for("ready: head ").split()[2]

    def pids(self) -> dict[str, int]:
        return {line.split()[1]: int(line.split()[3]) for line in self.lines if line.startswith("started ")}

    def replica_pids(self) -> set[int]:
        """Every replica and worker process the agent(s) started, from the agent's log."""
        agent_log = (self.state / "logs" / "agent.log").read_text()
        return {int(p) for p in re.findall(r"replica \S+: \w+ started, pid (\d+)", agent_log)}

    def request(self, max_tokens: int = 8) -> int:
        """Words in a plain-text answer (one per sim token)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/demo?max_tokens={max_tokens}",
            data=b"What is machine learning?",
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return len(resp.read().split())

    def interrupt(self) -> str:
        """SIGINT, then everything it printed while stopping."""
        n = len(self.lines)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        self._reader.join(10)
        return "".join(self.lines[n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))
