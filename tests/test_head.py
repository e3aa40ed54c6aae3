"""head/: a real Head in-process (real ROUTER/PUB sockets, a temp SQLite file) driven by fake agents that are
real DEALER sockets speaking the protocol, observed through a real SnapshotSubscriber and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from controlplane_helpers import (
    DEADLINE_S,
    TEST_HEARTBEAT_S,
    FakeAgent,
    admin,
    replica_status,
    running_head,
    subscriber,
    wait_until,
)
from prometheus_client import REGISTRY

import head.reconcile as head_reconcile
import head.server as head_server
from bus.admin import AdminError
from bus.snapshot_pub import SnapshotPublisher
from head.admin_ops import handle_admin
from head.proxies import ProxyTable
from head.server import PUBLISH_MIN_INTERVAL_S, RECONCILE_INTERVAL_S, Head
from head.state import ClusterState, RestartBackoff
from head.store import Store
from schemas.deployment import (
    DEFAULT_FIRST_TOKEN_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DeploymentSpec,
    Engine,
    Placement,
)
from schemas.messages import (
    MAX_PAYLOAD_BYTES,
    AdminReply,
    AdminRequest,
    Heartbeat,
    Kind,
    ProxyReport,
    Register,
    RegisterAck,
    ReplicaLoad,
    ReplicaState,
    Reregister,
    Snapshot,
    SnapshotRequest,
    StartReplica,
    StopReplica,
    decode,
)

SIM = {"name": "demo", "engine": "sim", "engine_args": {"token_delay_ms": 5}, "replicas": 1, "max_concurrency": 8}


@contextlib.asynccontextmanager
async def agent(head: Head, node_id: str, cpu_slots: int = 4) -> AsyncIterator[FakeAgent]:
    """A registered fake agent heartbeating in the background (a test stops that to make it silent)."""
    a = FakeAgent(head.router_endpoint, node_id, cpu_slots)
    await a.register()
    a.start_heartbeats()
    try:
        yield a
    finally:
        a.close()


def replicas_of(s: Snapshot, deployment: str) -> dict[str, tuple[ReplicaState, str]]:
    return {r.replica_id: (r.state, r.grpc_address) for r in s.replicas(deployment)}


async def test_deploy_places_a_replica_and_ready_makes_it_routable(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        ack = await n1.register()  # again: a re-registration is answered the same way
        assert ack.node_id == "n1" and ack.heartbeat_interval_s == TEST_HEARTBEAT_S
        await admin(head.router_endpoint, "deploy", SIM)
        empty = await sub.wait_for(lambda s: "demo" in s.deployments, timeout=10)
        assert empty.replicas("demo") == ()  # a deployment appears even with no replica
        settings = empty.deployments["demo"]
        assert (settings.max_model_len, settings.first_token_timeout_s, settings.idle_timeout_s) == (
            0,
            DEFAULT_FIRST_TOKEN_TIMEOUT_S,
            DEFAULT_IDLE_TIMEOUT_S,
        )
        assert len(empty.head_id) == 16 and empty.head_id == head.head_id

        start = await n1.expect(StartReplica)
        assert (start.deployment, start.engine, start.engine_args, start.max_concurrency) == (
            "demo",
            "sim",
            {"token_delay_ms": 5},
            8,
        )
        assert start.replica_id.startswith("demo-")
        rid = start.replica_id
        await n1.report(replica_status(rid, "demo", ReplicaState.STARTING))
        await n1.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
        ready = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        (rep,) = ready.replicas("demo")
        assert (rep.node, rep.grpc_address, rep.state, rep.max_concurrency, rep.healthy) == (
            "n1",
            "127.0.0.1:4001",
            ReplicaState.READY,
            8,
            True,
        )
        assert ready.epoch == head.epoch and ready.version >> 32 == head.epoch

        # load from a heartbeat reaches the snapshot as a new version
        load = ReplicaLoad(running=3, waiting=1, kv_usage=0.25)
        n1.replicas[rid] = msgspec.structs.replace(
            replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001", load),
            replica_metrics="127.0.0.1:4101",
            worker_metrics="127.0.0.1:4102",
        )
        loaded = await sub.wait_for(lambda s: s.replicas("demo") and s.replicas("demo")[0].load == load, 10)
        assert loaded.version > ready.version

        status = await admin(head.router_endpoint, "status")
        assert status["epoch"] == head.epoch and status["version"] >= loaded.version
        (node,) = status["nodes"]
        assert (node["node_id"], node["cpu_slots"], node["used_slots"], node["alive"]) == ("n1", 4, 1, True)
        (dep,) = status["deployments"]
        assert (dep["name"], dep["replicas"], dep["ready"]) == ("demo", 1, 1)
        assert dep["replicas_list"] == [
            {
                "id": rid,
                "node": "n1",
                "state": "READY",
                "healthy": True,
                "addr": "127.0.0.1:4001",
                "gpus": [],
                "load": load.to_wire(),
                "metrics": {"replica": "127.0.0.1:4101", "worker": "127.0.0.1:4102"},
            }
        ]
        assert status["synced"] and status["head_id"] == head.head_id and not dep["adopted"]


async def test_a_stream_of_load_reports_coalesces_into_few_snapshot_versions(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await n1.expect(StartReplica)).replica_id
        await n1.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
        ready = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        reports = 40
        t0 = time.monotonic()
        for running in range(1, reports + 1):  # a changing load every ~5 ms, as a busy agent's reports could be
            load = ReplicaLoad(running=running, waiting=0, kv_usage=0.0)
            await n1.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001", load))
            await asyncio.sleep(0.005)  # the pacing of the reports, not a synchronisation
        last = await sub.wait_for(lambda s: s.replicas("demo")[0].load.running == reports, timeout=10)
        elapsed = time.monotonic() - t0
        # Each report changed the table; versions went out at most once per interval (plus the first at once).
        versions = (last.version - ready.version) & 0xFFFFFFFF
        assert 1 <= versions <= elapsed / PUBLISH_MIN_INTERVAL_S + 2, (versions, elapsed)


async def test_placement_picks_the_node_with_most_free_slots(tmp_path: Path) -> None:
    async with (
        running_head(tmp_path / "head.db") as head,
        agent(head, "small", 1) as small,
        agent(head, "big", 3) as big,
    ):
        await admin(head.router_endpoint, "deploy", {**SIM, "replicas": 4})
        # big (3 free) gets the first two; then both have one free: ties go to the lowest id ("big")
        starts_big = [await big.expect(StartReplica) for _ in range(3)]
        start_small = await small.expect(StartReplica)
        assert len({s.replica_id for s in [*starts_big, start_small]}) == 4
        status = await admin(head.router_endpoint, "status")
        assert {n["node_id"]: n["used_slots"] for n in status["nodes"]} == {"big": 3, "small": 1}


async def test_a_lost_node_keeps_its_replicas_for_the_grace_then_they_are_replaced(tmp_path: Path) -> None:
    grace_s = 1.5
    async with (
        running_head(tmp_path / "head.db", node_grace_s=grace_s) as head,
        agent(head, "a") as a,
        subscriber(head) as sub,
    ):
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await a.expect(StartReplica)).replica_id
        await a.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
        await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)

        async with agent(head, "b") as b:
            a.stop_heartbeats()  # a falls silent: lost after 3 intervals, but its replica stays for the grace

            async def a_lost() -> bool:
                status = await admin(head.router_endpoint, "status")
                return {n["node_id"]: n["alive"] for n in status["nodes"]} == {"a": False, "b": True}

            await wait_until(a_lost, what="node a lost")
            assert rid in replicas_of(sub.snapshot, "demo")  # still routed: the proxies' retries cover a dead one
            replacement = await b.expect(StartReplica)  # only once the grace is over
            assert replacement.deployment == "demo" and replacement.replica_id != rid
            status = await admin(head.router_endpoint, "status")
            assert {n["node_id"]: n["lost_s"] for n in status["nodes"]}["a"] >= grace_s
            await sub.wait_for(lambda s: rid not in replicas_of(s, "demo"), timeout=10)


async def test_an_agent_back_within_the_grace_changes_nothing(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db", node_grace_s=60.0) as head, subscriber(head) as sub:
        a = FakeAgent(head.router_endpoint, "a")
        try:
            await a.register()
            a.start_heartbeats()
            await admin(head.router_endpoint, "deploy", SIM)
            rid = (await a.expect(StartReplica)).replica_id
            ready = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001")
            await a.report(ready)
            before = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
            a.stop_heartbeats()  # the agent dies; its replica goes on serving
            a.close()

            async def a_lost() -> bool:
                status = await admin(head.router_endpoint, "status")
                return [n["alive"] for n in status["nodes"]] == [False]

            await wait_until(a_lost, what="node a lost")
            a = FakeAgent(head.router_endpoint, "a")  # the restarted agent, a new peer, re-adopts its replica
            a.replicas[rid] = ready
            await a.register((ready,))
            a.start_heartbeats()
            status = await admin(head.router_endpoint, "status")
            assert [n["alive"] for n in status["nodes"]] == [True]
            assert [r["id"] for r in status["deployments"][0]["replicas_list"]] == [rid]
            # nothing was started nor stopped: the next messages it gets are heartbeats only
            deadline = time.monotonic() + 10 * TEST_HEARTBEAT_S
            while (remaining := deadline - time.monotonic()) > 0:
                if await a.sock.poll(remaining * 1000, zmq.POLLIN):
                    assert isinstance(decode(await a.sock.recv_multipart()), Heartbeat)
            assert replicas_of(sub.snapshot, "demo") == replicas_of(before, "demo")
        finally:
            a.close()


async def test_scale_down_stops_starting_replicas_first_then_the_newest(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", {**SIM, "replicas": 3})
        ids = [(await n1.expect(StartReplica)).replica_id for _ in range(3)]
        for i, rid in enumerate(ids[:2]):
            await n1.report(replica_status(rid, "demo", ReplicaState.READY, f"127.0.0.1:400{i}"))
        await sub.wait_for(lambda s: len(s.replicas("demo")) == 2, timeout=10)

        await admin(head.router_endpoint, "scale", {"name": "demo", "replicas": 2})
        stop = await n1.expect(StopReplica)
        assert stop.replica_id == ids[2] and stop.drain  # the one still STARTING

        await admin(head.router_endpoint, "scale", {"name": "demo", "replicas": 1})
        stop = await n1.expect(StopReplica)
        assert stop.replica_id == ids[1]  # of the READY ones, the newest
        # routed away at once: shown DRAINING until the agent reports it gone
        draining = await sub.wait_for(lambda s: replicas_of(s, "demo").get(ids[1], (None,))[0] == "DRAINING", 10)
        assert replicas_of(draining, "demo")[ids[0]][0] is ReplicaState.READY
        await n1.report(replica_status(ids[1], "demo", ReplicaState.EXITED, exit_code=0))
        await sub.wait_for(lambda s: list(replicas_of(s, "demo")) == [ids[0]], timeout=10)

        await admin(head.router_endpoint, "delete", {"name": "demo"})
        stop = await n1.expect(StopReplica)
        assert stop.replica_id == ids[0]
        gone = await sub.wait_for(lambda s: "demo" not in s.deployments, timeout=10)
        assert gone.deployments == {}


async def test_unexpected_exit_is_replaced(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1:
        await admin(head.router_endpoint, "deploy", SIM)
        first = await n1.expect(StartReplica)
        await n1.report(replica_status(first.replica_id, "demo", ReplicaState.EXITED, exit_code=137))
        second = await n1.expect(StartReplica)  # after the first restart backoff (1 s)
        assert second.replica_id != first.replica_id and second.deployment == "demo"
        (dep,) = (await admin(head.router_endpoint, "status"))["deployments"]
        assert dep["restarts"] == 1
        # one the head asked to stop is no restart
        await admin(head.router_endpoint, "scale", {"name": "demo", "replicas": 0})
        assert (await n1.expect(StopReplica)).replica_id == second.replica_id
        await n1.report(replica_status(second.replica_id, "demo", ReplicaState.EXITED, exit_code=0))
        await wait_until(lambda: status_of_demo(head), what="the stopped replica gone")
        (dep,) = (await admin(head.router_endpoint, "status"))["deployments"]
        assert dep["restarts"] == 1


async def status_of_demo(head: Head) -> bool:
    """Whether demo has no replica left in the head's status."""
    (dep,) = (await admin(head.router_endpoint, "status"))["deployments"]
    return not dep["replicas_list"]


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of this process's default registry (the head runs in the test's process); 0 when absent."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_status_lists_every_processs_metrics_address_and_the_proxies(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db", metrics_address="127.0.0.1:9100") as head:
        n1 = FakeAgent(head.router_endpoint, "n1")
        try:
            await n1.send(Register("n1", "127.0.0.1", 4, (), 1 << 30, (), metrics="127.0.0.1:9101"))
            await n1.expect(RegisterAck)
            proxy = FakeAgent(head.router_endpoint, "proxy")  # a DEALER like the proxy's
            await proxy.send(ProxyReport("proxy-a", "127.0.0.1:8000", 42, 7))
            status = await wait_until(lambda: proxies_listed(head), what="the proxy listed in status")
        finally:
            n1.close()
            proxy.close()
    assert status["head"]["metrics"] == "127.0.0.1:9100"
    (node,) = status["nodes"]
    assert node["metrics"] == "127.0.0.1:9101"
    (p,) = status["proxies"]
    assert {k: v for k, v in p.items() if k != "last_seen_s"} == {
        "id": "proxy-a",
        "addr": "127.0.0.1:8000",
        "metrics": "127.0.0.1:8000",
        "snapshot_version": 42,
        "open_streams": 7,
    }
    assert 0 <= p["last_seen_s"] < DEADLINE_S


async def proxies_listed(head: Head) -> dict[str, Any] | None:
    status = await admin(head.router_endpoint, "status")
    return status if status["proxies"] else None


def test_the_proxy_table_forgets_a_proxy_silent_for_10_s() -> None:
    table = ProxyTable()
    assert table.report(ProxyReport("a", "127.0.0.1:8000", 1, 0), now=100.0)  # new
    assert table.report(ProxyReport("b", "127.0.0.1:8001", 1, 3), now=101.0)
    assert not table.report(ProxyReport("a", "127.0.0.1:8000", 2, 5), now=105.0)  # known: updated
    assert table.expire(now=110.5) == []
    assert [(p["id"], p["snapshot_version"], p["open_streams"], p["last_seen_s"]) for p in table.status(110.5)] == [
        ("a", 2, 5, 5.5),
        ("b", 1, 3, 9.5),
    ]
    assert table.expire(now=111.01) == ["b"]  # silent for just over 10 s
    assert [p["id"] for p in table.status(111.01)] == ["a"] and len(table) == 1
    assert table.expire(now=115.01) == ["a"] and table.status(115.01) == []


async def test_the_head_counts_admin_requests_and_publishes_and_sets_its_gauges(tmp_path: Path) -> None:
    ok_before = metric("tokenbus_head_admin_requests_total", {"op": "deploy", "result": "ok"})
    refused_before = metric("tokenbus_head_admin_requests_total", {"op": "other", "result": "refused"})
    published_before = metric("tokenbus_head_snapshots_published_total")
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        with pytest.raises(AdminError):
            await admin(head.router_endpoint, "launch")
        rid = (await n1.expect(StartReplica)).replica_id
        await n1.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
        snap = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        await wait_until(lambda: metric("tokenbus_head_replicas", {"state": "ready"}) == 1, what="1 ready replica")
        assert metric("tokenbus_head_nodes", {"state": "alive"}) == 1
        assert metric("tokenbus_head_nodes", {"state": "lost"}) == 0
        assert metric("tokenbus_head_snapshot_version") >= snap.version
        assert metric("tokenbus_head_snapshot_bytes") > 0
    assert metric("tokenbus_head_admin_requests_total", {"op": "deploy", "result": "ok"}) == ok_before + 1
    assert metric("tokenbus_head_admin_requests_total", {"op": "other", "result": "refused"}) == refused_before + 1
    assert metric("tokenbus_head_snapshots_published_total") >= published_before + 2  # empty demo, then its replica
    assert metric("tokenbus_head_reconcile_duration_seconds_count") > 0


async def test_agent_list_is_the_truth_for_its_replicas(tmp_path: Path) -> None:
    """A replica the head placed but the agent's heartbeat no longer lists is removed (and replaced)."""
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await n1.expect(StartReplica)).replica_id
        n1.replicas[rid] = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001")  # heartbeats only
        await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        del n1.replicas[rid]  # it vanished without an EXITED event
        await sub.wait_for(lambda s: rid not in replicas_of(s, "demo"), timeout=10)


class AnsweringAgent:
    """A fake agent that outlives a head as a real one does: it heartbeats the replicas it runs, registers again
    (with them) when a head asks it to, and records every command it is sent."""

    def __init__(self, fake: FakeAgent) -> None:
        self.fake = fake
        self.commands: list[StartReplica | StopReplica] = []
        self._task = asyncio.create_task(self._serve(), name=f"answering-{fake.node_id}")

    async def _serve(self) -> None:
        while True:
            msg = decode(await self.fake.sock.recv_multipart())
            if isinstance(msg, Reregister):
                replicas = tuple(self.fake.replicas.values())
                await self.fake.send(
                    Register(self.fake.node_id, "127.0.0.1", self.fake.cpu_slots, (), 1 << 30, replicas)
                )
            elif isinstance(msg, (StartReplica, StopReplica)):
                self.commands.append(msg)

    def close(self) -> None:
        self._task.cancel()
        self.fake.close()


@contextlib.asynccontextmanager
async def two_agents_with_ready_replicas(
    db: Path, endpoints: dict[str, str]
) -> AsyncIterator[tuple[list[AnsweringAgent], int]]:
    """A head on `db` deploys `demo` x2 across two agents, both READY (started at different times); the head is
    then stopped, and the agents (still running their replicas and heartbeating) and its epoch are yielded."""
    agents: list[AnsweringAgent] = []
    try:
        async with running_head(db, **endpoints) as head1, subscriber(head1) as sub:
            fakes = [FakeAgent(head1.router_endpoint, node) for node in ("n1", "n2")]
            for fake in fakes:
                await fake.register()
                fake.start_heartbeats()  # they go on across the restart
            await admin(head1.router_endpoint, "deploy", {**SIM, "replicas": 2})
            for i, fake in enumerate(fakes):
                rid = (await fake.expect(StartReplica)).replica_id
                status = replica_status(rid, "demo", ReplicaState.READY, f"127.0.0.1:400{i}")
                await fake.report(msgspec.structs.replace(status, started_at=1000.0 + i))
                agents.append(AnsweringAgent(fake))
            await sub.wait_for(lambda s: len(s.replicas("demo")) == 2, timeout=10)
            epoch = head1.epoch
        yield agents, epoch
    finally:
        for a in agents:
            a.close()


def record_publishes(monkeypatch: pytest.MonkeyPatch) -> list[Snapshot]:
    """Every snapshot any in-process head publishes from now on, in order."""
    published: list[Snapshot] = []
    publish = SnapshotPublisher.publish

    async def recording(self: SnapshotPublisher, snapshot: Snapshot) -> None:
        published.append(snapshot)
        await publish(self, snapshot)

    monkeypatch.setattr(SnapshotPublisher, "publish", recording)
    return published


async def quiet_reconcile_passes(head: Head, passes: int = 6) -> None:
    """Lets the head's reconcile run several times after its view synced (a window in which a wrong decision
    would have been sent)."""
    await wait_until(lambda: head.synced, what="the head's view synced")
    await asyncio.sleep(passes * RECONCILE_INTERVAL_S)  # an observation window, not a synchronisation


async def test_a_restart_on_the_same_database_waits_for_its_agents_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "head.db"
    # ipc endpoints: the restarted head binds the very same addresses, which the agents keep talking to
    endpoints = {"router": f"ipc://{tmp_path}/router", "pub": f"ipc://{tmp_path}/pub"}
    async with two_agents_with_ready_replicas(db, endpoints) as (agents, epoch1):
        rids = sorted(r for a in agents for r in a.fake.replicas)
        published = record_publishes(monkeypatch)
        with contextlib.closing(Store(db)) as store:
            assert store.load_nodes() == {"n1", "n2"}  # whom the next head waits for
        async with running_head(db, **endpoints) as head2, subscriber(head2) as sub:
            assert head2.epoch == epoch1 + 1
            held = await sub.wait_for(lambda s: s.head_id == head2.head_id, timeout=10)
            await quiet_reconcile_passes(head2)
            # its very first table already lists every replica the agents run: nothing empty reached a proxy
            assert published and all(sorted(r.replica_id for r in s.replicas("demo")) == rids for s in published)
            assert [s.version for s in published] == sorted({s.version for s in published})
            assert held.version >> 32 == head2.epoch
            assert [a.commands for a in agents] == [[], []]  # no duplicate started, no warm replica stopped
            status = await admin(head2.router_endpoint, "status")
            (dep,) = status["deployments"]
            assert (dep["name"], dep["adopted"], dep["ready"]) == ("demo", False, 2)


async def test_a_head_on_a_fresh_database_adopts_what_runs_and_keeps_it_until_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoints = {"router": f"ipc://{tmp_path}/router", "pub": f"ipc://{tmp_path}/pub"}
    async with two_agents_with_ready_replicas(tmp_path / "lost.db", endpoints) as (agents, _):
        rids = sorted(r for a in agents for r in a.fake.replicas)
        published = record_publishes(monkeypatch)
        async with running_head(tmp_path / "fresh.db", **endpoints) as head2:
            assert head2.epoch == 1  # its versions are below anything the proxies hold
            await quiet_reconcile_passes(head2)
            assert published and all(sorted(r.replica_id for r in s.replicas("demo")) == rids for s in published)
            assert [a.commands for a in agents] == [[], []]  # adopted and kept, not stopped as undeployed
            status = await admin(head2.router_endpoint, "status")
            (dep,) = status["deployments"]
            assert (dep["name"], dep["adopted"], dep["replicas"], dep["ready"]) == ("demo", True, 2, 2)

            with pytest.raises(AdminError, match="only adopted"):
                await admin(head2.router_endpoint, "scale", {"name": "demo", "replicas": 1})
            # deploying the name takes the replicas over: 1 desired, so the one started last is stopped
            await admin(head2.router_endpoint, "deploy", {**SIM, "replicas": 1})
            await wait_until(lambda: any(a.commands for a in agents), what="a stop")
            assert agents[0].commands == [] and agents[1].commands == [StopReplica(rids_of(agents[1])[0], drain=True)]
            # deleting it stops the rest
            await admin(head2.router_endpoint, "delete", {"name": "demo"})
            await wait_until(lambda: agents[0].commands, what="the other stop")
            assert agents[0].commands == [StopReplica(rids_of(agents[0])[0], drain=True)]


def rids_of(agent: AnsweringAgent) -> list[str]:
    return list(agent.fake.replicas)


async def test_bad_frames_are_logged_with_the_peer_and_do_not_hurt_the_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_head(tmp_path / "head.db") as head:
        bad = FakeAgent(head.router_endpoint, "bad", identity=b"badpeer")
        try:
            with caplog.at_level(logging.WARNING, logger="head"):
                for frames in (
                    [b"\x03"],  # one frame
                    [b"\x7f", b"\x80"],  # unknown kind
                    [b"\x20", b"\xc1\xc1"],  # not MessagePack
                    [b"\x20", b"\x93\x01\x02\x03"],  # a list, not a map
                    [b"\x20", b"\x83\xa1v\x01\xaarequest_id\xa1x\xa2op\xa6status"],  # wrong type
                    [b"\x01", b"\x81\xa1v\x02"],  # wrong wire version
                    [b"\x03" * 2, b"\x80"],  # two-byte kind
                ):
                    await bad.sock.send_multipart(frames)
                await bad.send(RegisterAck("x", 1.0))  # valid, but not for the head
                await bad.send(AdminRequest(42, "status"))
                reply = await bad.expect(AdminReply)
            assert reply.request_id == 42 and reply.ok
            dropped = [r.getMessage() for r in caplog.records if b"badpeer".hex() in r.getMessage()]
            assert len(dropped) == 8, dropped
        finally:
            bad.close()


async def test_an_oversized_multipart_message_is_dropped_whole_and_the_head_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_head(tmp_path / "head.db") as head:
        big = FakeAgent(head.router_endpoint, "big", identity=b"bigpeer")
        try:
            with caplog.at_level(logging.WARNING, logger="bus.bounded_recv"):
                chunk = b"x" * (MAX_PAYLOAD_BYTES // 2 + 1024)  # each frame under the frame limit, both over it
                await big.sock.send_multipart([bytes([Kind.ADMIN_REQUEST]), chunk, chunk])
                await big.send(AdminRequest(7, "status"))
                reply = await big.expect(AdminReply)
            assert reply.request_id == 7 and reply.ok
            (drop,) = [r.getMessage() for r in caplog.records if "dropped a bus message" in r.getMessage()]
            assert "head-router" in drop and b"bigpeer".hex() in drop
        finally:
            big.close()


@pytest.mark.parametrize(
    ("op", "args", "error"),
    [
        ("launch", {}, "unknown op 'launch'"),
        ("deploy", {**SIM, "name": "bad name!"}, "`str` matching regex '^[a-zA-Z0-9_-]{1,64}$' - at `$.name`"),
        ("deploy", {**SIM, "name": "x" * 65}, "at `$.name`"),
        ("deploy", {**SIM, "engine": "gpt"}, "Invalid enum value 'gpt' - at `$.engine`"),
        ("deploy", {**SIM, "replicas": "2"}, "Expected `int`, got `str` - at `$.replicas`"),
        ("deploy", {**SIM, "replicas": True}, "Expected `int`, got `bool` - at `$.replicas`"),
        ("deploy", {**SIM, "replicas": -1}, "Expected `int` >= 0 - at `$.replicas`"),
        ("deploy", {**SIM, "max_concurrency": 0}, "Expected `int` >= 1 - at `$.max_concurrency`"),
        ("deploy", {**SIM, "gpus_per_replica": -1}, "at `$.gpus_per_replica`"),
        ("deploy", {**SIM, "placement": "random"}, "Invalid enum value 'random' - at `$.placement`"),
        ("deploy", {**SIM, "engine_args": [1]}, "Expected `object`, got `array` - at `$.engine_args`"),
        ("deploy", {**SIM, "engine_args": {"x": "y" * 70_000}}, "bytes of JSON, more than"),
        ("deploy", {"name": "demo"}, "missing required field `engine`"),
        ("deploy", {**SIM, "colour": "red"}, "unknown field `colour`"),
        ("scale", {"name": "ghost", "replicas": 1}, "no deployment named 'ghost'"),
        ("scale", {"name": "demo"}, "missing required field `replicas`"),
        ("scale", {"name": "demo", "replicas": 2000}, "Expected `int` <= 1024 - at `$.replicas`"),
        ("delete", {"name": "ghost"}, "no deployment named 'ghost'"),
        ("delete", {"name": 5}, "Expected `str`, got `int` - at `$.name`"),
        ("status", {"verbose": True}, "unknown field `verbose`"),
    ],
)
async def test_admin_validation_errors(tmp_path: Path, op: str, args: dict, error: str) -> None:
    async with running_head(tmp_path / "head.db") as head:
        await admin(head.router_endpoint, "deploy", SIM)
        with pytest.raises(AdminError) as info:
            await admin(head.router_endpoint, op, args)
        assert error in str(info.value)
        status = await admin(head.router_endpoint, "status")
        assert [(d["name"], d["replicas"]) for d in status["deployments"]] == [("demo", 1)]  # nothing changed


async def test_snapshot_request_is_answered_once_the_view_has_synced(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head:
        await admin(head.router_endpoint, "deploy", SIM)
        peer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(head.router_endpoint)
        try:
            # a new head waits for agents before it has a table: the request is not answered (the subscriber
            # asks again), as the status asked right after it shows
            await peer.send_multipart(SnapshotRequest(0).encode())
            await peer.send_multipart(AdminRequest(1, "status").encode())
            assert await peer.poll(10_000, zmq.POLLIN)
            reply = decode(await peer.recv_multipart())
            assert isinstance(reply, AdminReply) and reply.data["synced"] is False

            await wait_until(lambda: head.synced, what="the head's view synced")
            await peer.send_multipart(SnapshotRequest(0).encode())
            assert await peer.poll(10_000, zmq.POLLIN)
            snap = decode(await peer.recv_multipart())
            assert isinstance(snap, Snapshot)
            assert snap.version == head.version and snap.head_id == head.head_id
            assert list(snap.deployments) == ["demo"] and snap.replicas("demo") == ()
        finally:
            peer.close(linger=0)


async def test_unplaceable_replicas_wait_for_a_node(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head:
        await admin(head.router_endpoint, "deploy", {**SIM, "replicas": 2})
        async with agent(head, "late", cpu_slots=1) as late:
            await late.expect(StartReplica)
            status = await admin(head.router_endpoint, "status")
            assert status["nodes"][0]["used_slots"] == 1
            assert len(status["deployments"][0]["replicas_list"]) == 1  # one slot: the second waits


async def test_deployment_settings_and_context_length_reach_the_snapshot_and_status(tmp_path: Path) -> None:
    spec = {**SIM, "replicas": 3, "first_token_timeout_s": 7.5, "idle_timeout_s": 0}
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", spec)
        ids = [(await n1.expect(StartReplica)).replica_id for _ in range(3)]
        for i, (rid, context) in enumerate(zip(ids, (4096, 0, 2048), strict=True)):  # one has not said yet
            ready = replica_status(rid, "demo", ReplicaState.READY, f"127.0.0.1:400{i}")
            await n1.report(msgspec.structs.replace(ready, max_model_len=context))
        snap = await sub.wait_for(lambda s: len(s.replicas("demo")) == 3, timeout=10)
        settings = snap.deployments["demo"]
        assert (settings.max_model_len, settings.first_token_timeout_s, settings.idle_timeout_s) == (2048, 7.5, 0.0)
        (dep,) = (await admin(head.router_endpoint, "status"))["deployments"]
        assert (dep["first_token_timeout_s"], dep["idle_timeout_s"], dep["max_model_len"]) == (7.5, 0.0, 2048)
    async with running_head(tmp_path / "head.db") as head:  # persisted
        (dep,) = (await admin(head.router_endpoint, "status"))["deployments"]
        assert (dep["first_token_timeout_s"], dep["idle_timeout_s"]) == (7.5, 0.0)
        # the whole spec as deployed, its defaults filled in: what `tokenbus apply` compares a file with
        assert dep["spec"] == msgspec.to_builtins(msgspec.convert(spec, DeploymentSpec))
        assert dep["spec"]["placement"] == "spread" and dep["spec"]["gpus_per_replica"] is None


def test_deploying_the_same_spec_again_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="head")
    state = ClusterState([], TEST_HEARTBEAT_S, 3, now=0.0)
    store = Store(tmp_path / "head.db")

    def deploy(args: dict) -> tuple[dict, bool]:
        reply, changed = handle_admin(AdminRequest(1, "deploy", args), state, store, {}, 0.0)
        assert reply.ok, reply.error
        return reply.data, changed

    try:
        assert deploy(SIM) == ({"changed": True}, True)
        state.backoff["demo"] = RestartBackoff(delay_s=4.0, not_before=10.0)  # its replicas have been crashing
        caplog.clear()
        # the same spec, with its defaults spelled out this time: equal, so nothing happens
        assert deploy(msgspec.to_builtins(msgspec.convert(SIM, DeploymentSpec))) == ({"changed": False}, False)
        assert "demo" in state.backoff and "deployment demo" not in caplog.text

        assert deploy({**SIM, "placement": "pack"}) == ({"changed": True}, True)
        assert "demo" not in state.backoff and "deployment demo updated" in caplog.text
        assert store.load_deployments() == [state.deployments["demo"]]
        assert state.deployments["demo"].placement is Placement.PACK
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"first_token_timeout_s": -1}, "Expected `float` >= 0.0 - at `$.first_token_timeout_s`"),
        ({"idle_timeout_s": 1e9}, "Expected `float` <= 86400.0 - at `$.idle_timeout_s`"),
        ({"idle_timeout_s": "5"}, "Expected `float`, got `str` - at `$.idle_timeout_s`"),
        ({"first_token_timeout_s": True}, "Expected `float`, got `bool` - at `$.first_token_timeout_s`"),
        ({"idle_timeout_s": float("nan")}, "at `$.idle_timeout_s`"),
    ],
)
async def test_timeout_validation(tmp_path: Path, args: dict, error: str) -> None:
    async with running_head(tmp_path / "head.db") as head:
        with pytest.raises(AdminError) as info:
            await admin(head.router_endpoint, "deploy", {**SIM, **args})
        assert error in str(info.value)


def test_a_database_from_before_the_timeouts_and_gpus_opens_with_the_defaults(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "CREATE TABLE deployments (name TEXT PRIMARY KEY, engine TEXT NOT NULL, engine_args TEXT NOT NULL,"
            " replicas INTEGER NOT NULL, max_concurrency INTEGER NOT NULL);"
            "INSERT INTO meta VALUES ('epoch', 4);"
            """INSERT INTO deployments VALUES ('old', 'sim', '{"seed": 1}', 2, 16);"""
        )
        conn.commit()
    store = Store(db)
    try:
        assert store.next_epoch() == 5
        (old,) = store.load_deployments()
        # the columns it lacks read as the spec's defaults
        assert old == DeploymentSpec(
            name="old", engine=Engine.SIM, engine_args={"seed": 1}, replicas=2, max_concurrency=16
        )
        assert (old.first_token_timeout_s, old.gpus_per_replica, old.placement) == (
            DEFAULT_FIRST_TOKEN_TIMEOUT_S,
            None,
            Placement.SPREAD,
        )
        store.put_deployment(msgspec.structs.replace(old, idle_timeout_s=3.0))
        store.add_node("n1")
    finally:
        store.close()
    store = Store(db)  # opening a migrated database again changes nothing
    try:
        assert store.load_deployments() == [msgspec.structs.replace(old, idle_timeout_s=3.0)]
        assert store.load_nodes() == {"n1"}
        # every field away from its default survives the store
        full = DeploymentSpec(
            name="full",
            engine=Engine.VLLM,
            engine_args={"model": "/m", "tensor_parallel_size": 2},
            replicas=3,
            gpus_per_replica=4,
            max_concurrency=9,
            first_token_timeout_s=1.5,
            idle_timeout_s=0.0,
            placement=Placement.PACK,
        )
        store.put_deployment(full)
        assert store.load_deployments()[0] == full
    finally:
        store.close()


async def test_an_unhealthy_replica_is_unroutable_at_once_and_replaced_if_it_stays_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replace_s = 1.0
    monkeypatch.setattr(head_reconcile, "UNHEALTHY_REPLACE_S", replace_s)
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await n1.expect(StartReplica)).replica_id
        ready = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001")
        await n1.report(ready)
        await sub.wait_for(lambda s: [r.healthy for r in s.replicas("demo")] == [True], timeout=10)

        await n1.report(msgspec.structs.replace(ready, healthy=False))  # a stall, over before the replace time
        await sub.wait_for(lambda s: [r.healthy for r in s.replicas("demo")] == [False], timeout=10)
        await n1.report(ready)
        await sub.wait_for(lambda s: [r.healthy for r in s.replicas("demo")] == [True], timeout=10)

        await n1.report(msgspec.structs.replace(ready, healthy=False))  # and now for good
        unhealthy_at = time.monotonic()
        await sub.wait_for(lambda s: [r.healthy for r in s.replicas("demo")] == [False], timeout=10)
        stop = await n1.expect(StopReplica)
        assert stop == StopReplica(rid, drain=False) and time.monotonic() - unhealthy_at >= replace_s
        replacement = await n1.expect(StartReplica)
        assert replacement.deployment == "demo" and replacement.replica_id != rid


async def test_the_loop_survives_failing_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reconcile and publish raise for a while: each failure is logged (one traceback per step), the head keeps
    heartbeating its agent and answering, and once the fault is gone the deployment is placed and published."""
    faulty = {"reconcile": True, "publish": True}
    real_reconcile, real_table = head_server.reconcile, ClusterState.routing_table

    def reconcile(state: ClusterState, now: float) -> list:
        if faulty["reconcile"]:
            raise RuntimeError("injected reconcile fault")
        return real_reconcile(state, now)

    def routing_table(self: ClusterState) -> dict:
        if faulty["publish"]:
            raise RuntimeError("injected publish fault")
        return real_table(self)

    monkeypatch.setattr(head_server, "reconcile", reconcile)
    monkeypatch.setattr(ClusterState, "routing_table", routing_table)
    with caplog.at_level(logging.INFO, logger="head"):
        async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
            await admin(head.router_endpoint, "deploy", SIM)
            await wait_until(lambda: head.synced, what="the head's view synced")
            await wait_until(lambda: len([r for r in caplog.records if "failed; going on" in r.getMessage()]) == 2)
            # several liveness periods of failing steps: the agent is still alive to the head
            await asyncio.sleep(4 * 3 * TEST_HEARTBEAT_S)  # an observation window, not a synchronisation
            status = await admin(head.router_endpoint, "status")
            assert [n["alive"] for n in status["nodes"]] == [True] and sub.snapshot is None

            faulty["reconcile"] = faulty["publish"] = False
            rid = (await n1.expect(StartReplica)).replica_id
            await n1.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
            await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
    failures = [r for r in caplog.records if r.getMessage().startswith("head loop:")]
    tracebacks = [r for r in failures if r.exc_info]
    assert sorted(r.getMessage().split(":")[1].split()[0] for r in tracebacks) == ["publish", "reconcile"]
    assert sum("works again" in r.getMessage() for r in failures) == 2
