"""Bus messages: each wire type declared once, as a msgspec Struct, which both encodes it and validates it on decode.

A bus message travels as two ZeroMQ frames: one byte naming its kind, then its MessagePack payload, a map whose
first key "v" is the wire version, then the fields in their declared order (the golden vectors and the C++ reader
depend on that order). Decoding goes straight to the kind's type and checks every field's type and bounds (a bool
is not an int, a count is not negative), so a bad peer gets a `MessageError` naming the field instead of a crash
deep in a handler. A field added with a default is optional on decode: older peers that omit it still decode.
"""

from __future__ import annotations

import enum
import functools
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from schemas.deployment import Concurrency, Seconds

WIRE_VERSION = 1
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # any bus payload larger than this is refused unread
MAX_ID_CHARS = 256  # node, replica and head ids, hosts, addresses, deployment and op names on the wire

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
Short = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]  # may be empty: a replica with no address yet
Count = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


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
    PROXY_REPORT = 0x12
    ADMIN_REQUEST = 0x20
    ADMIN_REPLY = 0x21


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"  # processes spawned, health check not yet passed
    READY = "READY"  # serving; routable
    DRAINING = "DRAINING"  # finishing open requests; not given new ones
    EXITED = "EXITED"  # processes gone


W = TypeVar("W", bound="Wire")


@functools.cache
def _float_fields(cls: type[Wire]) -> tuple[str, ...]:
    return tuple(f.name for f in msgspec.inspect.type_info(cls).fields if isinstance(f.type, msgspec.inspect.FloatType))


class Wire(msgspec.Struct, frozen=True):
    """A message or a part of one."""

    def __post_init__(self) -> None:
        # MessagePack keeps 1 and 1.0 apart, and the wire says float64 for these fields (the C++ reader, the golden
        # vectors): an int given by Python code is stored as the float it stands for. Decoding already does this.
        for name in _float_fields(type(self)):
            value = getattr(self, name)
            if type(value) is not float:
                msgspec.structs.force_setattr(self, name, float(value))

    def to_wire(self) -> dict[str, Any]:
        """The payload as plain data, wire names as keys (an agent's state file keeps its StartReplica so)."""
        return msgspec.msgpack.decode(msgspec.msgpack.encode(self))  # lists, not tuples: what a file reads back

    @classmethod
    def from_wire(cls: type[W], data: Any) -> W:
        """The inverse of `to_wire`, validated like a decode."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as e:
            raise MessageError(f"bad {cls.__name__}: {e}") from None


class ReplicaLoad(Wire, frozen=True):
    running: Count = 0
    waiting: Count = 0
    kv_usage: NonNegative = 0.0


class GpuInfo(Wire, frozen=True):
    """One GPU of a node, as its agent found it (NVML) or was told (`--gpus`)."""

    index: Count  # its CUDA device index on the node: what CUDA_VISIBLE_DEVICES names
    name: Short
    memory_bytes: Count


class ReplicaStatus(Wire, frozen=True):
    """What an agent knows of one of its replicas."""

    replica_id: Id = msgspec.field(name="id")
    deployment: Short  # empty in the EXITED report of a replica the agent failed to start
    state: ReplicaState
    grpc_address: Short = msgspec.field(default="", name="addr")
    load: ReplicaLoad = msgspec.field(default_factory=ReplicaLoad)
    exit_code: int | None = None  # negative: the signal that ended it
    detail: str = ""
    healthy: bool = True  # the agent's active health verdict: false after 3 failed checks in a row
    max_model_len: Count = 0  # context length in tokens from the replica's gRPC Health (0 = not known yet)
    started_at: NonNegative = 0.0  # unix seconds when the agent spawned it: a restarted head keeps the oldest
    gpus: tuple[Count, ...] = ()  # the node's GPU indices it was started with
    replica_metrics: Short = msgspec.field(default="", name="rmetrics")  # its binary's /metrics "host:port" ("": none)
    worker_metrics: Short = msgspec.field(default="", name="wmetrics")  # its worker's /metrics "host:port" ("": none)


class SnapshotReplica(Wire, frozen=True):
    """One routable replica in a routing snapshot."""

    replica_id: Id = msgspec.field(name="id")
    node: Id
    grpc_address: Short = msgspec.field(name="addr")
    state: ReplicaState
    max_concurrency: Concurrency
    load: ReplicaLoad
    healthy: bool

    def __post_init__(self) -> None:
        if self.state not in (ReplicaState.READY, ReplicaState.DRAINING):
            raise ValueError(f"snapshot replica state must be READY or DRAINING, got {self.state.value}")
        super().__post_init__()


class SnapshotDeployment(Wire, frozen=True):
    """One deployment in a routing snapshot: its proxy-side settings and its routable replicas."""

    max_model_len: Count  # context length in tokens, the smallest any replica reported (0 = unknown)
    first_token_timeout_s: Seconds  # the proxy ends a call with no token by then (0 = no limit)
    idle_timeout_s: Seconds  # ... or with no token for this long after one (0 = no limit)
    replicas: tuple[SnapshotReplica, ...] = ()


class Message(Wire, frozen=True, tag_field="v", tag=WIRE_VERSION):
    """Base of every bus message: its `KIND`; the wire version rides as the payload's first key ("v", the tag)."""

    KIND: ClassVar[Kind]

    def encode(self) -> list[bytes]:
        """The two frames: kind byte, then the payload."""
        return [bytes([self.KIND]), _ENCODER.encode(self)]


class Register(Message, frozen=True):
    KIND: ClassVar[Kind] = Kind.REGISTER
    node_id: Id
    host: Short
    cpu_slots: Count
    gpus: tuple[GpuInfo, ...]
    memory_bytes: Count
    replicas: tuple[ReplicaStatus, ...] = ()  # replicas still running after an agent reconnects
    metrics: Short = ""  # the agent's /metrics "host:port" ("": none)


class RegisterAck(Message, frozen=True):
    KIND: ClassVar[Kind] = Kind.REGISTER_ACK
    node_id: Id
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)]


class Reregister(Message, frozen=True):
    """Head → agent, in answer to a heartbeat or event from a node it does not know (declared lost while the agent
    was stalled, or the head restarted): register again now, instead of after the agent's own liveness runs out."""

    KIND: ClassVar[Kind] = Kind.REREGISTER
    node_id: Id


class Heartbeat(Message, frozen=True):
    """Sent both ways. From an agent it carries its replicas' status; from the head, `replicas` is empty."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    node_id: Id
    replicas: tuple[ReplicaStatus, ...] = ()


class StartReplica(Message, frozen=True):
    KIND: ClassVar[Kind] = Kind.START_REPLICA
    replica_id: Id
    deployment: Short
    engine: Short  # "sim" or "vllm": schemas.deployment.Engine's value
    engine_args: dict[str, Any]
    max_concurrency: Concurrency
    gpus: tuple[Count, ...] = ()  # the node's GPU indices it gets (CUDA_VISIBLE_DEVICES)


class StopReplica(Message, frozen=True):
    KIND: ClassVar[Kind] = Kind.STOP_REPLICA
    replica_id: Id
    drain: bool = True  # let open requests finish (bounded by the agent's drain timeout) before stopping


class ReplicaEvent(Message, frozen=True):
    """Agent → head at once on a replica state change (READY, DRAINING, EXITED), not waiting for a heartbeat."""

    KIND: ClassVar[Kind] = Kind.REPLICA_EVENT
    node_id: Id
    replica: ReplicaStatus


class Snapshot(Message, frozen=True):
    """A full routing snapshot. `version` grows strictly within one head's life and across restarts on the same
    database; `head_id` names the head's incarnation, so a subscriber can tell a head on a new database (whose
    versions start low again) from a stale message."""

    KIND: ClassVar[Kind] = Kind.SNAPSHOT
    head_id: Id
    epoch: Count
    version: Count
    deployments: dict[Short, SnapshotDeployment]

    def replicas(self, deployment: str) -> tuple[SnapshotReplica, ...]:
        """The deployment's replicas; none when the snapshot does not name it."""
        d = self.deployments.get(deployment)
        return d.replicas if d is not None else ()


class SnapshotRequest(Message, frozen=True):
    """A subscriber asks for the full snapshot (at start, and on a gap); answered with a SNAPSHOT."""

    KIND: ClassVar[Kind] = Kind.SNAPSHOT_REQUEST
    have_version: Count = 0


class ProxyReport(Message, frozen=True):
    """Proxy → head on its DEALER, at start and every second: where it serves and how far it follows the head. The
    head lists the proxies it heard from in the last 10 s in `status` (for `tokenbus top` and Prometheus)."""

    KIND: ClassVar[Kind] = Kind.PROXY_REPORT
    proxy_id: Id
    addr: Short  # its HTTP listen address as clients reach it, "host:port"; its /metrics is there too
    snapshot_version: Count  # of the routing snapshot it applied last (0: none yet)
    open_streams: Count


class AdminRequest(Message, frozen=True):
    """CLI → head. `op` is one of deploy, scale, delete, status; `args` its arguments (schemas/admin.py types them)."""

    KIND: ClassVar[Kind] = Kind.ADMIN_REQUEST
    request_id: Count
    op: Short
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class AdminReply(Message, frozen=True):
    KIND: ClassVar[Kind] = Kind.ADMIN_REPLY
    request_id: Count
    ok: bool
    error: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Register,
    RegisterAck,
    Reregister,
    Heartbeat,
    StartReplica,
    StopReplica,
    ReplicaEvent,
    Snapshot,
    SnapshotRequest,
    ProxyReport,
    AdminRequest,
    AdminReply,
)
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[Kind, msgspec.msgpack.Decoder[Any]] = {cls.KIND: msgspec.msgpack.Decoder(cls) for cls in MESSAGE_TYPES}

M = TypeVar("M", bound=Message)


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
        msg: Message = _DECODERS[kind].decode(payload)
    except msgspec.ValidationError as e:  # a DecodeError too: caught first, for the field it names
        raise MessageError(f"bad {kind.name}: {e}") from None
    except msgspec.DecodeError as e:
        raise MessageError(f"{kind.name} payload is not MessagePack: {e}") from None
    return msg


def decode_as(cls: type[M], frames: list[bytes]) -> M:
    """Decode and check the message is of the expected type."""
    msg = decode(frames)
    if not isinstance(msg, cls):
        raise MessageError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
