"""Desired vs actual: one pass turns the difference into StartReplica / StopReplica commands.

The pass records its decisions in the state at once (a STARTING replica, a `stopping` flag), so the next pass,
0.5 s or one message later, does not repeat them; the agents' reports then confirm or correct them.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from head.state import ClusterState, Node, Replica
from schemas.messages import Message, ReplicaState, StartReplica, StopReplica

log = logging.getLogger("head")

STOP_RESEND_S = 10.0  # a StopReplica not followed by EXITED is sent again (the agent may have reconnected)


@dataclass(frozen=True)
class Command:
    node_id: str
    message: Message


def new_replica_id(deployment: str) -> str:
    return f"{deployment}-{secrets.token_hex(3)}"


def _counts_toward_desired(r: Replica) -> bool:
    return not r.stopping and r.state in (ReplicaState.STARTING, ReplicaState.READY)


def _pick_node(state: ClusterState) -> Node | None:
    """The alive node with the most free cpu slots (one per replica); ties go to the lowest node id."""
    best: Node | None = None
    best_free = 0
    for node in sorted(state.nodes.values(), key=lambda n: n.node_id):
        free = node.cpu_slots - state.used_slots(node.node_id)
        if node.alive and free > best_free:
            best, best_free = node, free
    return best


def reconcile(state: ClusterState, now: float) -> list[Command]:
    commands: list[Command] = []

    def stop(r: Replica, why: str) -> None:
        if not r.stopping:
            log.info("stopping replica %s of %s on node %s: %s", r.replica_id, r.deployment, r.node_id, why)
        r.stopping = True
        r.stop_sent_at = now
        commands.append(Command(r.node_id, StopReplica(r.replica_id, drain=True)))

    for r in list(state.replicas.values()):
        if r.deployment not in state.deployments and not r.stopping:
            stop(r, "its deployment was deleted")
        elif r.stopping and now - r.stop_sent_at > STOP_RESEND_S:
            stop(r, "no exit reported yet, asking again")

    for name, d in sorted(state.deployments.items()):
        live = [r for r in state.replicas.values() if r.deployment == name and _counts_toward_desired(r)]
        if len(live) > d.replicas:
            # STARTING ones first (they serve nothing yet), then the newest
            live.sort(key=lambda r: (r.state is not ReplicaState.STARTING, -r.order))
            for r in live[: len(live) - d.replicas]:
                stop(r, f"scaling {name} down to {d.replicas}")
            continue
        backoff = state.backoff.get(name)
        if len(live) < d.replicas and backoff is not None and now < backoff.not_before:
            continue
        for _ in range(d.replicas - len(live)):
            node = _pick_node(state)
            if node is None:
                if name not in state.unplaced:  # said once, not every pass
                    log.warning("deployment %s is short of replicas: no alive node has a free cpu slot", name)
                    state.unplaced.add(name)
                break
            state.unplaced.discard(name)
            rid = new_replica_id(name)
            state.add_replica(rid, name, node.node_id, ReplicaState.STARTING, now)
            log.info("replica %s of %s placed on node %s", rid, name, node.node_id)
            commands.append(
                Command(node.node_id, StartReplica(rid, name, d.engine, dict(d.engine_args), d.max_concurrency))
            )
    return commands
