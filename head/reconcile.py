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

from head.placement import place
from head.state import UNHEALTHY_REPLACE_S, ClusterState, Replica
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
    for name in state.unplaced.keys() - state.deployments.keys():
        del state.unplaced[name]  # deleted: nothing left to place
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
        if len(live) >= d.replicas:
            state.unplaced.pop(name, None)
        if len(live) > d.replicas:
            live.sort(key=_surplus_order)
            for r in live[: len(live) - d.replicas]:
                stop(r, f"{len(live)} replicas of {name}, {d.replicas} desired")
            continue
        backoff = state.backoff.get(name)
        if len(live) < d.replicas and backoff is not None and now < backoff.not_before:
            continue
        gpus = d.gpus_needed()
        missing = d.replicas - len(live)
        for placed in range(missing):
            spot = place(state.rooms(name), gpus, d.placement)
            if isinstance(spot, str):
                if state.unplaced.get(name) != spot:  # said when it changes, not every pass
                    log.warning("deployment %s is short of %d replicas: %s", name, missing - placed, spot)
                    state.unplaced[name] = spot
                break
            state.unplaced.pop(name, None)
            r = state.add_replica(new_replica_id(name), name, spot.node_id, ReplicaState.STARTING, now)
            r.gpus = spot.gpus
            log.info(
                "replica %s of %s placed on node %s%s",
                r.replica_id,
                name,
                spot.node_id,
                f", GPUs {','.join(map(str, spot.gpus))}" if spot.gpus else "",
            )
            start = StartReplica(
                r.replica_id, name, d.engine.value, dict(d.engine_args), d.max_concurrency, gpus=spot.gpus
            )
            commands.append(Command(spot.node_id, start))
    return commands
