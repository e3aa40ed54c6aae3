"""`python -m model_worker --replica-id ID --engine sim|vllm --engine-args JSON --req-ring M,D,S --resp-ring M,D,S`."""

from __future__ import annotations

import sys

import uvloop

from bus.log_setup import configure
from model_worker.worker import parse_args, serve


def main(argv: list[str] | None = None) -> int:
    configure("model_worker")
    return uvloop.run(serve(parse_args(argv)))


# vLLM's engine start spawns processes that re-import the main module: only the real entry point may run.
if __name__ == "__main__":
    sys.exit(main())
