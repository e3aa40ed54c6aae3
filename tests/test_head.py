"""head/: a real Head in-process (real ROUTER/PUB sockets, a temp SQLite file) driven by fake agents that are
real DEALER sockets speaking the protocol, observed through a real SnapshotSubscriber and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from controlplane_helpers import (
    TEST_HEARTBEAT_S,
    FakeAgent,
    admin,
    replica_status,
    running_head,
    subscriber,
    wait_until,
)

from bus.admin import AdminError
from head.server import PUBLISH_MIN_INTERVAL_S, Head
from schemas.messages import (
    DEFAULT_FIRST_TOKEN_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    AdminReply,
    AdminRequest,
    Heartbeat,
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
        n1.replicas[rid] = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001", load)
        loaded = await sub.wait_for(lambda s: s.replicas("demo") and s.replicas("demo")[0].load == load, 10)
        assert loaded.version > ready.version

        status = await admin(head.router_endpoint, "status")
        assert status["epoch"] == head.epoch and status["version"] >= loaded.version
        (node,) = status["nodes"]
        assert (node["node_id"], node["cpu_slots"], node["used_slots"], node["alive"]) == ("n1", 4, 1, True)
        (dep,) = status["deployments"]
        assert (dep["name"], dep["replicas"], dep["ready"]) == ("demo", 1, 1)
        assert dep["replicas_list"] == [
            {"id": rid, "node": "n1", "state": "READY", "addr": "127.0.0.1:4001", "load": load.to_wire()}
        ]


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


async def test_lost_agent_replicas_leave_the_snapshot_and_are_replaced(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head, agent(head, "a") as a, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await a.expect(StartReplica)).replica_id
        await a.report(replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001"))
        await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)

        async with agent(head, "b") as b:
            a.stop_heartbeats()  # a falls silent: lost after 3 intervals, its replica leaves the snapshot
            await sub.wait_for(lambda s: rid not in replicas_of(s, "demo"), timeout=10)
            replacement = await b.expect(StartReplica)
            assert replacement.deployment == "demo" and replacement.replica_id != rid
            status = await admin(head.router_endpoint, "status")
            alive = {n["node_id"]: n["alive"] for n in status["nodes"]}
            assert alive == {"a": False, "b": True}


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


async def test_agent_list_is_the_truth_for_its_replicas(tmp_path: Path) -> None:
    """A replica the head placed but the agent's heartbeat no longer lists is removed (and replaced)."""
    async with running_head(tmp_path / "head.db") as head, agent(head, "n1") as n1, subscriber(head) as sub:
        await admin(head.router_endpoint, "deploy", SIM)
        rid = (await n1.expect(StartReplica)).replica_id
        n1.replicas[rid] = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001")  # heartbeats only
        await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        del n1.replicas[rid]  # it vanished without an EXITED event
        await sub.wait_for(lambda s: rid not in replicas_of(s, "demo"), timeout=10)


async def test_restart_keeps_deployments_adopts_replicas_and_versions_grow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "head.db"
    # ipc endpoints: the restarted head binds the very same addresses, so one subscriber spans both heads
    endpoints = {"router": f"ipc://{tmp_path}/router", "pub": f"ipc://{tmp_path}/pub"}
    sub_cm = None
    async with running_head(db, **endpoints) as head1:
        sub_cm = subscriber(head1)
        sub = await sub_cm.__aenter__()
        n1 = FakeAgent(head1.router_endpoint, "n1")
        await n1.register()
        n1.start_heartbeats()  # they go on across the restart
        await admin(head1.router_endpoint, "deploy", SIM)
        rid = (await n1.expect(StartReplica)).replica_id
        ready = replica_status(rid, "demo", ReplicaState.READY, "127.0.0.1:4001")
        await n1.report(ready)
        before = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
        epoch1 = head1.epoch
    try:
        async with running_head(db, **endpoints) as head2:
            assert head2.epoch == epoch1 + 1
            after = await sub.wait_for(lambda s: s.epoch == head2.epoch, timeout=10)
            assert after.version > before.version
            assert list(after.deployments) == ["demo"] and after.replicas("demo") == ()  # persisted; no replica yet

            # the agent's heartbeat reaches a head that does not know it: logged, and answered with REREGISTER
            with caplog.at_level(logging.INFO, logger="head"):
                await wait_until(lambda: any("from unknown node n1" in r.getMessage() for r in caplog.records))
            assert decode(await n1.sock.recv_multipart()) == Reregister("n1")

            # re-registers listing what it still runs (past the REREGISTERs its beats drew meanwhile): adopted
            await n1.send(Register("n1", "127.0.0.1", n1.cpu_slots, 0, 1 << 30, (ready,)))
            await n1.expect(RegisterAck, skip=(Heartbeat, Reregister))
            adopted = await sub.wait_for(lambda s: rid in replicas_of(s, "demo"), timeout=10)
            assert adopted.version > after.version
            status = await admin(head2.router_endpoint, "status")
            assert [d["replicas_list"][0]["id"] for d in status["deployments"]] == [rid]
            # adopted, so nothing new is started: after the REREGISTERs answering beats sent before it registered,
            # the next message the agent gets is a head heartbeat
            while isinstance(msg := decode(await n1.sock.recv_multipart()), Reregister):
                pass
            assert isinstance(msg, Heartbeat)
    finally:
        n1.close()
        await sub_cm.__aexit__(None, None, None)


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


@pytest.mark.parametrize(
    ("op", "args", "error"),
    [
        ("launch", {}, "unknown op 'launch'"),
        ("deploy", {**SIM, "name": "bad name!"}, "name must be 1-64 characters"),
        ("deploy", {**SIM, "name": "x" * 65}, "name must be 1-64 characters"),
        ("deploy", {**SIM, "engine": "gpt"}, "engine must be one of sim, vllm"),
        ("deploy", {**SIM, "replicas": "2"}, "replicas must be an integer, got str"),
        ("deploy", {**SIM, "replicas": True}, "replicas must be an integer, got bool"),
        ("deploy", {**SIM, "replicas": -1}, "replicas must be between 0 and"),
        ("deploy", {**SIM, "max_concurrency": 0}, "max_concurrency must be between 1 and"),
        ("deploy", {**SIM, "engine_args": [1]}, "engine_args must be a map"),
        ("deploy", {"name": "demo"}, "missing argument(s): engine"),
        ("deploy", {**SIM, "colour": "red"}, "unknown argument(s): colour"),
        ("scale", {"name": "ghost", "replicas": 1}, "no deployment named 'ghost'"),
        ("scale", {"name": "demo"}, "missing argument(s): replicas"),
        ("delete", {"name": "ghost"}, "no deployment named 'ghost'"),
        ("delete", {"name": 5}, "name must be 1-64 characters"),
        ("status", {"verbose": True}, "unknown argument(s): verbose"),
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


async def test_snapshot_request_is_answered_with_the_current_snapshot(tmp_path: Path) -> None:
    async with running_head(tmp_path / "head.db") as head:
        await admin(head.router_endpoint, "deploy", SIM)
        peer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(head.router_endpoint)
        try:
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
