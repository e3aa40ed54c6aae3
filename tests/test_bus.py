"""bus/: snapshot subscriber (versions, catch-up, gaps, retries), publisher, liveness, admin client.

The "head" here is the test itself holding real PUB and ROUTER sockets, so it can send what a real head never
would (stale, reordered, gapped versions) and see exactly what the subscriber asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio
from controlplane_helpers import wait_until

from bus.admin import AdminClient, AdminError, AdminTimeout
from bus.liveness import Liveness
from bus.snapshot_pub import SnapshotPublisher
from bus.snapshot_sub import SnapshotSubscriber
from schemas.messages import (
    AdminReply,
    AdminRequest,
    ReplicaLoad,
    ReplicaState,
    Snapshot,
    SnapshotDeployment,
    SnapshotReplica,
    SnapshotRequest,
    decode,
    decode_as,
)

EPOCH = 7


def v(seq: int, epoch: int = EPOCH) -> int:
    return epoch << 32 | seq


def snap(version: int, head_id: str | None = None) -> Snapshot:
    """A snapshot whose content names its version, so a test can tell which one is held. Each epoch is its own
    head incarnation unless `head_id` says otherwise."""
    rep = SnapshotReplica(f"r-{version:x}", "n1", "127.0.0.1:1", ReplicaState.READY, 4, ReplicaLoad(), True)
    deployment = SnapshotDeployment(max_model_len=64, first_token_timeout_s=1.0, idle_timeout_s=1.0, replicas=(rep,))
    return Snapshot(head_id or f"head{version >> 32}", version >> 32, version, {"demo": deployment})


class FakeHeadSockets:
    """PUB + ROUTER bound by the test: publishes what it is told, answers requests when told."""

    def __init__(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub_endpoint = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router_endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"

    async def publish(self, s: Snapshot) -> None:
        await self.pub.send_multipart(s.encode())

    async def next_request(self, timeout: float = 10.0) -> tuple[bytes, SnapshotRequest]:
        assert await self.router.poll(timeout * 1000, zmq.POLLIN), "no SnapshotRequest arrived"
        identity, *body = await self.router.recv_multipart()
        return identity, decode_as(SnapshotRequest, body)

    async def answer(self, identity: bytes, s: Snapshot) -> None:
        await self.router.send_multipart([identity, *s.encode()])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


@pytest.fixture
async def fake_head() -> AsyncIterator[FakeHeadSockets]:
    sockets = FakeHeadSockets()
    yield sockets
    sockets.close()


@contextlib.asynccontextmanager
async def started(sub: SnapshotSubscriber) -> AsyncIterator[SnapshotSubscriber]:
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


async def synced(head: FakeHeadSockets, sub: SnapshotSubscriber, version: int) -> None:
    """Answers the start request with `version`, then publishes it until the SUB side is surely subscribed
    (PUB drops everything sent before the subscription arrives): held at `version` and a PUB copy seen."""
    identity, req = await head.next_request()
    assert req.have_version == 0
    await head.answer(identity, snap(version))
    await sub.wait_for_version(version - 1, timeout=10)
    confirmed = sub.confirmations

    async def seen_on_pub() -> bool:
        await head.publish(snap(version))
        return sub.confirmations > confirmed

    await wait_until(seen_on_pub, what="the subscription")


async def test_stale_and_reordered_versions_are_ignored(fake_head: FakeHeadSockets) -> None:
    async with started(SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint)) as sub:
        await synced(fake_head, sub, v(6))
        for old in (v(4), v(5), v(6), v(3, epoch=EPOCH - 1)):  # older, the same, an older epoch: none applies
            await fake_head.publish(snap(old))
        await fake_head.publish(snap(v(7)))
        held = await sub.wait_for_version(v(6), timeout=10)
        assert held.version == v(7)
        assert held.replicas("demo")[0].replica_id == f"r-{v(7):x}"
        assert sub.stale == 3  # v4, v5 and the older epoch; v6 again is a confirmation, not stale
        assert sub.applied == 2  # v6 (answer), v7
        assert sub.requests_sent == 1  # v7 follows v6: no gap


async def test_late_subscriber_gets_the_full_snapshot_by_request() -> None:
    publisher = SnapshotPublisher("tcp://127.0.0.1:*", republish_interval_s=3600)  # no re-publish in this test
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router_endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        await publisher.publish(snap(v(1)))
        await publisher.publish(snap(v(2)))  # both gone before the subscriber exists
        async with started(SnapshotSubscriber(router_endpoint, publisher.endpoint)) as sub:
            assert sub.snapshot is None and sub.staleness_s() == float("inf")
            assert await router.poll(10_000, zmq.POLLIN)
            identity, *body = await router.recv_multipart()
            assert isinstance(decode(body), SnapshotRequest)
            assert publisher.latest is not None
            await router.send_multipart([identity, *publisher.latest.encode()])
            held = await sub.wait_for_version(0, timeout=10)
            assert held == snap(v(2))
            assert sub.staleness_s() < 10
    finally:
        publisher.close()
        router.close(linger=0)


async def test_gap_in_an_epoch_triggers_a_request_but_a_new_epoch_does_not(fake_head: FakeHeadSockets) -> None:
    async with started(SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint)) as sub:
        await synced(fake_head, sub, v(6))
        await fake_head.publish(snap(v(9)))  # v7 and v8 were missed
        identity, req = await fake_head.next_request()
        assert req.have_version == v(6)  # asked before applying v9
        assert sub.requests_sent == 2
        await fake_head.answer(identity, snap(v(9)))
        await sub.wait_for_version(v(8), timeout=10)

        await fake_head.publish(snap(v(1, epoch=EPOCH + 1)))  # the head restarted: a new sequence
        await fake_head.publish(snap(v(2, epoch=EPOCH + 1)))
        await sub.wait_for_version(v(1, epoch=EPOCH + 1), timeout=10)
        assert sub.requests_sent == 2


async def test_a_head_on_a_new_database_is_followed_once_the_old_head_is_silent(fake_head: FakeHeadSockets) -> None:
    """Its versions start below the held one: ignored while the old head still speaks, then followed."""
    silence_s = 1.0  # long beside this test's own publish period (0.1 s), so a busy machine does not fake a silence
    async with started(
        SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint, head_silence_s=silence_s)
    ) as sub:
        await synced(fake_head, sub, v(6))
        fresh = snap(v(1, epoch=1), head_id="fresh")
        window_ends = time.monotonic() + 2 * silence_s
        last_old = time.monotonic()
        while last_old < window_ends:  # both heads speak for a while: the old one keeps the view
            last_old = time.monotonic()
            await fake_head.publish(snap(v(6)))
            await fake_head.publish(fresh)
            await asyncio.sleep(silence_s / 10)  # the old head's re-publish period
        assert sub.version == v(6) and sub.stale > 0 and sub.head_changes == 0
        # the old head is silent from its last publish on

        async def followed() -> bool:
            await fake_head.publish(fresh)
            return sub.version == fresh.version

        await wait_until(followed, what="the new head followed")
        assert time.monotonic() - last_old >= silence_s
        assert sub.snapshot == fresh and sub.head_changes == 1

        # from now on the new head's own sequence counts: its next version applies, a gap asks again
        await fake_head.publish(snap(v(2, epoch=1), head_id="fresh"))
        await sub.wait_for_version(v(1, epoch=1), timeout=10)
        requests = sub.requests_sent
        await fake_head.publish(snap(v(5, epoch=1), head_id="fresh"))
        _, req = await fake_head.next_request()
        assert req.have_version == v(2, epoch=1) and sub.requests_sent == requests + 1


async def test_start_request_is_repeated_until_answered(fake_head: FakeHeadSockets) -> None:
    async with started(
        SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint, request_interval_s=0.05)
    ) as sub:
        await fake_head.next_request()  # not answered
        identity, _ = await fake_head.next_request()
        await fake_head.answer(identity, snap(v(3)))
        assert (await sub.wait_for_version(0, timeout=10)).version == v(3)


async def test_bad_messages_are_dropped_and_logged(
    fake_head: FakeHeadSockets, caplog: pytest.LogCaptureFixture
) -> None:
    async with started(SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint)) as sub:
        await synced(fake_head, sub, v(1))
        with caplog.at_level(logging.WARNING, logger="bus.snapshot_sub"):
            await fake_head.pub.send_multipart([bytes([0x10]), b"\xc1not msgpack"])
            await fake_head.pub.send_multipart([bytes([0x10])])
            await fake_head.publish(snap(v(2)))
            assert (await sub.wait_for_version(v(1), timeout=10)).version == v(2)
        assert sum("dropped a bad message" in r.getMessage() for r in caplog.records) == 2


async def test_wait_for_times_out_with_a_clear_error(fake_head: FakeHeadSockets) -> None:
    async with started(SnapshotSubscriber(fake_head.router_endpoint, fake_head.pub_endpoint)) as sub:
        with pytest.raises(TimeoutError, match="holding version 0"):
            await sub.wait_for_version(0, timeout=0.05)


async def test_publisher_refuses_a_version_that_does_not_grow() -> None:
    publisher = SnapshotPublisher("tcp://127.0.0.1:*")
    try:
        await publisher.publish(snap(v(2)))
        with pytest.raises(ValueError, match="not above"):
            await publisher.publish(snap(v(2)))
    finally:
        publisher.close()


async def test_publisher_republishes_the_latest() -> None:
    publisher = SnapshotPublisher("tcp://127.0.0.1:*", republish_interval_s=0.05)
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publisher.endpoint)
    task = asyncio.create_task(publisher.run())
    try:
        await publisher.publish(snap(v(5)))  # may be lost to the slow joiner: the re-publish is what arrives
        assert await sub.poll(10_000, zmq.POLLIN)
        assert decode(await sub.recv_multipart()) == snap(v(5))
    finally:
        task.cancel()
        sub.close(linger=0)
        publisher.close()


async def test_publisher_survives_a_failed_republish(caplog: pytest.LogCaptureFixture) -> None:
    publisher = SnapshotPublisher("tcp://127.0.0.1:*", republish_interval_s=0.05)
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(publisher.endpoint)
    await publisher.publish(snap(v(5)))
    # the socket's next send fails once (as a send can, e.g. EINTR or a full queue): the loop must go on
    real_send = publisher._sock.send_multipart
    failures = 0

    async def failing_once(frames: list[bytes]) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise zmq.ZMQError(zmq.EAGAIN)
        await real_send(frames)

    publisher._sock.send_multipart = failing_once  # type: ignore[method-assign]
    task = asyncio.create_task(publisher.run())
    try:
        with caplog.at_level(logging.ERROR, logger="bus.snapshot_pub"):
            await wait_until(lambda: failures == 1, 10.0)
            while await sub.poll(0, zmq.POLLIN):  # what came before the failure
                await sub.recv_multipart()
            assert await sub.poll(10_000, zmq.POLLIN)  # a re-publish after it
            assert decode(await sub.recv_multipart()) == snap(v(5))
        assert "re-publishing snapshot version" in caplog.text
        assert not task.done()
    finally:
        task.cancel()
        sub.close(linger=0)
        publisher.close()


def test_liveness_counts_silent_intervals_and_any_message_resets() -> None:
    peer = Liveness(3)
    assert not peer.tick() and not peer.tick()
    assert peer.remaining == 1 and not peer.lost
    peer.heard()
    assert peer.remaining == 3
    assert [peer.tick() for _ in range(4)] == [False, False, True, False]  # lost once, on the third tick
    assert peer.lost
    peer.heard()
    assert not peer.lost
    with pytest.raises(ValueError):
        Liveness(0)


# --- admin client -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_server(answer: str) -> AsyncIterator[str]:
    """A ROUTER answering each AdminRequest per `answer`: "ok" (a stale reply first), "refuse", or "silent"."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

    async def serve() -> None:
        while True:
            identity, *body = await router.recv_multipart()
            req = decode_as(AdminRequest, body)
            if answer == "ok":
                await router.send_multipart([identity, *AdminReply(req.request_id - 1, True, data={"x": 0}).encode()])
                await router.send_multipart([identity, *AdminReply(req.request_id, True, data={"op": req.op}).encode()])
            elif answer == "refuse":
                await router.send_multipart([identity, *AdminReply(req.request_id, False, error="nope").encode()])

    task = asyncio.create_task(serve())
    try:
        yield endpoint
    finally:
        task.cancel()
        router.close(linger=0)


async def test_admin_client_matches_the_reply_to_its_request() -> None:
    async with admin_server("ok") as endpoint:
        client = AdminClient(endpoint)
        try:
            assert await client.request("status", {}) == {"op": "status"}
            assert await client.request("scale", {"name": "a", "replicas": 1}) == {"op": "scale"}
        finally:
            client.close()


async def test_admin_client_raises_on_refusal_and_on_timeout() -> None:
    async with admin_server("refuse") as endpoint:
        client = AdminClient(endpoint)
        with pytest.raises(AdminError, match="nope"):
            await client.request("delete", {"name": "x"})
        client.close()
    async with admin_server("silent") as endpoint:
        client = AdminClient(endpoint)
        with pytest.raises(AdminTimeout, match="no answer") as info:
            await client.request("status", timeout=0.1)
        assert isinstance(info.value, AdminError) and isinstance(info.value, TimeoutError)
        client.close()
