"""`tokenbus top`: the live cluster in a full-screen terminal view (data: tools/top_data.py, numbers:
tools/top_window.py, drawing: tools/top_render.py).

The screen thread only draws and reads keys; it redraws after each poll (the collector wakes it through a pipe) and
after each key. Keys are read in cbreak mode, and the terminal is given back as it was on every way out: `q`,
Ctrl-C, SIGTERM, SIGHUP (the SSH session closed), or an exception.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from bus.curve import CurveKeyError, add_client_args, client_keys
from bus.endpoints import DEFAULT_ROUTER
from tools.arg_types import positive_float

if TYPE_CHECKING:
    from tools.top_data import Collector

API_KEY_ENV = "TOKENBUS_API_KEY"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("top", help="the live cluster: nodes, deployments, replicas, proxies, rates and latencies")
    p.add_argument("--head", default=DEFAULT_ROUTER, help=f"the head's ROUTER endpoint (default {DEFAULT_ROUTER})")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="S", help="seconds between polls")
    p.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="also read this proxy's /metrics (one the head does not list); repeatable",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"the key for proxies started with --metrics-auth (default ${API_KEY_ENV} when set)",
    )
    add_client_args(p, "cli")
    p.set_defaults(func=main)


def main(opts: argparse.Namespace) -> int:
    # imported on use: every other command would pay for aiohttp and prometheus_client otherwise
    from rich.console import Console, Group
    from rich.live import Live

    from tools.top_data import FETCH_TIMEOUT_S, Collector
    from tools.top_render import Ui, render

    try:
        keys = client_keys(opts)
    except CurveKeyError as e:
        print(f"top: {e}", file=sys.stderr)
        return 1
    # the bus client logs dropped messages; on this screen a log line would only tear it
    logging.getLogger().addHandler(logging.NullHandler())
    collector = Collector(opts.head, keys, opts.interval, opts.proxy, opts.api_key)
    collector.start()
    console = Console()
    ui = Ui()
    try:
        with _terminal() as keys_fd, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                width, height = console.size
                live.update(Group(*render(collector.view, ui, width, height)), refresh=True)
                for key in _wait(keys_fd, collector, timeout=FETCH_TIMEOUT_S + opts.interval):
                    if key == "q":
                        return 0
                    ui.press(key)
    except KeyboardInterrupt:
        return 0
    finally:
        collector.stop()


def _wait(keys_fd: int | None, collector: Collector, timeout: float) -> list[str]:
    """The keys pressed, after waiting for a key or the next poll (or `timeout`, to redraw ages anyway)."""
    fds = [collector.wake_fd] + ([keys_fd] if keys_fd is not None else [])
    ready, _, _ = select.select(fds, [], [], timeout)
    if collector.wake_fd in ready:
        collector.drain_wake()
    if keys_fd is not None and keys_fd in ready:
        data = os.read(keys_fd, 64)
        if not data:  # the terminal is gone
            return ["q"]
        return list(data.decode(errors="replace"))
    return []


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _terminal() -> Iterator[int | None]:
    """stdin in cbreak mode (keys one by one, not echoed) for the block; its fd, or None when it is no terminal.

    SIGTERM and SIGHUP become SystemExit, so that the block's exits (the screen's and the terminal's) run."""
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield fd
    finally:
        if fd is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
