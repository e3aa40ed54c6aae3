"""The head's cluster state: desired deployments, registered nodes, replicas. Owned by the head's one task.

Agents are the truth about what runs: every report (Register, Heartbeat, ReplicaEvent) is folded in here, and
the reconcile loop (reconcile.py) turns the difference between desired and actual into commands.

A head that starts knows the desired state (SQLite) but not what runs: its view has synced once every node it
knew has registered again, or after a bounded grace. Until then it neither places, stops nor publishes, so a
restart never starts a duplicate, stops a warm replica or hands the proxies a table without their replicas.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bus.liveness import Liveness
from bus.metrics_http import set_replica_states
from head import metrics
from head.placement import NodeRoom
from schemas.deployment import DeploymentSpec, Engine
from schemas.messages import (
    GpuInfo,
    Register,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    SnapshotDeployment,
    SnapshotReplica,
)

log = logging.getLogger("head")

# a replica the head started but no agent report has mentioned after this long is taken as never started
# (its StartReplica was lost); several heartbeat intervals, so a report in flight is never overtaken
UNCONFIRMED_GRACE_INTERVALS = 5
FORGET_LOST_NODE_S = 300.0  # a lost node stays listed (alive=false) in status this long (and past its grace)
RESTART_BACKOFF_FIRST_S = 1.0  # a deployment whose replica crashed waits this long before the next start...
RESTART_BACKOFF_MAX_S = 30.0  # ...doubling per crash up to this, until one of its replicas is READY
# A starting head waits at most this many liveness periods (liveness x heartbeat) for the nodes it knew: long
# enough for every live agent to hear of the new head (REREGISTER) and register, even one in its reconnect backoff...
SYNC_GRACE_LIVENESS_PERIODS = 2
SYNC_GRACE_MAX_S = 20.0  # ...but no longer than this with slow heartbeats: a new deployment waits as long
# A lost node's replicas stay published and counted this long: an agent that restarts (its replicas outlive it)
# comes back within it, and the proxies' retries and ejection cover a replica that did die with its node.
DEFAULT_NODE_GRACE_S = 15.0
# A READY replica its agent reports unhealthy is not routed to at once, and replaced after this long unless it
# recovers first: long enough for a short stall (a GC pause, a swap storm) to pass without losing a warm replica.
UNHEALTHY_REPLACE_S = 10.0


@dataclass
class Node:
    node_id: str
    identity: bytes  # the agent DEALER's routing id on the head's ROUTER (new on every reconnect)
    host: str
    cpu_slots: int
    gpus: tuple[GpuInfo, ...]
    memory_bytes: int
    liveness: Liveness
    last_seen: float
    metrics: str = ""  # its agent's /metrics "host:port" ("" = none)
    alive: bool = True
    lost_at: float = 0.0
    released: bool = False  # lost past the grace: its replicas were removed (and replaced)


@dataclass
class Replica:
    replica_id: str
    deployment: str
    node_id: str
    state: ReplicaState
    created: float  # monotonic
    order: int  # creation order in this head ("newest" for scale-down: one pass creates several at the same time)
    grpc_address: str = ""
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    confirmed: bool = False  # an agent report has mentioned it
    healthy: bool = True  # the agent's active health verdict
    max_model_len: int = 0  # as the replica reported it (0 = not yet)
    started_at: float = 0.0  # unix seconds when its agent spawned it (0 = not reported)
    gpus: tuple[int, ...] = ()  # the indices of its node's GPUs it holds, from placement or its agent's report
    replica_metrics: str = ""  # the /metrics "host:port" of its binary and of its worker ("" = not known)
    worker_metrics: str = ""
    unhealthy_since: float | None = None  # monotonic time of the report that made it unhealthy
    stopping: bool = False  # the head asked for it to stop
    stop_drain: bool = True  # ... letting its open requests finish
    stop_sent_at: float = 0.0


@dataclass
class RestartBackoff:
    delay_s: float = 0.0
    not_before: float = 0.0


class ClusterState:
    def __init__(
        self,
        deployments: list[DeploymentSpec],
        heartbeat_s: float,
        liveness: int,
        *,
        now: float,
        known_nodes: frozenset[str] = frozenset(),
        node_grace_s: float = DEFAULT_NODE_GRACE_S,
    ) -> None:
        self.deployments: dict[str, DeploymentSpec] = {d.name: d for d in deployments}
        self.nodes: dict[str, Node] = {}
        self.replicas: dict[str, Replica] = {}
        self.backoff: dict[str, RestartBackoff] = {}
        # deployments short of replicas because no node fits one more, with the reason (logged when it changes)
        self.unplaced: dict[str, str] = {}
        # replicas of each deployment that exited without being asked to (and were replaced), since this head started
        self.restarts: dict[str, int] = {}
        # deployments the head has no record of (a new or lost database) whose replicas agents run: published and
        # left alone until the user deploys or deletes the name, so traffic to them is never black-holed
        self.adopted: set[str] = set()
        self._order = itertools.count()
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.node_grace_s = node_grace_s
        self.known_nodes = set(known_nodes)  # every node that registered with this database (persisted)
        self._awaited = frozenset(known_nodes)  # those known at the start: the sync waits for them
        self._forgotten: list[str] = []  # nodes no longer known, for the store to drop (take_forgotten)
        self._started = now
        self.sync_deadline = now + min(SYNC_GRACE_LIVENESS_PERIODS * liveness * heartbeat_s, SYNC_GRACE_MAX_S)
        self.synced = False

    # --- sync after a start ------------------------------------------------------------------------------------

    def check_synced(self, now: float) -> bool:
        """Whether the view is complete enough to act on: every known node registered, or the grace is over."""
        if self.synced:
            return True
        registered = {n.node_id for n in self.nodes.values() if n.alive}
        missing = sorted(self._awaited - registered)
        if now < self.sync_deadline and (missing or not self._awaited):  # nobody known: wait the grace out
            return False
        self.synced = True
        for node_id in missing:  # gone for good, or back later (registering makes it known again)
            self.known_nodes.discard(node_id)
            self._forgotten.append(node_id)
        log.info(
            "view synced after %.1f s: %d nodes registered%s; %d replicas adopted%s",
            now - self._started,
            len(registered),
            f", not registered: {', '.join(missing)}" if missing else "",
            len(self.replicas),
            f" (deployments unknown to this head: {', '.join(sorted(self.adopted))})" if self.adopted else "",
        )
        return True

    # --- nodes ---------------------------------------------------------------------------------------------

    def node_for(self, identity: bytes, node_id: str) -> Node | None:
        """The registered, alive node that this peer is, or None (an unknown peer must re-register)."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive or node.identity != identity:
            return None
        return node

    def register(self, identity: bytes, msg: Register, now: float) -> None:
        """A (re-)registering agent: its capacity, and the replicas it still runs, which are adopted."""
        previous = self.nodes.get(msg.node_id)
        node = Node(
            node_id=msg.node_id,
            identity=identity,
            host=msg.host,
            cpu_slots=msg.cpu_slots,
            gpus=tuple(msg.gpus),
            memory_bytes=msg.memory_bytes,
            liveness=Liveness(self.liveness),
            last_seen=now,
            metrics=msg.metrics,
        )
        self.nodes[msg.node_id] = node
        self.known_nodes.add(msg.node_id)
        log.info(
            "node %s %s: host %s, %d cpu slots, %d gpus, %d MiB, %d running replicas",
            msg.node_id,
            "re-registered" if previous is not None or not self.synced else "registered",
            msg.host,
            msg.cpu_slots,
            len(msg.gpus),
            msg.memory_bytes >> 20,
            len(msg.replicas),
        )
        self.sync_replicas(node, msg.replicas, now)

    def heard(self, node: Node, now: float) -> None:
        node.liveness.heard()
        node.last_seen = now

    def take_forgotten(self) -> list[str]:
        """The nodes forgotten since the last call: a later head need not wait for them."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def tick_liveness(self, now: float) -> None:
        """One heartbeat interval passed: marks the nodes lost by it, forgets those lost long ago.

        A lost node's replicas stay (see `release_lost_nodes`): its agent may be restarting while they serve."""
        for node in list(self.nodes.values()):
            if not node.alive:
                if node.released and now - node.lost_at > FORGET_LOST_NODE_S:
                    del self.nodes[node.node_id]
                    self.known_nodes.discard(node.node_id)
                    self._forgotten.append(node.node_id)
                continue
            if node.liveness.tick():
                node.alive = False
                node.lost_at = now
                kept = [r.replica_id for r in self.replicas.values() if r.node_id == node.node_id]
                log.warning(
                    "node %s lost (silent for %d heartbeat intervals); its replicas (%s) are kept for %.0f s in case "
                    "its agent comes back",
                    node.node_id,
                    self.liveness,
                    ", ".join(kept) or "none",
                    self.node_grace_s,
                )

    def release_lost_nodes(self, now: float) -> None:
        """Removes the replicas of nodes lost for longer than the grace, so that reconcile replaces them."""
        for node in self.nodes.values():
            if node.alive or node.released or now - node.lost_at <= self.node_grace_s:
                continue
            node.released = True
            gone = [r for r in self.replicas.values() if r.node_id == node.node_id]
            for r in gone:
                del self.replicas[r.replica_id]
            log.warning(
                "node %s lost for %.0f s: its replicas removed: %s",
                node.node_id,
                now - node.lost_at,
                ", ".join(r.replica_id for r in gone) or "none",
            )

    def add_replica(self, replica_id: str, deployment: str, node_id: str, state: ReplicaState, now: float) -> Replica:
        r = Replica(replica_id, deployment, node_id, state, created=now, order=next(self._order))
        self.replicas[replica_id] = r
        return r

    def used_slots(self, node_id: str) -> int:
        return sum(1 for r in self.replicas.values() if r.node_id == node_id)

    def free_gpus(self, node: Node) -> tuple[int, ...]:
        """The node's GPUs that no replica of the table holds (a stopping one holds its GPUs until it exited)."""
        held = {i for r in self.replicas.values() if r.node_id == node.node_id for i in r.gpus}
        return tuple(sorted(g.index for g in node.gpus if g.index not in held))

    def rooms(self, deployment: str) -> list[NodeRoom]:
        """What every alive node has left, for placing one more replica of `deployment`."""
        return [
            NodeRoom(
                node_id=n.node_id,
                free_slots=n.cpu_slots - self.used_slots(n.node_id),
                free_gpus=self.free_gpus(n),
                total_gpus=len(n.gpus),
                deployment_replicas=sum(
                    1 for r in self.replicas.values() if r.node_id == n.node_id and r.deployment == deployment
                ),
            )
            for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
            if n.alive
        ]

    # --- replica reports -------------------------------------------------------------------------------------

    def sync_replicas(self, node: Node, statuses: tuple[ReplicaStatus, ...], now: float) -> None:
        """A full list from an agent (Register, Heartbeat): apply each, and drop this node's replicas that the
        agent no longer has (confirmed ones at once, unconfirmed ones after the grace for a lost StartReplica)."""
        listed = {s.replica_id for s in statuses}
        for status in statuses:
            self.observe(node, status, now)
        grace = UNCONFIRMED_GRACE_INTERVALS * self.heartbeat_s
        for r in list(self.replicas.values()):
            if r.node_id != node.node_id or r.replica_id in listed:
                continue
            if r.confirmed or now - r.created > grace:
                del self.replicas[r.replica_id]
                log.warning("replica %s of %s is no longer on node %s: removed", r.replica_id, r.deployment, r.node_id)

    def observe(self, node: Node, status: ReplicaStatus, now: float) -> None:
        """One replica's status as its agent reports it."""
        r = self.replicas.get(status.replica_id)
        if r is not None and r.node_id != node.node_id:
            log.warning(
                "node %s reports replica %s that the head places on %s: ignored",
                node.node_id,
                status.replica_id,
                r.node_id,
            )
            return
        if status.state is ReplicaState.EXITED:
            if r is not None:
                del self.replicas[r.replica_id]
                self._exited(r, status, now)
            return
        if r is None:  # a replica the head does not know: adopted (after a head restart, the agent's list is truth)
            r = self.add_replica(status.replica_id, status.deployment, node.node_id, status.state, now)
            log.info(
                "replica %s of %s on node %s adopted (%s)", r.replica_id, r.deployment, node.node_id, r.state.value
            )
            if r.deployment not in self.deployments and r.deployment not in self.adopted:
                self.adopted.add(r.deployment)
                log.warning(
                    "deployment %s is unknown to this head (a new or lost database?): its replicas are adopted, "
                    "published and kept until it is deployed or deleted",
                    r.deployment,
                )
        if status.state is not r.state:
            self._state_change(r, status)
        if status.healthy != r.healthy:
            self._health_change(r, status, now)
        r.state = status.state
        r.confirmed = True
        r.grpc_address = status.grpc_address or r.grpc_address
        r.load = status.load
        r.healthy = status.healthy
        r.max_model_len = status.max_model_len or r.max_model_len
        r.started_at = status.started_at or r.started_at
        r.gpus = tuple(status.gpus)  # the agent's word: what the replica was started with
        r.replica_metrics = status.replica_metrics or r.replica_metrics
        r.worker_metrics = status.worker_metrics or r.worker_metrics
        if r.state is ReplicaState.DRAINING:
            r.stopping = True  # draining is on its way out whoever asked for it

    def _state_change(self, r: Replica, status: ReplicaStatus) -> None:
        if status.state is ReplicaState.READY:
            log.info(
                "replica %s of %s ready at %s on node %s", r.replica_id, r.deployment, status.grpc_address, r.node_id
            )
            self.backoff.pop(r.deployment, None)
        elif status.state is ReplicaState.STARTING:
            log.info("replica %s of %s starting on node %s", r.replica_id, r.deployment, r.node_id)
        else:
            log.info(
                "replica %s of %s %s on node %s", r.replica_id, r.deployment, status.state.value.lower(), r.node_id
            )

    def _health_change(self, r: Replica, status: ReplicaStatus, now: float) -> None:
        if status.healthy:
            log.info(
                "replica %s of %s on node %s is healthy again after %.1f s",
                r.replica_id,
                r.deployment,
                r.node_id,
                now - (r.unhealthy_since or now),
            )
            r.unhealthy_since = None
            return
        r.unhealthy_since = now
        log.warning(
            "replica %s of %s on node %s reported unhealthy%s: not routed to; replaced unless it recovers in %.0f s",
            r.replica_id,
            r.deployment,
            r.node_id,
            f" ({status.detail})" if status.detail else "",
            UNHEALTHY_REPLACE_S,
        )

    def forget_empty_adopted(self) -> None:
        """An adopted deployment whose last replica is gone leaves the table: nothing of it runs any more."""
        running = {r.deployment for r in self.replicas.values()}
        for name in sorted(self.adopted - running):
            self.adopted.discard(name)
            log.info("adopted deployment %s has no replica left: no longer published", name)

    def _exited(self, r: Replica, status: ReplicaStatus, now: float) -> None:
        detail = f" ({status.detail})" if status.detail else ""
        if r.stopping:
            log.info(
                "replica %s of %s exited on node %s, code %s%s",
                r.replica_id,
                r.deployment,
                r.node_id,
                status.exit_code,
                detail,
            )
            return
        # an exit nobody asked for: the replacement waits, so a replica that cannot start does not spin
        self.restarts[r.deployment] = self.restarts.get(r.deployment, 0) + 1
        metrics.REPLICA_UNEXPECTED_EXITS.labels(r.deployment).inc()
        b = self.backoff.setdefault(r.deployment, RestartBackoff())
        b.delay_s = min(RESTART_BACKOFF_MAX_S, max(RESTART_BACKOFF_FIRST_S, b.delay_s * 2))
        b.not_before = now + b.delay_s
        log.warning(
            "replica %s of %s exited unexpectedly on node %s, code %s%s; next start in %.1f s",
            r.replica_id,
            r.deployment,
            r.node_id,
            status.exit_code,
            detail,
            b.delay_s,
        )

    # --- views ---------------------------------------------------------------------------------------------------

    def export_gauges(self) -> None:
        """Sets the head's gauges of nodes and replicas by state (head/metrics.py)."""
        alive = sum(1 for n in self.nodes.values() if n.alive)
        metrics.NODES.labels("alive").set(alive)
        metrics.NODES.labels("lost").set(len(self.nodes) - alive)
        set_replica_states(metrics.REPLICAS, (self.shown_state(r) for r in self.replicas.values()))

    @staticmethod
    def shown_state(r: Replica) -> ReplicaState:
        """A READY replica the head is stopping is shown (and routed) as DRAINING from the moment it decides."""
        return ReplicaState.DRAINING if r.stopping and r.state is ReplicaState.READY else r.state

    def settings(self, name: str) -> DeploymentSpec:
        """A published deployment's settings: its desired spec, or defaults for one only adopted."""
        d = self.deployments.get(name)
        if d is not None:
            return d
        return DeploymentSpec(name=name, engine=Engine.SIM, replicas=0)  # its engine is unknown: status says adopted

    def max_model_len(self, name: str) -> int:
        """The deployment's context length: the smallest any of its replicas reported (0 when none did)."""
        return min(
            (r.max_model_len for r in self.replicas.values() if r.deployment == name and r.max_model_len), default=0
        )

    def published_names(self) -> list[str]:
        return sorted(self.deployments.keys() | self.adopted)

    def _on_live_node(self, r: Replica) -> bool:
        node = self.nodes.get(r.node_id)
        return node is not None and node.alive

    def routing_table(self) -> dict[str, SnapshotDeployment]:
        """Every deployment (even with no replica) with its settings and its routable replicas: READY, or DRAINING
        (kept so the proxy sees them leave and sends them nothing new). One the agent finds unhealthy is listed with
        `healthy` false, which the proxy does not route to; so is one on a lost node (cut off, or its agent gone: the
        head cannot vouch for it), unless the deployment has no routable replica on a live node: an agent restarting
        on a one-node cluster must not take the whole deployment out of routing."""
        table: dict[str, SnapshotDeployment] = {}
        for name in self.published_names():
            d = self.settings(name)
            listed = sorted(
                (
                    r
                    for r in self.replicas.values()
                    if r.deployment == name and r.state in (ReplicaState.READY, ReplicaState.DRAINING)
                ),
                key=lambda r: r.replica_id,
            )
            routable = {r.replica_id for r in listed if self.shown_state(r) is ReplicaState.READY and r.healthy}
            trust_lost_nodes = not any(self._on_live_node(r) for r in listed if r.replica_id in routable)
            reps = tuple(
                SnapshotReplica(
                    replica_id=r.replica_id,
                    node=r.node_id,
                    grpc_address=r.grpc_address,
                    state=self.shown_state(r),
                    max_concurrency=d.max_concurrency,
                    load=r.load,
                    healthy=r.replica_id in routable and (trust_lost_nodes or self._on_live_node(r)),
                )
                for r in listed
            )
            table[name] = SnapshotDeployment(
                max_model_len=self.max_model_len(name),
                first_token_timeout_s=d.first_token_timeout_s,
                idle_timeout_s=d.idle_timeout_s,
                replicas=reps,
            )
        return table

    def status(self, now: float) -> dict[str, Any]:
        """The admin `status` data, less head id, epoch and version (the head adds those)."""
        nodes = [
            {
                "node_id": n.node_id,
                "host": n.host,
                "cpu_slots": n.cpu_slots,
                "used_slots": self.used_slots(n.node_id),
                "gpus": [msgspec.to_builtins(g) for g in n.gpus],
                "free_gpus": list(self.free_gpus(n)),
                "alive": n.alive,
                "last_seen_s": round(now - n.last_seen, 3),
                "lost_s": None if n.alive else round(now - n.lost_at, 3),  # how long ago it was declared lost
                "metrics": n.metrics,
            }
            for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
        ]
        deployments = []
        for name in self.published_names():
            d = self.settings(name)
            reps = sorted((r for r in self.replicas.values() if r.deployment == name), key=lambda r: r.order)
            adopted = name not in self.deployments
            live = sum(1 for r in reps if not r.stopping and r.state is not ReplicaState.EXITED)
            deployments.append(
                {
                    "name": name,
                    "adopted": adopted,  # run by agents, unknown to this head's database
                    "spec": None if adopted else msgspec.to_builtins(d),  # as deployed (`tokenbus apply` compares it)
                    "engine": "" if adopted else d.engine.value,
                    "engine_args": d.engine_args,
                    "replicas": len(reps) if adopted else d.replicas,
                    "max_concurrency": d.max_concurrency,
                    "first_token_timeout_s": d.first_token_timeout_s,
                    "idle_timeout_s": d.idle_timeout_s,
                    "max_model_len": self.max_model_len(name),
                    "ready": sum(1 for r in reps if r.state is ReplicaState.READY and not r.stopping),
                    # replicas wanted but not placed, and why (a free cpu slot or enough free GPUs on no node)
                    "unplaced": 0 if adopted or name not in self.unplaced else max(0, d.replicas - live),
                    "unplaced_reason": self.unplaced.get(name, ""),
                    "restarts": self.restarts.get(name, 0),
                    "replicas_list": [
                        {
                            "id": r.replica_id,
                            "node": r.node_id,
                            "state": self.shown_state(r).value,
                            "healthy": r.healthy,
                            "addr": r.grpc_address,
                            "gpus": list(r.gpus),
                            "load": r.load.to_wire(),
                            "metrics": {"replica": r.replica_metrics, "worker": r.worker_metrics},
                        }
                        for r in reps
                    ],
                }
            )
        return {"synced": self.synced, "nodes": nodes, "deployments": deployments}
