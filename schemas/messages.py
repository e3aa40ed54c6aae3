"""Bus messages: each wire type declared once, encoded explicitly, validated on decode.

A bus message travels as two ZeroMQ frames: one byte naming its kind, then its MessagePack payload, a map
whose "v" field is the wire version. Decoding checks kind, version and every field's type, so a bad peer
gets a `MessageError` naming what is wrong instead of a crash deep in a handler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

WIRE_VERSION = 1
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # any bus payload larger than this is refused unread
# A deployment's stream deadlines at the proxy, unless `tokenbus deploy` sets them (0 = no limit). Generous enough
# for a long prefill on a slow machine; they exist to end streams on a replica that hangs, not to shape latency.
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 120.0  # from the call's start to its first token
DEFAULT_IDLE_TIMEOUT_S = 60.0  # between two tokens
DEFAULT_MAX_CONCURRENCY = 256  # a replica's open requests, unless `tokenbus deploy --max-concurrency` sets it


class MessageError(ValueError):
    """A frame that is not a valid bus message."""


class Kind(enum.IntEnum):
    REGISTER = 0x01
    REGISTER_ACK = 0x02
    HEARTBEAT = 0x03
    START_REPLICA = 0x04
    STOP_REPLICA = 0x05
    REPLICA_EVENT = 0x06
    REREGISTER = 0x07
    SNAPSHOT = 0x10
    SNAPSHOT_REQUEST = 0x11
    ADMIN_REQUEST = 0x20
    ADMIN_REPLY = 0x21


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"  # processes spawned, health check not yet passed
    READY = "READY"  # serving; routable
    DRAINING = "DRAINING"  # finishing open requests; not given new ones
    EXITED = "EXITED"  # processes gone


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise MessageError(f"missing field {key!r}")
    value = d[key]
    # bool is an int subclass: refuse it where an int is meant
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise MessageError(f"field {key!r} must be {typ}, got bool")
    if not isinstance(value, typ):
        raise MessageError(f"field {key!r} must be {typ}, got {type(value).__name__}")
    return value


def _opt(d: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any) -> Any:
    return _req(d, key, typ) if key in d and d[key] is not None else default


N = TypeVar("N", int, float)


def _non_negative(d: dict[str, Any], key: str, value: N) -> N:
    if value < 0:
        raise MessageError(f"field {key!r} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class ReplicaLoad:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting, "kv_usage": float(self.kv_usage)}

    @classmethod
    def from_wire(cls, d: Any) -> ReplicaLoad:
        if not isinstance(d, dict):
            raise MessageError("load must be a map")
        return cls(_req(d, "running", int), _req(d, "waiting", int), float(_req(d, "kv_usage", (int, float))))


@dataclass(frozen=True)
class ReplicaStatus:
    """What an agent knows of one of its replicas."""

    replica_id: str
    deployment: str
    state: ReplicaState
    grpc_address: str = ""
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    exit_code: int | None = None
    detail: str = ""
    healthy: bool = True  # the agent's active health verdict: false after 3 failed checks in a row
    max_model_len: int = 0  # context length in tokens from the replica's gRPC Health (0 = not known yet)
    started_at: float = 0.0  # unix seconds when the agent spawned it: a restarted head keeps the oldest

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.replica_id,
            "deployment": self.deployment,
            "state": self.state.value,
            "addr": self.grpc_address,
            "load": self.load.to_wire(),
            "exit_code": self.exit_code,
            "detail": self.detail,
            "healthy": self.healthy,
            "max_model_len": self.max_model_len,
            "started_at": float(self.started_at),
        }

    @classmethod
    def from_wire(cls, d: Any) -> ReplicaStatus:
        if not isinstance(d, dict):
            raise MessageError("replica status must be a map")
        try:
            state = ReplicaState(_req(d, "state", str))
        except ValueError as e:
            raise MessageError(f"bad replica state: {e}") from None
        return cls(
            replica_id=_req(d, "id", str),
            deployment=_req(d, "deployment", str),
            state=state,
            grpc_address=_req(d, "addr", str),
            load=ReplicaLoad.from_wire(_req(d, "load", dict)),
            exit_code=_opt(d, "exit_code", int, None),
            detail=_opt(d, "detail", str, ""),
            # optional: an agent older than these fields still decodes
            healthy=_opt(d, "healthy", bool, True),
            max_model_len=_non_negative(d, "max_model_len", _opt(d, "max_model_len", int, 0)),
            started_at=float(_opt(d, "started_at", (int, float), 0.0)),
        )


@dataclass(frozen=True)
class SnapshotReplica:
    """One routable replica in a routing snapshot. Field order is the wire order (golden vectors)."""

    replica_id: str
    node: str
    grpc_address: str
    state: ReplicaState
    max_concurrency: int
    load: ReplicaLoad
    healthy: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.replica_id,
            "node": self.node,
            "addr": self.grpc_address,
            "state": self.state.value,
            "max_concurrency": self.max_concurrency,
            "load": self.load.to_wire(),
            "healthy": self.healthy,
        }

    @classmethod
    def from_wire(cls, d: Any) -> SnapshotReplica:
        if not isinstance(d, dict):
            raise MessageError("snapshot replica must be a map")
        state = ReplicaState(_req(d, "state", str))
        if state not in (ReplicaState.READY, ReplicaState.DRAINING):
            raise MessageError(f"snapshot replica state must be READY or DRAINING, got {state.value}")
        return cls(
            replica_id=_req(d, "id", str),
            node=_req(d, "node", str),
            grpc_address=_req(d, "addr", str),
            state=state,
            max_concurrency=_req(d, "max_concurrency", int),
            load=ReplicaLoad.from_wire(_req(d, "load", dict)),
            healthy=_req(d, "healthy", bool),
        )


M = TypeVar("M", bound="Message")


class Message:
    """Base of every bus message: `KIND` plus `to_wire`/`from_wire` for the payload map."""

    KIND: ClassVar[Kind]

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls: type[M], d: dict[str, Any]) -> M:
        raise NotImplementedError

    def encode(self) -> list[bytes]:
        """The two frames: kind byte, then the payload with the wire version first."""
        payload = {"v": WIRE_VERSION, **self.to_wire()}
        return [bytes([self.KIND]), msgpack.packb(payload, use_bin_type=True)]


@dataclass(frozen=True)
class Register(Message):
    KIND: ClassVar[Kind] = Kind.REGISTER
    node_id: str
    host: str
    cpu_slots: int
    gpus: int
    memory_bytes: int
    replicas: tuple[ReplicaStatus, ...] = ()  # replicas still running after an agent reconnects

    def to_wire(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "host": self.host,
            "cpu_slots": self.cpu_slots,
            "gpus": self.gpus,
            "memory_bytes": self.memory_bytes,
            "replicas": [r.to_wire() for r in self.replicas],
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Register:
        return cls(
            node_id=_req(d, "node_id", str),
            host=_req(d, "host", str),
            cpu_slots=_req(d, "cpu_slots", int),
            gpus=_req(d, "gpus", int),
            memory_bytes=_req(d, "memory_bytes", int),
            replicas=tuple(ReplicaStatus.from_wire(r) for r in _opt(d, "replicas", list, [])),
        )


@dataclass(frozen=True)
class RegisterAck(Message):
    KIND: ClassVar[Kind] = Kind.REGISTER_ACK
    node_id: str
    heartbeat_interval_s: float

    def to_wire(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "heartbeat_interval_s": float(self.heartbeat_interval_s)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> RegisterAck:
        return cls(_req(d, "node_id", str), float(_req(d, "heartbeat_interval_s", (int, float))))


@dataclass(frozen=True)
class Reregister(Message):
    """Head → agent, in answer to a heartbeat or event from a node it does not know (declared lost while the agent
    was stalled, or the head restarted): register again now, instead of after the agent's own liveness runs out."""

    KIND: ClassVar[Kind] = Kind.REREGISTER
    node_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"node_id": self.node_id}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Reregister:
        return cls(_req(d, "node_id", str))


@dataclass(frozen=True)
class Heartbeat(Message):
    """Sent both ways. From an agent it carries its replicas' status; from the head, `replicas` is empty."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    node_id: str
    replicas: tuple[ReplicaStatus, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "replicas": [r.to_wire() for r in self.replicas]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Heartbeat:
        return cls(
            node_id=_req(d, "node_id", str),
            replicas=tuple(ReplicaStatus.from_wire(r) for r in _req(d, "replicas", list)),
        )


@dataclass(frozen=True)
class StartReplica(Message):
    KIND: ClassVar[Kind] = Kind.START_REPLICA
    replica_id: str
    deployment: str
    engine: str  # "sim" or "vllm"
    engine_args: dict[str, Any]
    max_concurrency: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "deployment": self.deployment,
            "engine": self.engine,
            "engine_args": self.engine_args,
            "max_concurrency": self.max_concurrency,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StartReplica:
        return cls(
            replica_id=_req(d, "replica_id", str),
            deployment=_req(d, "deployment", str),
            engine=_req(d, "engine", str),
            engine_args=_req(d, "engine_args", dict),
            max_concurrency=_req(d, "max_concurrency", int),
        )


@dataclass(frozen=True)
class StopReplica(Message):
    KIND: ClassVar[Kind] = Kind.STOP_REPLICA
    replica_id: str
    drain: bool = True  # let open requests finish (bounded by the agent's drain timeout) before stopping

    def to_wire(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "drain": self.drain}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> StopReplica:
        return cls(_req(d, "replica_id", str), _opt(d, "drain", bool, True))


@dataclass(frozen=True)
class ReplicaEvent(Message):
    """Agent → head at once on a replica state change (READY, DRAINING, EXITED), not waiting for a heartbeat."""

    KIND: ClassVar[Kind] = Kind.REPLICA_EVENT
    node_id: str
    replica: ReplicaStatus

    def to_wire(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "replica": self.replica.to_wire()}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ReplicaEvent:
        return cls(_req(d, "node_id", str), ReplicaStatus.from_wire(_req(d, "replica", dict)))


@dataclass(frozen=True)
class SnapshotDeployment:
    """One deployment in a routing snapshot: its proxy-side settings and its routable replicas (wire order)."""

    max_model_len: int  # context length in tokens, the smallest any replica reported (0 = unknown)
    first_token_timeout_s: float  # the proxy ends a call with no token by then (0 = no limit)
    idle_timeout_s: float  # ... or with no token for this long after one (0 = no limit)
    replicas: tuple[SnapshotReplica, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "max_model_len": self.max_model_len,
            "first_token_timeout_s": float(self.first_token_timeout_s),
            "idle_timeout_s": float(self.idle_timeout_s),
            "replicas": [r.to_wire() for r in self.replicas],
        }

    @classmethod
    def from_wire(cls, d: Any) -> SnapshotDeployment:
        if not isinstance(d, dict):
            raise MessageError("snapshot deployment must be a map")
        return cls(
            max_model_len=_non_negative(d, "max_model_len", _req(d, "max_model_len", int)),
            first_token_timeout_s=_non_negative(
                d, "first_token_timeout_s", float(_req(d, "first_token_timeout_s", (int, float)))
            ),
            idle_timeout_s=_non_negative(d, "idle_timeout_s", float(_req(d, "idle_timeout_s", (int, float)))),
            replicas=tuple(SnapshotReplica.from_wire(r) for r in _req(d, "replicas", list)),
        )


@dataclass(frozen=True)
class Snapshot(Message):
    """A full routing snapshot. `version` grows strictly within one head's life and across restarts on the same
    database; `head_id` names the head's incarnation, so a subscriber can tell a head on a new database (whose
    versions start low again) from a stale message."""

    KIND: ClassVar[Kind] = Kind.SNAPSHOT
    head_id: str
    epoch: int
    version: int
    deployments: dict[str, SnapshotDeployment]

    def replicas(self, deployment: str) -> tuple[SnapshotReplica, ...]:
        """The deployment's replicas; none when the snapshot does not name it."""
        d = self.deployments.get(deployment)
        return d.replicas if d is not None else ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "head_id": self.head_id,
            "epoch": self.epoch,
            "version": self.version,
            "deployments": {name: d.to_wire() for name, d in self.deployments.items()},
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Snapshot:
        deps = _req(d, "deployments", dict)
        out: dict[str, SnapshotDeployment] = {}
        for name, dep in deps.items():
            if not isinstance(name, str):
                raise MessageError("deployment names must be strings")
            out[name] = SnapshotDeployment.from_wire(dep)
        return cls(_req(d, "head_id", str), _req(d, "epoch", int), _req(d, "version", int), out)


@dataclass(frozen=True)
class SnapshotRequest(Message):
    """A subscriber asks for the full snapshot (at start, and on a gap); answered with a SNAPSHOT."""

    KIND: ClassVar[Kind] = Kind.SNAPSHOT_REQUEST
    have_version: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"have_version": self.have_version}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SnapshotRequest:
        return cls(_opt(d, "have_version", int, 0))


@dataclass(frozen=True)
class AdminRequest(Message):
    """CLI → head. `op` is one of deploy, scale, delete, status; `args` its arguments."""

    KIND: ClassVar[Kind] = Kind.ADMIN_REQUEST
    request_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "op": self.op, "args": self.args}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AdminRequest:
        return cls(_req(d, "request_id", int), _req(d, "op", str), _opt(d, "args", dict, {}))


@dataclass(frozen=True)
class AdminReply(Message):
    KIND: ClassVar[Kind] = Kind.ADMIN_REPLY
    request_id: int
    ok: bool
    error: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "ok": self.ok, "error": self.error, "data": self.data}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> AdminReply:
        return cls(
            _req(d, "request_id", int), _req(d, "ok", bool), _opt(d, "error", str, ""), _opt(d, "data", dict, {})
        )


MESSAGE_TYPES: dict[Kind, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Register,
        RegisterAck,
        Reregister,
        Heartbeat,
        StartReplica,
        StopReplica,
        ReplicaEvent,
        Snapshot,
        SnapshotRequest,
        AdminRequest,
        AdminReply,
    )
}


def decode(frames: list[bytes]) -> Message:
    """Decode [kind, payload] into its typed message; raises MessageError on anything malformed."""
    if len(frames) != 2:
        raise MessageError(f"expected 2 frames (kind, payload), got {len(frames)}")
    kind_frame, payload = frames
    if len(kind_frame) != 1:
        raise MessageError("kind frame must be one byte")
    try:
        kind = Kind(kind_frame[0])
    except ValueError:
        raise MessageError(f"unknown message kind 0x{kind_frame[0]:02x}") from None
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        d = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise MessageError(f"payload is not MessagePack: {e}") from None
    if not isinstance(d, dict):
        raise MessageError("payload must be a map")
    version = d.pop("v", None)
    if version != WIRE_VERSION:
        raise MessageError(f"wire version {version!r} is not {WIRE_VERSION}")
    try:
        return MESSAGE_TYPES[kind].from_wire(d)
    except MessageError:
        raise
    except (ValueError, TypeError) as e:
        raise MessageError(f"bad {kind.name}: {e}") from None


def decode_as(cls: type[M], frames: list[bytes]) -> M:
    """Decode and check the message is of the expected type."""
    msg = decode(frames)
    if not isinstance(msg, cls):
        raise MessageError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
