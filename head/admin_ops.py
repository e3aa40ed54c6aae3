"""Admin requests (deploy, scale, delete, status): argument validation, then the change to store and state.

Every refusal is an AdminReply with ok=false and an error a person can act on; nothing here raises to the loop.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Set as AbstractSet
from typing import Any

from head.state import ClusterState
from head.store import Deployment, Store
from schemas.messages import (
    DEFAULT_FIRST_TOKEN_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENCY,
    AdminReply,
    AdminRequest,
)

log = logging.getLogger("head")

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ENGINES = ("sim", "vllm")
MAX_REPLICAS = 1024
MAX_ENGINE_ARGS_BYTES = 64 * 1024
MAX_TIMEOUT_S = 24 * 3600.0  # a stream deadline beyond a day is a typo; 0 already means "no limit"


class InvalidArgs(ValueError):
    pass


def _check_keys(args: dict[str, Any], required: AbstractSet[str], optional: AbstractSet[str] = frozenset()) -> None:
    missing = sorted(required - set(args))
    if missing:
        raise InvalidArgs(f"missing argument(s): {', '.join(missing)}")
    unknown = sorted(str(k) for k in set(args) - required - optional)
    if unknown:
        raise InvalidArgs(f"unknown argument(s): {', '.join(unknown)}")


def _name(args: dict[str, Any]) -> str:
    name = args["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgs(f"name must be 1-64 characters of [a-zA-Z0-9_-], got {name!r}")
    return name


def _int(args: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgs(f"{key} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgs(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def _seconds(args: dict[str, Any], key: str, default: float) -> float:
    if key not in args:
        return default
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgs(f"{key} must be a number of seconds, got {type(value).__name__}")
    if not 0 <= value <= MAX_TIMEOUT_S:  # also refuses NaN
        raise InvalidArgs(f"{key} must be between 0 (no limit) and {MAX_TIMEOUT_S:.0f}, got {value}")
    return float(value)


def _deploy(args: dict[str, Any], state: ClusterState, store: Store) -> dict[str, Any]:
    _check_keys(
        args,
        {"name", "engine"},
        {"engine_args", "replicas", "max_concurrency", "first_token_timeout_s", "idle_timeout_s"},
    )
    name = _name(args)
    engine = args["engine"]
    if engine not in ENGINES:
        raise InvalidArgs(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    engine_args = args.get("engine_args", {})
    if not isinstance(engine_args, dict):
        raise InvalidArgs(f"engine_args must be a map, got {type(engine_args).__name__}")
    try:
        encoded = json.dumps(engine_args)  # stored as JSON and passed to the worker as JSON
    except (TypeError, ValueError) as e:
        raise InvalidArgs(f"engine_args must be JSON-compatible: {e}") from None
    if len(encoded) > MAX_ENGINE_ARGS_BYTES:
        raise InvalidArgs(f"engine_args is {len(encoded)} bytes of JSON, more than {MAX_ENGINE_ARGS_BYTES}")
    replicas = _int(args, "replicas", 0, MAX_REPLICAS) if "replicas" in args else 1
    mc = _int(args, "max_concurrency", 1, 1 << 20) if "max_concurrency" in args else DEFAULT_MAX_CONCURRENCY
    first_token = _seconds(args, "first_token_timeout_s", DEFAULT_FIRST_TOKEN_TIMEOUT_S)
    idle = _seconds(args, "idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    d = Deployment(name, engine, engine_args, replicas, mc, first_token, idle)
    previous = state.deployments.get(name)
    store.put_deployment(d)
    state.deployments[name] = d
    state.adopted.discard(name)  # its adopted replicas now count toward the spec (the oldest READY are kept)
    state.backoff.pop(name, None)  # a new spec deserves an immediate try
    log.info(
        "deployment %s %s: %d x %s %s, max_concurrency %d, first-token timeout %g s, idle timeout %g s",
        name,
        "updated" if previous else "created",
        replicas,
        engine,
        encoded,
        mc,
        first_token,
        idle,
    )
    return {}


def _scale(args: dict[str, Any], state: ClusterState, store: Store) -> dict[str, Any]:
    _check_keys(args, {"name", "replicas"})
    name = _name(args)
    replicas = _int(args, "replicas", 0, MAX_REPLICAS)
    d = state.deployments.get(name)
    if d is None and name in state.adopted:
        raise InvalidArgs(f"deployment {name!r} is only adopted (its replicas run, this head has no spec): deploy it")
    if d is None:
        raise InvalidArgs(f"no deployment named {name!r}")
    old = d.replicas
    d.replicas = replicas
    store.put_deployment(d)
    log.info("deployment %s scaled from %d to %d replicas", name, old, replicas)
    return {}


def _delete(args: dict[str, Any], state: ClusterState, store: Store) -> dict[str, Any]:
    _check_keys(args, {"name"})
    name = _name(args)
    if name in state.adopted:  # known only from its replicas: deleting it stops them
        state.adopted.discard(name)
        log.info("adopted deployment %s deleted", name)
        return {}
    if name not in state.deployments:
        raise InvalidArgs(f"no deployment named {name!r}")
    store.delete_deployment(name)
    del state.deployments[name]
    state.backoff.pop(name, None)
    state.unplaced.discard(name)
    log.info("deployment %s deleted", name)
    return {}


def handle_admin(
    req: AdminRequest, state: ClusterState, store: Store, status_extra: dict[str, Any], now: float
) -> tuple[AdminReply, bool]:
    """The reply, and whether the desired state changed (reconcile and publish then)."""
    try:
        if req.op == "status":
            _check_keys(req.args, set())
            return AdminReply(req.request_id, True, data={**status_extra, **state.status(now)}), False
        ops = {"deploy": _deploy, "scale": _scale, "delete": _delete}
        op = ops.get(req.op)
        if op is None:
            raise InvalidArgs(f"unknown op {req.op!r}; known: deploy, scale, delete, status")
        return AdminReply(req.request_id, True, data=op(req.args, state, store)), True
    except InvalidArgs as e:
        return AdminReply(req.request_id, False, error=f"{req.op}: {e}"), False
