"""head/reconcile.py as a table: a cluster state and a timeline of (time, what happens) -> the commands reconcile
sends at that time. No sockets and no clock: the head's decisions after a restart (sync grace, adoption, surplus),
for a lost node (within and after its grace) and for an unhealthy replica, one row each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from head.reconcile import reconcile
from head.state import (
    DEFAULT_NODE_GRACE_S,
    SYNC_GRACE_LIVENESS_PERIODS,
    SYNC_GRACE_MAX_S,
    UNHEALTHY_REPLACE_S,
    ClusterState,
)
from schemas.deployment import DeploymentSpec, Engine
from schemas.messages import (
    Register,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    StartReplica,
    StopReplica,
)

T0 = 1000.0  # the head's start, on its monotonic clock
HEARTBEAT_S = 1.0
LIVENESS = 3
SYNC_GRACE_S = SYNC_GRACE_LIVENESS_PERIODS * LIVENESS * HEARTBEAT_S
LOST_AFTER_S = LIVENESS * HEARTBEAT_S  # a node silent from T0 is lost at T0 + this

Event = Callable[[ClusterState, float], None]
Expected = list[tuple[str, ...]]  # ("start", node, deployment) or ("stop", node, replica, "drain" | "now")


def demo(replicas: int) -> DeploymentSpec:
    return DeploymentSpec(name="demo", engine=Engine.SIM, replicas=replicas, max_concurrency=8)


def status(rid: str, state: ReplicaState = ReplicaState.READY, started_at: float = 0.0, healthy: bool = True,
           deployment: str = "demo") -> ReplicaStatus:  # fmt: skip
    return ReplicaStatus(rid, deployment, state, f"addr-{rid}", ReplicaLoad(), healthy=healthy, started_at=started_at)


def registers(node: str, *replicas: ReplicaStatus) -> Event:
    def event(state: ClusterState, now: float) -> None:
        state.register(node.encode(), Register(node, "127.0.0.1", 4, (), 1 << 30, replicas), now)

    return event


def reports(node: str, replica: ReplicaStatus) -> Event:
    def event(state: ClusterState, now: float) -> None:
        n = state.nodes[node]
        state.heard(n, now)
        state.observe(n, replica, now)

    return event


def heartbeat_interval(*alive: str) -> Event:
    """One heartbeat interval: the `alive` nodes were heard, the others stayed silent."""

    def event(state: ClusterState, now: float) -> None:
        for node in alive:
            state.heard(state.nodes[node], now)
        state.tick_liveness(now)

    return event


def silent_until_lost(*alive: str) -> list[tuple[float, Event | None, Expected | None]]:
    """Every other registered node falls silent after T0 and is lost at T0 + LOST_AFTER_S."""
    return [(T0 + i * HEARTBEAT_S, heartbeat_interval(*alive), None) for i in range(1, LIVENESS + 1)]


@dataclass
class Case:
    name: str
    deployments: list[DeploymentSpec]
    known_nodes: tuple[str, ...]  # as persisted by an earlier head
    timeline: list[tuple[float, Event | None, Expected | None]]  # None: the commands then are not checked


CASES = [
    Case(
        "restart: nothing is placed until every known node registered or the grace ended",
        [demo(2)],
        ("a", "b"),
        [
            (T0, registers("a"), []),
            (T0 + SYNC_GRACE_S - 0.1, None, []),  # b is awaited
            (T0 + SYNC_GRACE_S + 0.1, None, [("start", "a", "demo"), ("start", "a", "demo")]),  # b never came
        ],
    ),
    Case(
        "restart: the replicas the agents report are adopted, no duplicate is started",
        [demo(2)],
        ("a", "b"),
        [
            (T0, registers("a", status("r1")), []),
            (T0 + 1, registers("b", status("r2")), []),  # synced: both there, nothing to do
            (T0 + SYNC_GRACE_S + 1, None, []),
        ],
    ),
    Case(
        "restart: a surplus stops STARTING ones first, then the newest READY; the oldest READY stay",
        [demo(2)],
        ("a", "b"),
        [
            (T0, registers("a", status("r1", started_at=300.0), status("r3", ReplicaState.STARTING, 50.0)), []),
            (
                T0 + 0.5,
                registers("b", status("r2", started_at=100.0), status("r4", started_at=200.0)),
                [("stop", "a", "r3", "drain"), ("stop", "a", "r1", "drain")],
            ),
            (T0 + 1, None, []),  # decided once: not repeated
        ],
    ),
    Case(
        "new database: a grace for the agents, then their replicas of an unknown deployment are kept",
        [],
        (),
        [
            (T0, registers("a", status("g1", deployment="ghost")), []),
            (T0 + SYNC_GRACE_S + 0.1, None, []),
            (T0 + 60, None, []),  # never stopped as undeployed
        ],
    ),
    Case(
        "a lost node's replicas are kept (not replaced) for the grace, then replaced",
        [demo(1)],
        ("a", "b"),
        [
            (T0, registers("a", status("r1")), None),
            (T0, registers("b"), []),
            *silent_until_lost("b"),
            (T0 + LOST_AFTER_S + DEFAULT_NODE_GRACE_S - 0.1, heartbeat_interval("b"), []),
            (T0 + LOST_AFTER_S + DEFAULT_NODE_GRACE_S + 0.1, heartbeat_interval("b"), [("start", "b", "demo")]),
        ],
    ),
    Case(
        "a lost node whose agent comes back within the grace: nothing started or stopped",
        [demo(1)],
        ("a", "b"),
        [
            (T0, registers("a", status("r1")), None),
            (T0, registers("b"), []),
            *silent_until_lost("b"),
            (T0 + LOST_AFTER_S + 5, registers("a", status("r1")), []),
            (T0 + LOST_AFTER_S + DEFAULT_NODE_GRACE_S + 5, heartbeat_interval("a", "b"), []),
        ],
    ),
    Case(
        "an unhealthy replica is replaced (not drained) after the replace time",
        [demo(1)],
        ("a",),
        [
            (T0, registers("a", status("r1")), []),
            (T0 + 1, reports("a", status("r1", healthy=False)), []),
            (T0 + 1 + UNHEALTHY_REPLACE_S - 0.1, None, []),
            (T0 + 1 + UNHEALTHY_REPLACE_S + 0.1, None, [("stop", "a", "r1", "now"), ("start", "a", "demo")]),
        ],
    ),
    Case(
        "an unhealthy replica that recovers in time stays",
        [demo(1)],
        ("a",),
        [
            (T0, registers("a", status("r1")), []),
            (T0 + 1, reports("a", status("r1", healthy=False)), []),
            (T0 + 5, reports("a", status("r1")), []),
            (T0 + 1 + UNHEALTHY_REPLACE_S + 5, None, []),
        ],
    ),
]


def described(commands: list) -> Expected:
    out: Expected = []
    for c in commands:
        if isinstance(c.message, StartReplica):
            out.append(("start", c.node_id, c.message.deployment))
        else:
            assert isinstance(c.message, StopReplica)
            out.append(("stop", c.node_id, c.message.replica_id, "drain" if c.message.drain else "now"))
    return out


def new_state(case: Case) -> ClusterState:
    return ClusterState(case.deployments, HEARTBEAT_S, LIVENESS, now=T0, known_nodes=frozenset(case.known_nodes))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile_timeline(case: Case) -> None:
    state = new_state(case)
    for when, event, expected in case.timeline:
        if event is not None:
            event(state, when)
        commands = described(reconcile(state, when))
        if expected is not None:
            assert commands == expected, f"at T0 + {when - T0:.1f} s"


def test_routing_during_a_lost_node_grace_and_an_unhealthy_spell() -> None:
    """What the proxies see: an unhealthy replica is listed unroutable; a lost node's replica stays routed when it is
    all the deployment has left."""
    state = ClusterState([demo(2)], HEARTBEAT_S, LIVENESS, now=T0, known_nodes=frozenset({"a", "b"}))
    registers("a", status("r1"))(state, T0)
    registers("b", status("r2"))(state, T0)
    reports("b", status("r2", healthy=False))(state, T0)
    for when, event, _ in silent_until_lost("b"):
        assert event is not None
        event(state, when)
    assert not state.nodes["a"].alive
    reconcile(state, T0 + LIVENESS + 1)
    table = state.routing_table()["demo"]
    assert [(r.replica_id, r.state, r.healthy) for r in table.replicas] == [
        ("r1", ReplicaState.READY, True),
        ("r2", ReplicaState.READY, False),
    ]
    status_of = {r["id"]: r for r in state.status(T0)["deployments"][0]["replicas_list"]}
    assert status_of["r2"]["healthy"] is False


def test_a_lost_nodes_replicas_are_not_routed_while_a_live_node_serves() -> None:
    """A node cut off: new requests go to replicas on live nodes at once, not after each proxy's own timeouts; with
    no other routable replica the lost node's stay routed (an agent restarting on a one-node cluster)."""
    state = ClusterState([demo(2)], HEARTBEAT_S, LIVENESS, now=T0, known_nodes=frozenset({"a", "b"}))
    registers("a", status("r1"))(state, T0)
    registers("b", status("r2"))(state, T0)
    for when, event, _ in silent_until_lost("b"):
        assert event is not None
        event(state, when)

    def routed() -> dict[str, bool]:
        return {r.replica_id: r.healthy for r in state.routing_table()["demo"].replicas}

    assert routed() == {"r1": False, "r2": True}
    reports("b", status("r2", healthy=False))(state, T0 + LIVENESS + 1)
    assert routed() == {"r1": True, "r2": False}
    registers("a", status("r1"))(state, T0 + LIVENESS + 2)  # its agent is back
    reports("b", status("r2"))(state, T0 + LIVENESS + 2)
    assert routed() == {"r1": True, "r2": True}


def test_adopted_deployment_is_published_and_deploying_it_takes_it_over() -> None:
    state = ClusterState([], HEARTBEAT_S, LIVENESS, now=T0)
    registers(
        "a", status("g1", started_at=10.0, deployment="ghost"), status("g2", started_at=20.0, deployment="ghost")
    )(state, T0)
    assert reconcile(state, T0 + SYNC_GRACE_S + 1) == []
    assert [r.replica_id for r in state.routing_table()["ghost"].replicas] == ["g1", "g2"]
    (shown,) = state.status(T0)["deployments"]
    assert (shown["name"], shown["adopted"], shown["replicas"]) == ("ghost", True, 2)

    state.deployments["ghost"] = DeploymentSpec(name="ghost", engine=Engine.SIM)  # what the admin deploy does
    state.adopted.discard("ghost")
    assert described(reconcile(state, T0 + SYNC_GRACE_S + 2)) == [("stop", "a", "g2", "drain")]  # the newer one


def test_an_adopted_deployment_whose_replicas_are_gone_leaves_the_table() -> None:
    state = ClusterState([], HEARTBEAT_S, LIVENESS, now=T0)
    registers("a", status("g1", deployment="ghost"))(state, T0)
    reconcile(state, T0 + SYNC_GRACE_S + 1)
    assert list(state.routing_table()) == ["ghost"]
    reports("a", status("g1", ReplicaState.EXITED, deployment="ghost"))(state, T0 + SYNC_GRACE_S + 2)
    reconcile(state, T0 + SYNC_GRACE_S + 2)
    assert state.routing_table() == {} and state.adopted == set()


def test_the_sync_ends_once_every_known_node_registered() -> None:
    state = ClusterState([demo(1)], HEARTBEAT_S, LIVENESS, now=T0, known_nodes=frozenset({"a", "b"}))
    registers("a")(state, T0 + 0.1)
    assert not state.check_synced(T0 + 0.1)
    registers("b")(state, T0 + 0.2)
    assert state.check_synced(T0 + 0.2) and state.take_forgotten() == []


def test_a_known_node_that_does_not_return_in_the_grace_is_forgotten() -> None:
    state = ClusterState([demo(1)], HEARTBEAT_S, LIVENESS, now=T0, known_nodes=frozenset({"a", "gone"}))
    registers("a")(state, T0)
    assert not state.check_synced(T0 + SYNC_GRACE_S - 0.1)
    assert state.check_synced(T0 + SYNC_GRACE_S)
    assert state.take_forgotten() == ["gone"] and state.known_nodes == {"a"}
    assert state.take_forgotten() == []


def test_the_sync_grace_is_capped_for_slow_heartbeats() -> None:
    state = ClusterState([demo(1)], 10.0, LIVENESS, now=T0)  # 2 liveness periods would be a minute
    assert not state.check_synced(T0 + SYNC_GRACE_MAX_S - 0.1)
    assert state.check_synced(T0 + SYNC_GRACE_MAX_S)
