"""The head's side of the routing-snapshot bus: owns the PUB socket, sends each new snapshot at once and
re-sends the latest periodically so a subscriber that missed one (PUB drops, late joiners) still converges
and can measure its staleness."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from bus.curve import ServerKeys, secure_server
from schemas.messages import Snapshot

log = logging.getLogger(__name__)

DEFAULT_REPUBLISH_S = 1.0


class SnapshotPublisher:
    def __init__(
        self,
        endpoint: str,
        *,
        republish_interval_s: float = DEFAULT_REPUBLISH_S,
        ctx: zmq.asyncio.Context | None = None,
        keys: ServerKeys | None = None,
    ) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        secure_server(self._sock, keys)  # subscribers without a known key get no snapshot
        self._sock.bind(endpoint)
        # the resolved endpoint, so "tcp://127.0.0.1:*" (a free port) can be used by tests
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._interval = republish_interval_s
        self._latest: Snapshot | None = None
        self._latest_frames: list[bytes] | None = None
        self.latest_payload_bytes = 0  # the size of the latest snapshot's payload (what every proxy receives)
        self._sent = asyncio.Event()  # set on every publish(): the re-publish timer starts over

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    async def publish(self, snapshot: Snapshot) -> None:
        """Sends a new snapshot now; it becomes the one re-published."""
        if self._latest is not None and snapshot.version <= self._latest.version:
            raise ValueError(f"snapshot version {snapshot.version} is not above {self._latest.version}")
        self._latest = snapshot
        self._latest_frames = snapshot.encode()
        self.latest_payload_bytes = len(self._latest_frames[1])
        await self._sock.send_multipart(self._latest_frames)  # PUB never blocks: it drops at its HWM
        self._sent.set()

    async def run(self) -> None:
        """Re-publishes the latest snapshot whenever `republish_interval_s` passes without a publish."""
        while True:
            self._sent.clear()
            try:
                await asyncio.wait_for(self._sent.wait(), self._interval)
            except asyncio.TimeoutError:
                if self._latest_frames is not None:
                    await self._republish()

    async def _republish(self) -> None:
        # A failed send is logged and the loop goes on: the next interval sends again. Ending here would leave
        # subscribers that missed a version stale until the next change.
        try:
            await self._sock.send_multipart(self._latest_frames or [])
        except zmq.ZMQError as e:
            log.error(
                "re-publishing snapshot version %s failed: %s; trying again in %.1f s",
                self._latest.version if self._latest else "-",
                e,
                self._interval,
            )

    def close(self) -> None:
        self._sock.close(linger=0)
