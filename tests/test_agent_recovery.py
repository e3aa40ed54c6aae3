"""The agent under faults, as real processes: a real agent, real `tokenbus-replica` and sim `model_worker` processes,
and a fake head (a real ZeroMQ ROUTER speaking the bus protocol) that decides what the agent is told and records what
it reports. Covered: a stuck (SIGSTOPped) worker is reported unhealthy and then healthy again; a SIGKILLed agent does
not take its replicas with it (a stream through the replica completes) and the restarted agent re-adopts them and can
stop them; an orphan whose agent never returns stops itself and leaves nothing behind; malformed commands from the
head are dropped and the agent goes on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from controlplane_helpers import (
    DEADLINE_S,
    TEST_HEARTBEAT_S,
    LoggedProcess,
    replica_path_missing,
    stopped_at_exit,
    wait_until,
)

from schemas.messages import (
    Heartbeat,
    Message,
    Register,
    RegisterAck,
    ReplicaEvent,
    ReplicaState,
    ReplicaStatus,
    StartReplica,
    StopReplica,
    decode,
)

HB = str(TEST_HEARTBEAT_S)
SLOW_S = 60.0  # starting real replicas on a busy 2-core machine, or waiting for a multi-second detection


needs_replicas = pytest.mark.skipif(replica_path_missing() is not None, reason=str(replica_path_missing()))


class FakeHead:
    """A ROUTER on a free loopback port: acknowledges registrations, answers heartbeats, records every message
    from the agent in arrival order, and sends the commands a test gives it."""

    def __init__(self) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[Message] = []
        self._peer = b""
        self._task = asyncio.create_task(self._serve(), name="fake-head")

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            msg = decode(frames)
            self.received.append(msg)
            self._peer = identity
            if isinstance(msg, Register):
                await self.sock.send_multipart([identity, *RegisterAck(msg.node_id, TEST_HEARTBEAT_S).encode()])
            elif isinstance(msg, Heartbeat):
                await self.sock.send_multipart([identity, *Heartbeat("head").encode()])

    async def send(self, msg: Message) -> None:
        await self.send_raw(msg.encode())

    async def send_raw(self, frames: list[bytes]) -> None:
        await wait_until(lambda: self._peer, what="an agent connected")
        await self.sock.send_multipart([self._peer, *frames])

    async def wait_for(self, what: str, match: Callable[[Message], bool], timeout: float = SLOW_S) -> Message:
        """The first message received (since the start) that matches."""
        return await wait_until(lambda: next((m for m in self.received if match(m)), None), timeout, what)

    def events(self, replica_id: str) -> list[ReplicaStatus]:
        return [m.replica for m in self.received if isinstance(m, ReplicaEvent) and m.replica.replica_id == replica_id]

    async def nth(self, kind: type[Message], n: int) -> Message:
        """The n-th (1-based) message of that kind received."""

        def found() -> Message | None:
            of_kind = [m for m in self.received if isinstance(m, kind)]
            return of_kind[n - 1] if len(of_kind) >= n else None

        return await wait_until(found, SLOW_S, f"{kind.__name__} #{n}")

    async def event(self, replica_id: str, what: str, match: Callable[[ReplicaStatus], bool]) -> ReplicaStatus:
        return await wait_until(lambda: next((r for r in self.events(replica_id) if match(r)), None), SLOW_S, what)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close(linger=0)


@contextlib.asynccontextmanager
async def fake_head() -> AsyncIterator[FakeHead]:
    head = FakeHead()
    try:
        yield head
    finally:
        await head.close()


def start_agent(tmp: Path, head: FakeHead, log_name: str, *extra: str) -> LoggedProcess:
    """A real agent of node n1 with its state directory in `tmp` (the same for every start)."""
    args = ["--head", head.endpoint, "--node-id", "n1", "--heartbeat", HB, "--state-dir", str(tmp / "state"), *extra]
    return LoggedProcess("node_agent", args, tmp / log_name)


def sim_replica(replica_id: str, **engine_args: Any) -> StartReplica:
    return StartReplica(replica_id, "demo", "sim", {"seed": 1, **engine_args}, 64)


def pids_of(agent: LoggedProcess, replica_id: str) -> dict[str, int]:
    found = re.findall(rf"replica {replica_id}: (\w+) started, pid (\d+)", agent.log_text())
    return {name: int(pid) for name, pid in found}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def state_files(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "state" / "replicas").iterdir())


def log_files(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "state" / "logs").iterdir())


async def ready(head: FakeHead, replica_id: str) -> ReplicaStatus:
    return await head.event(replica_id, f"{replica_id} READY", lambda r: r.state is ReplicaState.READY)


@needs_replicas
@pytest.mark.parametrize(
    ("process", "symptom"),
    [
        ("worker", "no load report from its worker"),  # alive, answering, but its engine side produces nothing
        ("replica", "RPC failed: DEADLINE_EXCEEDED"),  # its gRPC server itself hangs
    ],
)
async def test_a_stopped_process_is_reported_unhealthy_and_then_healthy_again(
    tmp_path: Path, process: str, symptom: str
) -> None:
    async with fake_head() as head:
        agent = start_agent(tmp_path, head, "agent.log")
        with stopped_at_exit(agent):
            await head.send(sim_replica("r1"))
            status = await ready(head, "r1")
            assert status.healthy and status.max_model_len == 4096 and abs(status.started_at - time.time()) < SLOW_S
            stopped = pids_of(agent, "r1")[process]
            os.kill(stopped, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                await head.event("r1", "r1 unhealthy", lambda r: not r.healthy)
                detected_s = time.monotonic() - stopped_at
                await agent.wait_for_log(rf"replica r1 is unhealthy: 3 failed checks in a row, the last: {symptom}")
                # the heartbeats say so too, and it is still READY (the head decides what to do with it)
                beat = await head.wait_for(
                    "a heartbeat with r1 unhealthy",
                    lambda m: isinstance(m, Heartbeat) and any(not r.healthy for r in m.replicas),
                )
                assert isinstance(beat, Heartbeat) and beat.replicas[0].state is ReplicaState.READY
            finally:
                os.kill(stopped, signal.SIGCONT)
            unhealthy = len(head.events("r1"))
            await wait_until(lambda: any(r.healthy for r in head.events("r1")[unhealthy:]), SLOW_S, "r1 healthy")
            await agent.wait_for_log("replica r1 is healthy again")
        assert agent.proc.returncode == 0
        # a graceful stop of the agent (SIGTERM) still stops what it runs: only a crash leaves replicas behind
        assert not any(alive(pid) for pid in pids_of(agent, "r1").values())
    # about 3 s of stats age (or 1 s RPC timeouts), and 3 checks 1 s apart: ~6 s here, 5x that on a busy CI box
    assert detected_s < 30, detected_s
    print(f"stopped {process} reported unhealthy after {detected_s:.1f} s")


@needs_replicas
async def test_replicas_outlive_a_killed_agent_and_the_restarted_agent_readopts_them(tmp_path: Path) -> None:
    import grpc

    from schemas.rpc import pb, pb_grpc

    shm_before = set(os.listdir("/dev/shm"))
    async with fake_head() as head:
        first = start_agent(tmp_path, head, "agent-1.log")
        with stopped_at_exit(first):
            await head.send(sim_replica("r1", token_delay_ms=20))
            await ready(head, "r1")
            # READY, and where its worker serves /metrics (the agent reads that line from the worker's log)
            status = await head.event("r1", "r1 with its worker's metrics", lambda r: bool(r.worker_metrics))
            pids = pids_of(first, "r1")
            assert state_files(tmp_path) == ["r1.json"]

            async with grpc.aio.insecure_channel(status.grpc_address) as channel:
                request = pb.GenerateRequest(request_id="x", prompt="hello", params=pb.SamplingParams(max_tokens=100))
                call = pb_grpc.ReplicaStub(channel).Generate(request, timeout=SLOW_S)
                chunks = [await call.read()]
                first.proc.kill()  # SIGKILL mid-stream: no clean stop, nothing of the agent runs
                first.proc.wait()
                while (chunk := await call.read()) is not grpc.aio.EOF:
                    chunks.append(chunk)
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and sum(c.tokens for c in chunks) == 100
            assert all(alive(pid) for pid in pids.values())

        registers = sum(isinstance(m, Register) for m in head.received)
        second = start_agent(tmp_path, head, "agent-2.log")
        with stopped_at_exit(second):
            reg = await head.nth(Register, registers + 1)
            assert isinstance(reg, Register)
            (adopted,) = reg.replicas
            assert (adopted.replica_id, adopted.state, adopted.grpc_address) == (
                "r1",
                ReplicaState.READY,
                status.grpc_address,
            )
            assert (adopted.started_at, adopted.max_model_len, adopted.healthy) == (status.started_at, 4096, True)
            # where its processes serve /metrics comes from the state file: their METRICS lines are not read again
            assert adopted.worker_metrics == status.worker_metrics
            assert adopted.replica_metrics == status.replica_metrics
            await second.wait_for_log(r"replica r1: replica re-adopted, pid \d+")
            await second.wait_for_log(r"replica r1 of demo re-adopted, serving on")

            await head.send(StopReplica("r1", drain=False))  # the new agent can stop what it did not start
            exited = await head.event("r1", "r1 EXITED", lambda r: r.state is ReplicaState.EXITED)
            assert exited.detail == "stopped by the head"
            await wait_until(lambda: not any(alive(pid) for pid in pids.values()), what="replica and worker gone")
            assert state_files(tmp_path) == [] and log_files(tmp_path) == []
            # the output of processes it did not start reaches its log too (they write to files, not to a pipe)
            await second.wait_for_log(r"\[r1 replica\] .* replica r1: Terminated received")
            await second.wait_for_log(r"\[r1 worker\] .* worker r1 stopped")
        assert second.proc.returncode == 0
    assert set(os.listdir("/dev/shm")) <= shm_before


@needs_replicas
async def test_an_orphan_stops_itself_after_its_timeout_and_leaves_nothing_behind(tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    orphan_timeout_s = 2.0
    async with fake_head() as head:
        agent = start_agent(tmp_path, head, "agent-1.log", "--orphan-timeout", str(orphan_timeout_s))
        with stopped_at_exit(agent):
            await head.send(sim_replica("r1"))
            await ready(head, "r1")
            pids = pids_of(agent, "r1")
            agent.proc.kill()
            agent.proc.wait()
            killed_at = time.monotonic()
            assert all(alive(pid) for pid in pids.values())  # the agent's death alone stops nothing
            await wait_until(lambda: not any(alive(pid) for pid in pids.values()), SLOW_S, "orphan gone")
            assert time.monotonic() - killed_at >= orphan_timeout_s
        assert set(os.listdir("/dev/shm")) <= shm_before
        assert state_files(tmp_path) == ["r1.json"]  # nobody was there to remove it
        assert log_files(tmp_path) == ["r1.replica.log", "r1.worker.log"]

        # an agent started later finds the entry stale, removes it, and registers no replica
        registers = sum(isinstance(m, Register) for m in head.received)
        second = start_agent(tmp_path, head, "agent-2.log")
        with stopped_at_exit(second):
            await second.wait_for_log("replica r1: its processes are gone; removing its state entry")
            # what the orphan said while no agent ran is not lost: its last lines are in the new agent's log
            await second.wait_for_log(r"\[r1 replica\] .* orphaned, and no agent called for 2\.0 s: stopping")
            assert log_files(tmp_path) == []
            reg = await head.nth(Register, registers + 1)
            assert isinstance(reg, Register) and reg.replicas == ()
            assert state_files(tmp_path) == []


async def test_malformed_commands_are_dropped_and_the_agent_goes_on(tmp_path: Path) -> None:
    async with fake_head() as head:
        agent = start_agent(tmp_path, head, "agent.log")
        with stopped_at_exit(agent):
            await head.wait_for("a Register", lambda m: isinstance(m, Register))
            await head.send_raw([b"\x04", b"\xc1"])  # StartReplica kind, a byte msgpack never uses
            bad_fields = {"v": 1, "replica_id": 7, "deployment": "d", "engine": "sim", "engine_args": {}}
            await head.send_raw([b"\x04", msgpack.packb(bad_fields)])
            await head.send_raw([b"\x7f", msgpack.packb({"v": 1})])
            await head.send_raw([b"\x04"] * 64)  # more frames than any bus message has: dropped whole
            await head.send(StartReplica("../escape", "demo", "sim", {}, 1))  # would name a file outside the state dir
            await head.send(StopReplica("nowhere"))  # a valid command after them is still handled
            await head.event("nowhere", "nowhere EXITED", lambda r: r.state is ReplicaState.EXITED)
            refused = await head.event("../escape", "../escape refused", lambda r: r.state is ReplicaState.EXITED)
            assert "refused" in refused.detail
            assert agent.log_text().count("dropped a bad message from the head") == 3
            assert re.search(
                r"dropped a bus message on agent-dealer from peer \S+: \d+ bytes in 64 frames", agent.log_text()
            )
            beats = len([m for m in head.received if isinstance(m, Heartbeat)])
            await wait_until(
                lambda: len([m for m in head.received if isinstance(m, Heartbeat)]) > beats + 3, what="more heartbeats"
            )
            assert agent.proc.poll() is None
        assert agent.proc.returncode == 0
        assert not (tmp_path / "escape.json").exists() and state_files(tmp_path) == []


async def test_two_agents_cannot_share_a_state_directory(tmp_path: Path) -> None:
    async with fake_head() as head:
        first = start_agent(tmp_path, head, "agent-1.log")
        with stopped_at_exit(first):
            await head.wait_for("a Register", lambda m: isinstance(m, Register))
            second = start_agent(tmp_path, head, "agent-2.log")
            try:
                code = await asyncio.wait_for(asyncio.to_thread(second.proc.wait), DEADLINE_S)
            finally:
                second.stop()
            assert code == 1
            assert "is in use by another agent" in second.log_text()
