"""Bus messages: golden vectors round-trip byte-identically; malformed payloads are refused with MessageError."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from schemas.golden.make_golden import GOLDEN
from schemas.messages import (
    MAX_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    WIRE_VERSION,
    AdminReply,
    AdminRequest,
    Heartbeat,
    Kind,
    Message,
    MessageError,
    ProxyReport,
    RegisterAck,
    ReplicaEvent,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    Snapshot,
    SnapshotRequest,
    StartReplica,
    decode,
    decode_as,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "schemas" / "golden"


def golden_kinds() -> dict[str, Kind]:
    """The bus vectors of golden/README (the ring records' are tests/test_ring_records.py's)."""
    lines = (GOLDEN_DIR / "README").read_text().splitlines()[1:]
    named = (line.split("\t") for line in lines)
    return {name.removesuffix(".msgpack"): Kind[kind] for name, kind in named if not kind.startswith("ring ")}


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
    assert (status.healthy, status.max_model_len, status.started_at, status.gpus) == (False, 4096, 1764480000.5, (1,))
    assert (status.replica_metrics, status.worker_metrics) == ("127.0.0.1:9201", "127.0.0.1:9202")
    payload = msgpack.unpackb((GOLDEN_DIR / "heartbeat.msgpack").read_bytes())
    assert list(payload["replicas"][0])[-7:] == [
        "detail",
        "healthy",
        "max_model_len",
        "started_at",
        "gpus",
        "rmetrics",
        "wmetrics",
    ]


def test_golden_register_carries_the_agents_metrics_address() -> None:
    payload = msgpack.unpackb((GOLDEN_DIR / "register.msgpack").read_bytes())
    assert list(payload)[-1] == "metrics" and payload["metrics"] == "127.0.0.1:9101"


def test_golden_proxy_report_is_the_contract_the_cpp_proxy_encodes() -> None:
    payload = (GOLDEN_DIR / "proxy_report.msgpack").read_bytes()
    # key order and values exactly as the C++ sender writes them (its test compares bytes with this file)
    assert list(msgpack.unpackb(payload).items()) == [
        ("v", 1),
        ("proxy_id", "proxy-a"),
        ("addr", "127.0.0.1:8000"),
        ("snapshot_version", 42),
        ("open_streams", 7),
    ]
    assert decode([bytes([0x12]), payload]) == ProxyReport("proxy-a", "127.0.0.1:8000", 42, 7)


def test_replica_status_from_an_older_agent_decodes_with_defaults() -> None:
    wire = ReplicaStatus("r", "d", ReplicaState.READY, "a", ReplicaLoad()).to_wire()
    for key in ("healthy", "max_model_len", "started_at", "gpus", "rmetrics", "wmetrics"):
        del wire[key]
    status = ReplicaStatus.from_wire(wire)
    assert (status.healthy, status.max_model_len, status.started_at, status.gpus) == (True, 0, 0.0, ())
    assert (status.replica_metrics, status.worker_metrics) == ("", "")


STATUS = ReplicaStatus(
    "demo-r1", "demo", ReplicaState.DRAINING, "127.0.0.1:1", ReplicaLoad(1, 2, 0.5), -9, "killed", False, 64, 12.5
)
# every message type, each field away from its default, beside the golden vectors
SAMPLES: list[Message] = [
    *GOLDEN.values(),
    RegisterAck("node-a", 0.25),
    ReplicaEvent("node-a", STATUS),
    SnapshotRequest(7 << 32 | 3),
    AdminRequest(1 << 40, "deploy", {"name": "demo", "engine_args": {"model": "/m", "nested": [1, 2.5, None]}}),
    AdminReply(5, False, "deploy: no", {"changed": False}),
]


def test_the_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)
    assert sorted(Kind) == sorted(cls.KIND for cls in MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_round_trips(msg: Message) -> None:
    frames = msg.encode()
    assert frames[0] == bytes([msg.KIND])
    assert next(iter(msgpack.unpackb(frames[1]))) == "v"  # the version first, whatever the type
    assert decode(frames) == msg
    assert decode_as(type(msg), frames) == msg
    assert type(msg).from_wire(msg.to_wire()) == msg  # the plain-data form (an agent's state file)


def test_an_int_given_for_a_float_field_goes_out_as_a_float() -> None:
    payload = msgpack.unpackb(RegisterAck("n", 1).encode()[1])
    assert payload == {"v": 1, "node_id": "n", "heartbeat_interval_s": 1.0}
    assert isinstance(payload["heartbeat_interval_s"], float)
    assert RegisterAck("n", 1) == RegisterAck("n", 1.0)


def frames(kind: Kind, payload: object) -> list[bytes]:
    return [bytes([kind]), msgpack.packb(payload)]


SNAP = {"v": WIRE_VERSION, "head_id": "h", "epoch": 1, "version": 1}
DEP = {"max_model_len": 0, "first_token_timeout_s": 1.0, "idle_timeout_s": 1.0, "replicas": []}
REPLICA = {
    "id": "r",
    "node": "n",
    "addr": "a",
    "state": "READY",
    "max_concurrency": 1,
    "load": {"running": 0, "waiting": 0, "kv_usage": 0.0},
    "healthy": True,
}
WIRE_STATUS = ReplicaStatus("r", "d", ReplicaState.READY, "a", ReplicaLoad()).to_wire()
START = StartReplica("r", "d", "sim", {}, 1).to_wire()


def beat(**status: object) -> list[bytes]:
    return frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{**WIRE_STATUS, **status}]})


@pytest.mark.parametrize(
    ("frame_list", "needle"),
    [
        ([b"\x10"], "expected 2 frames"),
        ([b"\x10\x10", b""], "one byte"),
        ([b"\x7f", msgpack.packb({"v": 1})], "unknown message kind 0x7f"),
        ([b"\x10", b"\xc1garbage"], "SNAPSHOT payload is not MessagePack"),
        ([b"\x10", b"\x80" + b"\x00" * MAX_PAYLOAD_BYTES], f"exceeds {MAX_PAYLOAD_BYTES}"),
        (frames(Kind.SNAPSHOT, [1, 2]), "Expected `object`, got `array`"),
        (frames(Kind.SNAPSHOT, {**SNAP, "v": 99, "deployments": {}}), "Invalid value 99 - at `$.v`"),
        # wrong type
        (frames(Kind.SNAPSHOT, {**SNAP, "epoch": "1", "deployments": {}}), "Expected `int`, got `str` - at `$.epoch`"),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": True, "replicas": []}), "got `bool` - at `$.node_id`"),
        (beat(started_at="x"), "Expected `float`, got `str` - at `$.replicas[0].started_at`"),
        (beat(state="GONE"), "Invalid enum value 'GONE' - at `$.replicas[0].state`"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": []}}), "got `array` - at `$.deployments[...]`"),
        (
            frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "replicas": {}}}}),
            "`$.deployments[...].replicas`",
        ),
        # bool where a number or a bool is meant, and the other way round
        (beat(healthy=1), "Expected `bool`, got `int` - at `$.replicas[0].healthy`"),
        (beat(max_model_len=True), "Expected `int`, got `bool` - at `$.replicas[0].max_model_len`"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "first_token_timeout_s": True}}}), "first_token"),
        (frames(Kind.START_REPLICA, {"v": WIRE_VERSION, **START, "max_concurrency": False}), "`$.max_concurrency`"),
        # negative where >= 0
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "max_model_len": -1}}}), ">= 0 - at `$.dep"),
        (frames(Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "idle_timeout_s": -0.5}}}), "idle_timeout_s"),
        (beat(load={"running": -1, "waiting": 0, "kv_usage": 0.0}), ">= 0 - at `$.replicas[0].load.running`"),
        (frames(Kind.SNAPSHOT_REQUEST, {"v": WIRE_VERSION, "have_version": -1}), ">= 0 - at `$.have_version`"),
        (frames(Kind.START_REPLICA, {"v": WIRE_VERSION, **START, "max_concurrency": 0}), ">= 1 - at `$.max_concur"),
        # missing, empty or over-long
        (frames(Kind.SNAPSHOT, {**SNAP}), "missing required field `deployments`"),
        (frames(Kind.SNAPSHOT, {"v": WIRE_VERSION, "epoch": 1, "version": 1, "deployments": {}}), "field `head_id`"),
        (frames(Kind.HEARTBEAT, {"v": WIRE_VERSION, "node_id": "n", "replicas": [{"id": "x"}]}), "`deployment`"),
        (frames(Kind.REREGISTER, {"v": WIRE_VERSION, "node_id": ""}), "length >= 1 - at `$.node_id`"),
        (frames(Kind.REREGISTER, {"v": WIRE_VERSION, "node_id": "n" * (MAX_ID_CHARS + 1)}), f"<= {MAX_ID_CHARS}"),
        # a snapshot lists routable replicas only
        (
            frames(
                Kind.SNAPSHOT, {**SNAP, "deployments": {"d": {**DEP, "replicas": [{**REPLICA, "state": "STARTING"}]}}}
            ),
            "READY or DRAINING, got STARTING",
        ),
    ],
)
def test_malformed_frames_are_refused(frame_list: list[bytes], needle: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(frame_list)
    assert needle in str(info.value)


def test_fields_a_newer_peer_adds_are_ignored() -> None:
    payload = {"v": WIRE_VERSION, "node_id": "n", "replicas": [{**WIRE_STATUS, "gpu_temp": 80}], "zone": "b"}
    assert decode(frames(Kind.HEARTBEAT, payload)) == Heartbeat("n", (ReplicaStatus.from_wire(WIRE_STATUS),))


def test_from_wire_refuses_like_decode() -> None:
    with pytest.raises(MessageError, match=r"bad StartReplica: .* at `\$.max_concurrency`"):
        StartReplica.from_wire({**START, "max_concurrency": -1})


def test_decode_as_checks_type() -> None:
    with pytest.raises(MessageError, match="expected Heartbeat"):
        decode_as(Heartbeat, GOLDEN["register"].encode())
