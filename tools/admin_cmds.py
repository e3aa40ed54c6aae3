"""`tokenbus deploy | scale | delete | status`: admin requests to the head over the bus."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from rich.console import Console

from bus.curve import ClientKeys, CurveKeyError, add_client_args, client_keys
from bus.endpoints import DEFAULT_ROUTER as DEFAULT_HEAD
from schemas.messages import DEFAULT_FIRST_TOKEN_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONCURRENCY
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
    p = sub.add_parser("deploy", help="create or update a deployment")
    p.add_argument("name")
    p.add_argument("--engine", default="sim", choices=("sim", "vllm"))
    p.add_argument("--replicas", type=non_negative_int, default=1)
    p.add_argument(
        "--max-concurrency", type=positive_int, default=DEFAULT_MAX_CONCURRENCY, help="open requests per replica"
    )
    # unset: the head applies its default (schemas/messages.py), as for any deploy request without them
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
        console.print(f"[red]{op} failed:[/red] {e or f'no answer from the head at {opts.head} in {opts.timeout} s'}")
        return None


def deploy(opts: argparse.Namespace) -> int:
    console = Console()
    args: dict[str, Any] = {
        "name": opts.name,
        "engine": opts.engine,
        "engine_args": dict(opts.engine_arg),
        "replicas": opts.replicas,
        "max_concurrency": opts.max_concurrency,
    }
    for key, value in (("first_token_timeout_s", opts.first_token_timeout), ("idle_timeout_s", opts.idle_timeout)):
        if value is not None:
            args[key] = value
    if _call(opts, "deploy", args, console) is None:
        return 1
    console.print(f"deployment [bold]{opts.name}[/bold]: {opts.replicas} x {opts.engine} {args['engine_args']}")
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
    console = Console()
    data = _call(opts, "status", {}, console)
    if data is None:
        return 1
    for table in status_tables(data):
        console.print(table)
    return 0
