"""Helpers for the control-plane tests (test_bus, test_head, test_agent): a head run in-process, fake agents
that are real DEALER sockets speaking the bus protocol, head/agent subprocesses, and polls with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from bus.admin import AdminClient
from bus.snapshot_sub import SnapshotSubscriber
from head.server import Head
from node_agent import binaries
from node_agent.replica_process import REPLICA_BINARY
from schemas.messages import (
    Heartbeat,
    Message,
    Register,
    RegisterAck,
    ReplicaEvent,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    decode,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_HEARTBEAT_S = 0.2  # short, so losses happen fast; liveness 3 still tolerates a 0.4 s stall of a busy machine
DEADLINE_S = 15.0

M = TypeVar("M", bound=Message)


async def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE_S, what: str = "condition") -> Any:
    """Polls `predicate` (sync or async) every 20 ms until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_head(db: Path, **kwargs: Any) -> AsyncIterator[Head]:
    """A Head on free loopback ports (or the endpoints given), run as a task of the test's loop."""
    router = kwargs.pop("router", "tcp://127.0.0.1:*")
    pub = kwargs.pop("pub", "tcp://127.0.0.1:*")
    head = Head(router, pub, db, heartbeat_s=kwargs.pop("heartbeat_s", TEST_HEARTBEAT_S), **kwargs)
    head.bind()
    task = asyncio.create_task(head.run(), name="test-head")
    try:
        yield head
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def subscriber(head: Head, **kwargs: Any) -> AsyncIterator[SnapshotSubscriber]:
    sub = SnapshotSubscriber(head.router_endpoint, head.pub_endpoint, **kwargs)
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


async def admin(head_router: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    client = AdminClient(head_router)
    try:
        return await client.request(op, args or {}, timeout=5.0)
    finally:
        client.close()


class FakeAgent:
    """A protocol-speaking peer on a real DEALER socket: the test decides what it says and when."""

    def __init__(self, router: str, node_id: str, cpu_slots: int = 4, identity: bytes | None = None) -> None:
        self.node_id = node_id
        self.cpu_slots = cpu_slots
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(router)
        self._beating: asyncio.Task[None] | None = None
        self.replicas: dict[str, ReplicaStatus] = {}  # what it says it runs in heartbeats, as a real agent would

    async def send(self, msg: Message) -> None:
        await self.sock.send_multipart(msg.encode())

    async def register(self, replicas: tuple[ReplicaStatus, ...] = ()) -> RegisterAck:
        await self.send(Register(self.node_id, "127.0.0.1", self.cpu_slots, (), 1 << 30, replicas))
        return await self.expect(RegisterAck)

    async def heartbeat(self) -> None:
        await self.send(Heartbeat(self.node_id, tuple(self.replicas.values())))

    async def report(self, status: ReplicaStatus) -> None:
        """A ReplicaEvent; the replica's status is also what later heartbeats list (until it EXITED)."""
        if status.state is ReplicaState.EXITED:
            self.replicas.pop(status.replica_id, None)
        else:
            self.replicas[status.replica_id] = status
        await self.send(ReplicaEvent(self.node_id, status))

    async def expect(self, cls: type[M], timeout: float = DEADLINE_S, skip: tuple[type, ...] = (Heartbeat,)) -> M:
        """The next message of type `cls`, skipping those of the `skip` types; anything else fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.sock.poll(remaining * 1000, zmq.POLLIN):
                raise AssertionError(f"node {self.node_id}: no {cls.__name__} in {timeout} s")
            msg = decode(await self.sock.recv_multipart())
            if isinstance(msg, cls):
                return msg
            assert isinstance(msg, skip), f"node {self.node_id}: expected {cls.__name__}, got {msg}"

    def start_heartbeats(self) -> None:
        """Heartbeats every test interval from now until close()."""

        async def beat() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(TEST_HEARTBEAT_S)  # the heartbeat period itself

        self._beating = asyncio.create_task(beat(), name=f"heartbeats-{self.node_id}")

    def stop_heartbeats(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None

    def close(self) -> None:
        self.stop_heartbeats()
        self.sock.close(linger=0)


def replica_status(
    replica_id: str,
    deployment: str,
    state: ReplicaState,
    addr: str = "",
    load: ReplicaLoad | None = None,
    exit_code: int | None = None,
) -> ReplicaStatus:
    return ReplicaStatus(replica_id, deployment, state, addr, load or ReplicaLoad(), exit_code)


# --- subprocesses ----------------------------------------------------------------------------------------------


class LoggedProcess:
    """A `python -m <module>` child with stderr in a log file; stopped by its PID."""

    def __init__(self, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, pattern: str, timeout: float = DEADLINE_S, count: int = 1) -> re.Match[str]:
        """The `count`-th match of `pattern` in the log (polled with a deadline)."""

        def found() -> re.Match[str] | None:
            matches = list(re.finditer(pattern, self.log_text()))
            if len(matches) >= count:
                return matches[count - 1]
            assert self.proc.poll() is None, f"process exited ({self.proc.returncode}):\n{self.log_text()}"
            return None

        return await wait_until(found, timeout, f"{pattern!r} x{count} in {self.log_path.name}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def replica_path_missing() -> str | None:
    """Why real replicas cannot run here (the binary, the ring binding or the gRPC stubs not built), or None."""
    binary = binaries.bin_dir() / REPLICA_BINARY
    if not binary.exists() or not binary.stat().st_mode & stat.S_IXUSR:
        return f"{binary} not built (make build)"
    try:
        import model_worker.ring  # noqa: F401
        from schemas.rpc import pb  # noqa: F401
    except ImportError as e:
        return f"ring binding or gRPC stubs missing: {e}"
    return None


@contextlib.contextmanager
def stopped_at_exit(*procs: LoggedProcess) -> Iterator[None]:
    """Stops `procs` (started test processes) when the block ends, however it ends."""
    try:
        yield
    finally:
        for p in procs:
            p.stop()
