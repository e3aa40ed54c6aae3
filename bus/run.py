"""Running a service coroutine as a process's main: uvloop; the first SIGTERM/SIGINT cancels it for a clean stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import uvloop


def run_until_signal(main: Coroutine[Any, Any, int]) -> int:
    async def runner() -> int:
        task = asyncio.create_task(main, name="main")
        loop = asyncio.get_running_loop()
        stopping = False

        def on_signal(sig: signal.Signals) -> None:
            nonlocal stopping
            if stopping:  # a second Ctrl-C must not cut the bounded shutdown short (it could leave children)
                logging.getLogger(__name__).info("%s: already stopping", sig.name)
                return
            stopping = True
            logging.getLogger(__name__).info("%s: stopping", sig.name)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    return uvloop.run(runner())
