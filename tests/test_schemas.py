"""Bus messages: golden vectors round-trip byte-identically; malformed payloads are refused with MessageError."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from schemas.golden.make_golden import GOLDEN
from schemas.messages import (
    WIRE_VERSION,
    Heartbeat,
    Kind,
    MessageError,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    Snapshot,
    decode,
    decode_as,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "schemas" / "golden"


def golden_kinds() -> dict[str, Kind]:
    lines = (GOLDEN_DIR / "README").read_text().splitlines()[1:]
    return {name.removesuffix(".msgpack"): Kind[kind] for name, kind in (line.split("\t") for line in lines)}


@pytest.mark.parametrize("name", sorted(golden_kinds()))
def test_golden_vector_round_trips_byte_identically(name: str) -> None:
    payload = (GOLDEN_DIR / f"{name}.msgpack").read_bytes()
    kind = golden_kinds()[name]
    msg = decode([bytes([kind]), payload])
    assert msg.KIND == kind
    assert msg.encode() == [bytes([kind]), payload]
    # the committed file is what the current code would write: the contract has not drifted
    assert GOLDEN[name] == msg


def test_golden_snapshot_fields() -> None:
    snap = decode_as(Snapshot, [bytes([Kind.SNAPSHOT]), (GOLDEN_DIR / "snapshot.msgpack").read_bytes()])
    assert snap.head_id == "5f3a9c0e1b2d4e6f" and snap.epoch == 3
    assert snap.version >> 32 == snap.epoch
    demo = snap.deployments["demo"]
    assert (demo.max_model_len, demo.first_token_timeout_s, demo.idle_timeout_s) == (2048, 7.5, 2.25)
    assert [r.replica_id for r in demo.replicas] == ["demo-r1", "demo-r2"]
    first, second = demo.replicas
    assert first.state is ReplicaState.READY and first.load.running == 5 and first.load.kv_usage == 0.25
    assert second.state is ReplicaState.DRAINING and not second.healthy
    assert snap.replicas("empty") == () and snap.replicas("absent") == ()
    # the payload's key order is the contract the C++ reader walks
    payload = msgpack.unpackb((GOLDEN_DIR / "snapshot.msgpack").read_bytes())
    assert list(payload) == ["v", "head_id", "epoch", "version", "deployments"]
    assert list(payload["deployments"]["demo"]) == [
        "max_model_len",
        "first_token_timeout_s",
        "idle_timeout_s",
        "replicas",
    ]


def test_golden_heartbeat_carries_the_health_fields() -> None:
    beat = decode_as(Heartbeat, [bytes([Kind.HEARTBEAT]), (GOLDEN_DIR / "heartbeat.msgpack").read_bytes()])
    (status,) = beat.replicas
    assert (status.healthy, status.max_model_len, status.started_at) == (False, 4096, 1764480000.5)
    payload = msgpack.unpackb((GOLDEN_DIR / "heartbeat.msgpack").read_bytes())
    assert list(payload["replicas"][0])[-4:] == ["detail", "healthy", "max_model_len", "started_at"]


def test_replica_status_from_an_older_agent_decodes_with_defaults() -> None:
    wire = ReplicaStatus("r", "d", ReplicaState.READY, "a", ReplicaLoad()).to_wire()
    for key in ("healthy", "max_model_len", "started_at"):
        del wire[key]
    status = ReplicaStatus.from_wire(wire)
    assert (status.healthy, status.max_model_len, status.started_at) == (True, 0, 0.0)


def frames(kind: Kind, payload: object) -> list[bytes]:
    return [bytes([kind]), msgpack.packb(payload)]


SNAP = {"v": WIRE_VERSION, "head_id": "h", "epoch": 1, "version": 1}
DEP = {"max_model_len": 0, "first_token_timeout_s": 1.0, "idle_timeout_s": 1.0, "replicas": []}
STATUS = ReplicaStatus("r", "d", ReplicaState.READY, "a", ReplicaLoad()).to_wire()


@pytest.mark.parametrize(
    ("frame_list", "needle"),
    [
        ([b"\x10"], "expected 2 frames"),
        ([b"\x10\x10", b""], "one byte"),
        ([b"\x7f", msgpack.packb({"v": 1})], "unknown message kind"),
        ([b"\x10", b"\xc1garbage"], "not MessagePack"),
        (frames(Kind.SNAPSHOT, [1, 2]), "must be a map"),
        (frames(Kind.SNAPSHOT, {"v": 99, "head_id": "h", "epoch": 1, "version": 1, "deployments": {}}), "wire version"),
        (
            frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "head_id": "h", "epoch": "1", "version": 1, "deployments": {}}),
            "epoch",
        ),
        (frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "head_id": "h", "epoch": 1, "version": 1}), "deployments"),
        (frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "epoch": 1, "version": 1, "deployments": {}}), "head_id"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": []}}), "snapshot deployment must be a map"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "max_model_len": -1}}}), "max_model_len"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "idle_timeout_s": -0.5}}}), "idle_timeout_s"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "first_token_timeout_s": True}}}), "first_token"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "replicas": {}}}}), "replicas"),
        (
            frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{**STATUS, "healthy": 1}]}),
            "healthy",
        ),
        (
            frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{**STATUS, "started_at": "x"}]}),
            "started",
        ),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{"id": "x"}]}), "missing field"),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": True, "replicas": []}), "node_id"),
    ],
)
def test_malformed_frames_are_refused(frame_list: list[bytes], needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        decode(frame_list)


def test_snapshot_replica_must_be_routable_state() -> None:
    replica = {
        "id": "r",
        "node": "n",
        "addr": "a",
        "state": "STARTING",
        "max_concurrency": 1,
        "load": {"running": 0, "waiting": 0, "kv_usage": 0.0},
        "healthy": True,
    }
    bad = {**SNAP, "deployments": {"d": {**DEP, "replicas": [replica]}}}
    with pytest.raises(MessageError, match="READY or DRAINING"):
        decode(frames(Kind.SNAPSHOT, bad))


def test_decode_as_checks_type() -> None:
    with pytest.raises(MessageError, match="expected Heartbeat"):
        decode_as(Heartbeat, GOLDEN["register"].encode())
