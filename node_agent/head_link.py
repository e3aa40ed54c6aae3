"""The agent's link to the head (zguide Paranoid Pirate): a DEALER that registers, heartbeats every interval,
counts the head's liveness, and on losing the head starts over on a new socket after a capped backoff,
re-registering with the replicas it still runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from bus.bounded_recv import limit_frames, recv_bounded
from bus.curve import ClientKeys, HandshakeWatch, secure_client
from bus.liveness import Liveness
from node_agent import metrics
from schemas.messages import (
    GpuInfo,
    Heartbeat,
    Message,
    MessageError,
    Register,
    RegisterAck,
    ReplicaStatus,
    Reregister,
    StartReplica,
    StopReplica,
    decode,
)

log = logging.getLogger("node_agent")

BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 8.0


@dataclass(frozen=True)
class Capacity:
    node_id: str
    host: str
    cpu_slots: int
    gpus: tuple[GpuInfo, ...]
    memory_bytes: int
    metrics: str = ""  # the agent's /metrics "host:port" as others reach it ("" = none)


def _log_send_failure(future: asyncio.Future[None], name: str) -> None:
    if future.cancelled():
        return
    e = future.exception()
    if isinstance(e, zmq.Again):  # not connected (IMMEDIATE) or the queue is full: the next interval retries
        log.debug("head not reachable: %s not sent", name)
    elif e is not None:
        log.warning("could not send %s to the head: %s", name, e)


class HeadLink:
    def __init__(
        self,
        endpoint: str,
        capacity: Capacity,
        *,
        heartbeat_s: float,
        liveness: int,
        statuses: Callable[[], tuple[ReplicaStatus, ...]],
        on_command: Callable[[StartReplica | StopReplica], None],
        keys: ClientKeys | None = None,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._capacity = capacity
        self.heartbeat_s = heartbeat_s
        self._liveness = liveness
        self._statuses = statuses
        self._on_command = on_command
        self._keys = keys
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._watch: HandshakeWatch | None = None  # says why when the head refuses this agent's key
        self.registered = False
        self.registrations = 0  # RegisterAcks received in all (1 + reconnections that succeeded)
        self._register_sent = 0.0  # monotonic time of the last Register sent (its round trip ends at the ack)
        self._head_beat_at: float | None = None  # of the last heartbeat from the head on this connection

    async def run(self) -> None:
        """Keeps the link up until cancelled. The socket stays open on cancel: `close()` ends it."""
        backoff = BACKOFF_FIRST_S
        while True:
            self._connect()
            try:
                if await self._session():
                    backoff = BACKOFF_FIRST_S  # this session had registered: the head was fine, retry soon
                assert self._watch is not None  # made with the socket
                why = self._watch.refusal()
                log.warning(
                    "head at %s lost (silent for %d heartbeats); reconnecting in %.2f s%s",
                    self._endpoint,
                    self._liveness,
                    backoff,
                    f"; {why}" if why else "",
                )
            except Exception:  # a bug must not end the link for good: start over on a new socket, backing off
                log.exception("the link to the head at %s failed; reconnecting in %.2f s", self._endpoint, backoff)
            self._close_socket()
            await asyncio.sleep(backoff)  # the backoff itself, not a synchronisation
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def send(self, msg: Message) -> None:
        """Sends now if registered; otherwise drops it (registration carries the full state anyway)."""
        if not self.registered:
            log.debug("not registered: %s not sent", type(msg).__name__)
            return
        self._post(msg)

    def close(self, linger_s: float = 0.5) -> None:
        """Closes the socket, giving queued messages (last replica events) `linger_s` to leave."""
        self._close_watch()
        if self._sock is not None:
            self._sock.close(linger=int(linger_s * 1000))
            self._sock = None

    # --- one connection ---------------------------------------------------------------------------------------

    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing to a head that is not connected: stale beats are useless
        limit_frames(sock)
        secure_client(sock, self._keys)
        self._watch = HandshakeWatch(sock, self._keys)
        sock.connect(self._endpoint)
        self._sock = sock
        self._set_registered(False)
        self._head_beat_at = None
        key = f" with key {self._keys.name}" if self._keys is not None else ""
        log.info("connecting to the head at %s as node %s%s", self._endpoint, self._capacity.node_id, key)

    def _close_watch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _set_registered(self, registered: bool) -> None:
        self.registered = registered
        metrics.REGISTERED.set(int(registered))

    def _close_socket(self) -> None:
        self._set_registered(False)
        self._close_watch()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _session(self) -> bool:
        """Registers and heartbeats until the head is lost; returns whether it registered."""
        assert self._sock is not None
        liveness = Liveness(self._liveness)
        registered_once = False
        next_beat = time.monotonic()
        first = True
        while True:
            timeout = max(0.0, next_beat - time.monotonic())
            if await self._sock.poll(timeout * 1000, zmq.POLLIN):
                while True:
                    try:
                        frames = await recv_bounded(self._sock, "agent-dealer", zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    liveness.heard()  # any message from the head counts, an oversized one too
                    if frames is not None:  # None: over the size limit, dropped (counted and logged)
                        registered_once |= self._on_frames(frames)
            if time.monotonic() < next_beat:
                continue
            if not first and liveness.tick():
                return registered_once
            first = False
            next_beat = time.monotonic() + self.heartbeat_s
            self._beat()

    def _beat(self) -> None:
        """Register until acknowledged, then a heartbeat, once per interval."""
        assert self._sock is not None
        statuses = self._statuses()
        if self.registered:
            msg: Message = Heartbeat(self._capacity.node_id, statuses)
        else:
            c = self._capacity
            msg = Register(c.node_id, c.host, c.cpu_slots, c.gpus, c.memory_bytes, statuses, c.metrics)
            self._register_sent = time.monotonic()
        self._post(msg)

    def _post(self, msg: Message) -> None:
        """Sends without waiting: the attempt happens now, its failure is logged when the future settles."""
        if self._sock is None:
            return
        name = type(msg).__name__
        future = self._sock.send_multipart(msg.encode(), flags=zmq.NOBLOCK)
        future.add_done_callback(lambda f: _log_send_failure(f, name))

    def _on_frames(self, frames: list[bytes]) -> bool:
        """Handles one message from the head; returns True when it is the RegisterAck."""
        try:
            msg = decode(frames)
        except MessageError as e:
            log.warning("dropped a bad message from the head at %s: %s", self._endpoint, e)
            return False
        if isinstance(msg, RegisterAck):
            if not self.registered:
                metrics.REGISTER_ROUND_TRIP.observe(time.monotonic() - self._register_sent)
                metrics.REGISTRATIONS.inc()
                self._set_registered(True)
                self.registrations += 1
                log.info("registered with the head at %s as node %s", self._endpoint, msg.node_id)
            if msg.heartbeat_interval_s > 0 and msg.heartbeat_interval_s != self.heartbeat_s:
                # the head's interval wins: its liveness counts in its own intervals
                log.info("heartbeat interval set to the head's %.3f s", msg.heartbeat_interval_s)
                self.heartbeat_s = msg.heartbeat_interval_s
            return True
        if isinstance(msg, Reregister):
            if self.registered:
                log.warning("the head at %s does not know node %s: registering again", self._endpoint, msg.node_id)
                self._set_registered(False)
                self._beat()  # a Register now, not at the next interval
        elif isinstance(msg, (StartReplica, StopReplica)):
            self._on_command(msg)
        elif isinstance(msg, Heartbeat):
            now = time.monotonic()
            if self._head_beat_at is not None:
                metrics.HEAD_HEARTBEAT_GAP.observe(now - self._head_beat_at)
            self._head_beat_at = now
        else:
            log.warning("dropped an unexpected %s from the head", type(msg).__name__)
        return False
