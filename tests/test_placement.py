"""Placement by resources: head/placement.py as a table, the reconcile pass on a fake GPU inventory, and real agents
with `--gpus 4` whose replicas each see exactly their own devices."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from head.placement import NodeRoom, Placed, place
from head.reconcile import reconcile
from head.state import ClusterState
from node_agent.gpus import GpuSpecError, parse_gpus
from schemas.deployment import DeploymentSpec, Engine, Placement
from schemas.messages import GpuInfo, Register, ReplicaLoad, ReplicaState, ReplicaStatus, StartReplica
from tools.local_cluster import STARTUP_DEADLINE_S, LocalCluster, require_binaries


def room(node: str, free_gpus: tuple[int, ...], *, slots: int = 4, total: int = 4, mine: int = 0) -> NodeRoom:
    return NodeRoom(node, slots, free_gpus, total, mine)


@pytest.mark.parametrize(
    ("rooms", "gpus", "policy", "expected"),
    [
        # spread: the node with fewest replicas of the deployment, then the most free GPUs
        ([room("a", (0, 1), mine=1), room("b", (2,))], 1, Placement.SPREAD, Placed("b", (2,))),
        ([room("a", (0, 1, 2)), room("b", (0,))], 1, Placement.SPREAD, Placed("a", (0,))),
        # pack: the fullest node that still fits
        ([room("a", (0, 1, 2)), room("b", (3,))], 1, Placement.PACK, Placed("b", (3,))),
        ([room("a", (0, 1, 2)), room("b", (3,))], 2, Placement.PACK, Placed("a", (0, 1))),
        # no GPUs wanted: any node with a slot
        ([room("a", (), slots=0, total=0), room("b", (), slots=1, total=0)], 0, Placement.SPREAD, Placed("b", ())),
        # the reasons
        ([], 0, Placement.SPREAD, "no alive node"),
        ([room("a", (0,), slots=0)], 1, Placement.SPREAD, "no free cpu slot on any of 1 alive nodes"),
        ([room("a", (0, 1))], 8, Placement.SPREAD, "needs 8 GPUs per replica; no node has that many"),
        ([room("a", (), total=0)], 1, Placement.SPREAD, "needs 1 GPUs per replica and no node has a GPU"),
        ([room("a", (0,)), room("b", ())], 2, Placement.SPREAD, "needs 2 free GPUs on one node"),
    ],
)
def test_place(rooms: list[NodeRoom], gpus: int, policy: Placement, expected: Placed | str) -> None:
    got = place(rooms, gpus, policy)
    if isinstance(expected, str):
        assert isinstance(got, str) and got.startswith(expected), got
    else:
        assert got == expected


def test_parse_gpus() -> None:
    assert [g.index for g in parse_gpus("3")] == [0, 1, 2]
    gpus = parse_gpus("1:H100:80,0")
    assert gpus == (
        GpuInfo(index=0, name="manual", memory_bytes=0),
        GpuInfo(index=1, name="H100", memory_bytes=80 << 30),
    )
    for bad in ("x", "0,0", "1:a:b", "99999", "-1"):
        with pytest.raises(GpuSpecError):
            parse_gpus(bad)


T0 = 100.0  # the head's start
T1 = T0 + 10.0  # past its sync grace (a head with no known node waits it out)


def fake_cluster(deployment: DeploymentSpec) -> ClusterState:
    """Two registered nodes of 4 fake GPUs and 4 cpu slots each, past the sync grace."""
    state = ClusterState([deployment], 1.0, 3, now=T0)
    for node in ("n1", "n2"):
        gpus = tuple(GpuInfo(index=i, name="fake", memory_bytes=0) for i in range(4))
        state.register(node.encode(), Register(node, "127.0.0.1", 4, gpus, 1 << 30), T0)
    assert state.check_synced(T1)
    return state


def starts(commands: list) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((c.node_id, tuple(c.message.gpus)) for c in commands if isinstance(c.message, StartReplica))


def test_five_replicas_of_two_gpus_on_two_nodes_of_four() -> None:
    state = fake_cluster(DeploymentSpec(name="wide", engine=Engine.VLLM, replicas=5, gpus_per_replica=2))
    placed = starts(reconcile(state, T1))
    assert placed == [("n1", (0, 1)), ("n1", (2, 3)), ("n2", (0, 1)), ("n2", (2, 3))]
    wide = next(d for d in state.status(T1)["deployments"] if d["name"] == "wide")
    assert wide["unplaced"] == 1
    assert wide["unplaced_reason"] == "needs 2 free GPUs on one node with a free cpu slot; free GPUs: n1 0, n2 0"
    assert starts(reconcile(state, T1 + 1.0)) == []  # nothing frees: nothing more is placed

    # one replica exits: its GPUs are free for the next one (after the crash backoff)
    gone = next(r for r in state.replicas.values() if r.node_id == "n2" and r.gpus == (2, 3))
    exited = ReplicaStatus(gone.replica_id, "wide", ReplicaState.EXITED, "", ReplicaLoad(), exit_code=1)
    state.observe(state.nodes["n2"], exited, T1 + 2.0)
    assert starts(reconcile(state, T1 + 60.0)) == [("n2", (2, 3))]


def test_a_replica_holds_the_gpus_its_agent_reports() -> None:
    """A restarted head learns which GPUs run what from the agents' reports, and places around them."""
    state = fake_cluster(DeploymentSpec(name="one", engine=Engine.VLLM, replicas=2, gpus_per_replica=3))
    adopted = ReplicaStatus("one-x", "one", ReplicaState.READY, "a:1", ReplicaLoad(), gpus=(1, 2, 3))
    state.observe(state.nodes["n1"], adopted, T1)
    assert starts(reconcile(state, T1)) == [("n2", (0, 1, 2))]


def worker_gpus(pid: int) -> str | None:
    """CUDA_VISIBLE_DEVICES in the environment of a running process."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [e.split(b"=", 1)[1].decode() for e in entries if e.startswith(b"CUDA_VISIBLE_DEVICES=")]
    return found[0] if found else None


async def replicas_by_state(cluster: LocalCluster, name: str) -> tuple[dict[str, dict], dict]:
    status = await cluster.admin("status")
    dep = next(d for d in status["deployments"] if d["name"] == name)
    return {r["id"]: r for r in dep["replicas_list"]}, dep


async def until(predicate, what: str, timeout: float = STARTUP_DEADLINE_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await predicate()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.mark.timeout(300)
async def test_agents_hand_each_replica_its_own_gpus(tmp_path: Path) -> None:
    require_binaries()
    cluster = LocalCluster(tmp_path, cpu_slots=4, agents=2, agent_args=("--gpus", "4"))
    cluster.start()
    try:
        spec = {"name": "wide", "engine": "sim", "replicas": 5, "gpus_per_replica": 2, "max_concurrency": 4}
        await cluster.admin("deploy", spec)

        async def four_ready() -> tuple[dict[str, dict], dict] | None:
            reps, dep = await replicas_by_state(cluster, "wide")
            ready = [r for r in reps.values() if r["state"] == "READY"]
            return (reps, dep) if len(ready) == 4 and dep["unplaced"] == 1 else None

        reps, dep = await until(four_ready, "4 of 5 replicas READY, 1 unplaced")
        assert "needs 2 free GPUs" in dep["unplaced_reason"]
        print(f"placed: {sorted((r['node'], r['gpus']) for r in reps.values())}; unplaced: {dep['unplaced_reason']}")
        per_node: dict[str, list[tuple[int, ...]]] = {}
        for r in reps.values():
            per_node.setdefault(r["node"], []).append(tuple(r["gpus"]))
        assert sorted(per_node) == ["e2e", "e2e-2"]
        for node, held in per_node.items():
            assert sorted(held) == [(0, 1), (2, 3)], (node, held)
        pids = cluster.replica_processes()
        for rid, r in reps.items():
            assert worker_gpus(pids[rid]["worker"]) == ",".join(map(str, r["gpus"]))

        # the deployment shrinks to 1 and a second one takes the GPUs the stopped replicas held
        await cluster.admin("scale", {"name": "wide", "replicas": 1})
        await cluster.admin("deploy", {"name": "other", "engine": "sim", "replicas": 3, "gpus_per_replica": 2})

        async def others_ready() -> dict[str, dict] | None:
            others, _ = await replicas_by_state(cluster, "other")
            return others if sum(r["state"] == "READY" for r in others.values()) == 3 else None

        others = await until(others_ready, "3 replicas of `other` READY on the freed GPUs")
        wide_now, _ = await replicas_by_state(cluster, "wide")
        held = [(r["node"], g) for r in [*others.values(), *wide_now.values()] for g in r["gpus"]]
        assert len(held) == len(set(held)) == 8  # every GPU of both nodes held once
        print(f"after the scale-down: wide {[(r['node'], r['gpus']) for r in wide_now.values()]}, other", end=" ")
        print(sorted((r["node"], r["gpus"]) for r in others.values()))
        pids = cluster.replica_processes()
        for rid, r in others.items():
            assert worker_gpus(pids[rid]["worker"]) == ",".join(map(str, r["gpus"]))
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
