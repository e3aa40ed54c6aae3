"""bus/bounded_recv.py: a multipart message over the size or frame limit is dropped whole, whatever its framing.

Real ZeroMQ sockets over TCP on port 0. The memory check traces the Python allocations of the receive
(tracemalloc): that is what the receive controls. libzmq itself holds a whole multipart message before its
first frame can be read, and releases it frame by frame as the receive discards it.
"""

from __future__ import annotations

import contextlib
import logging
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio
import zmq.utils.monitor
from controlplane_helpers import DEADLINE_S
from prometheus_client import REGISTRY

from bus.bounded_recv import MAX_FRAMES, MAX_MESSAGE_BYTES, limit_frames, recv_bounded
from schemas.messages import SnapshotRequest, decode

DEADLINE_MS = DEADLINE_S * 1000
PEER_ID = b"evil-peer"
MIB = 1024 * 1024


def dropped(socket_name: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("tokenbus_bus_dropped_messages_total", {"socket": socket_name, "reason": reason})
    return value or 0.0


@contextlib.asynccontextmanager
async def router_and_dealer() -> AsyncIterator[tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]:
    """A ROUTER with the bus limits, and a DEALER connected to it whose routing identity is PEER_ID."""
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.LINGER, 0)
        limit_frames(router)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, PEER_ID)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        yield router, dealer
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


async def recv_ready(sock: zmq.asyncio.Socket, socket_name: str) -> list[bytes] | None:
    """recv_bounded once a message is there (an absent message fails the test instead of hanging it)."""
    assert await sock.poll(DEADLINE_MS, zmq.POLLIN), f"no message on {socket_name} in {DEADLINE_S} s"
    return await recv_bounded(sock, socket_name, zmq.NOBLOCK)


async def test_200_mb_in_64_frames_is_dropped_whole_in_bounded_memory(caplog: pytest.LogCaptureFixture) -> None:
    name = "test-200mb"
    chunk = b"x" * (200 * MIB // 64)
    normal = SnapshotRequest(have_version=42).encode()
    before = dropped(name, "too_large")
    async with router_and_dealer() as (router, dealer):
        await dealer.send_multipart([chunk] * 64, copy=False)
        await dealer.send_multipart(normal)
        # libzmq makes the message readable only once all of it is there: trace the receive alone
        assert await router.poll(DEADLINE_MS, zmq.POLLIN)
        with caplog.at_level(logging.WARNING, logger="bus.bounded_recv"):
            tracemalloc.start()
            try:
                result = await recv_bounded(router, name)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert result is None
        # at most the frames that fit, one frame past the limit never copied: far below 200 MB
        assert peak < MAX_MESSAGE_BYTES + MIB, f"the receive allocated {peak} bytes"
        # the next message on the same socket arrives intact
        assert await recv_ready(router, name) == [PEER_ID, *normal]
    assert dropped(name, "too_large") == before + 1
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert PEER_ID.hex() in line
    assert f"{len(PEER_ID) + 64 * len(chunk)} bytes in 65 frames" in line


async def test_tracemalloc_sees_the_copies_of_a_multipart_receive() -> None:
    """The control for the test above: recv_multipart of 32 MB in 64 frames traces at least 32 MB."""
    chunk = b"x" * (32 * MIB // 64)
    async with router_and_dealer() as (router, dealer):
        await dealer.send_multipart([chunk] * 64, copy=False)
        assert await router.poll(DEADLINE_MS, zmq.POLLIN)
        tracemalloc.start()
        try:
            frames = await router.recv_multipart()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(frames) == 65
        assert peak >= 32 * MIB


async def test_a_message_exactly_at_the_size_limit_passes_and_one_byte_more_is_dropped() -> None:
    name = "test-size-limit"
    before = dropped(name, "too_large")
    payload_size = MAX_MESSAGE_BYTES - len(PEER_ID) - 1  # identity + one-byte kind + payload = the limit
    async with router_and_dealer() as (router, dealer):
        await dealer.send_multipart([b"\x11", b"p" * payload_size])
        frames = await recv_ready(router, name)
        assert frames is not None
        assert [len(f) for f in frames] == [len(PEER_ID), 1, payload_size]
        assert sum(len(f) for f in frames) == MAX_MESSAGE_BYTES
        await dealer.send_multipart([b"\x11", b"p" * (payload_size + 1)])
        assert await recv_ready(router, name) is None
    assert dropped(name, "too_large") == before + 1


async def test_too_many_frames_are_dropped_and_exactly_max_frames_pass(caplog: pytest.LogCaptureFixture) -> None:
    name = "test-frames"
    before = dropped(name, "too_many_frames")
    normal = SnapshotRequest(have_version=7).encode()
    async with router_and_dealer() as (router, dealer):
        at_limit = [b"a"] * (MAX_FRAMES - 1)  # the ROUTER adds the identity frame
        await dealer.send_multipart(at_limit)
        assert await recv_ready(router, name) == [PEER_ID, *at_limit]
        with caplog.at_level(logging.WARNING, logger="bus.bounded_recv"):
            await dealer.send_multipart([b"a"] * 1000)
            assert await recv_ready(router, name) is None
        await dealer.send_multipart(normal)
        frames = await recv_ready(router, name)
        assert frames is not None and frames[0] == PEER_ID
        assert decode(frames[1:]) == SnapshotRequest(have_version=7)
    assert dropped(name, "too_many_frames") == before + 1
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert PEER_ID.hex() in line
    assert f"{len(PEER_ID) + 1000} bytes in 1001 frames" in line


async def test_a_subscriber_names_the_publisher_endpoint_when_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    name = "test-sub"
    before = dropped(name, "too_many_frames")
    ctx = zmq.asyncio.Context.instance()
    xpub = ctx.socket(zmq.XPUB)
    sub = ctx.socket(zmq.SUB)
    try:
        xpub.setsockopt(zmq.LINGER, 0)
        endpoint = f"tcp://127.0.0.1:{xpub.bind_to_random_port('tcp://127.0.0.1')}"
        sub.setsockopt(zmq.LINGER, 0)
        limit_frames(sub)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        # the XPUB sees the subscription arrive: from then on what it publishes reaches the SUB
        assert await xpub.poll(DEADLINE_MS, zmq.POLLIN)
        assert await xpub.recv() == b"\x01"
        with caplog.at_level(logging.WARNING, logger="bus.bounded_recv"):
            await xpub.send_multipart([b"\x10"] * (MAX_FRAMES + 1))
            assert await recv_ready(sub, name) is None
        await xpub.send_multipart([b"\x10", b"after"])
        assert await recv_ready(sub, name) == [b"\x10", b"after"]
    finally:
        sub.close(linger=0)
        xpub.close(linger=0)
    assert dropped(name, "too_many_frames") == before + 1
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert endpoint in line


async def test_one_frame_over_the_limit_disconnects_the_peer_in_libzmq() -> None:
    """limit_frames is the first line of defence: libzmq refuses the frame before buffering it."""
    async with router_and_dealer() as (router, dealer):
        monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            await dealer.send_multipart([b"\x11", b"p" * (MAX_MESSAGE_BYTES + 1)])
            assert await monitor.poll(DEADLINE_MS, zmq.POLLIN), "the oversized peer was not disconnected"
            event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
            assert event["event"] == zmq.EVENT_DISCONNECTED
            assert not await router.poll(0, zmq.POLLIN)
        finally:
            router.disable_monitor()
            monitor.close(linger=0)


async def test_noblock_raises_again_when_nothing_waits() -> None:
    async with router_and_dealer() as (router, _):
        with pytest.raises(zmq.Again):
            await recv_bounded(router, "test-noblock", zmq.NOBLOCK)
