"""The head: one ROUTER for agents, the admin CLI and snapshot requests; one PUB for routing snapshots.

One task (`run`) owns the cluster state: it reads the ROUTER, folds each message into the state, sends the
agents their heartbeats, ticks their liveness, reconciles, and publishes a new snapshot version whenever the
routing table changed. The publisher's own task only re-sends the latest snapshot. Each of those steps survives
its own failure (logged with its traceback once, then retried after a short back-off), as a control loop must.
Until the state's view has synced after the start (state.py) nothing is published and snapshot requests wait.

With keys (bus/curve.py) both sockets are CURVE servers and the ZAP handler, a task of this loop too, admits only
the authorized client keys; a log line about a peer's message names the key it authenticated with.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from bus.bounded_recv import DROPPED_MESSAGES, Frames, describe_peer, limit_frames, recv_bounded
from bus.curve import ServerKeys, ZapHandler, secure_server
from bus.endpoints import DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS
from bus.snapshot_pub import DEFAULT_REPUBLISH_S, SnapshotPublisher
from head import metrics
from head.admin_ops import KNOWN_OPS, handle_admin
from head.proxies import PROXY_FORGET_S, ProxyTable
from head.reconcile import Command, reconcile
from head.state import DEFAULT_NODE_GRACE_S, ClusterState
from head.store import Store
from schemas.messages import (
    AdminRequest,
    Heartbeat,
    Message,
    MessageError,
    ProxyReport,
    Register,
    RegisterAck,
    ReplicaEvent,
    Reregister,
    Snapshot,
    SnapshotDeployment,
    SnapshotRequest,
    decode,
)

log = logging.getLogger("head")

RECONCILE_INTERVAL_S = 0.5
# Snapshot versions go out at most this often: agents report load changes as they happen (several a second per
# replica), and every proxy receives each version whole, so a large cluster's reports must coalesce.
PUBLISH_MIN_INTERVAL_S = 0.05
MAX_BATCH = 256  # messages handled before the timers get a turn
# after a failed step of the loop: a fault that persists costs a few lines of log and little CPU, and the other
# steps (heartbeats above all, well inside the agents' liveness) still run between its retries
LOOP_ERROR_BACKOFF_S = 0.25

T = TypeVar("T")


def _peer(identity: bytes, key: str | None = None) -> str:
    return describe_peer(identity.hex(), key)


def advertised(endpoint: str, host: str | None) -> str:
    """`endpoint` as clients reach it: a tcp endpoint's host replaced by `host` when given."""
    if host is None or not endpoint.startswith("tcp://"):
        return endpoint
    port = endpoint.rsplit(":", 1)[1]
    return f"tcp://{f'[{host}]' if ':' in host else host}:{port}"


class Head:
    def __init__(
        self,
        router: str,
        pub: str,
        db_path: Path,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        liveness: int = DEFAULT_LIVENESS,
        republish_interval_s: float = DEFAULT_REPUBLISH_S,
        node_grace_s: float = DEFAULT_NODE_GRACE_S,
        keys: ServerKeys | None = None,
        advertise: str | None = None,
        metrics_address: str = "",
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self._router_addr = router
        self._pub_addr = pub
        self._keys = keys
        self._advertise = advertise
        self._heartbeat_s = heartbeat_s
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._store = Store(db_path)
        self.epoch = self._store.next_epoch()
        # this incarnation: lets proxies follow a head on a new or lost database, whose versions start low again
        self.head_id = secrets.token_hex(8)
        self._seq = 0
        self._state = ClusterState(
            self._store.load_deployments(),
            heartbeat_s,
            liveness,
            now=time.monotonic(),
            known_nodes=self._store.load_nodes(),
            node_grace_s=node_grace_s,
        )
        self._failures: dict[str, int] = {}  # loop step -> consecutive failures
        self._republish_s = republish_interval_s
        self._router: zmq.asyncio.Socket | None = None
        self._publisher: SnapshotPublisher | None = None
        self._zap: ZapHandler | None = None
        self.bad_messages = 0  # messages from peers that arrived whole but did not decode
        self._table: dict[str, SnapshotDeployment] | None = None  # the routing table last published
        self.router_endpoint = ""
        self.pub_endpoint = ""
        self.advertised: dict[str, str] = {}  # "router", "pub": the endpoints as clients reach them
        self.metrics_address = metrics_address  # "host:port" of its /metrics as others reach it ("" = none)
        self._proxies = ProxyTable()

    @property
    def version(self) -> int:
        return self.epoch << 32 | self._seq

    def bind(self) -> None:
        """Binds both sockets (the ZAP handler first, with keys); the resolved endpoints (a "*" port becomes the real
        one) and the advertised ones are then set."""
        if self._keys is not None:
            self._zap = ZapHandler(self._keys, self._ctx)
            self._zap.bind()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer fails instead of vanishing
        limit_frames(router)  # libzmq drops a peer sending one frame over the limit; recv_bounded does the rest
        secure_server(router, self._keys)
        router.bind(self._router_addr)
        self._router = router
        self.router_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._publisher = SnapshotPublisher(
            self._pub_addr, republish_interval_s=self._republish_s, ctx=self._ctx, keys=self._keys
        )
        self.pub_endpoint = self._publisher.endpoint
        self.advertised = {
            "router": advertised(self.router_endpoint, self._advertise),
            "pub": advertised(self.pub_endpoint, self._advertise),
        }
        log.info(
            # the endpoints end the line: tests and tools read them from it
            "head %s started: epoch %d, %d deployments and %d known nodes from %s (acts once they registered, or in "
            "%.1f s); %s; clients use %s and %s; router bound on %s, snapshots published on %s",
            self.head_id,
            self.epoch,
            len(self._state.deployments),
            len(self._state.known_nodes),
            self._store.path,
            self._state.sync_deadline - time.monotonic(),
            "CURVE, authorized keys only" if self._keys is not None else "no keys: open to any peer that reaches it",
            self.advertised["router"],
            self.advertised["pub"],
            self.router_endpoint,
            self.pub_endpoint,
        )

    async def run(self) -> None:
        """Serves until cancelled, then closes its sockets and the store."""
        if self._router is None:
            self.bind()
        assert self._router is not None and self._publisher is not None
        tasks = [asyncio.create_task(self._publisher.run(), name="snapshot-republish")]
        if self._zap is not None:
            tasks.append(asyncio.create_task(self._zap.run(), name="zap"))
        try:
            await self._loop()
        finally:
            for task in tasks:
                task.cancel()
            self._router.close(linger=0)
            self._publisher.close()
            if self._zap is not None:
                self._zap.close()
            self._store.close()
            log.info("head stopped at version %#x", self.version)

    @property
    def synced(self) -> bool:
        return self._state.synced

    async def _loop(self) -> None:
        now = time.monotonic()
        next_heartbeat = now + self._heartbeat_s
        next_reconcile = now
        next_publish = now
        while True:
            wake_at = min(next_heartbeat, next_reconcile)
            if next_publish > now:  # a change held back by the publish interval goes out when it ends
                wake_at = min(wake_at, next_publish)
            changed = bool(await self._guard("receive", self._receive(max(0.0, wake_at - time.monotonic()))))
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self._heartbeat_s
                await self._guard("heartbeat", self._heartbeat(now))
            if changed or now >= next_reconcile:
                next_reconcile = now + RECONCILE_INTERVAL_S
                await self._guard("reconcile", self._reconcile(now))
            if now >= next_publish and await self._guard("publish", self._publish_if_changed()):
                next_publish = now + PUBLISH_MIN_INTERVAL_S

    async def _guard(self, step: str, work: Coroutine[Any, Any, T]) -> T | None:
        """Runs one step of the loop; a failure is logged (with its traceback the first time in a row), backed off
        from, and answered with None, so the loop goes on."""
        try:
            result = await work
        except Exception:
            failures = self._failures[step] = self._failures.get(step, 0) + 1
            if failures == 1:
                log.exception("head loop: %s failed; going on, retried after %.2f s", step, LOOP_ERROR_BACKOFF_S)
            await asyncio.sleep(LOOP_ERROR_BACKOFF_S)
            return None
        failures = self._failures.pop(step, 0)
        if failures:
            log.info("head loop: %s works again after %d failures in a row", step, failures)
        return result

    async def _receive(self, timeout_s: float) -> bool:
        """Handles what the ROUTER has (waiting up to `timeout_s` for the first); returns whether the state changed."""
        assert self._router is not None
        changed = False
        if await self._router.poll(timeout_s * 1000, zmq.POLLIN):
            for _ in range(MAX_BATCH):
                try:
                    frames = await recv_bounded(self._router, "head-router", zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames is not None:  # an oversized message was dropped whole (counted and logged)
                    changed |= await self._on_frames(frames)
        return changed

    async def _reconcile(self, now: float) -> None:
        with metrics.RECONCILE_SECONDS.time():
            commands = reconcile(self._state, now)
        for cmd in commands:
            await self._send_to_node(cmd)
        self._state.export_gauges()

    # --- messages --------------------------------------------------------------------------------------------

    async def _on_frames(self, frames: Frames) -> bool:
        """Handles one ROUTER message; returns whether the state changed. Never raises."""
        identity, body = frames[0], frames[1:]
        envelope: list[bytes] = []
        if body and body[0] == b"":  # a REQ-style empty delimiter: kept for the reply
            envelope, body = [b""], body[1:]
        try:
            msg = decode(body)
        except MessageError as e:
            self.bad_messages += 1
            DROPPED_MESSAGES.labels("head-router", "malformed").inc()
            log.warning(
                "dropped a bad message from peer %s: %s (%d bad messages so far)",
                _peer(identity, frames.user_id),
                e,
                self.bad_messages,
            )
            return False
        try:
            return await self._on_message(identity, envelope, msg)
        except Exception:  # a bug in one handler must not take the head down
            log.exception("handling %s from peer %s failed", type(msg).__name__, _peer(identity, frames.user_id))
            return False

    async def _on_message(self, identity: bytes, envelope: list[bytes], msg: Message) -> bool:
        now = time.monotonic()
        state = self._state
        if isinstance(msg, SnapshotRequest):
            if self._table is None:  # nothing published yet (the view has not synced): the subscriber asks again
                log.debug("snapshot request from peer %s before the first snapshot: not answered", _peer(identity))
                return False
            await self._send(identity, envelope, self._current_snapshot())
            return False
        if isinstance(msg, AdminRequest):
            extra = {
                "head_id": self.head_id,
                "epoch": self.epoch,
                "version": self.version,
                "head": {**self.advertised, "metrics": self.metrics_address},
                "proxies": self._proxies.status(now),
            }
            reply, changed = handle_admin(msg, state, self._store, extra, now)
            op = msg.op if msg.op in KNOWN_OPS else "other"  # a label per unknown op name would grow without bound
            metrics.ADMIN_REQUESTS.labels(op, "ok" if reply.ok else "refused").inc()
            if not reply.ok:
                log.warning("admin %s from peer %s refused: %s", msg.op, _peer(identity), reply.error)
            await self._send(identity, envelope, reply)
            return changed
        if isinstance(msg, ProxyReport):
            if self._proxies.report(msg, now):
                log.info(
                    "proxy %s reports from peer %s: serving on %s, snapshot version %#x",
                    msg.proxy_id,
                    _peer(identity),
                    msg.addr,
                    msg.snapshot_version,
                )
                metrics.PROXIES.set(len(self._proxies))
            return False
        if isinstance(msg, Register):
            if msg.node_id not in state.known_nodes:
                self._store.add_node(msg.node_id)  # a later head waits for it
            state.register(identity, msg, now)
            await self._send(identity, envelope, RegisterAck(msg.node_id, self._heartbeat_s))
            return True
        if isinstance(msg, (Heartbeat, ReplicaEvent)):
            node = state.node_for(identity, msg.node_id)
            if node is None:
                # Declared lost while it was stalled, or known to a previous head: it registers again at once, with
                # the replicas it still runs, rather than after its own liveness for us runs out.
                kind = type(msg).__name__
                log.info(
                    "%s from unknown node %s (peer %s): asked to register again", kind, msg.node_id, _peer(identity)
                )
                await self._send(identity, envelope, Reregister(msg.node_id))
                return False
            state.heard(node, now)
            if isinstance(msg, Heartbeat):
                state.sync_replicas(node, msg.replicas, now)
            else:
                state.observe(node, msg.replica, now)
            return True
        log.warning("dropped a %s from peer %s: not a message the head accepts", type(msg).__name__, _peer(identity))
        return False

    # --- timers ---------------------------------------------------------------------------------------------

    async def _heartbeat(self, now: float) -> None:
        """Sends every alive node its heartbeat and ticks its liveness; a node forgotten is no longer waited for."""
        for node in list(self._state.nodes.values()):
            if node.alive:
                await self._send(node.identity, [], Heartbeat(node.node_id))
        self._state.tick_liveness(now)
        for node_id in self._state.take_forgotten():
            self._store.forget_node(node_id)
        for proxy_id in self._proxies.expire(now):
            log.info("proxy %s silent for %.0f s: no longer listed", proxy_id, PROXY_FORGET_S)
        metrics.PROXIES.set(len(self._proxies))

    # --- output --------------------------------------------------------------------------------------------

    def _current_snapshot(self) -> Snapshot:
        assert self._table is not None
        return Snapshot(self.head_id, self.epoch, self.version, self._table)

    async def _publish_if_changed(self) -> bool:
        """Publishes a new version if the routing table changed since the last; returns whether it did. Nothing
        before the view has synced: a table lacking the replicas agents have yet to report would black-hole them."""
        assert self._publisher is not None
        if not self._state.check_synced(time.monotonic()):
            return False
        table = self._state.routing_table()
        if table == self._table:
            return False
        self._table = table
        self._seq += 1
        await self._publisher.publish(self._current_snapshot())
        metrics.SNAPSHOTS_PUBLISHED.inc()
        metrics.SNAPSHOT_VERSION.set(self.version)
        metrics.SNAPSHOT_BYTES.set(self._publisher.latest_payload_bytes)
        return True

    async def _send_to_node(self, cmd: Command) -> None:
        node = self._state.nodes.get(cmd.node_id)
        if node is None or not node.alive:
            log.warning("cannot send %s to node %s: not registered", type(cmd.message).__name__, cmd.node_id)
            return
        await self._send(node.identity, [], cmd.message)

    async def _send(self, identity: bytes, envelope: list[bytes], msg: Message) -> None:
        assert self._router is not None
        try:
            await self._router.send_multipart([identity, *envelope, *msg.encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # EHOSTUNREACH (peer gone) or EAGAIN (its queue is full): the peer recovers
            log.warning("could not send %s to peer %s: %s", type(msg).__name__, _peer(identity), e)
