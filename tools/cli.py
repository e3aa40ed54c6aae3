"""`tokenbus`: one entry point, a subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from tools import admin_cmds, apply, chat, keys, tiny_model, top, up
from tools.bench import run as bench

# run by another module's own argument parser: everything after the name is passed through untouched
PASSTHROUGH = ("head", "agent")


def _passthrough(name: str) -> Callable[[list[str]], int]:
    # imported on use: `tokenbus bench` must not pay for (or depend on) the control plane's imports
    if name == "head":
        from head import main as head_main

        return head_main
    from node_agent import main as agent_main

    return agent_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbus", description="tokenbus: distributed LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("head", help="run the head controller (tokenbus head --help)")
    sub.add_parser("agent", help="run a node agent (tokenbus agent --help)")
    up.add_parser(sub)
    admin_cmds.add_parsers(sub)
    apply.add_parser(sub)
    bench.add_parser(sub)
    tiny_model.add_parser(sub)
    keys.add_parser(sub)
    top.add_parser(sub)
    chat.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0])(argv[1:])
    opts = build_parser().parse_args(argv)
    return opts.func(opts)
