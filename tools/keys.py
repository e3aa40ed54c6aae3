"""`tokenbus keys gen DIR`: the CURVE key pairs of a closed control plane (bus/curve.py).

Copy DIR whole to the head's machine; to every other machine copy `head.key` and the key pair of the client that
runs there (`agent.key` and `agent.key_secret` on a GPU node, ...). The head accepts the clients in DIR/authorized/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bus.curve import DEFAULT_CLIENTS, CurveKeyError, generate


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="make the key pairs of a closed control plane (CURVE)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    gen = keys_sub.add_parser(
        "gen",
        help="write the head's and the clients' key pairs into DIR (existing ones are kept)",
        description="Writes DIR/head.key(_secret), DIR/NAME.key(_secret) per client and DIR/authorized/NAME.key, the "
        "public keys the head accepts; files with a secret key are readable by their owner only. Keys already in DIR "
        "are kept: run it again with --client NAME to add a client (the head reads DIR/authorized/ when it starts).",
    )
    gen.add_argument("dir", type=Path, metavar="DIR")
    gen.add_argument(
        "--client",
        action="append",
        metavar="NAME",
        help=f"a client's key name (repeatable; default {' '.join(DEFAULT_CLIENTS)})",
    )
    gen.set_defaults(func=gen_keys)


def gen_keys(opts: argparse.Namespace) -> int:
    try:
        lines = generate(opts.dir, opts.client or list(DEFAULT_CLIENTS))
    except (CurveKeyError, OSError) as e:
        print(f"keys gen failed: {e}")
        return 1
    for line in lines:
        print(line)
    return 0
