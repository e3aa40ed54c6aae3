"""Where a new replica goes: a node with a free cpu slot and enough free GPUs, chosen by the deployment's policy.

A pure function of what the nodes have free, so the reconcile pass (and its tests) decide placement without I/O.
When no node fits, the answer is the reason, worded for `tokenbus status`: which resource is short, and where.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.deployment import Placement


@dataclass(frozen=True)
class NodeRoom:
    """What one alive node has left, as the head's state counts it."""

    node_id: str
    free_slots: int  # cpu slots: every replica takes one
    free_gpus: tuple[int, ...]  # indices of its GPUs no replica holds, ascending
    total_gpus: int
    deployment_replicas: int  # replicas of the deployment being placed already there


@dataclass(frozen=True)
class Placed:
    node_id: str
    gpus: tuple[int, ...]


def _spread_key(room: NodeRoom) -> tuple[int, int, int, str]:
    # fewest replicas of this deployment first, so that losing a node loses as few of them as possible
    return (room.deployment_replicas, -len(room.free_gpus), -room.free_slots, room.node_id)


def _pack_key(room: NodeRoom) -> tuple[int, int, str]:
    # the fullest node that still fits, so that whole nodes stay free for wide replicas
    return (len(room.free_gpus), room.free_slots, room.node_id)


def place(rooms: list[NodeRoom], gpus: int, policy: Placement) -> Placed | str:
    """The node and GPUs for one replica needing `gpus` GPUs, or why none fits."""
    fits = [r for r in rooms if r.free_slots > 0 and len(r.free_gpus) >= gpus]
    if fits:
        best = min(fits, key=_spread_key if policy is Placement.SPREAD else _pack_key)
        return Placed(best.node_id, best.free_gpus[:gpus])
    if not rooms:
        return "no alive node"
    if gpus == 0 or all(r.free_slots == 0 for r in rooms):
        return f"no free cpu slot on any of {len(rooms)} alive nodes"
    most = max(r.total_gpus for r in rooms)
    if most == 0:  # a vLLM deployment on CPU-only nodes, most likely: say how to run it there
        return f"needs {gpus} GPUs per replica and no node has a GPU (gpus_per_replica 0 runs it on CPUs)"
    if most < gpus:
        return f"needs {gpus} GPUs per replica; no node has that many (most on one node: {most})"
    free = ", ".join(f"{r.node_id} {len(r.free_gpus)}" for r in sorted(rooms, key=lambda r: r.node_id))
    return f"needs {gpus} free GPUs on one node with a free cpu slot; free GPUs: {free}"
