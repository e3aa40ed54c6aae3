"""node_agent/: a real agent process against a real head process: registration, heartbeats, reconnection after a
head restart, reporting a replica that cannot start, a clean stop. The spawning of real replicas runs only where
the C++ binaries are built (`make build`); it is otherwise left to the end-to-end test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pynvml
import pytest
from cluster_harness import metric_samples
from controlplane_helpers import (
    DEADLINE_S,
    TEST_HEARTBEAT_S,
    LoggedProcess,
    admin,
    replica_path_missing,
    stopped_at_exit,
    wait_until,
)
from test_metrics_promtool import fetch_metrics

from bus.snapshot_sub import SnapshotSubscriber
from node_agent import binaries, capacity, gpus
from schemas.messages import ReplicaState, Snapshot

HB = str(TEST_HEARTBEAT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadProcess(LoggedProcess):
    def __init__(self, tmp: Path, router: str = "tcp://127.0.0.1:*", name: str = "head.log") -> None:
        args = ["--router", router, "--pub", "tcp://127.0.0.1:*", "--db", str(tmp / "head.db"), "--heartbeat", HB]
        super().__init__("head", args, tmp / name)
        self.router = ""
        self.pub = ""

    async def started(self) -> HeadProcess:
        m = await self.wait_for_log(r"router bound on (\S+), snapshots published on (\S+)")
        self.router, self.pub = m.group(1), m.group(2)
        return self


def start_agent(
    tmp: Path, router: str, node_id: str = "n1", bin_dir: Path | None = None, extra: tuple[str, ...] = ()
) -> LoggedProcess:
    """A real agent with its state directory under `tmp` (the same one for every start of that node)."""
    env = {"TOKENBUS_BIN_DIR": str(bin_dir)} if bin_dir is not None else {}
    args = ["--head", router, "--node-id", node_id, "--cpu-slots", "3", "--heartbeat", HB]
    args += ["--state-dir", str(tmp / f"state-{node_id}"), *extra]
    return LoggedProcess("node_agent", args, tmp / f"agent-{node_id}.log", env)


async def node_status(router: str, node_id: str) -> dict | None:
    status = await admin(router, "status")
    return next((n for n in status["nodes"] if n["node_id"] == node_id), None)


async def registered(router: str, node_id: str = "n1") -> dict:
    async def alive() -> dict | None:
        node = await node_status(router, node_id)
        return node if node and node["alive"] else None

    return await wait_until(alive, what=f"node {node_id} alive")


async def test_agent_registers_its_capacity_and_stays_alive_by_heartbeats(tmp_path: Path) -> None:
    head = HeadProcess(tmp_path)
    with stopped_at_exit(head):
        await head.started()
        agent = start_agent(tmp_path, head.router, bin_dir=tmp_path)
        with stopped_at_exit(agent):
            node = await registered(head.router)
            assert (node["host"], node["cpu_slots"], node["used_slots"]) == ("127.0.0.1", 3, 0)
            # its /metrics, at the address it registered with
            assert re.fullmatch(r"127\.0\.0\.1:\d+", node["metrics"]), node
            await agent.wait_for_log(rf"metrics on http://{re.escape(node['metrics'])}/metrics")
            m = metric_samples(fetch_metrics(node["metrics"]))
            assert m["tokenbus_agent_registered"] == 1 and m["tokenbus_agent_registrations_total"] == 1
            assert m["tokenbus_agent_register_round_trip_seconds_count"] == 1
            mib = capacity.memory_bytes() >> 20
            await head.wait_for_log(rf"node n1 (re-)?registered: host 127\.0\.0\.1, 3 cpu slots, \d+ gpus, {mib} MiB")
            # liveness is 3 intervals: over 10 intervals the node must stay alive, heard from recently
            until = time.monotonic() + 10 * TEST_HEARTBEAT_S
            while time.monotonic() < until:
                node = await node_status(head.router, "n1")
                assert node is not None and node["alive"] and node["last_seen_s"] < 3 * TEST_HEARTBEAT_S, node
                await asyncio.sleep(TEST_HEARTBEAT_S / 2)  # the sampling period of the check
            assert "lost" not in agent.log_text()
            # the head's heartbeats, one per interval, were timed
            gaps = metric_samples(fetch_metrics(node["metrics"]))["tokenbus_agent_head_heartbeat_gap_seconds_count"]
            assert gaps >= 5
        assert agent.proc.returncode == 0
        assert "agent n1 stopped" in agent.log_text()
        # the head notices the agent is gone
        await head.wait_for_log("node n1 lost")
        assert (await node_status(head.router, "n1"))["alive"] is False


async def test_agent_reregisters_after_a_head_restart(tmp_path: Path) -> None:
    router = f"tcp://127.0.0.1:{free_port()}"
    head = HeadProcess(tmp_path, router)
    await head.started()
    agent = start_agent(tmp_path, router, bin_dir=tmp_path)
    with stopped_at_exit(agent):
        try:
            await registered(router)
            await agent.wait_for_log("registered with the head")
        finally:
            assert head.stop() == 0
        await agent.wait_for_log(r"head at \S+ lost \(silent for 3 heartbeats\); reconnecting in 0\.25 s")
        head2 = HeadProcess(tmp_path, router, name="head2.log")
        with stopped_at_exit(head2):
            await head2.started()
            await head2.wait_for_log(r"head \w+ started: epoch 2")
            await registered(router)
            await agent.wait_for_log("registered with the head", count=2)
            await head2.wait_for_log("node n1 (re-)?registered")


async def test_an_agent_declared_lost_while_stalled_registers_again_at_once(tmp_path: Path) -> None:
    head = HeadProcess(tmp_path)
    with stopped_at_exit(head):
        await head.started()
        agent = start_agent(tmp_path, head.router, bin_dir=tmp_path)
        with stopped_at_exit(agent):
            await registered(head.router)
            os.kill(agent.proc.pid, signal.SIGSTOP)  # a starved agent: it sends nothing, reads nothing
            try:
                await head.wait_for_log("node n1 lost")
            finally:
                os.kill(agent.proc.pid, signal.SIGCONT)
            await head.wait_for_log("Heartbeat from unknown node n1 .* asked to register again")
            await agent.wait_for_log("registered with the head", count=2)
            await registered(head.router)
            # It re-registered on the head's word, over the same connection: it never lost the head itself.
            assert "the head at" in agent.log_text() and "does not know node n1" in agent.log_text()
            assert "lost (silent for" not in agent.log_text()


async def test_agent_reports_a_replica_that_cannot_start(tmp_path: Path) -> None:
    empty = tmp_path / "no-binaries"
    empty.mkdir()
    head = HeadProcess(tmp_path)
    with stopped_at_exit(head):
        await head.started()
        agent = start_agent(tmp_path, head.router, bin_dir=empty)
        with stopped_at_exit(agent):
            await registered(head.router)
            await admin(head.router, "deploy", {"name": "demo", "engine": "sim", "replicas": 1})
            await agent.wait_for_log(rf"replica demo-\w+ failed: {re.escape(str(empty))}/tokenbus-replica not found")
            await head.wait_for_log(r"replica demo-\w+ of demo exited unexpectedly on node n1.*not found")
            await head.wait_for_log(r"replica demo-\w+ of demo placed on node n1", count=2)  # retried, backing off
            assert (await node_status(head.router, "n1"))["alive"]


def test_bin_dir_is_the_env_override_else_the_repo_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENBUS_BIN_DIR", str(tmp_path))
    assert binaries.bin_dir() == tmp_path
    monkeypatch.delenv("TOKENBUS_BIN_DIR")
    assert binaries.bin_dir() == Path(__file__).resolve().parent.parent / "build" / "bin"


def test_capacity_reads_meminfo_and_finds_no_gpu_without_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:        1024 kB\n")
    assert capacity.memory_bytes(str(meminfo)) == 16384 * 1024
    assert capacity.memory_bytes(str(tmp_path / "missing")) == 0

    def no_driver() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)  # what a node without NVIDIA's driver answers
    assert gpus.discover_gpus() == ()
    assert capacity.default_cpu_slots() == len(os.sched_getaffinity(0))


# --- the real replica path, where it is built ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def snapshots(head: HeadProcess) -> AsyncIterator[SnapshotSubscriber]:
    sub = SnapshotSubscriber(head.router, head.pub)
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


def _pids(agent: LoggedProcess, replica_id: str) -> list[int]:
    return [int(p) for p in re.findall(rf"replica {replica_id}: \w+ started, pid (\d+)", agent.log_text())]


async def worker_metrics_known(router: str) -> dict | None:
    """The demo replica's status entry once its worker's metrics address is known."""
    (dep,) = (await admin(router, "status"))["deployments"]
    return next((r for r in dep["replicas_list"] if r["metrics"]["worker"]), None)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.skipif(replica_path_missing() is not None, reason=str(replica_path_missing()))
async def test_agent_runs_real_sim_replicas_replaces_a_crashed_one_and_stops_them(tmp_path: Path) -> None:
    import grpc

    from schemas.rpc import pb, pb_grpc

    head = HeadProcess(tmp_path)
    with stopped_at_exit(head):
        await head.started()
        agent = start_agent(tmp_path, head.router)  # the real binaries from bin_dir()
        with stopped_at_exit(agent):
            await registered(head.router)
            async with snapshots(head) as sub:
                await admin(head.router, "deploy", {"name": "demo", "engine": "sim", "replicas": 1})
                s = await sub.wait_for(lambda s: bool(s.replicas("demo")), timeout=60)
                (rep,) = s.replicas("demo")
                assert rep.state is ReplicaState.READY and rep.node == "n1"
                async with grpc.aio.insecure_channel(rep.grpc_address) as channel:
                    health = await pb_grpc.ReplicaStub(channel).Health(pb.HealthRequest(), timeout=5)
                    assert health.serving and health.engine == "sim"
                replica_pid, worker_pid = _pids(agent, rep.replica_id)
                # where its worker serves /metrics (its METRICS line) reaches the head
                view = await wait_until(lambda: worker_metrics_known(head.router), what="the worker's metrics")
                assert re.fullmatch(r"127\.0\.0\.1:\d+", view["metrics"]["worker"]), view
                assert metric_samples(fetch_metrics(view["metrics"]["worker"]))["tokenbus_worker_running_requests"] == 0

                # the worker dies: the agent ends the binary too, reports EXITED, and the head starts another
                os.kill(worker_pid, signal.SIGKILL)
                await agent.wait_for_log(rf"replica {rep.replica_id} is EXITED \(exit code -9\)")
                assert _gone(replica_pid) and _gone(worker_pid)

                def replaced(s: Snapshot) -> bool:
                    return [r.replica_id != rep.replica_id for r in s.replicas("demo")] == [True]

                s = await sub.wait_for(replaced, timeout=60)
                (rep2,) = s.replicas("demo")

                await admin(head.router, "scale", {"name": "demo", "replicas": 0})  # drained and stopped
                await sub.wait_for(lambda s: s.replicas("demo") == (), timeout=DEADLINE_S)
                await agent.wait_for_log(rf"replica {rep2.replica_id} is EXITED \(exit code 0\)")
                assert all(_gone(pid) for pid in _pids(agent, rep2.replica_id))

                # the agent's own SIGTERM stops what it runs before it exits
                await admin(head.router, "scale", {"name": "demo", "replicas": 1})
                s = await sub.wait_for(lambda s: bool(s.replicas("demo")), timeout=60)
                pids = _pids(agent, s.replicas("demo")[0].replica_id)
                node = await node_status(head.router, "n1")
                assert node is not None
                m = metric_samples(fetch_metrics(node["metrics"]))
                assert m["tokenbus_agent_replica_starts_total"] == 3
                exits = {
                    c: m.get(f'tokenbus_agent_replica_exits_total{{"cause": "{c}"}}') for c in ("crashed", "asked")
                }
                assert exits == {"crashed": 1, "asked": 1}
                assert m['tokenbus_agent_replicas{"state": "ready"}'] == 1
        assert agent.proc.returncode == 0
        assert len(pids) == 2 and all(_gone(pid) for pid in pids)
