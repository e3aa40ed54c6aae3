"""A routing-snapshot subscriber (zguide clone pattern): SUB for published snapshots, DEALER to ask the head
for the full snapshot at start and whenever a gap shows that one was missed.

Versions are `epoch << 32 | seq`. A snapshot is applied only when its version is above the one held, so a
stale or reordered message never rolls the view back. A gap is a version other than held + 1 from the same head
incarnation (`head_id`) and epoch; a new head starts a new sequence and is not a gap. A head on a new or lost
database starts its versions low again: its snapshots are applied once the head that published the held one has
been silent for its liveness period, so the subscriber follows it instead of ignoring it forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from bus.bounded_recv import limit_frames, recv_bounded
from bus.curve import ClientKeys, secure_client
from bus.endpoints import DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS
from schemas.messages import Kind, MessageError, Snapshot, SnapshotRequest, decode

log = logging.getLogger(__name__)

DEFAULT_REQUEST_INTERVAL_S = 1.0
# A head re-publishes at least every second; one silent this long is gone (the agents' rule for the head).
DEFAULT_HEAD_SILENCE_S = DEFAULT_LIVENESS * DEFAULT_HEARTBEAT_S


class SnapshotSubscriber:
    def __init__(
        self,
        router: str,
        pub: str,
        *,
        request_interval_s: float = DEFAULT_REQUEST_INTERVAL_S,
        head_silence_s: float = DEFAULT_HEAD_SILENCE_S,
        ctx: zmq.asyncio.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        self._router = router
        self._pub = pub
        self._request_interval = request_interval_s
        self._head_silence_s = head_silence_s
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._keys = keys
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._snapshot: Snapshot | None = None
        self._last_heard: float | None = None  # monotonic time of the last message confirming the held version
        self._request_pending = False  # a SnapshotRequest is unanswered: re-sent every request interval
        self._next_request = 0.0  # monotonic time to re-send it (set by each send, a gap's too)
        self._changed = asyncio.Condition()
        self._error: BaseException | None = None
        # counters (for status displays and tests)
        self.requests_sent = 0  # SnapshotRequests sent in all (start, gaps, retries)
        self.applied = 0  # snapshots applied (newer than the one held)
        self.confirmations = 0  # snapshots of the held version again (re-publishes, answers)
        self.stale = 0  # snapshots older than the one held, ignored
        self.head_changes = 0  # snapshots of a new head incarnation applied

    # --- the view ----------------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version if self._snapshot is not None else 0

    def staleness_s(self) -> float:
        """Seconds since the head last confirmed the held snapshot (infinite before the first one)."""
        if self._last_heard is None:
            return float("inf")
        return time.monotonic() - self._last_heard

    async def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """The first held snapshot (the current one included) for which `predicate` is true.

        Raises TimeoutError after `timeout` seconds, or the subscriber task's error if it died.
        """

        def ready() -> bool:
            return self._error is not None or (self._snapshot is not None and predicate(self._snapshot))

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no matching snapshot in {timeout} s (holding version {self.version})") from None
        if self._error is not None:
            raise self._error
        assert self._snapshot is not None
        return self._snapshot

    async def wait_for_version(self, above: int, timeout: float) -> Snapshot:
        """The first snapshot whose version is greater than `above`."""
        return await self.wait_for(lambda s: s.version > above, timeout)

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, bytes([Kind.SNAPSHOT]))
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        for sock, endpoint in ((self._sub, self._pub), (self._dealer, self._router)):
            limit_frames(sock)
            secure_client(sock, self._keys)
            sock.connect(endpoint)
        self._task = asyncio.create_task(self._run(), name="snapshot-subscriber")
        log.info("snapshot subscriber connected to %s (snapshots) and %s (requests)", self._pub, self._router)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for sock in (self._sub, self._dealer):
            if sock is not None:
                sock.close(linger=0)

    # --- the task --------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._sub is not None and self._dealer is not None
        try:
            poller = zmq.asyncio.Poller()
            poller.register(self._sub, zmq.POLLIN)
            poller.register(self._dealer, zmq.POLLIN)
            await self._request()  # the full snapshot first: PUB only carries what happens from now on
            while True:
                timeout_ms = max(0.0, self._next_request - time.monotonic()) * 1000 if self._request_pending else None
                events = dict(await poller.poll(timeout_ms))
                if self._sub in events:
                    await self._receive(self._sub, "pub", answers_request=False)
                if self._dealer in events:
                    await self._receive(self._dealer, "router", answers_request=True)
                if self._request_pending and time.monotonic() >= self._next_request:
                    await self._request()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced to waiters instead of dying silently
            log.exception("snapshot subscriber failed")
            self._error = e
            async with self._changed:
                self._changed.notify_all()
            raise

    async def _request(self) -> None:
        assert self._dealer is not None
        self._request_pending = True
        self._next_request = time.monotonic() + self._request_interval
        self.requests_sent += 1
        # NOBLOCK: with the head away the request is dropped, not queued; it is re-sent every interval
        try:
            await self._dealer.send_multipart(SnapshotRequest(self.version).encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("snapshot request not sent: %s not reachable yet", self._router)

    async def _receive(self, sock: zmq.asyncio.Socket, source: str, *, answers_request: bool) -> None:
        frames = await recv_bounded(sock, f"snapshot-{source}")
        if frames is not None:  # None: over the bus limits, dropped (counted and logged)
            await self._on_frames(frames, source=source, answers_request=answers_request)

    async def _on_frames(self, frames: list[bytes], *, source: str, answers_request: bool) -> None:
        try:
            msg = decode(frames)
        except MessageError as e:
            log.warning("dropped a bad message from the head's %s (%s): %s", source, self._router, e)
            return
        if not isinstance(msg, Snapshot):
            log.warning("dropped an unexpected %s from the head's %s", type(msg).__name__, source)
            return
        if answers_request:
            self._request_pending = False
        held = self._snapshot
        if held is not None and msg.head_id != held.head_id and msg.version <= held.version:
            # a head whose versions start below ours (new database): followed once the old one is gone
            if self.staleness_s() < self._head_silence_s:
                self.stale += 1
                return
            log.warning(
                "head %s silent for %.1f s: following head %s from version %#x (held %#x)",
                held.head_id,
                self.staleness_s(),
                msg.head_id,
                msg.version,
                held.version,
            )
            await self._apply(msg)
            return
        held_version = self.version
        same_head = held is not None and msg.head_id == held.head_id  # one head, one epoch: one sequence
        if same_head and not self._request_pending and msg.version > held_version + 1:
            log.info("snapshot gap: holding %#x, got %#x; asking for the full snapshot", held_version, msg.version)
            await self._request()
        if msg.version < held_version:
            self.stale += 1  # stale or reordered: never roll back
            return
        self._last_heard = time.monotonic()  # held or newer: the view is confirmed current
        if msg.version == held_version:
            self.confirmations += 1
            return
        await self._apply(msg)

    async def _apply(self, msg: Snapshot) -> None:
        if self._snapshot is not None and msg.head_id != self._snapshot.head_id:
            self.head_changes += 1
        self._last_heard = time.monotonic()
        self.applied += 1
        self._snapshot = msg
        async with self._changed:
            self._changed.notify_all()
