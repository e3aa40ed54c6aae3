"""The live display while a bench runs: the stage, elapsed time, requests in flight, requests, failures, tok/s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from rich.console import Console, RenderableType
from rich.live import Live as RichLive
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tools.bench.load import BenchConfig
from tools.bench.records import Live

T = TypeVar("T")
REFRESH_S = 0.5


def render(cfg: BenchConfig, live: Live, tokens_per_s: float, now: float) -> RenderableType:
    if live.started_at is None:
        return Text("starting...")
    stage = cfg.stages[live.stage]
    run_s = now - live.started_at
    stage_s = now - (live.stage_started_at or live.started_at)
    grid = Table.grid()
    grid.add_row(
        f"stage {live.stage}: {stage.describe()}   {stage_s:5.1f}/{stage.duration_s:g} s   "
        f"run {run_s:5.1f}/{cfg.duration_s:g} s ({len(cfg.stages)} stages)"
    )
    grid.add_row(ProgressBar(total=cfg.duration_s, completed=min(run_s, cfg.duration_s), width=60))
    grid.add_row(
        f"in flight {live.in_flight}   requests {live.requests}   failures {live.failures}   {tokens_per_s:8.0f} tok/s"
    )
    return grid


async def with_progress(cfg: BenchConfig, live: Live, console: Console, work: Awaitable[T]) -> T:
    """Awaits `work` under the live display of `live` (transient: the result tables follow it)."""

    async def tick(display: RichLive) -> None:
        last_at, last_tokens = time.perf_counter(), live.tokens
        while True:
            await asyncio.sleep(REFRESH_S)
            now = time.perf_counter()
            rate = (live.tokens - last_tokens) / (now - last_at)
            last_at, last_tokens = now, live.tokens
            display.update(render(cfg, live, rate, now))

    with RichLive(
        render(cfg, live, 0.0, time.perf_counter()), console=console, refresh_per_second=4, transient=True
    ) as display:
        ticker = asyncio.create_task(tick(display), name="bench-progress")
        try:
            return await work
        finally:
            ticker.cancel()
