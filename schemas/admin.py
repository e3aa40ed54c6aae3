"""Admin operations, CLI → head in an AdminRequest: each op's arguments and its reply data, declared once.

`deploy` takes a whole DeploymentSpec. The head decodes the arguments with `msgspec.convert`, so a wrong one is
refused naming its path (`$.replicas`), and checks its `status` answer against StatusReply before sending it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.deployment import DeploymentSpec, Name, Replicas
from schemas.messages import GpuInfo, ReplicaLoad, ReplicaState


class _Args(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An op's arguments: an unknown one is refused, not ignored (a typo must not pass for a default)."""


class ScaleArgs(_Args, frozen=True):
    name: Name
    replicas: Replicas


class DeleteArgs(_Args, frozen=True):
    name: Name


class StatusArgs(_Args, frozen=True):
    pass


class DeployReply(msgspec.Struct, frozen=True):
    changed: bool  # false: the spec equals the stored one, and nothing was done


class _Reply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Part of the status reply. Unknown fields are refused, so a field the head adds is declared here too."""


class HeadAddresses(_Reply, kw_only=True):
    router: str  # the endpoints clients connect to (the advertised address)
    pub: str
    metrics: str = ""  # its /metrics "host:port" ("" = none)


class NodeStatus(_Reply, kw_only=True):
    node_id: str
    host: str
    cpu_slots: int
    used_slots: int
    gpus: list[GpuInfo] = []
    free_gpus: list[int] = []  # indices of the GPUs no replica holds
    alive: bool
    last_seen_s: float
    lost_s: float | None  # how long ago it was declared lost; None while alive
    metrics: str = ""  # its agent's /metrics "host:port" ("" = none)


class ReplicaMetrics(_Reply, kw_only=True):
    """Where a replica's two processes serve /metrics, "host:port" ("" = not known yet)."""

    replica: str = ""  # the tokenbus-replica binary
    worker: str = ""  # its model worker


class ReplicaView(_Reply, kw_only=True):
    id: str
    node: str
    state: ReplicaState  # as routed: a READY replica the head is stopping shows DRAINING
    healthy: bool
    addr: str
    gpus: list[int] = []  # indices of its node's GPUs it holds
    load: ReplicaLoad
    metrics: ReplicaMetrics = msgspec.field(default_factory=ReplicaMetrics)


class DeploymentStatus(_Reply, kw_only=True):
    name: str
    adopted: bool  # run by agents, unknown to this head's database: no spec, settings are the defaults
    spec: DeploymentSpec | None = None  # as deployed (`tokenbus apply` compares it); None when adopted
    engine: str
    engine_args: dict[str, Any]
    replicas: int  # desired; the running count when adopted
    max_concurrency: int
    first_token_timeout_s: float
    idle_timeout_s: float
    max_model_len: int  # the smallest its replicas reported (0 = not known)
    ready: int
    unplaced: int = 0  # replicas wanted that no node has room for...
    unplaced_reason: str = ""  # ... and why
    restarts: int = 0  # its replicas that exited without being asked (and were replaced) since the head started
    replicas_list: list[ReplicaView]


class ProxyView(_Reply, kw_only=True):
    """A proxy that reported to the head in the last 10 s (PROXY_REPORT)."""

    id: str
    addr: str  # its HTTP address as clients reach it, "host:port"
    metrics: str  # where its /metrics is: the same address
    snapshot_version: int  # of the routing snapshot it applied last (0: none yet)
    open_streams: int
    last_seen_s: float  # since its last report


class StatusReply(_Reply, kw_only=True):
    head_id: str
    epoch: int
    version: int
    head: HeadAddresses | None = None
    synced: bool  # false while a starting head waits for its agents (it publishes nothing yet)
    nodes: list[NodeStatus]
    deployments: list[DeploymentStatus]
    proxies: list[ProxyView] = []
