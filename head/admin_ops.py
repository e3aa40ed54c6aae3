"""Admin requests (deploy, scale, delete, status): arguments decoded into their types (schemas/admin.py), then the
change to store and state.

Every refusal is an AdminReply with ok=false and an error a person can act on (a wrong argument named by its path,
`$.replicas`); nothing here raises to the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from head.state import ClusterState
from head.store import Store
from schemas.admin import DeleteArgs, DeployReply, ScaleArgs, StatusArgs, StatusReply
from schemas.deployment import DeploymentSpec
from schemas.messages import AdminReply, AdminRequest

log = logging.getLogger("head")

A = TypeVar("A", bound=msgspec.Struct)


class Refused(ValueError):
    pass


def _deploy(spec: DeploymentSpec, state: ClusterState, store: Store) -> tuple[dict[str, Any], bool]:
    previous = state.deployments.get(spec.name)
    if spec == previous:  # applying the same spec again is a no-op: no restart backoff reset, nothing logged
        return msgspec.to_builtins(DeployReply(changed=False)), False
    store.put_deployment(spec)
    state.deployments[spec.name] = spec
    state.adopted.discard(spec.name)  # its adopted replicas now count toward the spec (the oldest READY are kept)
    state.backoff.pop(spec.name, None)  # a new spec deserves an immediate try
    log.info(
        "deployment %s %s: %d x %s %s, %s GPUs each, %s placement, max_concurrency %d, first-token timeout %g s, "
        "idle timeout %g s",
        spec.name,
        "updated" if previous else "created",
        spec.replicas,
        spec.engine.value,
        msgspec.json.encode(spec.engine_args).decode(),
        spec.gpus_needed(),
        spec.placement.value,
        spec.max_concurrency,
        spec.first_token_timeout_s,
        spec.idle_timeout_s,
    )
    return msgspec.to_builtins(DeployReply(changed=True)), True


def _scale(args: ScaleArgs, state: ClusterState, store: Store) -> tuple[dict[str, Any], bool]:
    d = state.deployments.get(args.name)
    if d is None and args.name in state.adopted:
        raise Refused(f"deployment {args.name!r} is only adopted (its replicas run, this head has no spec): deploy it")
    if d is None:
        raise Refused(f"no deployment named {args.name!r}")
    old = d.replicas
    d.replicas = args.replicas
    store.put_deployment(d)
    log.info("deployment %s scaled from %d to %d replicas", args.name, old, args.replicas)
    return {}, True


def _delete(args: DeleteArgs, state: ClusterState, store: Store) -> tuple[dict[str, Any], bool]:
    name = args.name
    if name in state.adopted:  # known only from its replicas: deleting it stops them
        state.adopted.discard(name)
        log.info("adopted deployment %s deleted", name)
        return {}, True
    if name not in state.deployments:
        raise Refused(f"no deployment named {name!r}")
    store.delete_deployment(name)
    del state.deployments[name]
    state.backoff.pop(name, None)
    log.info("deployment %s deleted", name)
    return {}, True


_OPS: dict[str, tuple[type[Any], Callable[[Any, ClusterState, Store], tuple[dict[str, Any], bool]]]] = {
    "deploy": (DeploymentSpec, _deploy),
    "scale": (ScaleArgs, _scale),
    "delete": (DeleteArgs, _delete),
}


KNOWN_OPS = frozenset([*_OPS, "status"])


def _args(req: AdminRequest, typ: type[A]) -> A:
    try:
        return msgspec.convert(req.args, typ)
    except msgspec.ValidationError as e:
        raise Refused(str(e)) from None


def handle_admin(
    req: AdminRequest, state: ClusterState, store: Store, status_extra: dict[str, Any], now: float
) -> tuple[AdminReply, bool]:
    """The reply, and whether the desired state changed (reconcile and publish then)."""
    try:
        if req.op == "status":
            _args(req, StatusArgs)
            # checked against its declaration: a field the state reports but schemas/admin.py lacks fails here
            reply = msgspec.convert({**status_extra, **state.status(now)}, StatusReply)
            return AdminReply(req.request_id, True, data=msgspec.to_builtins(reply)), False
        if req.op not in _OPS:
            raise Refused(f"unknown op {req.op!r}; known: {', '.join(sorted(KNOWN_OPS))}")
        typ, op = _OPS[req.op]
        data, changed = op(_args(req, typ), state, store)
        return AdminReply(req.request_id, True, data=data), changed
    except Refused as e:
        return AdminReply(req.request_id, False, error=f"{req.op}: {e}"), False
