"""`tokenbus deploy | scale | delete | status`: admin requests to the head over the bus."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import msgspec
from rich.console import Console
from rich.markup import escape

from bus.curve import ClientKeys, CurveKeyError, add_client_args, client_keys
from bus.endpoints import DEFAULT_ROUTER as DEFAULT_HEAD
from schemas.deployment import (
    DEFAULT_FIRST_TOKEN_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENCY,
    DeploymentSpec,
    Engine,
    Placement,
)
from tools.arg_types import non_negative_int, positive_int
from tools.status_view import status_tables

DEFAULT_TIMEOUT_S = 5.0


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses as JSON (5, 0.5, true, [..]), else the string itself."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"engine arg must be key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def seconds(text: str) -> float:
    """A stream timeout: >= 0, where 0 means no limit."""
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", default=DEFAULT_HEAD, help=f"the head's ROUTER endpoint (default {DEFAULT_HEAD})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the head")
    add_client_args(p, "cli")


def add_parsers(sub: Any) -> None:
    # A flag left out is left out of the spec, whose default (schemas/deployment.py) applies.
    p = sub.add_parser("deploy", help="create or update a deployment")
    p.add_argument("name")
    p.add_argument("--engine", default=Engine.SIM.value, choices=[engine.value for engine in Engine])
    p.add_argument("--replicas", type=non_negative_int, help="default 1")
    p.add_argument(
        "--gpus-per-replica",
        type=non_negative_int,
        metavar="N",
        help="GPUs each replica is placed on (default: tensor x pipeline parallel size for vllm, 0 for sim)",
    )
    p.add_argument(
        "--placement",
        choices=[policy.value for policy in Placement],
        help="spread replicas over nodes, or pack them onto the fullest nodes that fit (default spread)",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        help=f"open requests per replica (default {DEFAULT_MAX_CONCURRENCY})",
    )
    p.add_argument(
        "--first-token-timeout",
        type=seconds,
        metavar="S",
        help="the proxy ends a stream with an error when no token came in S seconds (0 = no limit; "
        f"default {DEFAULT_FIRST_TOKEN_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=seconds,
        metavar="S",
        help=f"... or when S seconds pass between two tokens (0 = no limit; default {DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        type=parse_engine_arg,
        default=[],
        metavar="KEY=VALUE",
        help="an engine argument (repeatable); VALUE is parsed as JSON when it can be",
    )
    _common(p)
    p.set_defaults(func=deploy)

    p = sub.add_parser("scale", help="change a deployment's replica count")
    p.add_argument("name")
    p.add_argument("replicas", type=non_negative_int)
    _common(p)
    p.set_defaults(func=scale)

    p = sub.add_parser("delete", help="remove a deployment and its replicas")
    p.add_argument("name")
    _common(p)
    p.set_defaults(func=delete)

    p = sub.add_parser("status", help="nodes, deployments, replicas, their state and load")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the head's status reply as JSON (schemas/admin.py StatusReply: every process's metrics address)",
    )
    _common(p)
    p.set_defaults(func=status)


async def admin_request(
    head: str, op: str, args: dict[str, Any], timeout: float, keys: ClientKeys | None = None
) -> dict[str, Any]:
    from bus.admin import AdminClient

    client = AdminClient(head, keys=keys)
    try:
        return await client.request(op, args, timeout)
    finally:
        client.close()


def _call(opts: argparse.Namespace, op: str, args: dict[str, Any], console: Console) -> dict[str, Any] | None:
    """The head's answer, or None after printing why there is none."""
    from bus.admin import AdminError

    try:
        return asyncio.run(admin_request(opts.head, op, args, opts.timeout, client_keys(opts)))
    except CurveKeyError as e:
        console.print(f"[red]{op} failed:[/red] {e}")
        return None
    except (AdminError, TimeoutError) as e:
        why = str(e) or f"no answer from the head at {opts.head} in {opts.timeout} s"
        console.print(f"[red]{op} failed:[/red] {escape(why)}")  # the head's words may hold brackets: `$.x[0]`
        return None


def deploy(opts: argparse.Namespace) -> int:
    console = Console()
    flags = {
        "replicas": opts.replicas,
        "gpus_per_replica": opts.gpus_per_replica,
        "placement": opts.placement,
        "max_concurrency": opts.max_concurrency,
        "first_token_timeout_s": opts.first_token_timeout,
        "idle_timeout_s": opts.idle_timeout,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        spec = msgspec.convert(
            {"name": opts.name, "engine": opts.engine, "engine_args": dict(opts.engine_arg), **given}, DeploymentSpec
        )
    except msgspec.ValidationError as e:  # what the head would answer, without asking it
        console.print(f"[red]deploy failed:[/red] {escape(str(e))}")
        return 1
    data = _call(opts, "deploy", msgspec.to_builtins(spec), console)
    if data is None:
        return 1
    what = "updated" if data.get("changed") else "unchanged"
    console.print(
        f"deployment [bold]{spec.name}[/bold] {what}: {spec.replicas} x {spec.engine.value} {spec.engine_args}"
    )
    return 0


def scale(opts: argparse.Namespace) -> int:
    console = Console()
    if _call(opts, "scale", {"name": opts.name, "replicas": opts.replicas}, console) is None:
        return 1
    console.print(f"deployment [bold]{opts.name}[/bold] scaled to {opts.replicas} replicas")
    return 0


def delete(opts: argparse.Namespace) -> int:
    console = Console()
    if _call(opts, "delete", {"name": opts.name}, console) is None:
        return 1
    console.print(f"deployment [bold]{opts.name}[/bold] deleted")
    return 0


def status(opts: argparse.Namespace) -> int:
    console = Console(stderr=opts.json)  # with --json, stdout is the JSON alone
    data = _call(opts, "status", {}, console)
    if data is None:
        return 1
    if opts.json:
        print(json.dumps(data, indent=1))
        return 0
    for table in status_tables(data):
        console.print(table)
    return 0
