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
    ReplicaState,
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
    assert snap.epoch == 3
    assert snap.version >> 32 == snap.epoch
    demo = snap.deployments["demo"]
    assert [r.replica_id for r in demo] == ["demo-r1", "demo-r2"]
    assert demo[0].state is ReplicaState.READY and demo[0].load.running == 5 and demo[0].load.kv_usage == 0.25
    assert demo[1].state is ReplicaState.DRAINING and not demo[1].healthy
    assert snap.deployments["empty"] == ()


def frames(kind: Kind, payload: object) -> list[bytes]:
    return [bytes([kind]), msgpack.packb(payload)]


@pytest.mark.parametrize(
    ("frame_list", "needle"),
    [
        ([b"\x10"], "expected 2 frames"),
        ([b"\x10\x10", b""], "one byte"),
        ([b"\x7f", msgpack.packb({"v": 1})], "unknown message kind"),
        ([b"\x10", b"\xc1garbage"], "not MessagePack"),
        (frames(Kind.SNAPSHOT, [1, 2]), "must be a map"),
        (frames(Kind.SNAPSHOT, {"v": 99, "epoch": 1, "version": 1, "deployments": {}}), "wire version"),
        (frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "epoch": "1", "version": 1, "deployments": {}}), "epoch"),
        (frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "epoch": 1, "version": 1}), "deployments"),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{"id": "x"}]}), "missing field"),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": True, "replicas": []}), "node_id"),
    ],
)
def test_malformed_frames_are_refused(frame_list: list[bytes], needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        decode(frame_list)


def test_snapshot_replica_must_be_routable_state() -> None:
    bad = {
        "v": WIRE_VERSION,
        "epoch": 1,
        "version": 1,
        "deployments": {
            "d": [
                {
                    "id": "r",
                    "node": "n",
                    "addr": "a",
                    "state": "STARTING",
                    "max_concurrency": 1,
                    "load": {"running": 0, "waiting": 0, "kv_usage": 0.0},
                    "healthy": True,
                }
            ]
        },
    }
    with pytest.raises(MessageError, match="READY or DRAINING"):
        decode(frames(Kind.SNAPSHOT, bad))


def test_decode_as_checks_type() -> None:
    with pytest.raises(MessageError, match="expected Heartbeat"):
        decode_as(Heartbeat, GOLDEN["register"].encode())
