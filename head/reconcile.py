"""Desired vs actual: one pass turns the difference into StartReplica / StopReplica commands.

The pass records its decisions in the state at once (a STARTING replica, a `stopping` flag), so the next pass,
0.5 s or one message later, does not repeat them; the agents' reports then confirm or correct them. Nothing is
decided before the state's view has synced after a head start (state.py), and `now` is the only clock read, so a
pass is a function of (state, time) that tests drive directly.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from head.state import UNHEALTHY_REPLACE_S, ClusterState, Node, Replica
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


def _surplus_order(r: Replica) -> tuple[bool, bool, float, int]:
    """Which replicas go first when there are too many: STARTING ones (they serve nothing yet), then unhealthy
    ones, then the most recently started (an adopted one by when its agent spawned it), so the oldest READY stay."""
    return (r.state is not ReplicaState.STARTING, r.healthy, -r.started_at, -r.order)


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
    if not state.check_synced(now):
        return []
    commands: list[Command] = []

    def stop(r: Replica, why: str, *, drain: bool = True) -> None:
        if not r.stopping:
            log.info("stopping replica %s of %s on node %s: %s", r.replica_id, r.deployment, r.node_id, why)
            r.stop_drain = drain
        r.stopping = True
        r.stop_sent_at = now
        commands.append(Command(r.node_id, StopReplica(r.replica_id, drain=r.stop_drain)))

    state.release_lost_nodes(now)
    state.forget_empty_adopted()
    for r in list(state.replicas.values()):
        if r.stopping:
            if now - r.stop_sent_at > STOP_RESEND_S:
                stop(r, "no exit reported yet, asking again")
        elif r.deployment in state.adopted:
            continue  # not ours to change until the user deploys or deletes the name
        elif r.deployment not in state.deployments:
            stop(r, "its deployment was deleted")
        elif r.unhealthy_since is not None and now - r.unhealthy_since > UNHEALTHY_REPLACE_S:
            # its open requests are stuck on it, and the proxies' stream timeouts end them: no drain
            stop(r, f"unhealthy for {now - r.unhealthy_since:.0f} s", drain=False)

    for name, d in sorted(state.deployments.items()):
        live = [r for r in state.replicas.values() if r.deployment == name and _counts_toward_desired(r)]
        if len(live) > d.replicas:
            live.sort(key=_surplus_order)
            for r in live[: len(live) - d.replicas]:
                stop(r, f"{len(live)} replicas of {name}, {d.replicas} desired")
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
